"""The PASR paper's GPU training settings, shared by the 7B/8B presets."""

import ml_collections

from configs.base import get_base_config


def paper_gpu_config(hf_config: dict, workdir: str) -> ml_collections.ConfigDict:
  """Base config + the paper's hyper-parameters for a model with this public config.json."""
  c = get_base_config()
  c.workdir = workdir
  c.model.path = ""                   # required: the HF snapshot matching hf_config
  c.model.hf_config = dict(hf_config)  # used by the memory plan and to check the snapshot
  c.model.dtype = "bfloat16"          # compute; master weights and AdamW state stay float32
  c.model.param_dtype = "float32"
  c.model.scan_layers = True          # compile time independent of depth
  c.model.remat = True
  c.mesh.shape = (1, -1, 1)           # FSDP over every device (8 GPUs in the paper)
  # The paper: 8 prompts x 8 answers, β 0.04, ε 0.2, AdamW lr 1e-6, 1500 new tokens.
  c.rollout.prompts_per_step = 8
  c.rollout.n = 8
  c.rollout.max_tokens = 1500
  c.rollout.max_prompt_tokens = 512
  c.rollout.vllm.max_model_len = 2048
  c.rollout.vllm.dtype = "bfloat16"
  c.rollout.vllm.gpu_memory_utilization = 0.3
  c.grpo.beta = 0.04
  c.grpo.eps_low = 0.2
  c.grpo.eps_high = 0.2
  c.grpo.agg = "seq_mean_token_mean"
  c.optim.lr = 1e-6
  c.optim.weight_decay = 0.0
  # Global sequences per micro-batch: the paper's 2 per device x 8 devices (sequences of up to
  # 2048 tokens); 64 sequences per step -> 4 accumulation steps.
  c.optim.micro_batch = 16
  c.train.steps = 1000
  c.checkpoint.every = 50
  return c
