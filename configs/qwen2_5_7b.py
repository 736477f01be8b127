"""qwen2_5_7b: the PASR paper's main setting on GPUs (Qwen2.5-7B-Instruct, 8 devices, FSDP).

`python -m pasr_jax.train --config=configs/qwen2_5_7b.py --config.model.path=DIR` with DIR the HF
snapshot of Qwen2.5-7B-Instruct; `python -m pasr_jax.plan --config=configs/qwen2_5_7b.py
--mesh=1,8,1` prints the per-device memory of this train step without any weights.
On two nodes of 8 GPUs: `--config=configs/qwen2_5_7b.py:2x8`
(16 sequences per update; see configs/paper.py).
"""

from configs.paper import paper_gpu_config

# The public config.json of Qwen2.5-7B-Instruct (what `model.path` must contain); used by the
# memory plan and to check a downloaded snapshot.
HF_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "max_window_layers": 28,
    "torch_dtype": "bfloat16",
}


def get_config(cluster: str = ""):
  """`--config=configs/qwen2_5_7b.py[:HOSTSxGPUS]` (default 1x8; 2x8 for two nodes)."""
  return paper_gpu_config(HF_CONFIG, workdir="runs/qwen2_5_7b", cluster=cluster)
