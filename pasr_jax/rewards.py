"""The rewards of a sampled answer (pure functions on strings).

The reward of one sampled answer is
  format_weight * format_reward + accuracy_weight * acc + refine_weight * refine_reward
where `acc` in [0, 1] comes from the judge or, with `rewards.accuracy_rule`, from a Python
function in this process (`AccuracyRule`: the built-in `contains`, or a user's
`module:function`), and `refine_reward` compares `acc` with the mean accuracy of answers
sampled for the same question without the refine prompt (the baseline).
"""

from __future__ import annotations

import importlib
import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence

from pasr_jax import errors
from pasr_jax.answer_format import count_refines, extract_answer, format_ok
from pasr_jax.config import ConfigError, RewardsCfg

log = logging.getLogger(__name__)


class RewardError(errors.UserError):
  """Rewards were asked for with inputs that have no meaning (an empty baseline, an accuracy
  function that returns no number)."""


def format_reward(text: str) -> float:
  """+1 if the answer is well formed, else -1.

  C1: exactly one <think>...</think> followed by exactly one <answer>...</answer>, with
  only whitespace before, between and after. C2: every <refine> is closed, lies inside the
  think block and contains no other refine. C3: the order think -> answer is fixed.
  Tags are exact lowercase; `<Think>` is plain text.
  """
  return 1.0 if format_ok(text) else -1.0


def contains_accuracy(text: str, ground_truth: str) -> float:
  """The `contains` accuracy rule: 1 if the extracted answer of `text` holds the (stripped,
  non-empty) reference answer, else 0 (`rewards.accuracy_rule="contains"`: a judge-free
  signal for toy runs and short answers)."""
  target = ground_truth.strip()
  return 1.0 if target and target in extract_answer(text) else 0.0


def contains(prompts: Sequence[str], completions: Sequence[str], answer: Sequence[str],
             **kwargs) -> list[float]:
  """The built-in accuracy rule `contains` (`contains_accuracy` of each completion), written as
  any `rewards.accuracy_rule` function is."""
  del prompts, kwargs
  return [contains_accuracy(c, a) for c, a in zip(completions, answer)]


# rewards.accuracy_rule values that name a function of this module.
BUILTIN_RULES: dict[str, Callable[..., Sequence[float]]] = {"contains": contains}


def load_accuracy_function(rule: str) -> Callable[..., Sequence[float]]:
  """The function `rewards.accuracy_rule` names: a built-in (`BUILTIN_RULES`) or
  `module:function`, imported from sys.path. ConfigError naming the key when it is not there."""
  if rule in BUILTIN_RULES:
    return BUILTIN_RULES[rule]
  module, _, name = rule.partition(":")
  where = f"config rewards.accuracy_rule={rule!r}"
  try:
    mod = importlib.import_module(module)
  except ImportError as e:
    raise ConfigError(f"{where}: cannot import {module!r} ({e}); put it on PYTHONPATH") from None
  fn = getattr(mod, name, None)
  if not callable(fn):
    raise ConfigError(f"{where}: module {module!r} has no function {name!r}")
  return fn


def require_rule(cfg: RewardsCfg) -> None:
  """The function `cfg.accuracy_rule` names (if any) imports: checked by preflight and the run
  before any weights load (ConfigError naming the key otherwise)."""
  if cfg.accuracy_rule:
    load_accuracy_function(cfg.accuracy_rule)


class AccuracyRule:
  """Accuracy by a Python function in this process instead of the judge (`rewards.accuracy_rule`).

  The function is called once per step with every answer of the step, the way TRL calls a
  reward function: `fn(prompts=[question, ...], completions=[answer text, ...],
  answer=[reference, ...])` (lists of equal length; a function should take `**kwargs` for
  arguments added later) and returns one number per completion. The numbers are read as a
  judge's reply is: clamped to [0, 1] (logged once); anything that is not a finite number,
  or a list of another length, raises RewardError naming the function.
  """

  def __init__(self, rule: str):
    self.rule = rule
    self.fn = load_accuracy_function(rule)
    self._warned = False

  def __call__(self, questions: Sequence[str], completions: Sequence[str],
               references: Sequence[str]) -> list[float]:
    """Accuracy in [0, 1] of `completions[i]` to `questions[i]` against `references[i]`."""
    n = len(completions)
    got = self.fn(prompts=list(questions), completions=list(completions),
                  answer=list(references))
    where = f"rewards.accuracy_rule={self.rule!r}"
    if hasattr(got, "tolist"):  # a numpy array (or scalar)
      got = got.tolist()
    if isinstance(got, (str, bytes)) or not isinstance(got, Sequence):
      raise RewardError(f"{where}: returned {type(got).__name__}, not a list of {n} numbers")
    if len(got) != n:
      raise RewardError(f"{where}: returned {len(got)} numbers for {n} completions")
    out = []
    for i, v in enumerate(got):
      if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise RewardError(f"{where}: item {i} is {v!r:.80}, not a finite number (completion "
                          f"{completions[i]!r:.80})")
      clamped = min(1.0, max(0.0, float(v)))
      if clamped != float(v) and not self._warned:
        self._warned = True
        log.warning("%s returned %r (item %d): accuracies are clamped to [0, 1], as a "
                    "judge's scores are", where, v, i)
      out.append(clamped)
    return out

  def score_batch(self, items: Sequence[Mapping[str, str]]) -> tuple[list[float], dict]:
    """The judge client's interface (`JudgeClient.score_batch`) over judge requests
    (`judge.wire.judge_request` dicts), so evaluation can use the rule in the judge's place."""
    return self([it["question"] for it in items], [it["answer"] for it in items],
                [it["ground_truth"] for it in items]), {}


def refine_reward(text: str, acc: float, baseline_accs: Sequence[float] | None,
                  zeta: float = 0.0) -> float:
  """Reward for refining: 0 without a complete refine pair (or with no baseline, None);
  else +1 if acc > mean(baseline) + zeta, -1 if acc < mean - zeta, -0.5 within +-zeta."""
  if baseline_accs is None or count_refines(text) == 0:
    return 0.0
  if len(baseline_accs) == 0:
    raise RewardError("refine_reward: baseline_accs is empty (pass None when there is no "
                      "baseline)")
  if zeta < 0:
    raise RewardError(f"refine_reward: zeta={zeta} must be >= 0")
  mean = math.fsum(baseline_accs) / len(baseline_accs)
  if acc > mean + zeta:
    return 1.0
  if acc < mean - zeta:
    return -1.0
  return -0.5


def reward_terms(text: str, acc: float, baseline_accs: Sequence[float] | None,
                 zeta: float = 0.0) -> dict[str, float]:
  """The unweighted terms: {'format', 'accuracy', 'refine'}."""
  return {"format": format_reward(text), "accuracy": float(acc),
          "refine": refine_reward(text, acc, baseline_accs, zeta)}


# rewards.refine_compare: what a refining answer is compared with. "mean": the mean accuracy
# of the question's baseline answers (PASR); "single": only the baseline answer with the same
# index (paper Table 2, "w/o multi-answer"); "none": no comparison, every answer with a
# refinement gets rewards.refine_fixed (Table 2, "w/o comparison").


def group_reward_terms(texts: Sequence[str], accs: Sequence[float],
                       baseline_accs: Sequence[float] | None, cfg: RewardsCfg
                       ) -> list[dict[str, float]]:
  """`reward_terms` of one question's answers under the `rewards` config `cfg` (zeta,
  refine_compare, refine_fixed). `baseline_accs`: the accuracies of the question's baseline
  answers, None without a baseline."""
  zeta, compare = cfg.zeta, cfg.refine_compare
  if compare == "single" and baseline_accs is not None and len(baseline_accs) != len(texts):
    raise RewardError(f"rewards.refine_compare='single' pairs answer k with baseline answer k: "
                      f"{len(texts)} answers but {len(baseline_accs)} baseline answers")
  out = []
  for k, (text, acc) in enumerate(zip(texts, accs)):
    if compare == "none":
      t = reward_terms(text, acc, None, zeta)
      t["refine"] = cfg.refine_fixed if count_refines(text) else 0.0
    else:
      base = baseline_accs
      if compare == "single" and base is not None:
        base = [baseline_accs[k]]
      t = reward_terms(text, acc, base, zeta)
    out.append(t)
  return out


def weighted_reward(terms: dict[str, float], w: RewardsCfg) -> float:
  """format_weight*format + accuracy_weight*accuracy + refine_weight*refine of `reward_terms`
  output, with the `rewards` config's weights."""
  return (w.format_weight * terms["format"] + w.accuracy_weight * terms["accuracy"]
          + w.refine_weight * terms["refine"])
