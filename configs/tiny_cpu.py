"""tiny_cpu: a random tiny Qwen2 (char-level tokenizer) made on the fly; seconds per step.

For tests and smoke runs: `python -m pasr_jax.train --config=configs/tiny_cpu.py
--config.workdir=/tmp/tiny`. The verify judge must answer at `judge.base_url` (or set
`judge.autostart=True`).
"""

import os

from configs.base import get_base_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config():
  c = get_base_config()
  c.workdir = "runs/tiny_cpu"
  c.model.tiny_random = True          # written to <workdir>/tiny_model at the first start
  c.mesh.shape = (1, -1, 1)
  c.data.files = (os.path.join(_HERE, "data", "gsm8k_train_64.jsonl"),)
  c.rollout.prompts_per_step = 2
  c.rollout.n = 4
  c.rollout.max_tokens = 24
  c.rollout.max_prompt_tokens = 1024  # char-level: the PASR system prompt alone is ~700 tokens
  c.rollout.vllm.max_model_len = 1152
  c.rollout.vllm.kv_cache_space_gib = 1
  c.grpo.beta = 0.04
  c.grpo.skip_zero_variance = False   # a random model rarely varies; still exercise the update
  c.optim.lr = 1e-3
  c.optim.micro_batch = 8            # a multiple of data*fsdp (8 forced CPU devices in tests)
  c.train.steps = 3
  c.train.seq_multiple = 256          # one batch length (768) for the usual prompt: one compile
  c.sft.batch_size = 8                # = optim.micro_batch: no padding rows
  c.checkpoint.every = 1
  c.checkpoint.keep = 2
  return c
