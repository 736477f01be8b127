"""One chat encoder for training, evaluation and benchmarks, with one truncation rule.

A prompt is the tokenizer's chat template over the messages plus the assistant generation
prompt, rendered to text and tokenised without extra special tokens (as vLLM does with a text
prompt). A prompt over its token budget loses the end of the *question* (marked " ..."), never
the system prompt, an instruction placed around the question, or the generation prompt.
"""

from __future__ import annotations

from typing import Any, Callable

from pasr_jax import errors

Messages = list[dict[str, str]]

# Tokens given back per retry: merges at the cut can change the count by a few tokens.
_STEP = 16
CUT_MARK = " ..."


class ChatError(errors.UserError):
  """A prompt that cannot fit its budget even with the question cut away."""


def user_chat(system: str | None, question: str) -> Messages:
  """[system?, user(question)]: a one-turn chat (no system message when `system` is None)."""
  msgs = [{"role": "system", "content": system}] if system else []
  return msgs + [{"role": "user", "content": question}]


def encode(tokenizer: Any, messages: Messages) -> list[int]:
  """Token ids of `messages` followed by the assistant generation prompt."""
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit(tokenizer: Any, build: Callable[[str], Messages], question: str, budget: int,
        what: str = "rollout.max_prompt_tokens") -> tuple[list[int], str, bool]:
  """(ids, question used, cut) of `build(question)` in at most `budget` tokens.

  `build` puts the question into the chat (system prompt, instructions and all); only the
  question is shortened, from its end, with CUT_MARK appended. Raises ChatError (naming
  `what`, the budget's config key) when the chat does not fit even with the question cut
  to almost nothing.
  """
  ids = encode(tokenizer, build(question))
  if len(ids) <= budget:
    return ids, question, False
  q_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
  keep = len(q_ids) - (len(ids) - budget) - _STEP
  while keep > 0:
    q = tokenizer.decode(q_ids[:keep]) + CUT_MARK
    ids = encode(tokenizer, build(q))
    if len(ids) <= budget:
      return ids, q, True
    keep -= _STEP
  raise ChatError(f"{what}={budget}: the prompt without its question already takes "
                  f"{len(encode(tokenizer, build('')))} tokens (system prompt and template); "
                  f"raise {what}")
