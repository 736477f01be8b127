"""Evaluation prompts: chat messages per mode, encoded to token ids with the model's template.

Token ids (not text) go to the sampler so that what is counted is exactly what was generated.
Encoding and the cut of questions too long for `max_model_len - reserve` (head kept, reported)
are `pasr_jax.chat`'s, shared with training.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoTokenizer

from pasr_jax import chat
from pasr_jax.config import PromptsCfg
from pasr_jax.prompts import PromptError, load_prompts
from pasr_jax.eval.benchmarks import EvalError, Item

# Second turn of the post-hoc refinement baselines: the original's meaning
# (inference/config.py `second_revise_without_oracle`), in our words: revise if something is
# wrong, else say the solution stands, in which case the first answer is the final one.
KEEP_REPLY = "I believe the above solution is correct."
SELF_REFINE_TURN = (
    "Review your previous solution step by step for mistakes in reasoning, calculation or "
    "reading of the question. If you find any, give a revised, corrected solution in the same "
    f"format as before. If there are none, reply only: {KEEP_REPLY}")
ORACLE_TURN = (
    "Your previous answer contains an error. Review it step by step, find the mistake, and give "
    "the corrected final answer in the same format as before.")


def system_prompt(mode: str, prompts_cfg: PromptsCfg | None = None) -> str | None:
  """The PASR system prompt (config `prompts` may name a file) for mode `pasr`, else None
  (the chat template's default system prompt, if any)."""
  if mode != "pasr":
    return None
  try:
    return load_prompts(prompts_cfg).pasr_system
  except PromptError as e:
    raise EvalError(str(e)) from None


def first_turn(item: Item, question: str, system: str | None) -> list[dict[str, str]]:
  """[system?, user(instruction + question)] for the first answer."""
  user = f"{item.instruction}\n\n{question}" if item.instruction else question
  return chat.user_chat(system, user)


def keeps_first(reply: str) -> bool:
  """Whether a review reply lets the first answer stand (it says KEEP_REPLY and gives no new
  <answer> or boxed answer)."""
  flat = " ".join(reply.lower().split())
  return (KEEP_REPLY.lower().rstrip(".") in flat and "<answer>" not in flat
          and "\\boxed" not in flat)


def second_turn(first: list[dict[str, str]], answer: str, oracle: bool) -> list[dict[str, str]]:
  """The first chat + the model's answer + the review request (oracle: 'there is an error')."""
  return first + [{"role": "assistant", "content": answer},
                  {"role": "user", "content": ORACLE_TURN if oracle else SELF_REFINE_TURN}]


class ChatEncoder:
  """Encodes chats with a model dir's tokenizer and chat template."""

  def __init__(self, model_dir: str):
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
      raise EvalError(f"config.model={model_dir!r}: not an HF model dir (no config.json)")
    try:
      self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
      raise EvalError(f"config.model={model_dir!r}: cannot load the tokenizer: {e}") from None
    if not getattr(self.tokenizer, "chat_template", None):
      raise EvalError(f"config.model={model_dir!r}: the tokenizer has no chat template")

  def encode(self, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the chat followed by the assistant generation prompt (chat.encode)."""
    return chat.encode(self.tokenizer, messages)

  def fit_question(self, item: Item, system: str | None, budget: int) -> tuple[str, bool]:
    """The question, cut at the end so the first-turn prompt has <= `budget` tokens; the
    system prompt and the task instruction are kept whole (chat.fit)."""
    try:
      _, q, cut = chat.fit(self.tokenizer, lambda q: first_turn(item, q, system),
                           item.question, budget, what="rollout.vllm.max_model_len - max_tokens")
    except chat.ChatError as e:
      raise EvalError(f"{item.id}: {e}, or lower max_tokens") from None
    return q, cut

  def decode(self, ids: list[int]) -> str:
    return self.tokenizer.decode(ids, skip_special_tokens=True)

  def __getattr__(self, name: str) -> Any:  # eos ids etc.
    return getattr(self.tokenizer, name)
