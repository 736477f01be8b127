"""Flax NNX Qwen-family decoder and its HF checkpoint I/O."""

from pasr_jax.models.hf import HFFormatError, hf_tensors, load_hf, save_hf
from pasr_jax.models.qwen import Decoder, ModelConfig, ModelConfigError

__all__ = ["Decoder", "HFFormatError", "ModelConfig", "ModelConfigError", "hf_tensors",
           "load_hf", "save_hf"]
