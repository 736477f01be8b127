"""pasr_jax.chat, the one chat encoder of training and evaluation, on SmolLM2's tokenizer:
a prompt over its budget loses the end of the question, never the system prompt."""

import pytest
from transformers import AutoTokenizer

from configs.base import get_base_config
from pasr_jax import chat, prompts
from pasr_jax.config import RunConfig
from pasr_jax.eval.benchmarks import Item
from pasr_jax.eval.prompts import ChatEncoder, first_turn
from pasr_jax.step import RolloutStep

QUESTION = (" ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}."
                     for i in range(120)) + " Which of these facts are about odd numbers?")


@pytest.fixture(scope="module")
def tok(smollm2_dir):
  return AutoTokenizer.from_pretrained(smollm2_dir)


def rollout_step(tok, cap):
  cfg = get_base_config()
  cfg.rollout.max_prompt_tokens = cap
  cfg.rollout.vllm.max_model_len = max(cap + cfg.rollout.max_tokens, 2048)
  return RolloutStep(RunConfig.from_tree(cfg).step_cfg(), tok, sampler=None, judge=None)


@pytest.mark.parametrize("system", [prompts.PASR_SYSTEM_PROMPT, prompts.PAPER_PASR_SYSTEM_PROMPT])
def test_long_prompt_keeps_the_whole_system_prompt(tok, system):
  cap = 400
  full = chat.encode(tok, chat.user_chat(system, QUESTION))
  assert len(full) > cap + 200
  ids, cut = rollout_step(tok, cap)._prompt(system, QUESTION)
  assert cut and cap - 2 * chat._STEP <= len(ids) <= cap
  text = tok.decode(ids)
  assert system in text                                   # all of it
  assert text.endswith("<|im_start|>assistant\n")         # the generation prompt too
  assert "Fact 0: the number 0 is even." in text          # the question's head is kept
  assert "Which of these facts" not in text and chat.CUT_MARK + "<|im_end|>" in text


def test_train_and_eval_encode_the_same_ids(tok, smollm2_dir):
  system = prompts.PASR_SYSTEM_PROMPT
  enc = ChatEncoder(str(smollm2_dir))
  item = Item("x/0", "x", QUESTION, "", "general", "")
  for cap in (400, 10_000):                               # cut, and whole
    ids, cut = rollout_step(tok, cap)._prompt(system, QUESTION)
    q, eval_cut = enc.fit_question(item, system, cap)
    assert enc.encode(first_turn(item, q, system)) == ids and eval_cut == cut
  # Whole prompts are what the template's own tokenisation gives.
  short = chat.user_chat(system, "What is 2 + 2?")
  assert chat.encode(tok, short) == list(tok.apply_chat_template(
      short, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_instruction_around_the_question_is_kept(smollm2_dir):
  enc = ChatEncoder(str(smollm2_dir))
  item = Item("x/1", "x", QUESTION, "", "general", "Think step by step and give the final answer.")
  q, cut = enc.fit_question(item, None, 200)
  text = enc.tokenizer.decode(enc.encode(first_turn(item, q, None)))
  assert cut and item.instruction in text


def test_system_prompt_over_the_budget_is_an_error(tok):
  with pytest.raises(chat.ChatError, match=r"rollout.max_prompt_tokens=50: .*raise"):
    rollout_step(tok, 50)._prompt(prompts.PASR_SYSTEM_PROMPT, QUESTION)
