"""pasr_jax.step's pipeline on a scripted sampler and judge: the [PASR | baseline] layout,
the judge requests, and which answers reach the batch."""

import numpy as np
import pytest

from configs.base import get_base_config
from helpers import ScriptedSampler
from pasr_jax import batch as batch_lib, step
from pasr_jax.config import RunConfig
from pasr_jax.data import Row
from pasr_jax.step import Halves, RolloutStep

GOOD = "<think>a<refine>b</refine>c</think><answer>7</answer>"
PLAIN = "the answer is 7"
WRONG = "<think>a</think><answer>8</answer>"


class CharTokenizer:
  """One token per character; a chat is its messages joined (enough for chat.fit)."""
  eos_token_id = 0
  pad_token_id = None

  def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
    return "|".join(f"{m['role']}:{m['content']}" for m in msgs) + "|assistant:"

  def __call__(self, text, add_special_tokens=False):
    return {"input_ids": [1 + ord(c) % 97 for c in text]}

  def decode(self, ids):
    return "".join(chr(i) for i in ids)

  def convert_tokens_to_ids(self, token):
    return self.eos_token_id


class ScriptedJudge:
  """Scores 1 when the judged answer holds the reference, else 0."""

  def __init__(self):
    self.items = []

  def score_batch(self, items):
    self.items += items
    return [float(i["ground_truth"] in i["answer"]) for i in items], {"items": len(items)}


def test_halves_split_what_joined_gave():
  h = Halves(["p0", "p1"], ["b0", "b1"])
  assert h.joined() == ["p0", "p1", "b0", "b1"]
  assert h.split([0, 1, 2, 3]) == Halves([0, 1], [2, 3])
  assert h.map(str.upper) == Halves(["P0", "P1"], ["B0", "B1"])
  assert [k for k, _ in h.kinds()] == ["pasr", "baseline"]
  assert Halves([1], []).split(["x"]) == Halves(["x"], [])
  with pytest.raises(ValueError, match="3 items"):
    h.split([0, 1, 2])


def _step(texts, **cfg_over):
  cfg = get_base_config()
  cfg.rollout.n = 2
  cfg.rollout.max_prompt_tokens = 4096
  cfg.rollout.vllm.max_model_len = 4096 + cfg.rollout.max_tokens
  cfg.judge.input = "answer"
  for k, v in cfg_over.items():
    section, key = k.split("__")
    cfg[section][key] = v
  # Prompt i's k-th answer is texts[i][k] (cycled).
  sampler = ScriptedSampler(CharTokenizer(), lambda i, _, k: texts[i][k % len(texts[i])], 1)
  judge = ScriptedJudge()
  return RolloutStep(RunConfig.from_tree(cfg).step_cfg(), CharTokenizer(), sampler, judge), sampler, judge


ROWS = [Row("q0?", "7", "a"), Row("q1?", "7", "b")]


def test_pipeline_layout_requests_and_batch():
  # q0: both PASR answers good (a flat group: skipped); q1: one good, one wrong.
  # Baselines: q0 plain right, q1 wrong.
  stepper, sampler, judge = _step([[GOOD], [GOOD, WRONG], [PLAIN], [WRONG]])
  out = stepper(ROWS, step=3, seed=0)
  (prompts,) = sampler.calls
  assert len(prompts) == 4                    # PASR and baseline prompts in one call
  assert [r["kind"] for r in out.records] == ["pasr"] * 4 + ["baseline"] * 4
  assert [r["id"] for r in out.records] == ["a", "a", "b", "b"] * 2
  # one judge request per answer, in the same order; judge.input="answer" sends the extract
  assert [i["answer"] for i in judge.items] == ["7", "7", "7", "8", PLAIN, PLAIN, "8", "8"]
  assert {i["question"] for i in judge.items[2:4]} == {"q1?"}
  assert [r["accuracy"] for r in out.records] == [1, 1, 1, 0, 1, 1, 0, 0]
  pasr = out.records[:4]
  assert [r["refine"] for r in pasr] == [-0.5, -0.5, 1.0, 0.0]   # vs baseline means 1 and 0
  assert [r["trained"] for r in pasr] == [False, False, True, True]
  assert out.scalars["groups/zero_variance"] == 1 and out.scalars["groups/trained"] == 1
  assert out.batch.advantages[:2].tolist() == [pasr[2]["advantage"], pasr[3]["advantage"]]
  assert "reward" not in out.records[4]      # baseline answers carry no reward


def test_contains_rule_asks_no_judge_and_no_baseline_means_one_half():
  stepper, sampler, judge = _step([[GOOD, WRONG], [PLAIN]], rewards__accuracy_rule="contains",
                                  rollout__baseline=False)
  out = stepper(ROWS, step=1, seed=0)
  assert judge.items == [] and len(sampler.calls[0]) == 2
  assert [r["kind"] for r in out.records] == ["pasr"] * 4
  assert [r["accuracy"] for r in out.records] == [1.0, 0.0, 1.0, 1.0]
  assert "reward/baseline_accuracy" not in out.scalars
  assert out.weights["baseline"] == 0 and out.weights["prompts"] == 2


# ----------------------------------------------------------------------------- multi-host merge
class StatsJudge(ScriptedJudge):
  """ScriptedJudge reporting every stat the real judge client reports (judge.client)."""

  def __init__(self, latency_s):
    super().__init__()
    self.latency_s = latency_s

  def score_batch(self, items):
    from pasr_jax.judge.client import _BatchStats
    scores, _ = super().score_batch(items)
    stats = _BatchStats(requests=len(items), latencies=[self.latency_s])
    return scores, stats.as_dict(len(items))


def test_merge_scalars_reduces_each_metric_as_declared():
  """Two processes' real step outputs (2 questions and 1): counts add up, means are weighted
  by the items each process averaged over, latencies take the slowest; every metric a step
  makes, the judge's stats included, is declared."""
  outs = []
  for texts, rows, lat in (([[GOOD, WRONG], [GOOD, GOOD], [PLAIN], [WRONG]], ROWS, 0.5),
                           ([[WRONG, WRONG], [PLAIN]], ROWS[:1], 2.0)):
    stepper, _, _ = _step(texts)
    stepper.judge = StatsJudge(lat)
    outs.append(stepper(rows, step=1, seed=0))
  (a, b) = outs
  assert "judge/latency_ms_p90" in a.scalars and "judge/cache_hits" in a.scalars
  merged = step.merge_scalars([(o.scalars, o.weights) for o in outs], a.reductions)
  assert set(merged) == set(a.scalars)
  assert merged["judge/items"] == a.scalars["judge/items"] + b.scalars["judge/items"] == 12
  assert merged["tokens/generated"] == a.scalars["tokens/generated"] + b.scalars["tokens/generated"]
  assert merged["judge/latency_ms_p50"] == 2000.0
  assert merged["time/rollout"] == max(a.scalars["time/rollout"], b.scalars["time/rollout"])
  # reward/accuracy: 3 of 4 PASR answers right on process 0, 0 of 2 on process 1.
  assert (a.scalars["reward/accuracy"], b.scalars["reward/accuracy"]) == (0.75, 0.0)
  assert merged["reward/accuracy"] == pytest.approx(3 / 6)
  assert merged["rate/prompt_truncated"] == 0.0
  assert step.merge_scalars([(a.scalars, a.weights)], a.reductions) == a.scalars


def test_undeclared_metric_fails_instead_of_taking_process_0s_value():
  out = _step([[GOOD], [GOOD], [PLAIN], [PLAIN]])[0](ROWS, step=1, seed=0)
  scalars = dict(out.scalars, **{"reward/new_term": 0.5})
  for parts in ([(scalars, out.weights)], [(scalars, out.weights)] * 2):
    with pytest.raises(AssertionError, match="'reward/new_term' declares no multi-host"):
      step.merge_scalars(parts, out.reductions)
  fam = {"time/": step.MAX, "time/wait_": step.MIN, "policy_version": step.FIRST}
  assert step.reduction_of("time/wait_x", fam) == step.MIN  # the longest family wins
  assert step.reduction_of("time/update", fam) == step.MAX
  with pytest.raises(AssertionError):
    step.reduction_of("policy_version/x", fam)  # a name is no family
  two = [({"time/a": 1.0, "policy_version": 3.0}, {}), ({"time/a": 4.0, "policy_version": 9.0}, {})]
  assert step.merge_scalars(two, fam) == {"time/a": 4.0, "policy_version": 3.0}


# ----------------------------------------------------------------------------- the batch
def test_batch_pack_pad_and_fields():
  """batch.pack lays rows out with their masks; pad adds rows copying row 0's tokens with
  nothing scored and columns of pad tokens; a Batch's absent fields are None."""
  b = batch_lib.pack([[5, 6, 7], [8, 9]], [[0, 1, 1], [1, 0]], pad_id=0, multiple=4,
                     rows_multiple=4)
  assert b.shape == (4, 4) and b.fields() == ("input_ids", "attention_mask", "positions",
                                              "loss_mask")
  assert b.old_logps is None and b.advantages is None
  np.testing.assert_array_equal(b.input_ids, [[5, 6, 7, 0], [8, 9, 0, 0], [5, 6, 7, 0],
                                              [5, 6, 7, 0]])
  np.testing.assert_array_equal(b.attention_mask[2], [1, 1, 1, 0])
  np.testing.assert_array_equal(b.loss_mask, [[0, 1, 1, 0], [1, 0, 0, 0], [0] * 4, [0] * 4])
  wide = batch_lib.pad(b, 4, 6, pad_id=3)
  np.testing.assert_array_equal(wide.input_ids[1], [8, 9, 0, 0, 3, 3])
  np.testing.assert_array_equal(wide.positions[0], np.arange(6))
  none = batch_lib.pad(None, 2, 5, pad_id=3)
  assert none.fields() == ("input_ids", "attention_mask", "positions", "loss_mask", "old_logps",
                           "advantages")
  assert none.attention_mask.sum() == 2 and none.loss_mask.sum() == 0
  g = batch_lib.pack_completions([[1, 2], [3]], [[4], [5, 6]], [[-0.5], [-1.0, -2.0]],
                                 [1.0, -1.0], [True, False], pad_id=0, multiple=1)
  np.testing.assert_array_equal(g.loss_mask, [[0, 0, 1], [0, 0, 0]])
  np.testing.assert_array_equal(g.old_logps, [[0, 0, -0.5], [0, 0, 0]])
  with pytest.raises(batch_lib.BatchError, match="missing \\['advantages'\\]"):
    b.only(("input_ids", "advantages"))
