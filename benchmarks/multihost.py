"""One host vs two: the same short training run as 1 process x 8 CPU devices (one vLLM engine)
and as 2 processes x 4 devices (jax.distributed on 127.0.0.1, one engine each).

  PYTHONPATH=. python benchmarks/multihost.py [--steps 2] [--config configs/tiny_cpu.py]
      [--out /tmp/pasr_multihost] [--config.x=y ...]

Prints, per run, rollout tokens/s (tokens generated / time in generate; in the two-process
run the step's rollout time is the slower host's; "2+" leaves out step 1, whose generate
also warms the engine up) and, for the two-process run, how many
distinct completions each host sampled, and of how many questions both did: each host samples its own
share of every step's questions, so the second engine adds work instead of repeating it.
On one 2-core machine the two engines share the cores; report it as it is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(workdir: Path, procs: int, devices: int, args: list[str]) -> float:
  """Runs `python -m pasr_jax.train` as `procs` processes of `devices` CPU devices each;
  returns the wall time. Logs go to <workdir>.<i>.log."""
  shutil.rmtree(workdir, ignore_errors=True)
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  port = _free_port()
  t = time.perf_counter()
  running = []
  for i in range(procs):
    dist = ([] if procs == 1 else
            ["--config.mesh.distributed=True",
             f"--config.mesh.coordinator_address=127.0.0.1:{port}",
             f"--config.mesh.num_processes={procs}", f"--config.mesh.process_id={i}"])
    log = open(f"{workdir}.{i}.log", "w")  # pylint: disable=consider-using-with
    running.append((subprocess.Popen([sys.executable, "-m", "pasr_jax.train", *args,
                                      f"--config.workdir={workdir}", *dist], cwd=ROOT,
                                     env=env, stdout=log, stderr=subprocess.STDOUT), log))
  for p, log in running:
    rc = p.wait()
    log.close()
    if rc:
      raise SystemExit(f"run {workdir} process failed ({rc}); see {log.name}")
  return time.perf_counter() - t


def _report(name: str, workdir: Path, wall: float) -> dict:
  from pasr_jax.metrics import read_jsonl  # pylint: disable=import-outside-toplevel
  from pasr_jax.workdir import Workdir  # pylint: disable=import-outside-toplevel
  wd = Workdir(workdir)
  m = read_jsonl(str(wd.metrics))
  tokens = sum(r["tokens/generated"] for r in m)
  rollout = sum(r["time/rollout"] for r in m)
  later = m[1:] or m  # step 1's generate also warms the engine up
  later_tok_s = sum(r["tokens/generated"] for r in later) / sum(r["time/rollout"] for r in later)
  texts = defaultdict(set)
  for r in read_jsonl(str(wd.rollouts)):
    texts[r.get("process", 0)].add((r["step"], r["id"], r["kind"], r["text"]))
  return {"name": name, "tokens": tokens, "rollout_s": rollout, "tok_s": tokens / rollout,
          "later_tok_s": later_tok_s,
          "step_s": sum(r["time/step"] for r in m) / len(m), "wall_s": wall, "texts": texts}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--steps", type=int, default=2)
  ap.add_argument("--config", default="configs/tiny_cpu.py")
  ap.add_argument("--out", default="/tmp/pasr_multihost")
  known, extra = ap.parse_known_args()
  from pasr_jax.judge.server import stop_process, wait_healthy  # pylint: disable=import-outside-toplevel
  port = _free_port()
  judge = subprocess.Popen([sys.executable, "-m", "pasr_jax.judge", "--config.backend=verify",
                            "--config.host=127.0.0.1", f"--config.port={port}"], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  try:
    if not wait_healthy(url, judge, 120):
      raise SystemExit("the verify judge did not come up")
    args = [f"--config={known.config}", f"--config.train.steps={known.steps}",
            f"--config.judge.base_url={url}", "--config.logging.tensorboard=False", *extra]
    out = Path(known.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [_report("1 process x 8 devices (1 engine)", out / "one",
                    _run(out / "one", 1, 8, args)),
            _report("2 processes x 4 devices (2 engines)", out / "two",
                    _run(out / "two", 2, 4, args))]
  finally:
    stop_process(judge, 10.0)
  print(f"\n{known.steps} steps of {known.config} {' '.join(extra)}")
  print(f"  {'run':<38}{'tokens':>8}{'rollout s':>11}{'tok/s':>8}{'tok/s 2+':>10}"
        f"{'s/step':>8}{'wall s':>8}")
  for r in runs:
    print(f"  {r['name']:<38}{r['tokens']:>8.0f}{r['rollout_s']:>11.1f}{r['tok_s']:>8.1f}"
          f"{r['later_tok_s']:>10.1f}{r['step_s']:>8.1f}{r['wall_s']:>8.0f}")
  print(f"  two/one rollout tok/s ratio: {runs[1]['tok_s'] / runs[0]['tok_s']:.2f}x "
        f"(steps 2+: {runs[1]['later_tok_s'] / runs[0]['later_tok_s']:.2f}x)")
  hosts = runs[1]["texts"]
  questions = {p: {(step, q) for step, q, _, _ in v} for p, v in hosts.items()}
  for p in sorted(hosts):
    print(f"  host {p}: {len(hosts[p])} distinct completions of {len(questions[p])} "
          f"(step, question) pairs")
  shared = set.intersection(*questions.values()) if len(questions) > 1 else set()
  print(f"  (step, question) pairs sampled by both hosts: {len(shared)}")

if __name__ == "__main__":
  main()
