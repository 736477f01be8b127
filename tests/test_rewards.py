"""The rewards (pasr_jax.rewards) on hand-written cases, and the accuracy as a user's Python
function (`rewards.accuracy_rule="module:function"`) in a rollout step."""

import os
import sys

import pytest

from configs.base import get_base_config
from pasr_jax import errors, rewards
from pasr_jax.config import ConfigError, RewardsCfg

PAPER = RewardsCfg.of(get_base_config().rewards)  # the defaults are the paper's reward

REFINED = "<think>a<refine>b</refine></think><answer>4</answer>"
UNREFINED = "<think>a</think><answer>4</answer>"


@pytest.mark.parametrize("acc,baseline,zeta,expected", [
    (1.0, [0.0, 1.0], 0.0, 1.0),     # 1 > 0.5
    (0.0, [0.0, 1.0], 0.0, -1.0),    # 0 < 0.5
    (0.5, [0.0, 1.0], 0.0, -0.5),    # equal: strict comparisons both fail
    (0.7, [0.5], 0.2, -0.5),         # exactly mean + zeta: not above
    (0.71, [0.5], 0.2, 1.0),         # just above mean + zeta
    (0.3, [0.5], 0.2, -0.5),         # exactly mean - zeta: not below
    (0.29, [0.5], 0.2, -1.0),        # just below mean - zeta
    (1.0, [1.0] * 8, 0.0, -0.5),     # baseline already perfect: refining cannot win
])
def test_refine_reward_at_zeta_boundaries(acc, baseline, zeta, expected):
  assert rewards.refine_reward(REFINED, acc, baseline, zeta) == expected


def test_refine_reward_zero_without_refine_or_baseline():
  assert rewards.refine_reward(UNREFINED, 1.0, [0.0], 0.0) == 0.0
  assert rewards.refine_reward("<think><refine>open</think><answer>1</answer>", 1.0, [0.0]) == 0.0
  assert rewards.refine_reward(REFINED, 1.0, None, 0.0) == 0.0
  with pytest.raises(rewards.RewardError, match="empty"):
    rewards.refine_reward(REFINED, 1.0, [], 0.0)
  with pytest.raises(rewards.RewardError, match="zeta"):
    rewards.refine_reward(REFINED, 1.0, [0.0], -0.1)


def _total(text, acc, base, w=None):
  w = w or PAPER
  return rewards.weighted_reward(rewards.reward_terms(text, acc, base, w.zeta), w)


def test_total_reward_weights():
  # Paper defaults (the base config): 1*format + 1*acc + 1*refine.
  assert (PAPER.format_weight, PAPER.accuracy_weight, PAPER.refine_weight, PAPER.zeta) == (
      1.0, 1.0, 1.0, 0.0)
  assert _total(REFINED, 1.0, [0.0]) == 1 + 1 + 1
  assert _total(REFINED, 0.0, [1.0]) == 1 + 0 - 1
  assert _total("4", 1.0, [0.0]) == -1 + 1 + 0
  w = PAPER.replace(format_weight=0.5, accuracy_weight=2.0, refine_weight=0.25, zeta=0.3)
  # acc 0.7 vs mean 0.5 is within zeta 0.3 -> refine -0.5.
  assert _total(REFINED, 0.7, [0.5], w) == pytest.approx(0.5 + 1.4 - 0.125)
  assert rewards.reward_terms(REFINED, 0.9, [0.5], 0.3) == {
      "format": 1.0, "accuracy": 0.9, "refine": 1.0}


# The paper's Table 2 ablations of the refine reward, on hand-written groups.
REF = "<think> a <refine> b </refine> c </think> <answer> 4 </answer>"
NOREF = "<think> a </think> <answer> 4 </answer>"


def _refine_terms(compare, texts, accs, base, **extra):
  cfg = PAPER.replace(zeta=0.0, refine_compare=compare, refine_fixed=1.0,
                                      **extra)
  return [t["refine"] for t in rewards.group_reward_terms(texts, accs, base, cfg)]


def test_refine_against_the_mean_of_the_baseline_answers():
  # baseline mean 0.25: 1 and 0.5 beat it, 0 does not, the unrefined answer gets 0
  assert _refine_terms("mean", [REF, REF, REF, NOREF], [1, .5, 0, 1], [1, 0, 0, 0]) == [
      1.0, 1.0, -1.0, 0.0]
  assert _refine_terms("mean", [REF], [1], None) == [0.0]  # no baseline: no refine reward


def test_refine_without_multi_answer_compares_with_one_baseline_answer():
  # answer k against baseline answer k only: 1 vs 1 tie, 0.5 vs 0 better, 0 vs 0 tie
  assert _refine_terms("single", [REF, REF, REF, NOREF], [1, .5, 0, 1], [1, 0, 0, 0]) == [
      -0.5, 1.0, -0.5, 0.0]
  assert _refine_terms("single", [REF, REF], [0, 1], [1, 0]) == [-1.0, 1.0]
  with pytest.raises(rewards.RewardError, match="refine_compare='single'.*2 answers but 3"):
    _refine_terms("single", [REF, REF], [0, 1], [1, 0, 0])


def test_refine_without_comparison_is_a_fixed_reward_for_refining():
  # whatever the accuracies, a refinement earns the fixed reward and its absence 0
  assert _refine_terms("none", [REF, REF, NOREF], [0, 1, 1], [1, 1, 1]) == [1.0, 1.0, 0.0]
  assert _refine_terms("none", [REF, NOREF], [0, 0], None) == [1.0, 0.0]  # no baseline needed
  cfg = PAPER.replace(refine_compare="none", refine_fixed=0.5)
  assert [t["refine"] for t in rewards.group_reward_terms([REF], [0.0], None, cfg)] == [0.5]
  with pytest.raises(ConfigError, match="rewards.refine_compare='best'"):
    _refine_terms("best", [REF], [0], [0])



@pytest.mark.parametrize("text,target,expected", [
    ("<think>x</think><answer> 7 </answer>", "7", 1.0),
    ("<think>7</think><answer>8</answer>", "7", 0.0),      # only the extracted answer counts
    ("the answer is 17", " 7 ", 1.0),     # no tags: the whole text; a substring match counts
    ("<think>x</think><answer>7</answer>", "  ", 0.0),     # an empty reference matches nothing
])
def test_contains_accuracy(text, target, expected):
  assert rewards.contains_accuracy(text, target) == expected


# ------------------------------------------------------ the accuracy as a Python function
USER_MODULE = '''
CALLS = []

def score(prompts, completions, answer, **kwargs):
  """TRL-style: 1 when the reference is in the completion."""
  CALLS.append((list(prompts), list(completions), list(answer), sorted(kwargs)))
  return [float(a in c) for c, a in zip(completions, answer)]

def scaled(completions, answer, **kwargs):      # 0..10, numpy: clamped like a judge's
  import numpy as np
  return np.array([10.0 if a in c else -3.0 for c, a in zip(completions, answer)])

def nan(completions, **kwargs):
  return [float("nan")] * len(completions)

def words(completions, **kwargs):
  return ["right"] * len(completions)

def short(completions, **kwargs):
  return [1.0]

def text(completions, **kwargs):
  return "1"
'''

GOOD7 = "<think>a<refine>b</refine>c</think><answer>7</answer>"
WRONG8 = "<think>a<refine>b</refine>c</think><answer>8</answer>"
PLAIN7 = "the answer is 7"


class _RefJudge:
  """A judge client stand-in scoring as `score` does (the reference in the judged text)."""

  def __init__(self):
    self.items = []

  def score_batch(self, items):
    self.items += items
    return [float(i["ground_truth"] in i["answer"]) for i in items], {}


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
  """A user's reward module `my_rewards_mod` on sys.path (fresh for each test)."""
  (tmp_path / "my_rewards_mod.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.delitem(sys.modules, "my_rewards_mod", raising=False)
  import my_rewards_mod  # noqa: E402  (the module the config names, as the run imports it)
  return my_rewards_mod


def _stepper(tmp_path, rule: str, judge, texts):
  """A RolloutStep on the char tokenizer and a scripted sampler: prompt i's k-th answer is
  texts[i][k] (PASR prompts first, then the baseline's)."""
  from transformers import AutoTokenizer
  from helpers import ScriptedSampler
  from pasr_jax.config import RunConfig
  from pasr_jax.step import RolloutStep
  from pasr_jax.tiny import write_char_tokenizer
  write_char_tokenizer(str(tmp_path / "tok"))
  tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  cfg = get_base_config()
  cfg.rollout.n = 2
  cfg.rollout.max_prompt_tokens = 4096          # the char tokenizer: a token per character
  cfg.rollout.vllm.max_model_len = 4096 + cfg.rollout.max_tokens
  cfg.rewards.accuracy_rule = rule
  sampler = ScriptedSampler(tok, lambda i, _, k: texts[i][k % len(texts[i])])
  return RolloutStep(RunConfig.from_tree(cfg).step_cfg(), tok, sampler, judge)


def test_accuracy_function_in_process_asks_no_judge_and_keeps_the_refine_comparison(
    tmp_path, user_rewards):
  """rewards.accuracy_rule="module:function": the step calls the user's function once with
  every answer (PASR and baseline), never a judge, and its rewards, refine terms and
  advantages are the ones a judge scoring the same way gives."""
  from pasr_jax.data import Row
  rows = [Row("q0?", "7", "a"), Row("q1?", "7", "b")]
  # q0: one right and one wrong refinement, baseline always right (mean 1);
  # q1: the same answers, baseline always wrong (mean 0).
  texts = [[GOOD7, WRONG8], [GOOD7, WRONG8], [PLAIN7], ["no idea"]]
  out = _stepper(tmp_path, "my_rewards_mod:score", None, texts)(rows, step=1, seed=0)
  (call,) = user_rewards.CALLS
  prompts, completions, answers, extra = call
  assert prompts == ["q0?", "q0?", "q1?", "q1?"] * 2 and answers == ["7"] * 8 and extra == []
  assert completions == [GOOD7, WRONG8, GOOD7, WRONG8, PLAIN7, PLAIN7, "no idea", "no idea"]
  assert [r["accuracy"] for r in out.records] == [1, 0, 1, 0, 1, 1, 0, 0]
  pasr = out.records[:4]
  # Right refinement vs baseline mean 1: not above it (-0.5); wrong one below it (-1);
  # vs baseline mean 0: +1 and -0.5.
  assert [r["refine"] for r in pasr] == [-0.5, -1.0, 1.0, -0.5]
  assert not any(k.startswith("judge/") for k in out.scalars)
  judge = _RefJudge()
  same = _stepper(tmp_path, "", judge, texts)(rows, step=1, seed=0)
  assert len(judge.items) == 8
  keys = ("accuracy", "format", "refine", "reward", "advantage", "trained")
  assert [{k: r.get(k) for k in keys} for r in out.records] == \
      [{k: r.get(k) for k in keys} for r in same.records]


def test_accuracy_function_replies_are_read_like_a_judges(tmp_path, user_rewards, caplog):
  """Numbers outside [0, 1] are clamped as a judge's are (and said once); a reply that is not
  a finite number per answer stops the step naming the function."""
  from pasr_jax.data import Row
  rows = [Row("q0?", "7", "a")]
  texts = [[GOOD7, WRONG8], [PLAIN7]]
  with caplog.at_level("WARNING"):
    out = _stepper(tmp_path, "my_rewards_mod:scaled", None, texts)(rows, step=1, seed=0)
  assert [r["accuracy"] for r in out.records] == [1.0, 0.0, 1.0, 1.0]
  assert sum("clamped to [0, 1]" in r.message for r in caplog.records) == 1
  for name, why in (("nan", r"item 0 is nan, not a finite number"),
                    ("words", r"item 0 is 'right', not a finite number"),
                    ("short", r"returned 1 numbers for 4 completions"),
                    ("text", r"returned str, not a list of 4 numbers")):
    with pytest.raises(rewards.RewardError,
                       match=rf"rewards.accuracy_rule='my_rewards_mod:{name}': {why}"):
      _stepper(tmp_path, f"my_rewards_mod:{name}", None, texts)(rows, step=1, seed=0)
  assert issubclass(rewards.RewardError, errors.UserError)   # one line, exit 2


def test_accuracy_rule_values_are_checked_before_the_run(user_rewards):
  from pasr_jax.config import RunConfig
  for bad in ("my_rewards_mod", "my_rewards_mod:", "1mod:f", "mod:f:g", "judge"):
    with pytest.raises(ConfigError, match="rewards.accuracy_rule.*'module:function'"):
      RewardsCfg(accuracy_rule=bad)
  assert RewardsCfg(accuracy_rule="my_pkg.sub.rewards:score").accuracy_rule
  assert rewards.load_accuracy_function("contains") is rewards.contains
  assert rewards.load_accuracy_function("my_rewards_mod:score") is user_rewards.score
  with pytest.raises(ConfigError, match=r"cannot import 'no_such_mod_xyz'.*PYTHONPATH"):
    rewards.load_accuracy_function("no_such_mod_xyz:score")
  with pytest.raises(ConfigError, match="module 'my_rewards_mod' has no function 'missing'"):
    rewards.load_accuracy_function("my_rewards_mod:missing")
  cfg = get_base_config()
  cfg.model.tiny_random = True
  cfg.rewards.accuracy_rule = "my_rewards_mod:missing"
  with pytest.raises(ConfigError, match="no function 'missing'"):
    rewards.require_rule(RunConfig.from_tree(cfg).rewards)  # preflight and the run call it first


@pytest.mark.slow
def test_a_run_with_an_accuracy_function_starts_no_judge(tmp_path, monkeypatch):
  """`python -m pasr_jax.train` (scripted sampler) with rewards.accuracy_rule naming a user's
  function: nothing answers at judge.base_url and judge.autostart is on, yet no judge is
  started or asked; the accuracies in rollouts.jsonl are the function's."""
  from helpers import DATA, run_train
  from pasr_jax import metrics
  from procs import free_port
  (tmp_path / "my_acc_mod.py").write_text(
      "def score(prompts, completions, answer, **kwargs):\n"
      "  return [0.25 + 0.75 * (a in c) for c, a in zip(completions, answer)]\n")
  wd = tmp_path / "w"
  monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  run_train(wd, f"http://127.0.0.1:{free_port()}", "--config.train.steps=1",
            "--config.judge.autostart=True", "--config.rewards.accuracy_rule=my_acc_mod:score",
            f"--config.data.files=('{DATA / 'say_seven.jsonl'}',)", scripted=True)
  assert not (wd / "judge.log").exists()
  recs = metrics.read_jsonl(str(wd / "rollouts.jsonl"))
  assert recs and {r["accuracy"] for r in recs} <= {0.25, 1.0}
  assert all(r["accuracy"] == (1.0 if "7" in r["text"] else 0.25) for r in recs)
