"""Synchronous vs asynchronous rollouts (issue #25): steady-state step time, K = 0 vs K = 1.

The same short tiny_cpu run (the scripted sampler of tests/helpers.py, `Run` driven as the
train command drives it, in this process) twice: rollout.max_staleness=0, then 1. Every
`generate` sleeps a fixed time: an engine on hardware of its own, which costs the trainer no
CPU while it samples. A step's time is the wall clock between the ends of consecutive
`Run.step` calls (everything: wait, update, sync, logs, checkpoints); the steady state is the
median over the steps after the first `--warmup` (compilation). With generation G and the
trainer's part T per step, the synchronous step is ~G + T and the asynchronous one
~max(G, T): the ratio printed is async / sync (issue #25's goal: <= 0.6 where G ~ T). A real
engine sharing the trainer's cores is not measured here.

Usage: PYTHONPATH=. python benchmarks/async_rollout.py [--generate-s 1.0] [--steps 8]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def run(workdir: Path, k: int, generate_s: float, steps: int) -> tuple[list[float], list[dict]]:
  """One scripted run; the wall-clock time of each step and the metrics of each."""
  from helpers import DATA, ScriptedSampler, load_preset
  from pasr_jax import devices
  from pasr_jax.config import RunConfig
  from pasr_jax.run import Run

  tree = load_preset("tiny_cpu")
  tree.workdir = str(workdir)
  tree.rewards.accuracy_rule = "contains"
  tree.data.files = (str(DATA / "say_seven.jsonl"),)
  tree.logging.tensorboard = False
  tree.train.steps = steps
  tree.checkpoint.every = steps  # saves would add the same time to both runs
  tree.rollout.max_staleness = k

  class ScriptedRun(Run):
    def make_sampler(self):
      s = ScriptedSampler.for_model_dir(self.model_dir)
      s.delay = lambda call: generate_s
      return s

  r = ScriptedRun(RunConfig.from_tree(tree))
  times, scalars = [], []
  try:
    if devices.xla_bridge.backends_are_initialized():  # the second run: JAX is up
      with mock.patch.object(devices, "setup", lambda cfg: {}):
        r.setup()
    else:
      r.setup()
    r.resume()
    t = time.perf_counter()
    while not r.finished:
      scalars.append(r.step())
      times.append(time.perf_counter() - t)
      t = time.perf_counter()
    r.finish()
  finally:
    r.close()
  return times, scalars


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--generate-s", type=float, default=1.0, help="seconds per generate call")
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--warmup", type=int, default=2, help="steps left out (compilation)")
  args = ap.parse_args()
  med = {}
  with tempfile.TemporaryDirectory(prefix="async_bench_") as tmp:
    for k in (0, 1):
      times, m = run(Path(tmp) / f"k{k}", k, args.generate_s, args.steps)
      steady = slice(args.warmup, None)
      med[k] = statistics.median(times[steady])
      phases = {p: statistics.median(r.get(p, 0.0) for r in m[steady])
                for p in ("time/rollout", "time/wait", "time/update", "time/sync")}
      print(f"K={k}: steady step {med[k]:.3f} s (median wall clock of steps "
            f"{args.warmup + 1}..{len(times)}); "
            + ", ".join(f"{p} {v:.3f}" for p, v in phases.items())
            + f"; staleness per step {[r['staleness/max'] for r in m]}", flush=True)
  rest = max(med[0] - args.generate_s, 0.0)  # the trainer's part of a synchronous step
  print(f"steady-state step time K=1 / K=0: {med[1] / med[0]:.3f} (generate "
        f"{args.generate_s:g} s per step, engine on other hardware; perfect overlap would give "
        f"max(G, T) / (G + T) = {max(args.generate_s, rest) / med[0]:.3f})")


if __name__ == "__main__":
  main()
