"""Tokens/s of one full GRPO update: JAX (this project) vs PyTorch/transformers eager.

  python benchmarks/train_step.py [--batch 8] [--seq 384] [--runs 3]

One update = reference forward + policy forward/backward + AdamW step, SmolLM2-135M, fp32 CPU,
B sequences of T tokens (the second half of each is the scored completion). The torch side is
the original PASR/TRL way: eager transformers model, per-row log_softmax + gather, a deep-copied
frozen reference model, torch.optim.AdamW. Each side is warmed up (compile / first-touch)
once, then the two are timed in turns, `--runs` times each; each side's best run counts.
Also times `jax_full`: the JAX update with the LM head on all T positions like torch's, which
shows what the logit window contributes (`--skip-full-head` leaves it out). With the malloc
settings each side keeps its peak heap, so three sides need ~8 GiB at B=8 T=384, and more than
this machine's 24 GiB at B=4 T=768: use `--skip-full-head` there.
Prints tokens/s, achieved GFLOP/s (model matmul FLOPs: 4 forward passes' worth: ref fwd,
policy fwd, policy bwd = 2 fwd; each side counted with the LM-head positions it computes: JAX
only the completion window, see trainer._logprobs_fn; attention over the full causal square
for both, though both skip part of it) and the JAX/torch ratio.
Both sides run in one process, so both get pasr_jax.host_malloc's settings.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from pasr_jax.batch import Batch, positions


def model_flops(cfg: dict, b: int, t: int, head_positions: int | None = None) -> float:
  """Matmul FLOPs of one forward over [b, t] tokens (linear layers, attention, and the
  lm_head over `head_positions` positions per row, default all t)."""
  d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
  h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  hd = cfg.get("head_dim") or d // h
  per_layer = 2 * d * (h * hd + 2 * kv * hd) + 2 * h * hd * d + 3 * 2 * d * f
  attn = 2 * 2 * t * h * hd  # QK^T and PV over the full (masked) square, per token
  head = 2 * d * v * (t if head_positions is None else head_positions)
  return b * (t * cfg["num_hidden_layers"] * (per_layer + attn) + head)


def make_batch(b: int, t: int, vocab: int, seed: int = 0) -> Batch:
  """B random rows of T tokens; the second half of each row is the scored completion."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (b, t)).astype(np.int32)
  loss = np.zeros((b, t), np.float32)
  loss[:, t // 2:] = 1
  return Batch(input_ids=ids, attention_mask=np.ones((b, t), np.int32),
               positions=positions(b, t), loss_mask=loss, old_logps=np.zeros((b, t), np.float32),
               advantages=rng.normal(0, 1, b).astype(np.float32))


def completion_tokens(batch: Batch) -> int:
  return int(batch.loss_mask.sum(1).max())


def setup_jax(model_dir: Path, batch: Batch, window: bool = True) -> Callable[[], None]:
  """The JAX update as a callable, compiled and run once. `window=False` runs the LM head
  on all T positions, as the torch side does (rollout.max_tokens = T turns the window off)."""
  import jax

  from configs.base import get_base_config
  from pasr_jax import sharding
  from pasr_jax.config import RunConfig
  from pasr_jax.models.hf import load_hf
  from pasr_jax.trainer import Trainer

  c = get_base_config()
  c.mesh.shape = (1, 1, 1)
  rows, length = batch.shape
  c.optim.micro_batch = rows
  # Completions are the second half of each row: at most that many tokens, so the loss's
  # LM head runs on that window only (the torch side, the original's way, runs it on all).
  c.rollout.max_tokens = completion_tokens(batch) if window else length
  model, mcfg = load_hf(model_dir)
  tr = Trainer(RunConfig.from_tree(c).trainer_cfg(), model, mcfg, sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]))
  old = tr.logprobs(batch)  # also warms the logprob function
  batch = batch.replace(old_logps=old * batch.loss_mask)

  def step() -> None:
    m = tr.update(batch)
    assert np.isfinite(m["loss"])
  step()  # compile
  return step


def setup_torch(model_dir: Path, batch: Batch, threads: int) -> Callable[[], None]:
  """The torch update as a callable, run once (warm-up)."""
  import torch
  from transformers import AutoModelForCausalLM

  torch.set_num_threads(threads)
  policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  ref = copy.deepcopy(policy).eval()
  for p in ref.parameters():
    p.requires_grad_(False)
  opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
  ids = torch.from_numpy(batch.input_ids).long()
  attn = torch.from_numpy(batch.attention_mask).long()
  mask = torch.from_numpy(batch.loss_mask)[:, 1:]
  adv = torch.from_numpy(batch.advantages)[:, None]

  def logps(model):
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    rows = []  # the original's per-row log_softmax
    for row, tg in zip(logits, ids[:, 1:]):
      rows.append(torch.gather(row.log_softmax(-1), 1, tg[:, None])[:, 0])
    return torch.stack(rows)

  def step():
    with torch.no_grad():
      ref_lp = logps(ref)
    lp = logps(policy)
    ratio = torch.exp(lp - lp.detach())
    pg = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv)
    d = ref_lp - lp
    per = pg + 0.04 * (torch.exp(d) - d - 1)
    loss = ((per * mask).sum(1) / mask.sum(1)).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    return float(loss.detach())

  step()  # warm-up
  return step


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=384)
  ap.add_argument("--runs", type=int, default=3)
  ap.add_argument("--torch-threads", type=int, default=2)
  ap.add_argument("--skip-torch", action="store_true")
  ap.add_argument("--skip-full-head", action="store_true",
                  help="do not also time JAX with the LM head on all positions")
  args = ap.parse_args()

  from pasr_jax.smollm2 import prepare_smollm2
  model_dir = prepare_smollm2()
  cfg = json.loads((model_dir / "config.json").read_text())
  batch = make_batch(args.batch, args.seq, cfg["vocab_size"])
  tokens = args.batch * args.seq
  flops = {"torch": 4 * model_flops(cfg, args.batch, args.seq),
           "jax": 4 * model_flops(cfg, args.batch, args.seq, completion_tokens(batch))}
  flops["jax_full"] = flops["torch"]

  steps = {"jax": setup_jax(model_dir, batch)}
  if not args.skip_full_head:
    steps["jax_full"] = setup_jax(model_dir, batch, window=False)
  if not args.skip_torch:
    steps["torch"] = setup_torch(model_dir, batch, args.torch_threads)
  # Alternate the two sides run by run, so that the machine's drift (large on shared CPUs)
  # falls on both alike; report each side's best run.
  times: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(args.runs):
    for name, step in steps.items():
      t0 = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - t0)
  res = {name: min(t) for name, t in times.items()}
  print(f"GRPO update, SmolLM2-135M fp32, B={args.batch} T={args.seq} ({tokens} tokens); "
        f"GFLOP per update: jax {flops['jax'] / 1e9:.0f} (LM head on the "
        f"{completion_tokens(batch)} completion positions), torch {flops['torch'] / 1e9:.0f}")
  for name, s in res.items():
    print(f"  {name:8s} {s:7.2f} s   {tokens / s:7.1f} tokens/s   "
          f"{flops[name] / s / 1e9:6.1f} GFLOP/s   (runs: "
          f"{' '.join(f'{t:.2f}' for t in times[name])})")
  if "torch" in res:
    print(f"  ratio jax/torch (tokens/s): {res['torch'] / res['jax']:.2f}x")
    if "jax_full" in res:
      print(f"  ratio jax_full/torch (both LM heads on all {args.seq} positions): "
            f"{res['torch'] / res['jax_full']:.2f}x")


if __name__ == "__main__":
  main()
