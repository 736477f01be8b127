"""Rollouts: the `Sampler` protocol, its vLLM implementation and the weight sync into it.

The vLLM sampler and the weight sync are imported on first use: vLLM's worker processes import
this package (for `vllm_internals.SyncExtension`) and must not pay for JAX's import.
"""

from __future__ import annotations

import importlib
from typing import Any

from pasr_jax.rollout.base import Completion, EngineError, Group, Sampler, SamplerError, SyncError

_LAZY = {"VllmSampler": "pasr_jax.rollout.vllm_sampler", "VllmEngine": "pasr_jax.rollout.engine",
         "WeightSync": "pasr_jax.rollout.weight_sync"}

__all__ = ["Completion", "EngineError", "Group", "Sampler", "SamplerError", "SyncError",
           *_LAZY]


def __getattr__(name: str) -> Any:
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
