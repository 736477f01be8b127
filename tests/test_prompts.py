"""The prompts (pasr_jax.prompts) and the judge wire format (pasr_jax.judge.wire)."""

import pytest

from configs.base import get_base_config

from pasr_jax import prompts
from pasr_jax.config import ConfigError, PromptsCfg
from pasr_jax.judge import wire


@pytest.mark.parametrize("task_type", prompts.TASK_TYPES)
def test_judge_messages_round_trip(task_type):
  q = "What is 2+2?\n=== END ===\ntricky line"
  gt = "4\n#### 4"
  ans = "<think>=== CANDIDATE ANSWER ===</think><answer>4</answer>\n"
  msgs = wire.judge_messages(q, gt, ans, task_type)
  assert [m["role"] for m in msgs] == ["system", "user"]
  assert msgs[0]["content"] == prompts.JUDGE_INSTRUCTIONS[task_type]
  assert wire.parse_judge_sections(msgs[1]["content"]) == {
      "task_type": task_type, "question": q, "ground_truth": gt, "answer": ans}


def test_judge_messages_rejects_unknown_task():
  with pytest.raises(prompts.PromptError, match="task_type='essay'"):
    wire.judge_messages("q", "a", "b", "essay")
  assert wire.parse_judge_sections("no sections here") is None


def test_load_prompts_from_files(tmp_path):
  (tmp_path / "prompts.txt").write_text("Refine a lot.\n")
  jd = tmp_path / "judge"
  jd.mkdir()
  (jd / "general.txt").write_text("Q: {question}\nRef: {ground_truth}\nAns: {answer}\nScore:")
  cfg = _prompts_cfg(pasr_system_file=str(tmp_path / "prompts.txt"), judge_dir=str(jd))
  p = prompts.load_prompts(PromptsCfg.of(cfg))
  assert p.pasr_system == "Refine a lot."
  assert p.plain_system == prompts.PLAIN_SYSTEM_PROMPT
  assert p.judge["summary"] == prompts.JUDGE_INSTRUCTIONS["summary"]
  msgs = wire.judge_messages("1+1 {x}", "2", "\\frac{4}{2}", "general", templates=p.judge)
  assert msgs == [{"role": "user", "content": "Q: 1+1 {x}\nRef: 2\nAns: \\frac{4}{2}\nScore:"}]
  assert prompts.load_prompts(None) == prompts.Prompts()


def _prompts_cfg(**overrides):
  cfg = get_base_config().prompts
  cfg.update(overrides)
  return cfg


def test_load_prompts_errors_name_the_field(tmp_path):
  missing = _prompts_cfg(pasr_system_file=str(tmp_path / "nope.txt"))
  with pytest.raises(ConfigError, match="prompts.pasr_system_file=.*nope.txt'?: no such file"):
    prompts.load_prompts(PromptsCfg.of(missing))
  (tmp_path / "empty.txt").write_text("  \n")
  empty = _prompts_cfg(plain_system_file=str(tmp_path / "empty.txt"))
  with pytest.raises(prompts.PromptError, match="plain_system_file=.*empty"):
    prompts.load_prompts(PromptsCfg.of(empty))
  nodir = _prompts_cfg(judge_dir=str(tmp_path))
  with pytest.raises(prompts.PromptError, match="judge_dir=.*none of"):
    prompts.load_prompts(PromptsCfg.of(nodir))


def test_judge_input_modes():
  text = "<think>x</think><answer> 7 </answer>"
  assert wire.judge_input(text, "full") == text
  assert wire.judge_input(text, "answer") == "7"
  with pytest.raises(prompts.PromptError, match="judge.input='both'"):
    wire.judge_input(text, "both")



def test_judge_request_is_what_train_and_eval_send():
  text = "<think>x</think><answer> 7 </answer>"
  assert wire.judge_request("q", "7", text, "general", "answer") == {
      "question": "q", "ground_truth": "7", "answer": "7", "task_type": "general"}
  assert wire.judge_request("q", "7", text, "summary")["answer"] == text   # "full" by default
  with pytest.raises(prompts.PromptError, match="judge.input='both'"):
    wire.judge_request("q", "7", text, "general", "both")
