"""Rollouts: the `Sampler` protocol and its vLLM implementation (with weight sync)."""

from pasr_jax.rollout.base import Completion, EngineError, Group, Sampler, SamplerError, SyncError
from pasr_jax.rollout.vllm_sampler import VllmSampler

__all__ = ["Completion", "EngineError", "Group", "Sampler", "SamplerError", "SyncError", "VllmSampler"]
