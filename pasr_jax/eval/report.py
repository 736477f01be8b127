"""Evaluation reports: results.json, summary tables (md/csv), plots, run comparison.

`summarize` turns per-item records into per-dataset rows (accuracy in %, average generated
tokens, refine rate, format rate). `compare` lines several result dirs up against the first
(paper-style Δaccuracy points and Δtokens %) and, for a vanilla run and a PASR run, tabulates
how answers move between right and wrong (paper Figure 4).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

from pasr_jax.eval.benchmarks import EvalError

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


def transitions(base: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]],
                ) -> dict[str, Any]:
  """How answers move from `base` (vanilla) to `other` (PASR) on the items both answered.

  Returns counts n, shares (%) right_right, wrong_right, right_wrong, wrong_wrong, and
  refine_rate: % of `other`'s answers on those items with at least one refine block.
  """
  b = {i["id"]: i for i in base}
  pairs = [(b[o["id"]], o) for o in other if o["id"] in b]
  n = len(pairs)
  out: dict[str, Any] = dict(n=n)
  for name, (x, y) in dict(right_right=(True, True), wrong_right=(False, True),
                           right_wrong=(True, False), wrong_wrong=(False, False)).items():
    out[name] = 100.0 * sum(bool(p["correct"]) == x and bool(o["correct"]) == y
                            for p, o in pairs) / max(n, 1)
  out["refine_rate"] = 100.0 * sum(o["refine_count"] > 0 for _, o in pairs) / max(n, 1)
  return out


def compare(run_dirs: Sequence[str], out_png: str | None = None) -> str:
  """Markdown: each run vs the first (Δaccuracy points, Δtokens %) and the refinement analysis."""
  if len(run_dirs) < 2:
    raise EvalError("compare needs at least two result dirs")
  runs = [load_run(d) for d in run_dirs]
  names = [f"{r['meta'].get('mode', '?')}@{os.path.basename(os.path.normpath(d))}"
           for r, d in zip(runs, run_dirs)]
  base = {r["dataset"]: r for r in runs[0]["summary"]}
  parts = []
  for name, run in zip(names[1:], runs[1:]):
    rows = []
    for r in run["summary"]:
      b = base.get(r["dataset"])
      if b is None:
        continue
      dtok = 100.0 * (r["tokens"] - b["tokens"]) / b["tokens"] if b["tokens"] else float("nan")
      rows.append([r["dataset"], f"{b['accuracy']:.1f}", f"{r['accuracy']:.1f}",
                   f"{r['accuracy'] - b['accuracy']:+.1f}", f"{b['tokens']:.1f}",
                   f"{r['tokens']:.1f}", f"{dtok:+.1f}%"])
    parts.append(f"## {name} vs {names[0]}\n\n" + _md_table(
        ["dataset", "acc base", "acc", "Δacc (points)", "tokens base", "tokens", "Δtokens"], rows))
  # Refinement analysis: every (vanilla, pasr) pair of runs among the dirs.
  modes = [r["meta"].get("mode") for r in runs]
  rows = []
  for i, mi in enumerate(modes):
    for j, mj in enumerate(modes):
      if mi == "vanilla" and mj == "pasr":
        t = transitions(runs[i]["items"], runs[j]["items"])
        rows.append([f"{names[i]} → {names[j]}", t["n"], f"{t['right_right']:.1f}",
                     f"{t['wrong_right']:.1f}", f"{t['right_wrong']:.1f}",
                     f"{t['wrong_wrong']:.1f}", f"{t['refine_rate']:.1f}"])
  if rows:
    parts.append("## Refinement analysis (items answered by both runs, % of them)\n\n" + _md_table(
        ["runs", "n", "right→right", "wrong→right", "right→wrong", "wrong→wrong",
         "PASR refine rate"], rows))
  if out_png:
    plot(list(zip(names, [r["summary"] for r in runs])), out_png)
  return "\n\n".join(parts) + "\n"
