"""One batch sampled ahead (rollout.max_staleness >= 1): the rollout thread and its job.

The run submits the next step's job (`submit`: a key, the step's draw, and the call that
loads the newest weights and samples); `take` hands the job back at the next step; `wait`
bounds the wait for its result by `timeout_s`; `drop` ends and discards it. While the run
ends a job it no longer wants, `aborting` is True: the sampler's `should_stop` reads it, so a
generation in flight stops at once and the wait for it stays bounded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
from typing import Any, Callable

from pasr_jax.rollout.base import EngineError

log = logging.getLogger("pasr_jax.rollout.ahead")


class RolloutAhead:
  """The rollout thread (one) and the job in it, at most one at a time."""

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
