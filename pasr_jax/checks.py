"""Cross-key checks: each rule that relates config keys to each other or to the cluster, once.

A check returns None when the rule holds, else the problem as one line naming the keys and
values. `preflight` shows it with its fix before anything loads; the runtime (the trainer, the
run) raises it as a ConfigError (`require`) when it meets the real mesh and processes.
"""

from __future__ import annotations

from pasr_jax.config import ConfigError


def micro_batch_vs_shards(micro_batch: int, shards: int, axes: str = "") -> str | None:
  """optim.micro_batch must be a positive multiple of the batch shards (the devices one
  micro-batch is split over; `axes` names their mesh axes, e.g. "data*fsdp")."""
  if micro_batch >= 1 and micro_batch % shards == 0:
    return None
  return (f"optim.micro_batch={micro_batch} is not a multiple of the {shards} batch shards"
          + (f" ({axes})" if axes else ""))


def questions_vs_processes(prompts_per_step: int, processes: int) -> str | None:
  """rollout.prompts_per_step must be >= the processes: each samples a share of the step's
  questions."""
  if prompts_per_step >= processes:
    return None
  return (f"rollout.prompts_per_step={prompts_per_step} < {processes} processes (each "
          "samples a share)")


def require(problem: str | None) -> None:
  """Raises ConfigError("config <problem>") when a check found one."""
  if problem is not None:
    raise ConfigError(f"config {problem}")
