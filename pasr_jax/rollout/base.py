"""What a rollout is: completions with their token ids, sampler logprobs and policy version.

A `Sampler` turns a batch of tokenised prompts into `Group`s of `n` completions each. The
trainer scores exactly the token ids a sampler returns (never re-tokenised text), so the
stop token, when generation stopped on one, is part of `Completion.token_ids`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from pasr_jax import errors


class SamplerError(ValueError):
  """Bad arguments to a sampler (empty prompt, n < 1, ...) or a malformed engine answer: the
  caller's or the engine's bug, not a user error (exit 1 with the traceback)."""


class SyncError(errors.EngineFailure):
  """A weight sync failed; the sampler's policy version did not advance."""


class EngineError(errors.EngineFailure):
  """The engine died, or did not answer within its time limit, or the wait was interrupted.

  The engine is closed when this is raised: the next call starts a fresh one, which holds
  the model dir's weights again, so a trainer must sync its weights before sampling.
  """


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sampled answer.

  token_ids: generated ids, the stop token included when generation stopped on it.
  logprobs: the sampler's log-probability (nats) of each id in `token_ids`, same length;
    from softmax(logits / temperature) (see `vllm_sampler` for the exact definition).
  text: `token_ids` decoded with special tokens skipped.
  finish_reason: "stop" (EOS or a stop token) or "length" (cut at max_tokens).
  policy_version: the version of the weights it was sampled with (see `Sampler.sync`).
  """
  token_ids: list[int]
  logprobs: list[float]
  text: str
  finish_reason: str
  policy_version: int

  def __post_init__(self):
    assert len(self.token_ids) == len(self.logprobs), (len(self.token_ids), len(self.logprobs))


@dataclasses.dataclass(frozen=True)
class Group:
  """The `n` completions of one prompt (GRPO's group)."""
  prompt_token_ids: list[int]
  completions: list[Completion]


@runtime_checkable
class Sampler(Protocol):
  """Generates rollouts and receives new policy weights: everything a training run
  (`pasr_jax.run.Run`) uses of a sampler, and all a test double has to implement.

  A run calls `generate` and `load` from one background thread (rollout.max_staleness >= 1)
  or from its main thread, never two at once, and `sync`, `snapshot`, `start` and `close`
  from the main thread only while no `generate` or `load` is in flight.
  """

  # Polled while a call waits on the engine; returning True ends the wait with EngineError
  # (the run points it at its SIGTERM/SIGINT flag).
  should_stop: Callable[[], bool]

  @property
  def policy_version(self) -> int:
    """Version of the weights the next `generate` samples with."""
    ...

  @property
  def needs_sync(self) -> bool:
    """True when the engine does not hold the weights of `policy_version` (a restarted
    engine holds the model dir's): `generate` refuses until a `sync` succeeds."""
    ...

  def start(self) -> None:
    """Starts the engine now (otherwise the first `generate`/`sync` does); idempotent."""
    ...

  def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, temperature: float,
               top_p: float, max_tokens: int, stop_token_ids: Sequence[int] | None = None,
               seed: int | None = None) -> list[Group]:
    """Samples `n` completions for every prompt, all prompts in one engine call.

    Returns one `Group` per prompt, in prompt order. `seed` makes the call reproducible
    (each completion gets its own derived seed); None draws fresh randomness.
    """
    ...

  def sync(self, model, version: int) -> dict[str, float]:
    """Loads the weights of `model` (a `Decoder`) and tags later rollouts with `version`.

    Returns phase timings in seconds. Raises `SyncError` on failure, leaving the version
    unchanged.
    """
    ...

  def snapshot(self, model) -> Any:
    """The weights of `model` copied to the host, for a later `load`: the part of a sync that
    reads the trainer's arrays (multi-host: a collective), so the main thread's."""
    ...

  def load(self, snapshot: Any, version: int) -> dict[str, float]:
    """Loads a `snapshot` and tags later rollouts with `version`, as `sync` does (whose
    timings and errors it has); safe off the main thread."""
    ...

  def close(self) -> None:
    """Frees the engine; idempotent."""
    ...
