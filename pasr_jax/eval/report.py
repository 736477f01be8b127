"""Evaluation reports: results.json, summary tables (md/csv), plots, run comparison.

`summarize` turns per-item records into per-dataset rows (accuracy in %, average generated
tokens, refine rate, format rate). `compare` pairs several result dirs item by item against the
first: per-run accuracy with CI, tokens, truncation, format and refine rates; paired accuracy
differences with CI and McNemar p (`eval.stats`); how answers that refine move between
right and wrong relative to the reference (paper Figure 4); and what the refinements inside
each run's answers do (`eval.refine`: confirm / correct / rewrite, fixes and breaks within the
answer, refine rate by difficulty bucket and its gap, selectivity, fake slips).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

from pasr_jax.eval.benchmarks import BENCHMARKS, EvalError
from pasr_jax.eval.refine import refine_metrics
from pasr_jax.eval.stats import cmh_paired, mcnemar_exact, mean_ci

AVG = "average"


def summarize(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per-dataset rows (in first-seen order) plus an `average` row (mean over datasets).

  accuracy: mean score x 100 (XSum scores are 0..1 similarities); tokens: mean generated tokens
  per question (both turns for self-refine); refine_rate / format_rate: % of answers.
  """
  by_ds: dict[str, list[dict[str, Any]]] = {}
  for it in items:
    by_ds.setdefault(it["dataset"], []).append(it)
  rows = []
  for ds, its in by_ds.items():
    n = len(its)
    rows.append(dict(dataset=ds, n=n,
                     accuracy=100.0 * sum(i["score"] for i in its) / n,
                     tokens=sum(i["tokens"] for i in its) / n,
                     refine_rate=100.0 * sum(i["refine_count"] > 0 for i in its) / n,
                     format_rate=100.0 * sum(bool(i["format_ok"]) for i in its) / n))
  if rows:
    avg = dict(dataset=AVG, n=sum(r["n"] for r in rows))
    for k in ("accuracy", "tokens", "refine_rate", "format_rate"):
      avg[k] = sum(r[k] for r in rows) / len(rows)
    rows.append(avg)
  return rows


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def write_outputs(out_dir: str, items: list[dict[str, Any]], meta: dict[str, Any]) -> None:
  """results.json, summary.md, summary.csv and summary.png in `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  summary = summarize(items)
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(dict(meta=meta, summary=summary, items=items), f, indent=1, ensure_ascii=False)
  with open(os.path.join(out_dir, "summary.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=["dataset", "n", "accuracy", "tokens", "refine_rate",
                                      "format_rate"])
    w.writeheader()
    for r in summary:
      w.writerow({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
  table = _md_table(["dataset", "n", "accuracy %", "avg tokens", "refine %", "format ok %"],
                    [[r["dataset"], r["n"], f"{r['accuracy']:.1f}", f"{r['tokens']:.1f}",
                      f"{r['refine_rate']:.1f}", f"{r['format_rate']:.1f}"] for r in summary])
  with open(os.path.join(out_dir, "summary.md"), "w", encoding="utf-8") as f:
    f.write(f"# Evaluation: mode `{meta.get('mode')}`, model `{meta.get('model')}`\n\n"
            f"{table}\n\nGreedy decoding, max_tokens={meta.get('max_tokens')}, "
            f"limit={meta.get('limit') or 'all'}.\n")
  plot([(meta.get("label") or meta.get("mode") or "run", summary)],
       os.path.join(out_dir, "summary.png"))


def plot(runs: Sequence[tuple[str, list[dict[str, Any]]]], path: str) -> None:
  """Accuracy and average tokens per dataset, one bar per run, side by side."""
  # Lazily: the headless backend must be chosen before pyplot is imported (and only plotting
  # pays for matplotlib).
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  datasets = [r["dataset"] for r in runs[0][1]]
  x = np.arange(len(datasets))
  width = 0.8 / len(runs)
  fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(datasets)), 4))
  for ax, key, label in ((axes[0], "accuracy", "accuracy (%)"),
                         (axes[1], "tokens", "avg generated tokens")):
    for j, (name, rows) in enumerate(runs):
      vals = {r["dataset"]: r[key] for r in rows}
      ax.bar(x + (j - (len(runs) - 1) / 2) * width, [vals.get(d, 0.0) for d in datasets], width,
             label=name)
    ax.set_xticks(x, datasets, rotation=30, ha="right")
    ax.set_ylabel(label)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def load_run(run_dir: str) -> dict[str, Any]:
  """results.json of one evaluation output dir."""
  path = os.path.join(run_dir, "results.json")
  if not os.path.isfile(path):
    raise EvalError(f"{run_dir}: no results.json (not an evaluation output dir)")
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise EvalError(f"{path}: invalid JSON: {e}") from None


# --- comparing runs ---------------------------------------------------------------------------
Key = tuple[str, str]          # (dataset, item id): how items are paired across runs
ALL_PAIRS_UP_TO = 5            # arms; beyond this only each-vs-first and consecutive pairs


@dataclasses.dataclass(frozen=True)
class Arm:
  """One evaluation output dir: its label, mode, per-item records keyed by (dataset, id) and
  its meta (results.json)."""
  label: str
  run_dir: str
  mode: str
  items: dict[Key, dict[str, Any]]
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _labels(run_dirs: Sequence[str]) -> list[str]:
  """Dir names without an `eval_` prefix; the parent dirs' names where those collide
  (runs/experiment/<arm>/eval), else the paths as given."""
  paths = [os.path.normpath(d) for d in run_dirs]
  for names in ([os.path.basename(p).removeprefix("eval_") for p in paths],
                [os.path.basename(os.path.dirname(p)) for p in paths]):
    if all(names) and len(set(names)) == len(names):
      return names
  return list(run_dirs)


def load_arms(run_dirs: Sequence[str], labels: Sequence[str] | None = None) -> list[Arm]:
  """The runs in `run_dirs`, each holding the same items as the first (EvalError if not)."""
  if len(run_dirs) < 2:
    raise EvalError("compare needs at least two result dirs")
  if labels is not None and len(labels) != len(run_dirs):
    raise EvalError(f"config.labels has {len(labels)} names for {len(run_dirs)} result dirs")
  arms = []
  for label, d in zip(labels or _labels(run_dirs), run_dirs):
    run = load_run(d)
    items: dict[Key, dict[str, Any]] = {}
    for it in run["items"]:
      key = (it["dataset"], str(it["id"]))
      if key in items:
        raise EvalError(f"{d}: item {key[1]!r} of {key[0]!r} appears twice in results.json")
      items[key] = it
    arms.append(Arm(label, d, run["meta"].get("mode", "?"), items, run["meta"]))
  ref = arms[0]
  for arm in arms[1:]:
    if arm.items.keys() != ref.items.keys():
      only_ref = sorted(ref.items.keys() - arm.items.keys())
      only_arm = sorted(arm.items.keys() - ref.items.keys())
      example = (only_ref or only_arm)[0][1]
      raise EvalError(f"{ref.run_dir} and {arm.run_dir} hold different items ({len(only_ref)} "
                      f"only in the first, {len(only_arm)} only in the second, e.g. "
                      f"{example!r}); paired comparison needs the same items in every dir")
  return arms


def _truncated(it: dict[str, Any]) -> bool:
  return it.get("finish_reason") == "length"


def arm_row(arm: Arm) -> dict[str, Any]:
  """Pooled over all items of one arm: n, accuracy % (mean judge score) with its 95 % Wald
  interval, mean generated tokens, and the % of answers cut at max_tokens (finish reason
  `length`), in the answer format, and holding at least one refine block."""
  its = list(arm.items.values())
  n = len(its)
  acc, lo, hi = mean_ci([float(i["score"]) for i in its])
  return dict(label=arm.label, mode=arm.mode, n=n, accuracy=100 * acc, acc_lo=100 * lo,
              acc_hi=100 * hi, tokens=sum(i["tokens"] for i in its) / n,
              truncated=100.0 * sum(map(_truncated, its)) / n,
              format_rate=100.0 * sum(bool(i["format_ok"]) for i in its) / n,
              refine_rate=100.0 * sum(i["refine_count"] > 0 for i in its) / n)


def paired(a: Arm, b: Arm, keys: Sequence[Key] | None = None) -> dict[str, Any]:
  """`b` against `a` on `keys` (default: all items): diff = mean per-item score difference
  b − a in points with its 95 % Wald interval (`mean_ci`: for 0/1 scores the interval of a
  difference of paired proportions); b_wrong / a_wrong = items only `a` / only `b` gets right
  (the discordant pairs, by the records' `correct`) and McNemar's exact two-sided p on them;
  the four transitions a → b (right_right, wrong_right, right_wrong, wrong_wrong) as counts."""
  keys = list(a.items) if keys is None else list(keys)
  d, lo, hi = mean_ci([float(b.items[k]["score"]) - float(a.items[k]["score"]) for k in keys])
  out: dict[str, Any] = dict(n=len(keys), diff=100 * d, lo=100 * lo, hi=100 * hi)
  for name, (x, y) in dict(right_right=(True, True), wrong_right=(False, True),
                           right_wrong=(True, False), wrong_wrong=(False, False)).items():
    out[name] = sum(bool(a.items[k]["correct"]) == x and bool(b.items[k]["correct"]) == y
                    for k in keys)
  out["p"] = mcnemar_exact(out["right_wrong"], out["wrong_right"])
  return out


def arm_pairs(n: int) -> list[tuple[int, int]]:
  """Index pairs (i, j), i < j, to compare: all of them for up to ALL_PAIRS_UP_TO arms, else
  each arm against the first and each against the one before it."""
  if n <= ALL_PAIRS_UP_TO:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]
  return sorted({(0, j) for j in range(1, n)} | {(j - 1, j) for j in range(1, n)})


def refine_analysis(ref: Arm, arm: Arm) -> dict[str, Any] | None:
  """The paper's Figure 4, on answers that refine: the items where `arm`'s answer holds at
  least one refine block, each classed by the reference's answer to the same item (right or
  wrong) → `arm`'s answer. `paired` on those items, plus share = % of `arm`'s answers that
  refine; None when none do."""
  keys = [k for k, it in arm.items.items() if it["refine_count"] > 0]
  if not keys:
    return None
  return dict(paired(ref, arm, keys), share=100.0 * len(keys) / len(arm.items))


def _p(p: float) -> str:
  return f"{p:.4f}" if p >= 1e-3 else f"{p:.1e}"


def _count(k: int, n: int) -> str:
  return f"{k} ({100.0 * k / n:.1f}%)" if n else "0"


def _data_rows(arm: Arm) -> dict[Key, dict[str, Any]]:
  """(dataset, id) -> the data file's row (its worked solution, its `difficulty`) for the
  arm's datasets found under its meta's data_dir; {} where there is none to read."""
  out: dict[Key, dict[str, Any]] = {}
  for ds in {k[0] for k in arm.items}:
    bench = BENCHMARKS.get(ds)
    path = os.path.join(str(arm.meta.get("data_dir") or ""), bench.path) if bench else ""
    if not (path and os.path.isfile(path) and path.endswith(".jsonl")):
      continue
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          row = json.loads(line)
          out[(ds, f"{ds}/{row.get('id')}")] = row
  return out


def refine_answers(arm: Arm) -> list[dict[str, Any]]:
  """The arm's answers as `refine_metrics` takes them: the reference is the data row's worked
  solution where its data file is found (else the record's final answer), the bucket the
  record's or row's `difficulty` (else None)."""
  rows = _data_rows(arm)
  out = []
  for key, it in arm.items.items():
    row = rows.get(key, {})
    out.append(dict(text=it["answer"], score=float(it["score"]),
                    reference=row.get("answer") or it.get("reference") or it["ground_truth"],
                    bucket=it.get("bucket") or it.get("difficulty") or row.get("difficulty")))
  return out


def _pct(x: float) -> str:
  return "–" if math.isnan(x) else f"{100 * x:.1f}"


def _num(x: float, fmt: str = ".2f") -> str:
  return "–" if math.isnan(x) else format(x, fmt)


def refine_table(arms: Sequence[Arm]) -> str:
  """Markdown: per run, what the refinements inside its answers do (`refine_metrics`)."""
  ms = [(a.label, refine_metrics(refine_answers(a))) for a in arms]
  buckets = [b for b in ("easy", "medium", "hard") if any(f"n/{b}" in m for _, m in ms)]
  header = (["run", "refine %"] + [f"refine % {b}" for b in buckets]
            + (["G (points)"] if buckets else [])
            + ["blocks: confirm / correct / rewrite", "fixes", "breaks", "sign p",
               "net fixes /100 med+hard", "selectivity", "fake slips %",
               "check: right before → after %"])
  rows = []
  for label, m in ms:
    rows.append([label, _pct(m["refine_rate"])] + [_pct(m[f"refine_rate/{b}"])
                                                   if f"n/{b}" in m else "–" for b in buckets]
                + ([_num(100 * m["gap"], "+.1f")] if buckets else [])
                + [f"{m['blocks/confirm']:.0f} / {m['blocks/correct']:.0f} / "
                   f"{m['blocks/rewrite']:.0f}", f"{m['fixes']:.0f}", f"{m['breaks']:.0f}",
                   _p(m["fix_break_p"]), _num(m["net_fixes_per_100_harder"], "+.1f"),
                   _num(m["selectivity"]), _pct(m["fake_slip_rate"]),
                   f"{_pct(m['check/before_right'])} → {_pct(m['check/after_right'])}"])
  return ("## Refinements inside answers (fix: a wrong step value turned right by the answer's "
          "own refine, against the reference chain; confirmations are never fixes; G: refine "
          "% on medium + hard − on easy; selectivity: P(refine | step wrong) / P(refine | step "
          "right); fake slips: wrong values refined on steps the run nearly always gets right; "
          "sign p: exact, fixes vs breaks)\n\n" + _md_table(header, rows))


_SEEDED = re.compile(r"^(.+)_s(\d+)$")


def seed_groups(arms: Sequence[Arm]) -> dict[str, dict[int, Arm]]:
  """Arms labelled `<name>_s<seed>` grouped by name: {name: {seed: arm}} (names with one seed
  too); unseeded arms are left out."""
  out: dict[str, dict[int, Arm]] = {}
  for a in arms:
    m = _SEEDED.match(a.label)
    if m:
      out.setdefault(m[1], {})[int(m[2])] = a
  return out


def pooled(pairs: Sequence[tuple[Arm, Arm]]) -> dict[str, Any]:
  """B against A over several (A, B) pairs of runs, one per training seed: per seed the
  paired Δacc (points) and discordant counts, how many seeds share the pooled sign, and the
  seed-stratified paired test (`cmh_paired`: CMH χ² and its exact version)."""
  per = [paired(a, b) for a, b in pairs]
  test = cmh_paired([(s["right_wrong"], s["wrong_right"]) for s in per])
  sign = (test["c"] > test["b"]) - (test["c"] < test["b"])
  return dict(diffs=[s["diff"] for s in per], n=sum(s["n"] for s in per),
              diff=sum(s["diff"] * s["n"] for s in per) / max(sum(s["n"] for s in per), 1),
              same_sign=sum(((s["diff"] > 0) - (s["diff"] < 0)) == sign for s in per)
              if sign else 0, **test)


def pooled_table(arms: Sequence[Arm]) -> str | None:
  """Markdown: each seeded group against the reference (first arm), and each seeded group
  against each other on their common seeds, pooled over seeds; None without seeded groups."""
  groups = seed_groups(arms)
  if not groups:
    return None
  rows = []
  ref = arms[0]
  comparisons = [(ref.label, {s: ref for s in g}, name, g) for name, g in groups.items()
                 if ref not in g.values()]
  names = list(groups)
  comparisons += [(x, groups[x], y, groups[y]) for i, x in enumerate(names)
                  for y in names[i + 1:]]
  for a_name, a, b_name, b in comparisons:
    seeds = sorted(set(a) & set(b))
    if not seeds:
      continue
    t = pooled([(a[s], b[s]) for s in seeds])
    g_a = [refine_metrics(refine_answers(a[s]))["gap"] for s in seeds]
    g_b = [refine_metrics(refine_answers(b[s]))["gap"] for s in seeds]
    rows.append([f"{b_name} − {a_name}", ",".join(map(str, seeds)), t["n"], f"{t['diff']:+.1f}",
                 " / ".join(f"{d:+.1f}" for d in t["diffs"]), f"{t['same_sign']}/{len(seeds)}",
                 f"{t['c']:.0f} / {t['b']:.0f}", f"{t['chi2']:.2f}", _p(t["p"]),
                 _p(t["p_exact"]),
                 " / ".join(_num(100 * (y - x), "+.1f") for x, y in zip(g_a, g_b))])
  if not rows:
    return None
  return ("## Pooled over training seeds (runs labelled <arm>_s<seed>; per seed B − A on the "
          "same items; test: Cochran–Mantel–Haenszel with the seed as stratum, χ² and exact; "
          "ΔG: B's refine-rate gap minus A's, per seed, in points)\n\n" + _md_table(
              ["B − A", "seeds", "n", "Δacc (points)", "Δacc per seed", "same sign",
               "only B right / only A right", "CMH χ²", "p", "exact p", "ΔG per seed"], rows))


def compare(run_dirs: Sequence[str], out_png: str | None = None,
            labels: Sequence[str] | None = None) -> str:
  """Markdown comparing result dirs on the same items, the first being the reference: per-arm
  table, accuracy by dataset (when several), paired differences with 95 % CI and McNemar p,
  and the refinement analysis of answers that refine. `out_png`: accuracy ± CI and tokens."""
  arms = load_arms(run_dirs, labels)
  rows = [arm_row(a) for a in arms]
  ref = arms[0]
  parts = [f"# {len(arms)} runs on the same {rows[0]['n']} items (reference: {ref.label})",
           "## Per run (accuracy: mean judge score, 95 % Wald CI; truncated: cut at max_tokens)"
           "\n\n" + _md_table(
               ["run", "mode", "n", "accuracy %", "95 % CI", "avg tokens", "truncated %",
                "format ok %", "refine %"],
               [[r["label"], r["mode"], r["n"], f"{r['accuracy']:.1f}",
                 f"[{r['acc_lo']:.1f}, {r['acc_hi']:.1f}]", f"{r['tokens']:.1f}",
                 f"{r['truncated']:.1f}", f"{r['format_rate']:.1f}", f"{r['refine_rate']:.1f}"]
                for r in rows])]
  by_ds = [summarize(list(a.items.values())) for a in arms]
  if len(by_ds[0]) > 2:    # several datasets (+ the average row)
    parts.append("## Accuracy % by dataset\n\n" + _md_table(
        ["dataset"] + [a.label for a in arms],
        [[r["dataset"]] + [f"{s[i]['accuracy']:.1f}" for s in by_ds]
         for i, r in enumerate(by_ds[0])]))
  prow = []
  for i, j in arm_pairs(len(arms)):
    s = paired(arms[i], arms[j])
    dtok = (100.0 * (rows[j]["tokens"] - rows[i]["tokens"]) / rows[i]["tokens"]
            if rows[i]["tokens"] else math.nan)
    prow.append([f"{arms[j].label} − {arms[i].label}", s["n"], f"{s['diff']:+.1f}",
                 f"[{s['lo']:+.1f}, {s['hi']:+.1f}]", s["wrong_right"], s["right_wrong"],
                 _p(s["p"]), f"{dtok:+.1f}%"])
  parts.append(
      "## Paired differences (B − A on the same items; 95 % CI: Wald, paired proportions; "
      "p: exact two-sided McNemar on the discordant items)\n\n" + _md_table(
          ["B − A", "n", "Δacc (points)", "95 % CI", "only B right", "only A right",
           "McNemar p", "Δtokens"], prow))
  rrow = []
  for arm in arms[1:]:
    t = refine_analysis(ref, arm)
    if t is not None:
      n = t["n"]
      rrow.append([f"{ref.label} → {arm.label}", f"{n} ({t['share']:.1f}%)",
                   _count(t["right_right"], n), _count(t["wrong_right"], n),
                   _count(t["right_wrong"], n), _count(t["wrong_wrong"], n), _p(t["p"])])
  if rrow:
    parts.append(
        f"## Refinement analysis of answers that refine (items where the run's answer holds a "
        f"refine block; {ref.label}'s answer to the same item → the run's answer)\n\n"
        + _md_table(["reference → run", "refining answers (% of run)", "right→right",
                     "wrong→right", "right→wrong", "wrong→wrong", "McNemar p"], rrow))
  parts.append(refine_table(arms))
  pooled_part = pooled_table(arms)
  if pooled_part:
    parts.append(pooled_part)
  if out_png:
    plot_arms(rows, out_png)
  return "\n\n".join(parts) + "\n"


def plot_arms(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Per run: accuracy with its 95 % CI, and mean tokens with the truncated share on top."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  labels = [r["label"] for r in rows]
  x = range(len(rows))
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(max(8, 1.8 * len(rows)), 4))
  acc = [r["accuracy"] for r in rows]
  err = [[r["accuracy"] - max(r["acc_lo"], 0.0) for r in rows],
         [min(r["acc_hi"], 100.0) - r["accuracy"] for r in rows]]
  ax0.bar(x, acc, yerr=err, capsize=4, color="tab:blue")
  ax0.set_ylabel("accuracy (%), 95 % CI")
  bars = ax1.bar(x, [r["tokens"] for r in rows], color="tab:orange")
  ax1.bar_label(bars, [f"{r['truncated']:.0f}% cut" for r in rows], fontsize=8)
  ax1.set_ylabel("avg generated tokens")
  for ax in (ax0, ax1):
    ax.set_xticks(list(x), labels, rotation=30, ha="right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
