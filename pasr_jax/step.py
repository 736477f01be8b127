"""One PASR rollout step: B questions -> a trainer batch, rollout records and metrics.

`RolloutStep` runs it as named stages, each a method: prompts (every question under the PASR
system prompt and, for the baseline, the plain one) -> sampling (n answers per prompt, both
halves in ONE sampler call) -> judge requests (`judge.wire.judge_request`) -> accuracies (all
2·B·n answers judged concurrently, or the `contains` rule) -> rewards (format + accuracy +
refine vs that question's baseline accuracies) -> advantages (grpo, over the PASR answers,
with the zero-variance groups) -> batch (those groups dropped or kept per config; completions
cut at `max_tokens` masked out of the loss if configured) -> records and scalars. `Halves`
holds the [PASR | baseline] layout. The batch is a `batch.Batch`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np

from pasr_jax import batch as batch_lib, chat, grpo, rewards as rewards_lib
from pasr_jax.answer_format import count_refines
from pasr_jax.batch import Batch
from pasr_jax.config import StepCfg
from pasr_jax.data import Row
from pasr_jax.judge.wire import judge_request
from pasr_jax.prompts import Prompts
from pasr_jax.rollout.base import Completion


@dataclasses.dataclass
class StepOutput:
  """What one rollout step produced.

  batch: trainer batch (numpy, `[B', L]` / `[B']`) of the kept PASR answers, None if none
    kept; B' is not rounded to the micro-batch (`batch.pad` does that).
  records: one JSON-able dict per sampled answer (PASR and baseline) for rollouts.jsonl.
  scalars: metrics of the step (rewards, rates, lengths, judge stats, phase times in s).
  weights: how many items the means in `scalars` average over (pasr answers, all answers,
    prompts, baseline answers), for `merge_scalars`.
  reductions: how each of `scalars` combines over processes (`merge_scalars`).
  """
  batch: Batch | None
  records: list[dict[str, Any]]
  scalars: dict[str, float]
  weights: dict[str, float] = dataclasses.field(default_factory=dict)
  reductions: dict[str, str] = dataclasses.field(default_factory=lambda: dict(STEP_REDUCTIONS))


# ----------------------------------------------------------------------------- multi-host
# How several processes' values of a metric combine into the run's: each producer declares it
# for every metric it makes (a name, or a family: a prefix ending in "/" or "_"), and
# `merge_scalars` refuses a metric nobody declared.
SUM, MAX, MIN = "sum", "max", "min"
FIRST = "first"  # process 0's: for values equal on every process (the trainer's)


def mean_over(weight: str) -> str:
  """The reduction "mean weighted by each process's count `weight`" (a StepOutput.weights
  key: the items the process's mean is over)."""
  return f"mean:{weight}"


def reduction_of(name: str, reductions: dict[str, str]) -> str:
  """`name`'s declared reduction: its own, else its longest declared family's."""
  if name in reductions:
    return reductions[name]
  families = [k for k in reductions if k[-1:] in ("/", "_") and name.startswith(k)]
  assert families, (f"metric {name!r} declares no multi-host reduction (sum, max, min, first "
                    "or mean_over) where it is produced")
  return reductions[max(families, key=len)]


def merge_scalars(parts: Sequence[tuple[dict[str, float], dict[str, float]]],
                  reductions: dict[str, str]) -> dict[str, float]:
  """One step's scalars from each process's (scalars, weights), in process order, each
  metric combined by its declared reduction (`reduction_of`; an undeclared one raises
  AssertionError, on one process too)."""
  out = {}
  for k, first in parts[0][0].items():
    how = reduction_of(k, reductions)
    vals = [float(s[k]) for s, _ in parts]
    if how == SUM:
      out[k] = sum(vals)
    elif how == MAX:
      out[k] = max(vals)
    elif how == MIN:
      out[k] = min(vals)
    elif how == FIRST:
      out[k] = first
    else:
      assert how.startswith("mean:"), (k, how)
      w = [float(ws[how[len("mean:"):]]) for _, ws in parts]
      out[k] = (sum(v * x for v, x in zip(vals, w)) / max(sum(w), 1e-12) if len(parts) > 1
                else first)
  return out


# Every metric a RolloutStep makes (`RolloutStep.scalars`) and its reduction.
STEP_REDUCTIONS = {
    **{k: mean_over("pasr") for k in ("reward/mean", "reward/format", "reward/accuracy",
                                      "reward/refine", "rate/format_ok", "rate/refine",
                                      "len/pasr_mean")},
    **{k: mean_over("answers") for k in ("rate/truncated", "len/all_mean")},
    "rate/prompt_truncated": mean_over("prompts"),
    "reward/baseline_accuracy": mean_over("baseline"),
    "groups/zero_variance": SUM, "groups/trained": SUM, "tokens/generated": SUM,
    "time/rollout": MAX, "time/judge": MAX, "time/pack": MAX,
    # The judge's batch stats (judge.client): counts add up, latencies take the slowest.
    **{f"judge/{k}": SUM for k in ("items", "requests", "retries", "rate_limited", "waited_s",
                                   "failures", "unparseable", "cache_hits")},
    "judge/latency_": MAX,
}


T = TypeVar("T")
U = TypeVar("U")


@dataclasses.dataclass(frozen=True)
class Halves(Generic[T]):
  """The [PASR | baseline] layout of a step: one list per half, each in question order.

  Both halves go to the sampler in ONE call, as `joined()` (PASR first); `split` cuts a list
  in that joined order back into halves. `baseline` is empty when rollout.baseline is off.
  """
  pasr: list[T]
  baseline: list[T]

  def joined(self) -> list[T]:
    return [*self.pasr, *self.baseline]

  def split(self, joined: Sequence[U]) -> Halves[U]:
    """`joined`, one item per item of `self.joined()`, cut back into the two halves."""
    if len(joined) != len(self.pasr) + len(self.baseline):
      raise ValueError(f"{len(joined)} items for halves of {len(self.pasr)} + "
                       f"{len(self.baseline)}")
    k = len(self.pasr)
    return Halves(list(joined[:k]), list(joined[k:]))

  def map(self, fn: Callable[[T], U]) -> Halves[U]:
    return Halves([fn(x) for x in self.pasr], [fn(x) for x in self.baseline])

  def kinds(self) -> tuple[tuple[str, list[T]], ...]:
    """(kind, half) pairs in joined order; kind is the rollouts.jsonl `kind`."""
    return (("pasr", self.pasr), ("baseline", self.baseline))


@dataclasses.dataclass(frozen=True)
class Prompt:
  """A question's token ids under one system prompt; `cut`: the question was shortened."""
  row: Row
  ids: list[int]
  cut: bool


@dataclasses.dataclass(frozen=True)
class Answers:
  """The rollout.n sampled answers to one prompt."""
  prompt: Prompt
  completions: list[Completion]

  @property
  def row(self) -> Row:
    return self.prompt.row


@dataclasses.dataclass(frozen=True)
class Rewards:
  """The PASR answers' reward terms and weighted rewards, `[question][sample]`."""
  terms: list[list[dict[str, float]]]
  rewards: list[list[float]]

  def flat_rewards(self) -> list[float]:
    return [r for group in self.rewards for r in group]

  def flat_terms(self) -> list[dict[str, float]]:
    return [t for group in self.terms for t in group]


@dataclasses.dataclass(frozen=True)
class Packed:
  """The trainer batch (None when no answer is trained) and the groups / answers in it."""
  batch: Batch | None
  kept: np.ndarray       # [B] bool: groups in the batch
  trained: np.ndarray    # [B, n] bool: answers whose tokens the loss scores


def _regroup(flat: Sequence[U], sizes: Sequence[int]) -> list[list[U]]:
  """`flat` cut into consecutive lists of `sizes`."""
  out, k = [], 0
  for m in sizes:
    out.append(list(flat[k:k + m]))
    k += m
  return out


class RolloutStep:
  """Turns questions into a trainer batch with a sampler and a judge (see module doc).

  Calling it, `stepper(rows, step, seed)`, runs the stages in order: prompt_ids -> sample ->
  judge_requests -> accuracies -> rewards -> advantages -> batch -> records, scalars; every
  stage but sampling and judging is a pure function of the ones before it.
  """

  def __init__(self, cfg: StepCfg, tokenizer, sampler, judge, prompts: Prompts | None = None):
    """`cfg`: the step's slice (`RunConfig.step_cfg()`); `prompts`: the built-in ones if None."""
    self.cfg = cfg
    self.tok = tokenizer
    self.sampler = sampler
    self.judge = judge
    rule = cfg.rewards.accuracy_rule
    self.accuracy_rule = rewards_lib.AccuracyRule(rule) if rule else None
    self.prompts = prompts or Prompts()
    self.eos_ids = sorted({i for i in (tokenizer.eos_token_id,) if i is not None})
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

  def __call__(self, rows: Sequence[Row], step: int, seed: int) -> StepOutput:
    """Sample, judge, reward and pack one step for `rows` (B questions)."""
    t0 = time.perf_counter()
    prompts = self.prompt_ids(rows)
    answers = self.sample(prompts, seed)
    t1 = time.perf_counter()
    requests = self.judge_requests(answers)
    accuracies, judge_stats = self.accuracies(answers, requests)
    t2 = time.perf_counter()
    rewards = self.rewards(answers, accuracies)
    advantages = self.advantages(rewards)
    packed = self.batch(answers.pasr, advantages)
    t3 = time.perf_counter()
    records = self.records(step, answers, accuracies, rewards, advantages, packed)
    times = {"time/rollout": t1 - t0, "time/judge": t2 - t1, "time/pack": t3 - t2}
    scalars, weights = self.scalars(answers, accuracies, rewards, advantages, packed,
                                    judge_stats, times)
    return StepOutput(batch=packed.batch, records=records, scalars=scalars, weights=weights)

  # ---------------------------------------------------------------------------- the stages
  def _prompt(self, system: str, question: str) -> tuple[list[int], bool]:
    """[system, user] ids within rollout.max_prompt_tokens: the question is cut, not the
    system prompt (chat.fit); the bool says whether it was."""
    ids, _, cut = chat.fit(self.tok, lambda q: chat.user_chat(system, q), question,
                           int(self.cfg.rollout.max_prompt_tokens))
    return ids, cut

  def prompt_ids(self, rows: Sequence[Row]) -> Halves[Prompt]:
    """Every question under the PASR system prompt, and under the plain one (the baseline)
    when rollout.baseline is on."""
    def under(system: str) -> list[Prompt]:
      return [Prompt(r, *self._prompt(system, r.question)) for r in rows]
    return Halves(under(self.prompts.pasr_system),
                  under(self.prompts.plain_system) if self.cfg.rollout.baseline else [])

  def sample(self, prompts: Halves[Prompt], seed: int) -> Halves[Answers]:
    """rollout.n answers to every prompt of both halves, in one sampler call."""
    rc = self.cfg.rollout
    joined = prompts.joined()
    groups = self.sampler.generate([p.ids for p in joined], n=rc.n,
                                   temperature=rc.temperature, top_p=rc.top_p,
                                   max_tokens=rc.max_tokens, stop_token_ids=self.eos_ids,
                                   seed=seed)
    return prompts.split([Answers(p, g.completions) for p, g in zip(joined, groups)])

  def judge_requests(self, answers: Halves[Answers]) -> Halves[list[dict[str, str]]] | None:
    """One judge request (`wire.judge_request`) per answer, `[question][sample]` per half;
    None under rewards.accuracy_rule, which asks no judge."""
    if self.accuracy_rule is not None:
      return None
    task_type, mode = self.cfg.task_type, self.cfg.judge_input
    return answers.map(lambda a: [judge_request(a.row.question, a.row.answer, c.text,
                                                task_type, mode) for c in a.completions])

  def accuracies(self, answers: Halves[Answers], requests: Halves[list[dict[str, str]]] | None
                 ) -> tuple[Halves[list[float]], dict[str, Any]]:
    """Accuracy in [0, 1] of every answer, `[question][sample]` per half, and the judge's
    stats: all `requests` in one concurrent judge batch, or all answers in one call of the
    rewards.accuracy_rule function without them."""
    if requests is None:
      groups = answers.joined()
      flat = [(a.row, c.text) for a in groups for c in a.completions]
      scores = self.accuracy_rule([r.question for r, _ in flat], [t for _, t in flat],
                                  [r.answer for r, _ in flat])
      return answers.split(_regroup(scores, [len(a.completions) for a in groups])), {}
    per_question = requests.joined()
    scores, stats = self.judge.score_batch([r for rs in per_question for r in rs])
    return requests.split(_regroup([float(s) for s in scores],
                                   [len(rs) for rs in per_question])), dict(stats)

  def rewards(self, answers: Halves[Answers], accuracies: Halves[list[float]]) -> Rewards:
    """Reward terms and weighted rewards of the PASR answers (the refine term against the
    same question's baseline accuracies)."""
    cfg = self.cfg
    baseline = accuracies.baseline or [None] * len(accuracies.pasr)
    terms = [rewards_lib.group_reward_terms([c.text for c in a.completions], accs, base,
                                            cfg.rewards)
             for a, accs, base in zip(answers.pasr, accuracies.pasr, baseline)]
    rewards = [[rewards_lib.weighted_reward(t, cfg.rewards) for t in group] for group in terms]
    return Rewards(terms=terms, rewards=rewards)

  def advantages(self, rewards: Rewards) -> grpo.GroupAdvantages:
    """Group advantages of the PASR answers and the zero-variance groups (grpo)."""
    gc = self.cfg.grpo
    return grpo.group_advantages(rewards.flat_rewards(), self.cfg.rollout.n, gc.adv_std_ddof,
                                 gc.adv_scale, gc.adv_eps, gc.skip_range)

  def batch(self, answers: Sequence[Answers], advantages: grpo.GroupAdvantages) -> Packed:
    """The trainer batch of the kept groups' PASR answers (grpo.skip_zero_variance drops the
    flat ones); an answer cut at max_tokens is in it but unscored with grpo.mask_truncated."""
    gc, n = self.cfg.grpo, self.cfg.rollout.n
    kept = advantages.kept(gc.skip_zero_variance)
    truncated = np.array([[c.finish_reason == "length" for c in a.completions]
                          for a in answers]).reshape(len(answers), n)
    trained = kept[:, None] & ~(gc.mask_truncated & truncated)
    adv = advantages.values.reshape(len(answers), n)
    rows = [(a.prompt.ids, c, adv[i, k], bool(trained[i, k]))
            for i, a in enumerate(answers) if kept[i] for k, c in enumerate(a.completions)]
    batch = None
    if trained.any():
      batch = batch_lib.pack_completions(
          [ids for ids, _, _, _ in rows], [c.token_ids for _, c, _, _ in rows],
          [c.logprobs for _, c, _, _ in rows], [a for _, _, a, _ in rows],
          [t for _, _, _, t in rows], self.pad_id, self.cfg.seq_multiple)
    return Packed(batch=batch, kept=kept, trained=trained)

  def records(self, step: int, answers: Halves[Answers], accuracies: Halves[list[float]],
              rewards: Rewards, advantages: grpo.GroupAdvantages, packed: Packed
              ) -> list[dict[str, Any]]:
    """One rollouts.jsonl record per answer, PASR half first; PASR answers also carry their
    reward terms, reward, advantage and whether the loss trained on them."""
    adv = advantages.values.reshape(packed.trained.shape)
    records = []
    for (kind, half), (_, half_accs) in zip(answers.kinds(), accuracies.kinds()):
      for i, a in enumerate(half):
        for k, c in enumerate(a.completions):
          rec = {"step": step, "id": a.row.id, "kind": kind, "sample": k, "text": c.text,
                 "num_tokens": len(c.token_ids), "finish_reason": c.finish_reason,
                 "accuracy": half_accs[i][k], "policy_version": c.policy_version}
          if kind == "pasr":
            terms = rewards.terms[i][k]
            rec.update(format=terms["format"], refine=terms["refine"],
                       reward=rewards.rewards[i][k], advantage=float(adv[i, k]),
                       trained=bool(packed.trained[i, k]))
          records.append(rec)
    return records

  def scalars(self, answers: Halves[Answers], accuracies: Halves[list[float]], rewards: Rewards,
              advantages: grpo.GroupAdvantages, packed: Packed, judge_stats: dict[str, Any],
              times: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """The step's metrics (see `StepOutput`) and the counts their means are over."""
    terms = rewards.flat_terms()
    pasr_comps = [c for a in answers.pasr for c in a.completions]
    all_comps = [c for a in answers.joined() for c in a.completions]
    lens = np.array([len(c.token_ids) for c in pasr_comps], np.float64)
    all_lens = np.array([len(c.token_ids) for c in all_comps], np.float64)
    scalars = {
        "reward/mean": float(np.mean(rewards.flat_rewards())),
        "reward/format": float(np.mean([t["format"] for t in terms])),
        "reward/accuracy": float(np.mean([t["accuracy"] for t in terms])),
        "reward/refine": float(np.mean([t["refine"] for t in terms])),
        "rate/format_ok": float(np.mean([t["format"] > 0 for t in terms])),
        "rate/refine": float(np.mean([count_refines(c.text) > 0 for c in pasr_comps])),
        "rate/truncated": float(np.mean([c.finish_reason == "length" for c in all_comps])),
        "rate/prompt_truncated": float(np.mean([a.prompt.cut for a in answers.joined()])),
        "len/pasr_mean": float(lens.mean()),
        "len/all_mean": float(all_lens.mean()),
        "groups/zero_variance": float(advantages.zero_variance),
        "groups/trained": float(np.sum(packed.kept)) if packed.batch is not None else 0.0,
        "tokens/generated": float(all_lens.sum()),
        **times,
    }
    if answers.baseline:
      scalars["reward/baseline_accuracy"] = float(np.mean(
          [x for accs in accuracies.baseline for x in accs]))
    for k, v in judge_stats.items():
      if isinstance(v, (int, float)) and math.isfinite(float(v)):
        scalars[f"judge/{k}"] = float(v)
    weights = {"pasr": float(len(pasr_comps)), "answers": float(all_lens.size),
               "prompts": float(len(answers.joined())),
               "baseline": float(sum(len(a.completions) for a in answers.baseline))}
    return scalars, weights
