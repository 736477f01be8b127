"""A JAX-only check of one GPU: the GRPO update at real sizes, cuDNN attention, memory, Orbax.

  python -m pasr_jax.gpu_check [--out=gpu_check.md] [--tiny] [--skip-plan]

Runs with JAX + its CUDA plugin, flax, optax, orbax-checkpoint, ml_collections and this source
tree: no vLLM, torch, transformers, judge or network, and no weights (random ones at the
models' real shapes). What it measures, per model (Qwen2.5-0.5B, Qwen2.5-1.5B, the first
layers of Qwen3-8B): `Trainer.update` (the training path: micro-batch scan, reference model,
AdamW, remat, scanned layers, bf16 over fp32 master weights), its compile and step time,
tokens/s and MFU, and the peak device memory against `pasr_jax.plan`'s prediction for the same
program; then cuDNN flash attention against XLA's, and an Orbax save and restore of a trainer
state through `pasr_jax.checkpoint`. One Markdown table goes to stdout and to `--out`; exit 1
when a check fails. `--tiny` runs the same code at tiny sizes on any backend (the CPU test).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.paper import paper_gpu_config
from configs.qwen3_8b import HF_CONFIG as QWEN3_8B
from pasr_jax import batch as batch_lib, checkpoint, plan, sharding
from pasr_jax.batch import Batch
from pasr_jax.config import RunConfig
from pasr_jax.models.qwen import Decoder, ModelConfig, resolve_attention
from pasr_jax.trainer import Trainer

GIB = 1024 ** 3

_QWEN25 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
           "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
# Public config.json values of the models whose shapes the check trains (random weights).
MODELS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2),
    "qwen2.5-1.5b": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2),
    "qwen3-8b": dict(QWEN3_8B),
}
TINY = dict(_QWEN25, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)

# Dense bf16 peak FLOP/s per device kind (NVIDIA data sheets, without sparsity).
PEAK_BF16 = {"H100 80GB HBM3": 989e12, "H100 SXM": 989e12, "H100 PCIe": 756e12,
             "H100 NVL": 835e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12,
             "L40S": 362e12, "B200": 2250e12}


@dataclasses.dataclass
class Row:
  """One line of the table."""
  check: str
  shape: str = ""
  compile_s: str = ""
  step_s: str = ""
  tokens_s: str = ""
  mfu: str = ""
  peak: str = ""
  result: str = "ok"
  ok: bool = True


@dataclasses.dataclass(frozen=True)
class Case:
  """One GRPO update to measure: a model's config, its layers, and the batch."""
  name: str
  hf: dict[str, Any]
  layers: int        # 0 = all
  batch: int         # sequences per update
  micro: int         # sequences per micro-batch
  seq: int           # tokens per sequence (prompt + completion)
  prompt: int        # prompt tokens (not scored)


def cases(tiny: bool) -> list[Case]:
  """The updates to measure, smallest first (the allocator's peak only ever grows)."""
  if tiny:
    return [Case("tiny", TINY, 0, 4, 2, 64, 16)]
  return [Case("qwen2.5-0.5b", MODELS["qwen2.5-0.5b"], 0, 8, 4, 1024, 256),
          Case("qwen2.5-1.5b", MODELS["qwen2.5-1.5b"], 0, 8, 4, 1024, 256),
          Case("qwen3-8b", MODELS["qwen3-8b"], 4, 8, 4, 1024, 256)]


def run_config(case: Case, workdir: str) -> RunConfig:
  """The paper preset for this model on the local devices, with the case's batch."""
  hf = dict(case.hf, num_hidden_layers=case.layers or case.hf["num_hidden_layers"])
  c = paper_gpu_config(hf, workdir=workdir, cluster="1x1")
  c.mesh.shape = (1, jax.device_count(), 1)
  c.mesh.platform = jax.default_backend() if jax.default_backend() != "gpu" else "cuda"
  c.optim.micro_batch = case.micro * jax.device_count()
  c.optim.sequences_per_update = case.batch * jax.device_count()
  return RunConfig.from_tree(c)


def train_flops_per_token(m: ModelConfig, seq: int, beta: bool, remat: bool) -> float:
  """Model FLOPs of one trained token: policy forward + backward (3 forwards), remat's
  recomputed forward, the reference's forward; each forward 2 FLOP per matmul weight plus
  causal attention (scores and values: 2 x 2 x seq/2 x heads x head_dim per layer)."""
  embed = m.vocab_size * m.hidden_size
  # The embedding lookup is free; the LM head is a matmul (the embedding itself when tied).
  matmul = count_params(m) - embed + (embed if m.tie_word_embeddings else 0)
  attn = m.num_layers * 2 * 2 * (seq / 2) * m.num_heads * m.head_dim
  forwards = 3 + (1 if remat else 0) + (1 if beta else 0)
  return forwards * (2 * matmul + attn)


def count_params(m: ModelConfig) -> int:
  abstract = nnx.eval_shape(lambda: Decoder(m, rngs=nnx.Rngs(0)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def synthetic_batch(case: Case, vocab: int, seed: int = 0) -> Batch:
  """A right-padded GRPO batch: prompt tokens unscored, completion tokens scored, the last
  rows shorter (padding), advantages of both signs."""
  rng = np.random.default_rng(seed)
  b, n = case.batch * jax.device_count(), case.seq
  ids = rng.integers(0, vocab, (b, n), dtype=np.int32)
  lengths = np.full(b, n)
  lengths[b // 2:] = n - n // 4
  mask = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = mask * (np.arange(n)[None] >= case.prompt)
  return Batch(input_ids=ids * mask, attention_mask=mask, positions=batch_lib.positions(b, n),
               loss_mask=loss_mask.astype(np.float32), old_logps=np.zeros((b, n), np.float32),
               advantages=rng.standard_normal(b).astype(np.float32))


def peak_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def peak_flops() -> float | None:
  kind = jax.local_devices()[0].device_kind
  return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def measure_update(case: Case, repeats: int, with_plan: bool) -> tuple[Row, Trainer]:
  """Build a random model of the case's shape, train it with `Trainer.update`, time it."""
  cfg = run_config(case, tempfile.mkdtemp(prefix="gpu_check_"))
  mcfg = ModelConfig.from_hf_dict(dict(cfg.model.hf_config))
  mesh = sharding.make_mesh(tuple(cfg.mesh.shape))
  dtype = cfg.model.compute_dtype
  attention = resolve_attention(cfg.model.attention, dtype)
  model = Decoder(mcfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=cfg.model.weight_dtype,
                  scan_layers=cfg.model.scan_layers, remat=cfg.model.remat, attention=attention)
  trainer = Trainer(cfg.trainer_cfg(), model, mcfg, mesh)
  del model
  batch = synthetic_batch(case, mcfg.vocab_size)
  # Old logprobs from the policy itself (the sampler's would be close to them): ratio ~1.
  batch = batch.replace(old_logps=trainer.logprobs(batch))
  t0 = time.perf_counter()
  first = trainer.update(batch)
  first_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    m = trainer.update(batch)  # returns host floats: the step has finished
    times.append(time.perf_counter() - t0)
  step = statistics.median(times)
  peak = peak_bytes()
  tokens = int(batch.attention_mask.sum())
  flops = train_flops_per_token(mcfg, case.seq, cfg.grpo.beta > 0, cfg.model.remat) * tokens
  device_peak = peak_flops()
  finite = all(math.isfinite(v) for v in (first["loss"], m["loss"])) and not m["skipped"]
  planned, vs_plan = "", ""
  if with_plan:
    p = plan.plan(cfg, tuple(cfg.mesh.shape), case.seq, batch=case.batch * jax.device_count())
    planned = f" ({p['peak_gib']:.3g})"
    if peak is not None and p["peak_gib"] > 0:
      vs_plan = f"; measured / planned peak {peak / GIB / p['peak_gib']:.2f}"
  layers = f"{mcfg.num_layers} of {case.hf['num_hidden_layers']}" if case.layers else str(mcfg.num_layers)
  row = Row(
      check=f"grpo update {case.name}",
      shape=(f"{layers} layers, {count_params(mcfg) / 1e9:.3g} B params, {case.batch} x "
             f"{case.seq} tokens/device, micro {case.micro}, {attention} attention"),
      compile_s=f"{max(first_s - step, 0.0):.1f}", step_s=f"{step:.3f}",
      tokens_s=f"{tokens / step:,.0f}",
      mfu=(f"{100 * flops / step / (device_peak * jax.device_count()):.1f}"
           if device_peak else "n/a"),
      peak=(f"{peak / GIB:.3g}" if peak is not None else "n/a") + planned,
      result=("ok" if finite else f"FAIL: loss {m['loss']}, skipped {m['skipped']}") + vs_plan,
      ok=finite)
  return row, trainer


def attention_row(tiny: bool) -> Row:
  """cuDNN flash attention against XLA's: outputs and gradients, causal, bf16."""
  b, s, h, kv, d = (1, 64, 4, 2, 16) if tiny else (2, 2048, 28, 4, 128)
  shape = f"[{b}, {s}, {h}/{kv}, {d}] bf16 causal"
  if jax.default_backend() not in ("gpu", "cuda"):
    return Row("attention cudnn vs xla", shape,
               result=f"skipped: cuDNN attention needs an NVIDIA GPU (backend: {jax.default_backend()})")
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, s, h, d), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, s, kv, d), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, s, kv, d), jnp.bfloat16)
  ct = jax.random.normal(keys[3], (b, s, h, d), jnp.bfloat16)

  def run(impl: str):
    def f(q, k, v):
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
      return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32)), out
    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out.astype(jnp.float32), [g.astype(jnp.float32) for g in grads]

  try:
    out_c, g_c = run("cudnn")
  except Exception as e:  # cuDNN missing or too old: report it as the check's result
    return Row("attention cudnn vs xla", shape, result=f"FAIL: cudnn: {str(e)[:160]}", ok=False)
  out_x, g_x = run("xla")
  d_out = float(jnp.max(jnp.abs(out_c - out_x)))
  # Gradients relative to their scale: bf16 accumulation orders differ between the kernels.
  d_grad = max(float(jnp.max(jnp.abs(a - c)) / (jnp.max(jnp.abs(c)) + 1e-6))
               for a, c in zip(g_c, g_x))
  ok = d_out <= 2e-2 and d_grad <= 2e-2
  return Row("attention cudnn vs xla", shape,
             result=f"{'ok' if ok else 'FAIL'}: max |out diff| {d_out:.1e}, "
                    f"max grad diff / max grad {d_grad:.1e} (limits 2e-2)", ok=ok)


def orbax_row(trainer: Trainer, name: str) -> Row:
  """Save the trainer's state with `pasr_jax.checkpoint` and restore it: equal, checksums ok."""
  state = trainer.state_for_checkpoint()
  size = sum(x.nbytes for x in jax.tree.leaves(state))
  with tempfile.TemporaryDirectory(prefix="gpu_check_ckpt_") as d:
    ckpt = checkpoint.Checkpointer(d, keep=1, async_save=False)
    t0 = time.perf_counter()
    ckpt.save_run(state, checkpoint.RunState.fresh(0))
    ckpt.wait()
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    restored, _ = ckpt.restore_run(state)
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - t0
    ckpt.close()
  equal = all(bool(jnp.array_equal(a, b)) for a, b in
              zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
  return Row("orbax save / restore", f"{name} trainer state, {size / GIB:.2f} GiB",
             step_s=f"save {save_s:.1f}, restore {restore_s:.1f}",
             result="equal, checksums ok" if equal else "FAIL: restored state differs", ok=equal)


def table(rows: list[Row]) -> str:
  """The rows as one Markdown table."""
  head = ("| check | shape | compile s | step s | tokens/s | MFU % | peak GiB (plan) | result |\n"
          "|---|---|---|---|---|---|---|---|\n")
  return head + "".join(f"| {r.check} | {r.shape} | {r.compile_s} | {r.step_s} | {r.tokens_s} | "
                        f"{r.mfu} | {r.peak} | {r.result} |\n" for r in rows)


def _guarded(name: str, fn: Callable[[], Row]) -> Row:
  try:
    return fn()
  except Exception as e:  # one failed check still lets the others run and the table print
    return Row(name, result=f"FAIL: {type(e).__name__}: {str(e)[:200]}", ok=False)


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m pasr_jax.gpu_check", allow_abbrev=False,
                               description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="gpu_check.md", help="where the Markdown table goes")
  ap.add_argument("--tiny", action="store_true", help="tiny sizes (any backend, seconds)")
  ap.add_argument("--repeats", type=int, default=3, help="timed updates after the first")
  ap.add_argument("--skip-plan", action="store_true", help="no plan compile (saves time)")
  args = ap.parse_args(argv)
  # JAX takes 75 % of a GPU at its first op by default; this check is alone on its GPU. Set
  # before the first device use (JAX starts its backends lazily).
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
  dev = jax.local_devices()[0]
  rows = [Row("device", f"{dev.device_kind} x{jax.device_count()}, {jax.default_backend()}, "
                        f"jax {jax.__version__}")]
  orbax_done = False

  def add(row: Row) -> None:
    """One more row: printed at once and the file rewritten, so a run cut short by a time
    limit still leaves the rows it finished."""
    rows.append(row)
    print(table([row]).splitlines()[-1], flush=True)
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(table(rows))

  add(rows.pop())
  # Cheapest first: a run cut short still has the attention comparison.
  add(_guarded("attention cudnn vs xla", lambda: attention_row(args.tiny)))
  for case in cases(args.tiny):
    holder: dict[str, Any] = {}

    def one(case=case, holder=holder):
      row, holder["trainer"] = measure_update(case, args.repeats, not args.skip_plan)
      return row
    add(_guarded(f"grpo update {case.name}", one))
    if not orbax_done and "trainer" in holder:  # the smallest model's state is enough
      add(_guarded("orbax save / restore", lambda: orbax_row(holder["trainer"], case.name)))
      orbax_done = True
    holder.clear()
    gc.collect()
  print(table(rows))
  print(f"written to {args.out}")
  return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
  sys.exit(main())
