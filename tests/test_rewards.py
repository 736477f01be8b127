"""The rewards (pasr_jax.rewards) on hand-written cases."""


import pytest

from configs.base import get_base_config
from pasr_jax import rewards
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
