"""Step-time breakdown of a training run, and PASR+baseline rollouts in one vLLM call vs two.

  python benchmarks/train_breakdown.py --workdir runs/demo            # shares of each phase
  python benchmarks/train_breakdown.py --workdir runs/demo --two_calls # + one call vs two

Shares come from the run's metrics.jsonl (time/rollout, judge, update (reference forward +
GRPO updates), sync, checkpoint). Steps whose update compiled (train/compilations > 0: the
first step, and every step with a batch length not seen before) are reported apart; runs
written before that metric existed have only their first step set apart. --two_calls starts
the run's vLLM engine on its model and times the same prompts sampled as one call (this
project) and as a PASR call followed by a baseline call (the original's design).
"""

from __future__ import annotations

import argparse
import json
import time

PHASES = ("time/rollout", "time/judge", "time/pack", "time/update", "time/sync",
          "time/checkpoint")


def _rows(workdir: str) -> list[dict]:
  from pasr_jax.metrics import read_jsonl  # pylint: disable=import-outside-toplevel
  from pasr_jax.workdir import Workdir  # pylint: disable=import-outside-toplevel
  from pasr_jax import policy  # pylint: disable=import-outside-toplevel
  from pasr_jax.config import RunConfig  # pylint: disable=import-outside-toplevel
  return read_jsonl(str(Workdir(workdir).metrics))


def breakdown(rows: list[dict]) -> dict[str, float]:
  """Mean seconds per phase over `rows`, plus 'other' (step time not in any phase)."""
  out = {p: sum(r.get(p) or 0.0 for r in rows) / len(rows) for p in PHASES}
  step = sum(r["time/step"] for r in rows) / len(rows)
  out["other"] = max(0.0, step - sum(out.values()))
  out["step"] = step
  return out


def print_breakdown(title: str, b: dict[str, float]) -> None:
  print(f"\n{title}: {b['step']:.1f} s per step")
  print(f"  {'phase':<16}{'s/step':>9}{'share':>8}")
  for k, v in b.items():
    if k != "step":
      print(f"  {k.replace('time/', ''):<16}{v:>9.2f}{100 * v / b['step']:>7.1f}%")


def two_calls(workdir: str, steps: int = 2) -> None:
  """Times one generate over PASR+baseline prompts vs two generates, same prompts and seeds."""
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  from pasr_jax import data, prompts as prompts_lib  # pylint: disable=import-outside-toplevel
  from pasr_jax.rollout.vllm_sampler import VllmSampler  # pylint: disable=import-outside-toplevel
  from pasr_jax import chat  # pylint: disable=import-outside-toplevel
  from pasr_jax.workdir import Workdir  # pylint: disable=import-outside-toplevel
  from pasr_jax import policy  # pylint: disable=import-outside-toplevel
  from pasr_jax.config import RunConfig  # pylint: disable=import-outside-toplevel

  wd = Workdir(workdir)
  cfg = RunConfig.from_tree(json.loads(wd.config.read_text(encoding="utf-8")))
  model_dir = policy.start_dir(cfg)
  tok = AutoTokenizer.from_pretrained(model_dir)
  prompts = prompts_lib.load_prompts(cfg.prompts)
  stream = data.BatchStream(data.load_dataset(cfg.data), cfg.rollout.prompts_per_step, 123)
  r = cfg.rollout
  kw = dict(n=r.n, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens,
            stop_token_ids=[tok.eos_token_id], seed=7)
  sampler = VllmSampler.from_config(cfg.rollout, model_dir, seed=cfg.seed)
  try:
    _ = sampler.llm
    one = two = 0.0
    tokens_one = tokens_two = 0
    for _ in range(steps):
      rows = stream.next_batch()
      pa = [chat.encode(tok, chat.user_chat(prompts.pasr_system, x.question)) for x in rows]
      ba = [chat.encode(tok, chat.user_chat(prompts.plain_system, x.question)) for x in rows]
      t = time.perf_counter()
      g = sampler.generate(pa + ba, **kw)
      one += time.perf_counter() - t
      tokens_one += sum(len(c.token_ids) for x in g for c in x.completions)
      t = time.perf_counter()
      g = sampler.generate(pa, **kw) + sampler.generate(ba, **kw)
      two += time.perf_counter() - t
      tokens_two += sum(len(c.token_ids) for x in g for c in x.completions)
  finally:
    sampler.close()
  print(f"\nrollout of {r.prompts_per_step} questions x n={r.n} PASR + n baseline, "
        f"{steps} batches:")
  print(f"  one call (pasr_jax):     {one / steps:7.1f} s/step  {tokens_one / one:6.1f} tok/s")
  print(f"  two calls (original):    {two / steps:7.1f} s/step  {tokens_two / two:6.1f} tok/s")
  print(f"  two/one time ratio:      {two / one:7.2f}x")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="runs/demo")
  ap.add_argument("--two_calls", action="store_true")
  args = ap.parse_args()
  rows = _rows(args.workdir)
  counted = any("train/compilations" in r for r in rows)
  compiling = ([r for r in rows if r.get("train/compilations", 0) > 0] if counted
               else rows[:1])
  steady = [r for r in rows if r not in compiling]
  steps = lambda rs: ("step " if len(rs) == 1 else "steps ") + ", ".join(str(r["step"])
                                                                        for r in rs)
  if steady:
    print_breakdown(f"{args.workdir}: {steps(steady)} "
                    f"({'no compilation' if counted else 'compilations not recorded'})",
                    breakdown(steady))
  if compiling:
    print_breakdown(f"{args.workdir}: {steps(compiling)} (with XLA compilation)",
                    breakdown(compiling))
  if args.two_calls:
    two_calls(args.workdir)


if __name__ == "__main__":
  main()
