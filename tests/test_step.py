"""pasr_jax.step's pipeline on a scripted sampler and judge: the [PASR | baseline] layout,
the judge requests, and which answers reach the batch."""

import pytest

from configs.base import get_base_config
from helpers import ScriptedSampler
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
