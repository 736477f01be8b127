"""qwen2_5_7b_base: the original run's policy, the *base* Qwen2.5-7B (PASR/config.py
`model_path`), with the paper's hyper-parameters on GPUs (8 devices, FSDP).

`python -m pasr_jax.train --config=configs/qwen2_5_7b_base.py[:2x8] --config.model.path=DIR` with
DIR the HF snapshot of Qwen2.5-7B (not -Instruct; configs/qwen2_5_7b.py is the Instruct model,
the documented default). The chat template: the base snapshot's tokenizer_config.json ships
Qwen's ChatML template, and the original applies it to the base model as to an instruct one
([system, user] + generation prompt); preflight fails when model.path's tokenizer has none
(add a `chat_template` entry to its tokenizer_config.json, e.g. the Instruct snapshot's).
The base model's generation config ends on <|endoftext|>; vLLM also stops on <|im_end|>, the
template's end of turn, only if the model emits it (as in the original).
"""

from configs.paper import paper_gpu_config
from configs.qwen2_5_7b import HF_CONFIG as INSTRUCT

# The public config.json of Qwen2.5-7B: the Instruct architecture with the base model's
# context length and end-of-text token.
HF_CONFIG = dict(INSTRUCT, max_position_embeddings=131072, eos_token_id=151643)


def get_config(cluster: str = ""):
  """`--config=configs/qwen2_5_7b_base.py[:HOSTSxGPUS]` (default 1x8; 2x8 for two nodes)."""
  return paper_gpu_config(HF_CONFIG, workdir="runs/qwen2_5_7b_base", cluster=cluster)
