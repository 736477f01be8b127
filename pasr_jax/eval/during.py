"""Evaluation during training: greedy answers to held-out items, judged as the run judges.

`load_items` reads `eval.files` (the rows of `data`, plus an optional `difficulty` / `bucket`
field); `answer` samples one greedy answer per item under the PASR system prompt on the
run's own sampler (between steps: no second engine) and scores it with the run's accuracy
rule or judge (`RolloutStep.accuracies`); `eval_metrics` turns the answers into the
`eval/*` scalars. Multi-host: each process answers its share of the items and `gather`
gives every process all answers, so every process computes the same scalars.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from pasr_jax import data as data_lib
from pasr_jax import multihost
from pasr_jax.eval.refine import refine_metrics
from pasr_jax.rewards import format_reward
from pasr_jax.step import Answers, Halves, RolloutStep

# The refine analytics logged during training (see `refine_metrics` for their meaning).
REFINE_KEYS = ("gap", "accuracy/refining", "accuracy/not_refining", "blocks/confirm",
               "blocks/correct", "blocks/rewrite", "fixes", "breaks",
               "net_fixes_per_100_harder", "selectivity", "check/before_right",
               "check/after_right", "fake_slip_rate")

# Row fields that name an item's difficulty bucket, in order of preference.
BUCKET_FIELDS = ("difficulty", "bucket")


@dataclasses.dataclass(frozen=True)
class Item:
  """One held-out question with its reference and (optional) difficulty bucket."""
  row: data_lib.Row
  bucket: str


def load_items(files: Sequence[str], question_field: str = "", answer_field: str = "",
               limit: int = 0) -> list[Item]:
  """The first `limit` (0 = all) rows of `files`, validated as training rows are; raises
  `data.DataError` naming the file and row."""
  items = []
  for path in files:
    for rowno, rec in data_lib._parse_records(str(path)):  # pylint: disable=protected-access
      (row,) = data_lib.rows_from_records([(rowno, rec)], str(path), question_field,
                                          answer_field)
      bucket = next((rec[f] for f in BUCKET_FIELDS if isinstance(rec, dict) and f in rec), "")
      items.append(Item(row, str(bucket)))
      if limit and len(items) >= limit:
        return items
  return items


def answer(items: Sequence[Item], stepper: RolloutStep, sampler, max_tokens: int
           ) -> list[dict[str, Any]]:
  """One greedy answer per item of this process's share, scored, in item order (`gather`
  makes them every process's). Each is a dict: id, question, reference, bucket, text,
  tokens, finish_reason, score (the accuracy in [0, 1])."""
  mine = list(items[multihost.share(len(items))])
  if not mine:
    return []
  prompts = stepper.prompt_ids([it.row for it in mine]).pasr
  groups = sampler.generate([p.ids for p in prompts], n=1, temperature=0.0, top_p=1.0,
                            max_tokens=max_tokens, stop_token_ids=stepper.eos_ids, seed=0)
  answers = Halves([Answers(p, g.completions) for p, g in zip(prompts, groups)], [])
  accs, _ = stepper.accuracies(answers, stepper.judge_requests(answers))
  local = []
  for it, a, acc in zip(mine, answers.pasr, accs.pasr):
    c = a.completions[0]
    local.append({"id": it.row.id, "question": it.row.question, "reference": it.row.answer,
                  "bucket": it.bucket, "text": c.text, "tokens": len(c.token_ids),
                  "finish_reason": c.finish_reason, "score": float(acc[0])})
  return local


def gather(local: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Every process's `answer`s, in item order (a collective: every process calls it)."""
  return [a for part in multihost.allgather_json(local) for a in part]


def eval_metrics(answers: Sequence[dict[str, Any]]) -> dict[str, float]:
  """`eval/accuracy` (mean score), `eval/tokens_mean`, `eval/refine_rate` (share with a
  <refine> block), `eval/format_ok` (share in the PASR layout), `eval/items`; per difficulty
  bucket (answers whose `bucket` is not "") `eval/<bucket>/accuracy` and
  `eval/<bucket>/refine_rate`; and the refine analytics of `pasr_jax.eval.refine` (gap G,
  fixes and breaks inside answers, selectivity, fake slips, ...) as `eval/refine/<name>`, where
  defined. `answers`: dicts with at least question, reference, text, score, bucket, tokens."""
  if not answers:
    return {}
  m = refine_metrics(answers)
  out = {"eval/accuracy": m["accuracy"], "eval/refine_rate": m["refine_rate"],
         "eval/tokens_mean": float(np.mean([a["tokens"] for a in answers])),
         "eval/format_ok": float(np.mean([format_reward(a["text"]) > 0 for a in answers])),
         "eval/items": float(len(answers))}
  for bucket in sorted({a["bucket"] for a in answers if a.get("bucket")}):
    out[f"eval/{bucket}/accuracy"] = m[f"accuracy/{bucket}"]
    out[f"eval/{bucket}/refine_rate"] = m[f"refine_rate/{bucket}"]
  # Rates over an empty set are NaN there: left out, so a curve shows no made-up zero.
  out.update({f"eval/refine/{k}": v for k, v in m.items()
              if k in REFINE_KEYS and math.isfinite(v)})
  return out
