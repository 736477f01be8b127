"""The probe before any RL: what the refine reward would pay on the training items, per bucket.

  python -m pasr_jax.eval.probe --config=configs/arith_135m.py [--items=60] [--out=FILE.md] \\
      [--config.a.b=v ...]

On training items only (the `data.files` of the preset, never held-out ones), after the cold
start (`cold_start.ensure`: made first when the preset enables it and it does not exist yet),
samples `rollout.n` answers per item under the PASR system prompt and `rollout.n` under the
plain one (the baseline) with the rollout's sampling settings, grades them with the `verify`
judge's code in this process, and prints per difficulty bucket (the rows' `difficulty`):
  - accuracy of refining and of non-refining PASR answers, and the share that refines;
  - b, the baseline's mean accuracy, and the share of baseline answers cut at max_tokens;
  - the expected refine reward of a refining answer, and the expected reward (with the
    preset's weights) of refining minus not refining, at ζ ∈ {0, 0.125, 0.25}
    (`rewards.refine_reward` / `weighted_reward` on each answer with its own question's
    baseline answers);
  - the check against the first pass: of the steps a refine block follows, the share whose
    value is right before the block and after it (`eval.refine`), and the first-pass step
    accuracy over all steps.
This is what ζ and the buckets are chosen from before an experiment; no held-out item is read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from pasr_jax import chat, cold_start, prompts
from pasr_jax import data as data_lib
from pasr_jax.answer_format import count_refines
from pasr_jax.config import RunConfig
from pasr_jax.data import Row
from pasr_jax.eval.refine import BUCKETS, refine_metrics
from pasr_jax.judge.verify import grade
from pasr_jax.rewards import reward_terms, weighted_reward

PROG = "python -m pasr_jax.eval.probe"
ZETAS = (0.0, 0.125, 0.25)
ALL = "all"


def buckets_of(files: Sequence[str]) -> dict[str, str]:
  """question -> `difficulty` of every JSONL row of `files` that carries one."""
  out: dict[str, str] = {}
  for path in files:
    if not path.endswith(".jsonl"):
      continue
    with open(path, encoding="utf-8") as f:
      for line in f:
        if line.strip():
          r = json.loads(line)
          if r.get("difficulty"):
            out[str(r.get("question"))] = str(r["difficulty"])
  return out


def pick_items(rows: Sequence[Row], buckets: dict[str, str], n: int, seed: int
               ) -> list[tuple[Row, str | None]]:
  """`n` rows of a seeded order, taken from the buckets in turn (as evenly as they allow)."""
  order = np.random.default_rng([seed, 5]).permutation(len(rows))
  by: dict[str | None, list[Row]] = {}
  for i in order:
    by.setdefault(buckets.get(rows[i].question), []).append(rows[i])
  names = [b for b in BUCKETS if b in by] + sorted(k for k in by if k and k not in BUCKETS)
  names += [None] if None in by else []
  out: list[tuple[Row, str | None]] = []
  while len(out) < n and any(by[b] for b in names):
    for b in names:
      if by[b] and len(out) < n:
        out.append((by[b].pop(0), b))
  return out


def _mean(xs: Sequence[float]) -> float:
  return float(np.mean(xs)) if len(xs) else math.nan


def probe(cfg: RunConfig, sampler: Any, tokenizer: Any, items: Sequence[tuple[Row, str | None]]
          ) -> dict[str, dict[str, float]]:
  """Samples and grades PASR and baseline answers to `items` ([(row, bucket)]) and returns
  {bucket or "all": numbers} (see the module doc; rates are fractions)."""
  ps = prompts.load_prompts(cfg.prompts)
  rc = cfg.rollout
  budget = int(rc.max_prompt_tokens)

  def ids(system: str, q: str) -> list[int]:
    return chat.fit(tokenizer, lambda x: chat.user_chat(system, x), q, budget)[0]

  prompt_ids = ([ids(ps.pasr_system, r.question) for r, _ in items]
                + [ids(ps.plain_system, r.question) for r, _ in items])
  eos = sorted({i for i in (tokenizer.eos_token_id,) if i is not None})
  groups = sampler.generate(prompt_ids, n=int(rc.n), temperature=float(rc.temperature),
                            top_p=float(rc.top_p), max_tokens=int(rc.max_tokens),
                            stop_token_ids=eos, seed=int(cfg.seed))
  k = len(items)
  answers: list[dict[str, Any]] = []   # PASR answers, with their question's baseline scores
  baseline: list[dict[str, Any]] = []  # one per item: bucket, baseline scores, cut shares
  for j, (row, bucket) in enumerate(items):
    def score(text: str, row: Row = row) -> float:
      return grade(cfg.data.task_type, row.question, row.answer, text)
    base = groups[k + j].completions
    accs = [score(c.text) for c in base]
    baseline.append(dict(bucket=bucket, accs=accs,
                         cut=[c.finish_reason == "length" for c in base]))
    for c in groups[j].completions:
      answers.append(dict(text=c.text, reference=row.answer, score=score(c.text),
                          bucket=bucket, base=accs, cut=c.finish_reason == "length"))
  out = {}
  names = [b for b in BUCKETS if any(a["bucket"] == b for a in answers)]
  names += sorted({a["bucket"] for a in answers if a["bucket"] and a["bucket"] not in BUCKETS})
  for name in names + [ALL]:
    ans = [a for a in answers if name == ALL or a["bucket"] == name]
    base = [b for b in baseline if name == ALL or b["bucket"] == name]
    refining = [count_refines(a["text"]) > 0 for a in ans]
    m = refine_metrics(ans)
    r: dict[str, float] = dict(
        items=float(len(base)), answers=float(len(ans)), refine_rate=m["refine_rate"],
        acc_refining=m["accuracy/refining"], acc_not_refining=m["accuracy/not_refining"],
        b=_mean([x for b in base for x in b["accs"]]),
        baseline_cut=_mean([float(x) for b in base for x in b["cut"]]),
        pasr_cut=_mean([float(a["cut"]) for a in ans]),
        check_before_right=m["check/before_right"], check_after_right=m["check/after_right"],
        step_accuracy=_rate(m["steps/right"], m["steps/right"] + m["steps/wrong"]),
        fixes=m["fixes"], breaks=m["breaks"], confirms=m["blocks/confirm"])
    for z in ZETAS:
      terms = [reward_terms(a["text"], a["score"], a["base"], z) for a in ans]
      total = [weighted_reward(t, cfg.rewards) for t in terms]
      r[f"refine_reward@{z:g}"] = _mean([t["refine"] for t, x in zip(terms, refining) if x])
      r[f"advantage@{z:g}"] = (_mean([t for t, x in zip(total, refining) if x])
                               - _mean([t for t, x in zip(total, refining) if not x]))
    out[name] = r
  return out


def _rate(k: float, n: float) -> float:
  return k / n if n else math.nan


def _f(x: float, pct: bool = True) -> str:
  if math.isnan(x):
    return "–"
  return f"{100 * x:.1f}" if pct else f"{x:+.2f}"


def table(result: dict[str, dict[str, float]]) -> str:
  """Markdown of `probe`'s numbers, one row per bucket."""
  header = (["bucket", "answers", "refine %", "acc refining %", "acc not refining %", "b %",
             "baseline cut %", "PASR cut %"]
            + [f"E[refine reward] ζ={z:g}" for z in ZETAS]
            + [f"E[reward] refine − not, ζ={z:g}" for z in ZETAS]
            + ["check: step right before → after %", "first-pass step acc %",
               "fixes / breaks / confirms"])
  rows = []
  for name, r in result.items():
    rows.append([name, f"{r['answers']:.0f}", _f(r["refine_rate"]), _f(r["acc_refining"]),
                 _f(r["acc_not_refining"]), _f(r["b"]), _f(r["baseline_cut"]),
                 _f(r["pasr_cut"])]
                + [_f(r[f"refine_reward@{z:g}"], pct=False) for z in ZETAS]
                + [_f(r[f"advantage@{z:g}"], pct=False) for z in ZETAS]
                + [f"{_f(r['check_before_right'])} → {_f(r['check_after_right'])}",
                   _f(r["step_accuracy"]),
                   f"{r['fixes']:.0f} / {r['breaks']:.0f} / {r['confirms']:.0f}"])
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return "\n".join(lines)


def run(cfg: RunConfig, items_n: int, out: str = "") -> str:
  """The command: cold start, sampling with the vLLM engine, the table (also to `out`)."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel
  from pasr_jax.rollout.vllm_sampler import VllmSampler  # pylint: disable=import-outside-toplevel
  hf = cold_start.ensure(cfg)
  rows = data_lib.load_dataset(cfg.data)
  items = pick_items(rows, buckets_of(cfg.data.files), items_n, int(cfg.seed))
  tok = AutoTokenizer.from_pretrained(hf)
  sampler = VllmSampler.from_config(cfg.rollout, hf, seed=int(cfg.seed))
  try:
    result = probe(cfg, sampler, tok, items)
  finally:
    sampler.close()
  text = (f"Probe of {hf} on {len(items)} training items, {cfg.rollout.n} PASR + "
          f"{cfg.rollout.n} baseline answers each (T={cfg.rollout.temperature}, max_tokens="
          f"{cfg.rollout.max_tokens}), graded by the verify judge's code\n\n" + table(result))
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  print(text, flush=True)
  return text


def main() -> None:
  from absl import flags  # pylint: disable=import-outside-toplevel
  from pasr_jax import cli  # pylint: disable=import-outside-toplevel
  items = flags.DEFINE_integer("items", 60, "training items to probe (split over the buckets)")
  out = flags.DEFINE_string("out", "", "also write the table to this file")
  cli.main(PROG, lambda cfg: run(cfg, items.value, out.value))


if __name__ == "__main__":
  main()
