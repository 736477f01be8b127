"""qwen3_8b: the PASR paper's second model on GPUs (Qwen3-8B, 8 devices, FSDP).

`python -m pasr_jax.train --config=configs/qwen3_8b.py --config.model.path=DIR` with DIR the
HF snapshot of Qwen3-8B; `python -m pasr_jax.plan --config=configs/qwen3_8b.py
--mesh=1,8,1` prints the per-device memory of this train step without any weights.
"""

from configs.base import get_base_config

# The public config.json of Qwen3-8B (what `model.path` must contain); used by the
# memory plan and to check a downloaded snapshot.
HF_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "sliding_window": None,
    "use_sliding_window": False,
    "max_window_layers": 36,
    "torch_dtype": "bfloat16",
}


def get_config():
  c = get_base_config()
  c.workdir = "runs/qwen3_8b"
  c.model.path = ""                   # required: HF dir of Qwen3-8B
  c.model.hf_config = dict(HF_CONFIG)
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
