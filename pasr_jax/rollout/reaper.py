"""Ends a trainer's vLLM processes when the trainer dies, even while its engine starts.

vLLM 0.32's engine core has no parent-death check: a SIGKILLed trainer leaves its engine core
and workers running, holding their memory (a GPU's, on GPU hosts). A started engine is
watched from the inside (`vllm_internals.SyncExtension.pasr_watch_trainer`), but an engine that
is still starting (loading weights, compiling: minutes for a 7B model) cannot be reached yet.
So the first engine a process starts also starts this reaper, a small process of its own
(run as a script: importing the package would take seconds, a window with no watch):

  python pasr_jax/rollout/reaper.py TRAINER_PID

It notes the trainer's multiprocessing descendants (vLLM's engine core is a spawned one, its
workers are forked from it) every `POLL_S` seconds and, once the trainer has exited, SIGKILLs
those still running, then exits itself. A process started less than `POLL_S` before the
trainer died is not yet noted; the in-engine watch covers it once the engine is up.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys

import psutil

POLL_S = 0.25
# vLLM names its processes "VLLM::EngineCore", "VLLM::Worker", ... (vllm_internals'
# PROCESS_TITLE_PREFIX; a copy: importing the package would take seconds).
ENGINE_TITLE_PREFIX = "VLLM"
_started: dict[int, subprocess.Popen] = {}  # trainer pid -> its reaper


def ensure_reaper() -> None:
  """Starts this process's reaper once and waits until it watches (a no-op where pidfds are
  unavailable)."""
  me = os.getpid()
  if me in _started or not hasattr(os, "pidfd_open"):
    return
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(me)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  proc.stdout.readline()  # "watching" (or "" if it could not: then there is no reaper)
  proc.stdout.close()
  _started[me] = proc


def _spawned(proc: psutil.Process) -> bool:
  """A process of multiprocessing's (vLLM's engine core, spawned, and the workers forked from
  it, which inherit its command line) or one titled by vLLM."""
  try:
    return ("multiprocessing" in " ".join(proc.cmdline())
            or proc.name().startswith(ENGINE_TITLE_PREFIX + "::"))
  except psutil.Error:
    return False


def reap(trainer_pid: int, ready=lambda: None) -> int:
  """Watches `trainer_pid` until it exits, then kills its noted descendants; how many.
  `ready()` is called once the watch is on."""
  me = os.getpid()
  try:
    fd = os.pidfd_open(trainer_pid)
    trainer = psutil.Process(trainer_pid)
  except (OSError, psutil.Error):
    return 0
  ready()
  noted: dict[int, psutil.Process] = {}
  while not select.select([fd], [], [], POLL_S)[0]:
    try:
      for p in trainer.children(recursive=True):
        if p.pid != me and p.pid not in noted and _spawned(p):
          noted[p.pid] = p
    except psutil.Error:
      break
  killed = 0
  for p in noted.values():
    try:
      if p.is_running():  # the same process (psutil checks its start time), still there
        p.kill()
        killed += 1
    except psutil.Error:
      pass
  return killed


if __name__ == "__main__":
  reap(int(sys.argv[1]), ready=lambda: print("watching", flush=True))
