"""Asynchronous rollouts (rollout.max_staleness = 1, issue #25) on a real vLLM engine: the
engine core SIGKILLed while the rollout thread publishes a version to it, and again later
in the run. Real processes throughout: the train command, its engine, the verify judge.

The moments are made certain, not hoped for: the test watches the run's sync dir, and the
moment a version starts being written (or has just been loaded and removed, when the
generation begins) it stops the trainer (SIGSTOP), kills the engine core and lets the
trainer go on, which then asks a dead engine to reload (or to generate).
"""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest

from helpers import DATA, assert_group_gone, is_engine_core, start_train, wait_for_step
from pasr_jax import metrics

pytestmark = pytest.mark.slow  # real vLLM engines
STEPS = 6
RECORDS = 16  # per step: 2 questions x (4 PASR + 4 baseline answers)


def _kill_engine(trainer: psutil.Process) -> list[int]:
  cores = [c for c in trainer.children(recursive=True) if is_engine_core(c)]
  for c in cores:
    c.kill()
  return [c.pid for c in cores]


def _kill_engine_at_a_publish(sync_dir, trainer: psutil.Process, at: str,
                              timeout_s: float = 300.0) -> str:
  """Polls `sync_dir` until a version is being written (`at`="start") or until one has been
  written, loaded and removed (`at`="end": the rollout thread then generates at once); then
  trainer stopped, engine core killed, trainer continued. Returns the dir name it saw."""
  deadline, seen = time.monotonic() + timeout_s, None
  while time.monotonic() < deadline:
    names = os.listdir(sync_dir) if sync_dir.is_dir() else []
    seen = seen or (names[0] if names else None)
    if (at == "start" and names) or (at == "end" and seen and not names):
      trainer.suspend()
      try:
        assert _kill_engine(trainer), "no engine core to kill"
      finally:
        trainer.resume()
      return seen
    time.sleep(0.0005)
  raise AssertionError(f"no publish into {sync_dir} within {timeout_s} s")


@pytest.mark.timeout(900)
def test_engine_killed_during_a_publish_and_a_generation_then_the_run_goes_on(tmp_path,
                                                                               judge_url):
  """K = 1, 6 steps. The engine dies while the rollout thread publishes a version (its
  reload fails with EngineError), and again after step 3 as the rollout thread starts the
  generation that follows a publish: each time the main thread meets the failure when it waits for the
  batch, restarts the engine, gives it the trainer's weights and samples the batch again.
  The run ends like an unfaulted one: every step logged once, every answer recorded once,
  every batch within the staleness bound."""
  w, sync = tmp_path / "w", tmp_path / "sync"
  with open(tmp_path / "w.log", "w") as log:
    p = start_train(w, judge_url, f"--config.train.steps={STEPS}",
                    "--config.rollout.max_staleness=1", "--config.logging.tensorboard=False",
                    f"--config.rollout.vllm.sync_dir={sync}",
                    f"--config.data.files=('{DATA / 'say_seven.jsonl'}',)", log=log)
    try:
      trainer = psutil.Process(p.pid)
      wait_for_step(w, p, 1)   # version 1 is published during step 2
      seen = _kill_engine_at_a_publish(sync, trainer, "start")
      wait_for_step(w, p, 3)
      _kill_engine_at_a_publish(sync, trainer, "end")
      rc = p.wait(600)
    finally:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  out = (tmp_path / "w.log").read_text(errors="replace")
  assert rc == 0, out[-4000:]
  assert_group_gone(p.pid)
  assert re.match(r"pasr_sync_\d+_(tmp|v)", seen), seen
  retries = re.findall(r"step (\d+): (.*); restarting the engine and retrying the step", out)
  assert len(retries) == 2, retries
  assert "weight reload for version" in retries[0][1], retries[0]
  assert "generate" in retries[1][1] and "died" in retries[1][1], retries[1]
  m = metrics.read_jsonl(str(w / "metrics.jsonl"))
  assert [r["step"] for r in m] == list(range(1, STEPS + 1))
  assert all(0 <= r["staleness/max"] <= 1 for r in m), [r["staleness/max"] for r in m]
  rec = metrics.read_jsonl(str(w / "rollouts.jsonl"))
  assert [(r["step"], r["kind"], r["sample"]) for r in rec] == \
      [(r["step"], r["kind"], r["sample"]) for r in sorted(rec, key=lambda r: r["step"])]
  assert [r["step"] for r in rec] == [s for s in range(1, STEPS + 1) for _ in range(RECORDS)]
  # Nothing of a publish is left in the sync dir.
  assert not list(sync.iterdir())


@pytest.mark.timeout(300)
def test_a_trainer_killed_while_its_engine_starts_leaves_no_engine(tmp_path, judge_url):
  """SIGKILL of the trainer alone (not its group) while its vLLM engine core is still
  starting, where the engine cannot watch the trainer yet: the reaper
  (`pasr_jax.rollout.reaper`) kills the engine's processes, and none of the run is left."""
  w = tmp_path / "w"
  with open(tmp_path / "w.log", "w") as log:
    p = start_train(w, judge_url, "--config.train.steps=1", log=log)
    try:
      trainer = psutil.Process(p.pid)
      deadline = time.monotonic() + 240
      while not any("multiprocessing" in " ".join(c.cmdline()) for c in _kids(trainer)):
        assert p.poll() is None and time.monotonic() < deadline, "no engine process started"
        time.sleep(0.1)
      time.sleep(1.0)  # the reaper notes it (it polls every 0.25 s)
      out = (tmp_path / "w.log").read_text(errors="replace")
      assert "vLLM engine up" not in out, "the engine started before the kill: too late"
      kids = _kids(trainer)
      assert any("rollout/reaper.py" in " ".join(c.cmdline()) for c in kids), kids
      trainer.kill()
      p.wait(30)
      gone, alive = psutil.wait_procs(kids, timeout=30)
      assert not alive, [(c.pid, c.name()) for c in alive]
    finally:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  assert_group_gone(p.pid)


def _kids(proc: psutil.Process) -> list[psutil.Process]:
  out = []
  for c in proc.children(recursive=True):
    try:
      c.cmdline()
      out.append(c)
    except psutil.Error:
      pass
  return out
