"""Evaluation config: `python -m pasr_jax.evaluate --config=configs/eval.py --config.model=DIR`.

Every key of `pasr_jax.eval.schema.EvalRunConfig` (where each has its type, help and check) at
its default, then this preset's values. Paper protocol: greedy decoding,
at most 1500 new tokens, one answer per question, a judge scores each answer against the
reference. The judge, vLLM and prompt sections are the training ones.
"""

import ml_collections

from pasr_jax.config import defaults
from pasr_jax.eval.schema import EvalRunConfig


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(defaults(EvalRunConfig))
  c.rollout.vllm.max_model_len = 4096     # long articles (XSum, DROP) + 1500 new tokens
  return c
