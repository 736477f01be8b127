"""Judge throughput: our concurrent client vs a serial one-request-at-a-time client.

Both score the same 64 GSM8K-style answers against one local `verify` judge with an artificial
100 ms latency per request (tests/slow_judge.py: a stand-in for a judge model's generation time).
Prints both wall times and the ratio; the target is >= 8x.

  python benchmarks/judge.py [--items 64] [--latency-ms 100] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import httpx

from pasr_jax.judge import wire
from pasr_jax.config import JudgeCfg
from pasr_jax.judge import JudgeClient, JudgeItem, parse_score
from pasr_jax.judge.server import wait_healthy


def serial_scores(url: str, model: str, batch: list[JudgeItem]) -> list[float]:
  """The original's way: one blocking request after another."""
  out = []
  with httpx.Client(base_url=url, timeout=60.0) as http:
    for it in batch:
      msgs = wire.judge_messages(it.question, it.ground_truth, it.answer, it.task_type)
      r = http.post("/v1/chat/completions",
                    json={"model": model, "messages": msgs, "max_tokens": 16})
      r.raise_for_status()
      out.append(parse_score(r.json()["choices"][0]["message"]["content"]) or 0.0)
  return out


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--items", type=int, default=64)
  ap.add_argument("--latency-ms", type=float, default=100.0)
  ap.add_argument("--concurrency", type=int, default=32, help="judge.concurrency default")
  args = ap.parse_args()

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  # The verify judge, each answer delayed (tests/slow_judge.py: a judge model's stand-in).
  proc = subprocess.Popen([sys.executable, "tests/slow_judge.py", str(args.latency_ms / 1000),
                           "--config.backend=verify", f"--config.port={port}"],
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
  try:
    if not wait_healthy(url, proc, 60):
      print("verify judge did not start", file=sys.stderr)
      return 1
    batch = [JudgeItem(f"What is {i} + {i}?", f"#### {2 * i}",
                       f"<think>{i}+{i}</think><answer>\\boxed{{{2 * i + (i % 3 == 0)}}}</answer>")
             for i in range(args.items)]
    # Warm both paths (imports, first math-verify parse) outside the timings.
    JudgeClient(JudgeCfg(base_url=url)).score_batch(batch[:2])
    serial_scores(url, "pasr-verify", batch[:2])

    t0 = time.perf_counter()
    ser = serial_scores(url, "pasr-verify", batch)
    t_serial = time.perf_counter() - t0
    client = JudgeClient(JudgeCfg(base_url=url, concurrency=args.concurrency))
    t0 = time.perf_counter()
    ours, stats = client.score_batch(batch)
    t_ours = time.perf_counter() - t0
  finally:
    proc.terminate()
    proc.wait(30)

  if ours != ser:
    print("MISMATCH between serial and concurrent scores", file=sys.stderr)
    return 1
  ratio = t_serial / t_ours
  print(f"judge: {args.items} answers, server latency {args.latency_ms:g} ms, "
        f"concurrency {args.concurrency}")
  print(f"  {'client':<24}{'wall s':>10}{'answers/s':>12}")
  print(f"  {'serial (original)':<24}{t_serial:>10.2f}{args.items / t_serial:>12.1f}")
  print(f"  {'JudgeClient (ours)':<24}{t_ours:>10.2f}{args.items / t_ours:>12.1f}")
  print(f"  speed-up {ratio:.1f}x (target >= 8x: {'met' if ratio >= 8 else 'NOT met'}); "
        f"latency p50/p90/p99 {stats['latency_ms_p50']:.0f}/{stats['latency_ms_p90']:.0f}/"
        f"{stats['latency_ms_p99']:.0f} ms; mean score {sum(ours) / len(ours):.3f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
