"""qwen3_8b: the PASR paper's second model on GPUs (Qwen3-8B, 8 devices, FSDP).

`python -m pasr_jax.train --config=configs/qwen3_8b.py --config.model.path=DIR` with DIR the HF
snapshot of Qwen3-8B; `python -m pasr_jax.plan --config=configs/qwen3_8b.py
--mesh=1,8,1` prints the per-device memory of this train step without any weights.
On two nodes of 8 GPUs: `--config=configs/qwen3_8b.py:2x8`
(16 sequences per update; see configs/paper.py).
"""

from configs.paper import paper_gpu_config

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


def get_config(cluster: str = ""):
  """`--config=configs/qwen3_8b.py[:HOSTSxGPUS]` (default 1x8; 2x8 for two nodes)."""
  return paper_gpu_config(HF_CONFIG, workdir="runs/qwen3_8b", cluster=cluster)
