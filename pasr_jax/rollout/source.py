"""Where a training step's batch comes from: a rollout source (`make` picks one).

  draw, out, scalars = source.next_batch(step)   # step j's questions, sampled, judged, packed
  ... the trainer updates on out.batch ...
  scalars |= source.publish(model, step)         # update j's weights towards the engine
  source.drop(); source.close()

A source owns everything between the data stream and a trained-on batch: the draw order and
each step's sampling seed (batch j always holds the stream's j-th questions and the j-th seed,
whatever the timing), the engine-failure retries (agreed by every process), the policy
versions and their relabelling after an engine restart, the staleness bound and its
`staleness/*` metrics.

`Synchronous` (rollout.max_staleness = 0): sample, then train; every `sync_every` steps the
trainer's weights are synced into the engine before the next batch.

`SampledAhead` (rollout.max_staleness = 1): while the trainer updates on batch j, ONE
background thread (the rollout thread) samples, judges and rewards batch j+1 with the weights
of update j-1 (AReaL's admission rule with one engine: one batch ahead, staleness <= 1).
Publishing update j is split: after batch j+1 is collected the main thread copies the weights
to the host (the only part on the trainer's path), and the rollout thread loads them into the
engine before it samples batch j+2 (never during a generation). Every multi-host collective
stays in the main thread. A batch sampled ahead of a save, a stop or a crash is not trained on:
the checkpoint's cursor and RNG are those of the steps trained on, so a resumed run samples it
again (from the restored policy: staleness 0). A failure of the background batch surfaces in
the main thread as the synchronous loop's error; the wait for it is bounded by
rollout.timeout_s.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from typing import Any, Callable, TypeVar

import jax
import numpy as np

from pasr_jax import errors, multihost
from pasr_jax.data import BatchStream, Cursor
from pasr_jax.rollout.base import EngineError
from pasr_jax.step import RolloutStep, StepOutput

T = TypeVar("T")

log = logging.getLogger("pasr_jax.run")


class RolloutInterrupted(errors.Interrupted):
  """A signal (on some process) ended the wait on the engine: the step is abandoned."""


@dataclasses.dataclass(frozen=True)
class Draw:
  """One step's questions (this process's share) and sampling seed; the data cursor and RNG
  once the step is done."""
  rows: list
  seed: int
  cursor: Cursor
  rng: Any


class RolloutSource:
  """What the two sources share: the draw, the engine-retry loop, versions and staleness.

  `version` is the trainer's newest policy version (checkpointed as RunState.policy_version);
  `stopping()` is the run's stop flag (a signal arrived)."""

  max_staleness = 0

  def __init__(self, cfg, stream: BatchStream, rng: Any, version: int, stepper: RolloutStep,
               sampler, model: Callable[[], Any], stopping: Callable[[], bool]):
    self.cfg, self.stream, self.stepper, self.sampler = cfg, stream, stepper, sampler
    self.version = version
    self._model, self._stopping = model, stopping
    self._trained = (stream.cursor, rng)  # cursor and RNG after the last batch handed out
    # Versions made by an engine-retry re-sync: the same weights as the version before them
    # (no update between), so they add no staleness.
    self._relabeled: set[int] = set()
    # A signal ends a rollout wait at once; with several processes the step is then
    # abandoned by all of them together (`_rollout` agrees on it).
    sampler.should_stop = self._should_stop

  def _should_stop(self) -> bool:
    return self._stopping()

  # ---------------------------------------------------------------------------- interface
  def next_batch(self, step: int) -> tuple[Draw, StepOutput, dict[str, float]]:
    """Step `step`'s draw, rollout output and scalars (timings, staleness/*)."""
    raise NotImplementedError

  def publish(self, model, step: int) -> dict[str, float]:
    """After update `step`: a new policy version every rollout.sync_every steps, on its way
    to the engine; the scalars of what it cost (time/sync, sync/*)."""
    raise NotImplementedError

  def quiet(self) -> Any:
    """The sampler, with no generation in flight and holding the newest published version
    (for greedy evaluation between steps)."""
    if self.sampler.policy_version != self.version:
      self.sampler.sync(self._model(), self.version)
    return self.sampler

  def quietly(self, fn: Callable[[Any], T], step: int) -> T:
    """`fn(self.quiet())` (evaluation between steps), with engine failures retried as a step's
    rollout is. `fn` must not run a collective: a process whose engine failed would not
    reach it."""
    return self._retrying(step, lambda attempt: fn(self.quiet()))

  def drop(self) -> None:
    """Discards what was sampled and not trained on; the stream goes back to the last
    batch handed out."""
    self.stream.cursor = self._trained[0]

  def close(self) -> None:
    self.drop()

  # ---------------------------------------------------------------------------- shared
  def _draw(self, rng) -> Draw:
    """The next batch of the stream and its seed, from the RNG `rng` of the step before."""
    batch_rows = self.stream.next_batch()  # the step's questions: the same on every process
    rng, sub = jax.random.split(rng)
    seed = int(jax.random.randint(sub, (), 0, 2**31 - 1))
    mine = multihost.share(len(batch_rows))
    # Per-prompt seeds of the processes' shares do not overlap (vLLM: seed + i * n).
    seed = (seed + mine.start * 2 * self.cfg.rollout.n) % 2**31
    return Draw(batch_rows[mine], seed, self.stream.cursor, rng)

  def _handed_out(self, draw: Draw, out: StepOutput, scalars: dict[str, float]):
    self._trained = (draw.cursor, draw.rng)
    scalars.update(self._staleness(out, draw))
    return draw, out, scalars

  def _lag(self, version: int) -> int:
    """Updates between policy `version` and the trainer's (an engine-retry re-sync's version
    bump is none: same weights)."""
    now = self.version
    return now - version - sum(version < r <= now for r in self._relabeled)

  def _staleness(self, out: StepOutput, draw: Draw) -> dict[str, float]:
    """staleness/mean, /max and the histogram /frac_<d> (share of answers d updates behind,
    d = 0..K) of the batch's answers; outside [0, K] is a bug of the source."""
    lag = [self._lag(int(r["policy_version"])) for r in out.records]
    k = self.max_staleness
    if lag and not 0 <= min(lag) <= max(lag) <= k:
      raise AssertionError(f"staleness {min(lag)}..{max(lag)} outside [0, "
                           f"rollout.max_staleness={k}]")
    hist = {f"staleness/frac_{d}": (lag.count(d) / len(lag) if lag else 0.0)
            for d in range(k + 1)}
    return {"staleness/mean": float(np.mean(lag)) if lag else 0.0,
            "staleness/max": float(max(lag, default=0)), **hist}

  def _rollout(self, draw: Draw, step: int, first: Callable[[], StepOutput] | None = None
               ) -> StepOutput:
    """`RolloutStep` with engine failures handled (`_retrying`). `first`: the first attempt's
    result instead of running the step (the batch sampled in the background); it may raise
    as the step would."""
    return self._retrying(step, lambda attempt: (
        first() if attempt == 0 and first is not None
        else self.stepper(draw.rows, step, draw.seed)))

  def _retrying(self, step: int, attempt_fn: Callable[[int], T]) -> T:
    """`attempt_fn(attempt)` until it returns without an `EngineError` on every process.

    Every process takes the same branch after each attempt, agreed in one small collective:
    a rollout interrupted by a signal on any process abandons the step on all of them
    (`RolloutInterrupted`, the stream back at the last trained batch); an engine failure on
    any process makes every process sync the trainer's weights again (the gather is a
    collective; a healthy engine just reloads the same weights) and the failed processes
    retry their share, up to `rollout.engine_retries` times.
    """
    retries = int(self.cfg.rollout.engine_retries)
    out = None
    for attempt in range(retries + 1):
      error = None
      if out is None:
        try:
          out = attempt_fn(attempt)
        except EngineError as e:
          error = e
      interrupted = error is not None and self._stopping()
      # Re-sync before a retry when the engine lacks usable weights: a fresh engine after a
      # sync (it holds the model dir's), or an engine whose background load failed.
      behind = self.sampler.needs_sync or self._lag(self.sampler.policy_version) > \
          self.max_staleness
      flags = multihost.agree([error is not None, interrupted, bool(behind)])
      failed = [i for i, f in enumerate(flags[:, 0]) if f]
      if flags[:, 1].any():
        self.drop()
        raise RolloutInterrupted(f"interrupted during step {step}")
      if not failed:
        return out
      where = f"process {', '.join(map(str, failed))}" if flags.shape[0] > 1 else ""
      what = f"{error}" if error is not None else f"the engine of {where} failed"
      if attempt == retries:
        raise EngineError(f"step {step}: {what} (gave up after {retries} restarts, "
                          "rollout.engine_retries); the last checkpoint is intact: run the "
                          "same command to resume")
      log.warning("step %d: %s%s; restarting the engine and retrying the step (%d of %d)",
                  step, what, f" [{where}]" if where and error is not None else "",
                  attempt + 1, retries)
      if flags[:, 2].any():  # the engine lacks the trainer's weights (above)
        self.version += 1
        self._relabeled.add(self.version)
        self.sampler.sync(self._model(), self.version)
    raise AssertionError("unreachable")


class Synchronous(RolloutSource):
  """rollout.max_staleness = 0: sample, then train; the engine gets every published update
  before the next batch."""

  def next_batch(self, step):
    draw = self._draw(self._trained[1])
    out = self._rollout(draw, step)
    return self._handed_out(draw, out, dict(out.scalars))

  def publish(self, model, step):
    t = time.perf_counter()
    scalars = {}
    if step % self.cfg.rollout.sync_every == 0:
      scalars = {f"sync/{k}": float(v)
                 for k, v in self.sampler.sync(model, self.version + 1).items()}
      self.version += 1
    scalars["time/sync"] = time.perf_counter() - t
    return scalars


class SampledAhead(RolloutSource):
  """rollout.max_staleness = 1: the next step's batch is sampled in the rollout thread while
  this one trains (see the module docstring)."""

  max_staleness = 1

  def __init__(self, *args, steps: int, **kw):
    super().__init__(*args, **kw)
    self.steps = steps  # train.steps: the last step samples nothing ahead
    self.ahead = Ahead(self.cfg.rollout.timeout_s)

  def next_batch(self, step):
    """This step's batch, sampled in the background during the last step (or now, at the
    first step and after a resume); then, with no generation in flight, the newest weights
    are copied to the host and the next step's batch is submitted, to sample after the
    engine loads them. Every process takes the same branches (the host copy is a
    collective)."""
    t = time.perf_counter()
    job = self.ahead.take()
    if job is None:
      draw = self._draw(self._trained[1])
      out = self._rollout(draw, step)
    else:
      draw, future = job
      out = self._rollout(draw, step, first=lambda: self.ahead.wait(future))
    scalars = dict(out.scalars, **{"time/wait": time.perf_counter() - t, "time/sync": 0.0})
    if step < self.steps:
      t = time.perf_counter()
      snap = self._snapshot()
      scalars["time/sync"] = time.perf_counter() - t
      nxt = self._draw(draw.rng)
      self.ahead.submit(nxt, self._load_and_sample, snap, nxt, step + 1)
    return self._handed_out(draw, out, scalars)

  def publish(self, model, step):
    """The version only: the next `next_batch` copies the weights for the rollout thread."""
    if step % self.cfg.rollout.sync_every == 0:
      self.version += 1
    return {}

  def _should_stop(self):
    # Also while the source ends a job it no longer wants: its generation stops at once.
    return self._stopping() or self.ahead.aborting

  def quiet(self):
    self.ahead.settle()
    return super().quiet()

  def _snapshot(self) -> tuple[Any, int] | None:
    """The trainer's weights copied to the host and their version, when the engine holds an
    older version; None when it holds the newest. Read with no rollout in flight, so the
    sampler's version is settled."""
    if self.sampler.policy_version == self.version:
      return None
    return self.sampler.snapshot(self._model()), self.version

  def _load_and_sample(self, snap: tuple[Any, int] | None, draw: Draw, step: int) -> StepOutput:
    """The rollout thread's job: `snap`'s weights into the engine (between generations),
    then batch `step`; the load's timings join the batch's scalars (`sync/*`). A failed load
    raises here as the step's rollout would (an `EngineError` is retried with a fresh engine
    and a fresh sync; a `SyncError` ends the run)."""
    sync = {} if snap is None else self.sampler.load(*snap)
    out = self.stepper(draw.rows, step, draw.seed)
    out.scalars.update({f"sync/{k}": float(v) for k, v in sync.items()})
    return out

  def drop(self):
    self.ahead.drop()
    super().drop()

  def close(self):
    self.drop()
    self.ahead.close()


def make(cfg, stream: BatchStream, rng: Any, version: int, stepper: RolloutStep, sampler,
         model: Callable[[], Any], stopping: Callable[[], bool]) -> RolloutSource:
  """The source rollout.max_staleness names (the one place that reads it). `model()` is the
  trainer's current model, `stopping()` the run's stop flag."""
  args = (cfg, stream, rng, version, stepper, sampler, model, stopping)
  if cfg.rollout.max_staleness == 0:
    return Synchronous(*args)
  if multihost.is_writer():
    print(f"[train] rollouts: one batch sampled ahead (rollout.max_staleness=1, grpo.tis_cap="
          f"{cfg.grpo.tis_cap:g})", flush=True)
  if cfg.rollout.vllm.colocate:
    log.warning("rollout.max_staleness=1 with rollout.vllm.colocate=True: the engine and the "
                "trainer share devices, so sampling ahead overlaps little and costs one step "
                "of staleness (scripts/launch_gpu.sh gives them GPUs of their own)")
  return SampledAhead(*args, steps=cfg.train.steps)


class Ahead:
  """The rollout thread (one) and the job in it, at most one at a time.

  `submit` starts a job (a key, the call); `take` hands it back; `wait` bounds the wait for
  its result by `timeout_s`; `drop` ends and discards it. While a job is being ended,
  `aborting` is True: the sampler's `should_stop` reads it, so a generation in flight stops
  at once and the wait for it stays bounded."""

  def __init__(self, timeout_s: float):
    self.timeout_s = timeout_s  # rollout.timeout_s; 0: no limit
    self.aborting = False
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pasr-rollout")
    self._job: tuple[Any, concurrent.futures.Future] | None = None

  def submit(self, key: Any, fn: Callable[..., Any], *args: Any) -> None:
    """Starts `fn(*args)` in the rollout thread; `take` returns it with `key`."""
    if self._job is not None:
      raise AssertionError("a batch is already sampled ahead")
    self._job = (key, self._pool.submit(fn, *args))

  def take(self) -> tuple[Any, concurrent.futures.Future] | None:
    """The job submitted last, now the caller's (None: none was)."""
    job, self._job = self._job, None
    return job

  def settle(self) -> None:
    """Waits (at most `timeout_s`) until the job, if any, is done; its result stays for
    `take`."""
    if self._job is not None:
      concurrent.futures.wait([self._job[1]], timeout=self.timeout_s or None)

  def wait(self, future: concurrent.futures.Future) -> Any:
    """`future`'s result, waited for at most `timeout_s`; its own exception is raised here
    (EngineError, JudgeError, ...), a missed deadline is an EngineError. Before that
    EngineError the job is ended (`aborting`; at most another `timeout_s`), so a retry never
    shares the engine with it."""
    try:
      return future.result(timeout=self.timeout_s or None)
    except concurrent.futures.TimeoutError:
      with self._ending():
        concurrent.futures.wait([future], timeout=self.timeout_s)
      raise EngineError(f"the background rollout gave no batch within {self.timeout_s:g} s "
                        "(rollout.timeout_s)") from None

  def drop(self) -> None:
    """Ends and discards the job, if any (bounded by `timeout_s`)."""
    job = self.take()
    if job is not None:
      with self._ending():
        try:
          job[1].result(timeout=self.timeout_s or None)
        except Exception as e:  # pylint: disable=broad-except
          log.info("discarded the batch sampled ahead: %s", e)

  def close(self) -> None:
    """Drops the job; the thread ends."""
    self.drop()
    self._pool.shutdown(wait=False, cancel_futures=True)

  @contextlib.contextmanager
  def _ending(self):
    self.aborting = True
    try:
      yield
    finally:
      self.aborting = False
