"""Flax NNX Qwen-family decoder and its HF checkpoint I/O."""

from pasr_jax import host_malloc as _host_malloc

# Every process that runs the decoder imports this package before its first JAX computation
# starts XLA's thread pools, which is when the settings must be in place (see host_malloc).
# Processes that only import other parts of pasr_jax (vLLM's engine loading
# rollout.vllm_worker, the judge server) keep glibc's defaults: vLLM's reloads were measured
# slower and uneven under these settings.
_host_malloc.keep_freed_memory()

from pasr_jax.models.hf import HFFormatError, hf_tensors, load_hf, save_hf  # noqa: E402
from pasr_jax.models.qwen import Decoder, ModelConfig, ModelConfigError, tiny_config  # noqa: E402

__all__ = ["Decoder", "HFFormatError", "ModelConfig", "ModelConfigError", "hf_tensors",
           "load_hf", "save_hf", "tiny_config"]
