"""Flax NNX Qwen-family decoder and its HF checkpoint I/O."""

from pasr_jax.models.qwen import Decoder, ModelConfig, ModelConfigError, tiny_config

__all__ = ["Decoder", "ModelConfig", "ModelConfigError", "tiny_config"]
