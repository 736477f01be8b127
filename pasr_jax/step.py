"""One PASR rollout step: B questions -> a trainer batch, rollout records and metrics.

For B questions: n answers with the PASR system prompt and n baseline answers with the plain
prompt, in ONE sampler call; all 2·B·n answers judged concurrently; rewards (format + accuracy
+ refine vs that question's baseline mean accuracy); group advantages over the PASR answers;
zero-variance groups dropped or kept (config); completions cut at `max_tokens` counted and,
if configured, masked out of the loss. The batch layout is the `Trainer`'s (see trainer.py).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pasr_jax import chat, grpo, rewards as rewards_lib
from pasr_jax.answer_format import count_refines
from pasr_jax.data import Row
from pasr_jax.judge.wire import judge_request
from pasr_jax.prompts import Prompts, load_prompts


@dataclasses.dataclass
class StepOutput:
  """What one rollout step produced.

  batch: trainer batch (numpy, `[B', L]` / `[B']`) of the kept PASR answers, None if none
    kept; B' is not rounded to the micro-batch (`pad_batch` does that).
  records: one JSON-able dict per sampled answer (PASR and baseline) for rollouts.jsonl.
  scalars: metrics of the step (rewards, rates, lengths, judge stats, phase times in s).
  weights: how many items the means in `scalars` average over (pasr answers, all answers,
    prompts, baseline answers), for `merge_scalars`.
  """
  batch: dict[str, np.ndarray] | None
  records: list[dict[str, Any]]
  scalars: dict[str, float]
  weights: dict[str, float] = dataclasses.field(default_factory=dict)


# How several processes' step scalars combine into the run's (multi-host): counts add up,
# a mean is weighted by the items it averages over, times and latencies take the slowest
# process; anything else (the trainer's and the sync's, equal on every process) is process 0's.
_SUMMED = ("groups/zero_variance", "groups/trained", "tokens/generated", "judge/items",
           "judge/requests", "judge/retries", "judge/failures", "judge/unparseable",
           "judge/cache_hits")
_MEAN_OVER = {"reward/mean": "pasr", "reward/format": "pasr", "reward/accuracy": "pasr",
              "reward/refine": "pasr", "rate/format_ok": "pasr", "rate/refine": "pasr",
              "len/pasr_mean": "pasr", "rate/truncated": "answers", "len/all_mean": "answers",
              "rate/prompt_truncated": "prompts", "reward/baseline_accuracy": "baseline"}
_SLOWEST = ("time/", "judge/latency", "sync/")


def merge_scalars(parts: Sequence[tuple[dict[str, float], dict[str, float]]]
                  ) -> dict[str, float]:
  """One step's scalars from each process's (scalars, weights), in process order."""
  if len(parts) == 1:
    return dict(parts[0][0])
  out = {}
  for k, first in parts[0][0].items():
    vals = [float(s[k]) for s, _ in parts]
    if k in _SUMMED:
      out[k] = sum(vals)
    elif k in _MEAN_OVER:
      w = [float(ws.get(_MEAN_OVER[k], 0.0)) for _, ws in parts]
      out[k] = sum(v * x for v, x in zip(vals, w)) / max(sum(w), 1e-12)
    elif k.startswith(_SLOWEST) and not k.endswith("bytes"):
      out[k] = max(vals)
    else:
      out[k] = first
  return out


def pack_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               logprobs: Sequence[Sequence[float]], advantages: Sequence[float],
               scored: Sequence[bool], pad_id: int, multiple: int,
               rows_multiple: int = 1) -> dict[str, np.ndarray]:
  """Right-padded trainer batch of prompt+completion rows.

  Row i is `prompts[i] + completions[i]`; `loss_mask` is 1 on completion tokens when
  `scored[i]`, and `old_logps` holds the sampler logprob of that token at the same index
  (the trainer reads its logprob from logits at t-1). Length L = longest row rounded up
  to `multiple`. The row count is rounded up to `rows_multiple` (the micro-batch) by
  `pad_batch`, with copies of row 0 whose loss_mask is 0: real tokens keep attention finite,
  and a row without scored tokens is no sequence of the loss (grpo.loss_denominator, all
  three aggregations).
  """
  lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
  L = max(1, -(-max(lengths) // multiple) * multiple)
  B = len(prompts)
  input_ids = np.full((B, L), pad_id, np.int32)
  attention = np.zeros((B, L), np.int32)
  loss_mask = np.zeros((B, L), np.float32)
  old = np.zeros((B, L), np.float32)
  for i, (p, c, lp) in enumerate(zip(prompts, completions, logprobs)):
    n_p, n = len(p), len(p) + len(c)
    input_ids[i, :n] = list(p) + list(c)
    attention[i, :n] = 1
    if scored[i] and len(c):
      loss_mask[i, n_p:n] = 1.0
      old[i, n_p:n] = lp
  batch = {"input_ids": input_ids, "attention_mask": attention, "positions": _positions(B, L),
           "loss_mask": loss_mask, "old_logps": old,
           "advantages": np.asarray(advantages, np.float32).reshape(B)}
  return pad_batch(batch, -(-B // rows_multiple) * rows_multiple, L, pad_id)


def _positions(rows: int, length: int) -> np.ndarray:
  return np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()


# Batch arrays copied from row 0 into padding rows; the others (loss_mask, old_logps,
# advantages, ...) are 0 there.
_ROW_KEYS = ("input_ids", "attention_mask", "positions")


def pad_batch(batch: dict[str, np.ndarray] | None, rows: int, length: int,
              pad_id: int) -> dict[str, np.ndarray]:
  """`batch` (`[B, L]` / `[B]`, B <= rows, L <= length) padded to `rows` x `length`.

  New columns are padding (pad_id, attention 0, no loss). New rows are copies of row 0 with
  loss_mask 0 and advantage 0: real tokens keep attention finite, and a row without scored
  tokens adds nothing to the loss (token_mean / seq_mean_token_mean). With `batch` None (a
  process that has no rows of its own this step), every row is one attended pad token.
  """
  if batch is None:
    ids = np.full((1, length), pad_id, np.int32)
    att = np.zeros((1, length), np.int32)
    att[:, 0] = 1
    batch = {"input_ids": ids, "attention_mask": att, "positions": _positions(1, length),
             "loss_mask": np.zeros((1, length), np.float32),
             "old_logps": np.zeros((1, length), np.float32),
             "advantages": np.zeros((1,), np.float32)}
  B, L = batch["input_ids"].shape
  assert B <= rows and L <= length, (B, L, rows, length)
  out = {}
  for k, x in batch.items():
    if x.ndim == 1:
      out[k] = np.concatenate([x, np.zeros(rows - B, x.dtype)])
      continue
    y = np.zeros((rows, length), x.dtype)
    y[:B, :L] = x
    if k in _ROW_KEYS:
      y[B:, :L] = x[0]
    if k == "input_ids":
      y[:, L:] = pad_id
    elif k == "positions":
      y[:, L:] = np.arange(L, length, dtype=y.dtype)
    out[k] = y
  return out


class RolloutStep:
  """Turns questions into a trainer batch with a sampler and a judge (see module doc)."""

  def __init__(self, cfg, tokenizer, sampler, judge, prompts: Prompts | None = None):
    self.cfg = cfg
    self.tok = tokenizer
    self.sampler = sampler
    self.judge = judge
    self.prompts = prompts or load_prompts(cfg.prompts)
    self.eos_ids = sorted({i for i in (tokenizer.eos_token_id,) if i is not None})
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

  def _prompt(self, system: str, question: str) -> tuple[list[int], bool]:
    """[system, user] ids within rollout.max_prompt_tokens: the question is cut, not the
    system prompt (chat.fit); the bool says whether it was."""
    ids, _, cut = chat.fit(self.tok, lambda q: chat.user_chat(system, q), question,
                           int(self.cfg.rollout.max_prompt_tokens))
    return ids, cut

  def _accuracies(self, rows: Sequence[Row], texts: list[list[str]]) -> tuple[list[list[float]], dict]:
    """Accuracy in [0, 1] of every answer text, `texts[prompt][sample]`."""
    rule = self.cfg.rewards.get("accuracy_rule", "")
    if rule == "contains":
      return [[rewards_lib.contains_accuracy(t, rows[i % len(rows)].answer) for t in ts]
              for i, ts in enumerate(texts)], {}
    items, shape = [], []
    for i, ts in enumerate(texts):
      row = rows[i % len(rows)]
      for t in ts:
        items.append(judge_request(row.question, row.answer, t, self.cfg.data.task_type,
                                   self.cfg.judge.input))
      shape.append(len(ts))
    scores, stats = self.judge.score_batch(items)
    out, k = [], 0
    for m in shape:
      out.append([float(s) for s in scores[k:k + m]])
      k += m
    return out, dict(stats)

  def run(self, rows: Sequence[Row], step: int, seed: int) -> StepOutput:
    """Sample, judge, reward and pack one step for `rows` (B questions)."""
    rc, gc = self.cfg.rollout, self.cfg.grpo
    B, n = len(rows), rc.n
    t0 = time.perf_counter()
    prompts, cut = zip(*[self._prompt(self.prompts.pasr_system, r.question) for r in rows])
    all_prompts = list(prompts)
    if rc.baseline:
      base, base_cut = zip(*[self._prompt(self.prompts.plain_system, r.question) for r in rows])
      all_prompts += list(base)
      cut = cut + base_cut
    groups = self.sampler.generate(all_prompts, n=n, temperature=rc.temperature, top_p=rc.top_p,
                                   max_tokens=rc.max_tokens, stop_token_ids=self.eos_ids,
                                   seed=seed)
    t1 = time.perf_counter()
    texts = [[c.text for c in g.completions] for g in groups]
    accs, judge_stats = self._accuracies(rows, texts)
    t2 = time.perf_counter()

    base_accs = accs[B:] if rc.baseline else [None] * B
    rewards, terms = [], []
    for i in range(B):
      group = rewards_lib.group_reward_terms([c.text for c in groups[i].completions], accs[i],
                                      base_accs[i], self.cfg.rewards)
      terms += group
      rewards += [rewards_lib.weighted_reward(t, self.cfg.rewards) for t in group]
    adv, zero_var = grpo.group_advantages(rewards, n, gc.adv_std_ddof, gc.adv_scale,
                                          gc.adv_eps, gc.skip_range)
    keep_group = ~grpo.flat_groups(rewards, n, gc.skip_range) | (not gc.skip_zero_variance)

    pasr_comps = [c for g in groups[:B] for c in g.completions]
    truncated = np.array([c.finish_reason == "length" for c in pasr_comps])
    scored = [bool(keep_group[j // n]) and not (gc.mask_truncated and truncated[j])
              for j in range(B * n)]
    batch = None
    if any(scored):
      idx = [j for j in range(B * n) if keep_group[j // n]]
      batch = pack_batch([prompts[j // n] for j in idx], [pasr_comps[j].token_ids for j in idx],
                         [pasr_comps[j].logprobs for j in idx], [adv[j] for j in idx],
                         [scored[j] for j in idx], self.pad_id, self.cfg.train.seq_multiple)
    t3 = time.perf_counter()

    records = []
    for i, g in enumerate(groups):
      kind = "pasr" if i < B else "baseline"
      row = rows[i % B]
      for k, c in enumerate(g.completions):
        rec = {"step": step, "id": row.id, "kind": kind, "sample": k, "text": c.text,
               "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
               "accuracy": accs[i][k], "policy_version": c.policy_version}
        if kind == "pasr":
          j = i * n + k
          rec.update(format=terms[j]["format"], refine=terms[j]["refine"], reward=rewards[j],
                     advantage=float(adv[j]), trained=scored[j])
        records.append(rec)

    lens = np.array([len(c.token_ids) for c in pasr_comps], np.float64)
    all_lens = np.array([len(c.token_ids) for g in groups for c in g.completions], np.float64)
    scalars = {
        "reward/mean": float(np.mean(rewards)),
        "reward/format": float(np.mean([t["format"] for t in terms])),
        "reward/accuracy": float(np.mean([t["accuracy"] for t in terms])),
        "reward/refine": float(np.mean([t["refine"] for t in terms])),
        "rate/format_ok": float(np.mean([t["format"] > 0 for t in terms])),
        "rate/refine": float(np.mean([count_refines(c.text) > 0 for c in pasr_comps])),
        "rate/truncated": float(np.mean([c.finish_reason == "length"
                                         for g in groups for c in g.completions])),
        "rate/prompt_truncated": float(np.mean(cut)),
        "len/pasr_mean": float(lens.mean()),
        "len/all_mean": float(all_lens.mean()),
        "groups/zero_variance": float(zero_var),
        "groups/trained": float(np.sum(keep_group)) if batch is not None else 0.0,
        "tokens/generated": float(all_lens.sum()),
        "time/rollout": t1 - t0, "time/judge": t2 - t1, "time/pack": t3 - t2,
    }
    if rc.baseline:
      scalars["reward/baseline_accuracy"] = float(np.mean([a for acc in accs[B:] for a in acc]))
    for k, v in judge_stats.items():
      if isinstance(v, (int, float)) and math.isfinite(float(v)):
        scalars[f"judge/{k}"] = float(v)
    weights = {"pasr": float(B * n), "answers": float(all_lens.size),
               "prompts": float(len(all_prompts)), "baseline": float(B * n * rc.baseline)}
    return StepOutput(batch=batch, records=records, scalars=scalars, weights=weights)
