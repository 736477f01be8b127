"""Rollouts: the `Sampler` protocol, its vLLM implementation and the weight sync into it."""

from pasr_jax.rollout.base import Completion, EngineError, Group, Sampler, SamplerError, SyncError
from pasr_jax.rollout.vllm_sampler import VllmSampler
from pasr_jax.rollout.weight_sync import WeightSync

__all__ = ["Completion", "EngineError", "Group", "Sampler", "SamplerError", "SyncError", "VllmSampler",
           "WeightSync"]
