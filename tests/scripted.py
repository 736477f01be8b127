"""A deterministic test double of the vLLM sampler: scripted completions, same on any host.

vLLM's samples differ between engines, so a run split over processes cannot be compared with
a one-process run on real rollouts. This sampler answers by the question alone: a question
containing "SAME" gets n identical answers (a zero-variance group); any other gets answers
that alternate between containing "7" and not. Token ids come from the run's tokenizer, the
"sampler logprobs" are fixed numbers. `sync` gathers the weights exactly as the vLLM sampler
does (`hf_tensors` in the engine's dtype, one copy per host) and keeps their checksum.
"""

from __future__ import annotations

import numpy as np
from transformers import AutoTokenizer

from pasr_jax.rollout.base import Completion, Group


class ScriptedSampler:
  """`Sampler` whose completions depend only on the prompt text and the sample index."""

  def __init__(self, model_dir: str):
    self.tok = AutoTokenizer.from_pretrained(model_dir)
    self.llm = None  # the run starts an engine by touching `llm`; there is none
    self._version = 0
    self.prompts_seen: list[str] = []
    self.weight_sums: list[float] = []

  @property
  def policy_version(self) -> int:
    return self._version

  def generate(self, prompt_token_ids, n, temperature, top_p, max_tokens, stop_token_ids=None,
               seed=None) -> list[Group]:
    eos = self.tok.convert_tokens_to_ids("<|im_end|>")
    groups = []
    for ids in prompt_token_ids:
      question = self.tok.decode(ids).rsplit("<|im_start|>user", 1)[-1]
      self.prompts_seen.append(question)
      comps = []
      for k in range(n):
        text = "<answer>3</answer>" if "SAME" in question or k % 2 else "<answer>7</answer>"
        tokens = list(self.tok.encode(text, add_special_tokens=False))[:max_tokens - 1] + [eos]
        lps = [-0.5 - 0.01 * j for j in range(len(tokens))]
        comps.append(Completion(token_ids=tokens, logprobs=lps, text=text, finish_reason="stop",
                                policy_version=self._version))
      groups.append(Group(prompt_token_ids=list(ids), completions=comps))
    return groups

  def sync(self, model, version: int) -> dict[str, float]:
    from pasr_jax.models.hf import hf_tensors
    total = sum(float(np.asarray(x, np.float64).sum()) for _, x in hf_tensors(model, model.cfg))
    self.weight_sums.append(total)
    self._version = version
    return {"total_s": 0.0}

  def close(self) -> None:
    pass
