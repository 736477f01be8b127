"""How long one vLLM engine start takes (`VllmEngine.start`, the tiny model), side by side:

- ours: the engine core spawned without this process's main module (`engine._main_left_out`),
  its worker forked from it (`vllm_internals.forking_executor`, CPU);
- spawned: vLLM's multiprocess executor with every process spawned, the core importing the
  main module again, as before both (this script imports JAX at its top, as a trainer's main
  module does).

Starts alternate (ours first), each engine generates one token and is closed; this process
imports vLLM before the first, so no start pays for that. Target: ours / spawned <= 0.7.

Usage: PYTHONPATH=. python benchmarks/engine_start.py [--reps 3]
"""

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from unittest import mock

import jax  # noqa: F401  (the trainer's main module imports JAX: see the docstring)

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def start_once(model_dir: str, spawned: bool) -> float:
  """Seconds from `VllmEngine.start` to a started engine; then one token, and close."""
  from pasr_jax.config import VllmCfg
  from pasr_jax.rollout import engine, vllm_internals
  from vllm import SamplingParams
  from vllm.inputs import TokensPrompt
  cfg = VllmCfg(max_model_len=256, kv_cache_space_gib=0.25)
  patches = contextlib.ExitStack()
  if spawned:
    patches.enter_context(mock.patch.object(vllm_internals, "forking_executor", lambda: "mp"))
    patches.enter_context(mock.patch.object(engine, "_main_left_out", contextlib.nullcontext))
  with patches:
    e = engine.VllmEngine(model_dir, cfg)
    t = time.perf_counter()
    e.start()
    took = time.perf_counter() - t
  try:
    e.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], [SamplingParams(max_tokens=1)])
  finally:
    e.close()
  return took


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  from pasr_jax.tiny import make_tiny_model_dir
  import vllm  # noqa: F401  (imported once, before any start is timed)
  with tempfile.TemporaryDirectory() as tmp:
    model = make_tiny_model_dir(os.path.join(tmp, "model"), seed=0)
    times: dict[str, list[float]] = {"ours": [], "spawned": []}
    for r in range(args.reps):
      for name in times:
        times[name].append(start_once(model, spawned=name == "spawned"))
        print(f"  rep {r} {name:8s} {times[name][-1]:6.1f} s", flush=True)
  ours, spawned = (statistics.median(times[n]) for n in ("ours", "spawned"))
  print(f"engine start, median of {args.reps}: ours {ours:.1f} s, spawned {spawned:.1f} s, "
        f"ratio {ours / spawned:.2f} (target <= 0.7)")


if __name__ == "__main__":
  main()
