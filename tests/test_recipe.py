"""The last recipe differences from the original run (issue #24 item 4) that are behaviours:
the Self-Refine review turn's "the solution stands" reply, the judge's reference for GSM8K
(the whole worked solution as an option), evaluation's first-answer temperature.

The sampler here is a double that replies from a script: whether a model answers "I believe
the above solution is correct" cannot be caused on demand with SmolLM2. Everything else is
real: SmolLM2's tokenizer and chat template, the `verify` judge over HTTP, the result files.
"""

from pathlib import Path

from configs import paper_eval
from configs.eval import get_config
from pasr_jax.eval import prompts as P
from pasr_jax.evaluate import evaluate
from pasr_jax.rollout.base import Completion, Group

DATA = str(Path(__file__).resolve().parent / "data" / "eval")


class ScriptedModel:
  """Replies by turn: the first answer (`first`), then the review reply (`review`)."""

  def __init__(self, first: str, review: str):
    self.first, self.review, self.calls = first, review, []

  def generate(self, prompts, n=1, temperature=0.0, **kw):
    self.calls.append(dict(kw, temperature=temperature, prompts=len(prompts)))
    text = self.review if len(self.calls) > 1 else self.first
    return [Group(p, [Completion(list(range(7)), [0.0] * 7, text, "stop", 0)]) for p in prompts]

  def close(self):
    pass


def _cfg(model, judge_url, out, **kw):
  c = get_config()
  c.model, c.data_dir, c.datasets, c.limit, c.out_dir = str(model), DATA, "gsm8k", 1, str(out)
  c.max_tokens, c.judge.base_url = 64, judge_url
  for k, v in kw.items():
    c[k] = v
  return c


def test_review_reply_that_the_solution_stands_keeps_the_first_answer(
    tmp_path, smollm2_dir, judge_url):
  """GSM8K's first item (18): a right first answer and the original's 'it is correct' reply
  keep the score of the first answer; a review that gives a new wrong answer replaces it."""
  right = "<answer> 18 </answer>"
  kept = evaluate(_cfg(smollm2_dir, judge_url, tmp_path / "a", mode="self_refine"),
                  make_sampler=lambda: ScriptedModel(right, P.KEEP_REPLY))["items"][0]
  assert kept["second_turn"] and kept["score"] == kept["first_score"] == 1.0, kept
  assert kept["answer"] == right and kept["tokens_per_turn"] == [7, 7]
  revised = evaluate(_cfg(smollm2_dir, judge_url, tmp_path / "b", mode="self_refine"),
                     make_sampler=lambda: ScriptedModel(right, "<answer> 17 </answer>"))
  assert revised["items"][0]["score"] == 0.0
  assert "If there are none, reply only: " + P.KEEP_REPLY in P.SELF_REFINE_TURN
  assert not P.keeps_first(P.KEEP_REPLY + " <answer> 17 </answer>")


def test_gsm8k_reference_is_the_number_or_the_whole_solution(tmp_path, smollm2_dir, judge_url):
  final = evaluate(_cfg(smollm2_dir, judge_url, tmp_path / "f"),
                   make_sampler=lambda: ScriptedModel("<answer> 18 </answer>", ""))["items"][0]
  whole = evaluate(_cfg(smollm2_dir, judge_url, tmp_path / "w", reference="solution"),
                   make_sampler=lambda: ScriptedModel("<answer> 18 </answer>", ""))["items"][0]
  assert final["ground_truth"] == "18"
  assert whole["ground_truth"].startswith("Janet sells") and whole["ground_truth"].endswith("#### 18")
  assert final["score"] == whole["score"] == 1.0  # the verify judge reads the number after ####


def test_paper_eval_is_greedy_1500_or_sampled_0_5_with_2048_tokens(tmp_path, smollm2_dir,
                                                                    judge_url):
  greedy, sampled = paper_eval.get_config(), paper_eval.get_config("sampled")
  assert (greedy.temperature, greedy.max_tokens) == (0.0, 1500)
  assert (sampled.temperature, sampled.max_tokens) == (0.5, 2048)
  assert greedy.reference == "solution"
  model = ScriptedModel("<answer> 18 </answer>", "")
  evaluate(_cfg(smollm2_dir, judge_url, tmp_path, temperature=0.5), make_sampler=lambda: model)
  assert model.calls[0]["temperature"] == 0.5
