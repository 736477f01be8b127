"""Memory plan: compile the GRPO train step ahead of time on a simulated mesh, print bytes/device.

  python -m pasr_jax.plan --config=configs/qwen2_5_7b.py --mesh=1,8,1 [--device-memory-gib=80]

No weights are read: params, reference, AdamW state and the batch are abstract
(`jax.ShapeDtypeStruct` with their shardings) and the step is lowered and compiled for
`prod(mesh)` forced CPU devices; `compiled.memory_analysis()` then gives per-device argument,
output, temp and aliased (donated) bytes. The architecture comes from `model.hf_config` in the
preset or `model.path`/config.json. The CPU compiler's buffer assignment is a close but not exact
proxy for a GPU's (fusion and layouts differ); treat ±10% as noise.
"""

from __future__ import annotations

import math
import os
import sys


def _force_devices() -> None:
  # Must happen before jax is imported anywhere in this process.
  n = None
  for i, a in enumerate(sys.argv):
    if a.startswith("--mesh="):
      n = a.split("=", 1)[1]
    elif a == "--mesh" and i + 1 < len(sys.argv):
      n = sys.argv[i + 1]
  if n:
    count = math.prod(abs(int(x)) for x in n.split(","))
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "force_host_platform_device_count" not in f)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


if __name__ == "__main__":
  _force_devices()

import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from pasr_jax import sharding  # noqa: E402
from pasr_jax.models.qwen import Decoder, ModelConfig  # noqa: E402
from pasr_jax.trainer import (BATCH_KEYS, INT_KEYS, batch_shardings, jit_update,  # noqa: E402
                              make_optimizer, make_step_fns, opt_state_shardings)

GIB = 1024 ** 3


class PlanError(ValueError):
  """A preset or flag the plan cannot use."""


def model_config(cfg: ml_collections.ConfigDict, layers: int = 0) -> ModelConfig:
  """The ModelConfig from `model.hf_config` or `model.path`/config.json (optionally fewer layers)."""
  if cfg.model.get("hf_config"):
    d = cfg.model.hf_config.to_dict()
  elif cfg.model.path and (Path(cfg.model.path) / "config.json").exists():
    d = json.loads((Path(cfg.model.path) / "config.json").read_text())
  else:
    raise PlanError("the config needs model.hf_config or model.path with a config.json")
  if layers:
    d = dict(d, num_hidden_layers=layers)
  return ModelConfig.from_hf_dict(d)


def _abstract(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def plan(cfg: ml_collections.ConfigDict, mesh_shape, seq_len: int, layers: int = 0,
         batch: int = 0) -> dict[str, float]:
  """Lowers + compiles the update for abstract inputs; returns per-device bytes and timings."""
  mcfg = model_config(cfg, layers)
  mesh = sharding.make_mesh(mesh_shape)
  mb = int(cfg.optim.micro_batch)
  # One update's batch: optim.sequences_per_update rows, or the whole rollout batch (0).
  batch = batch or int(cfg.optim.sequences_per_update) or (
      int(cfg.rollout.prompts_per_step) * int(cfg.rollout.n))
  if batch % mb or mb % sharding.batch_shards(mesh):
    raise PlanError(f"batch={batch}, optim.micro_batch={mb}, batch shards="
                    f"{sharding.batch_shards(mesh)}: need shards | micro_batch | batch")
  dtype = jnp.dtype(cfg.model.dtype)
  abs_model = nnx.eval_shape(lambda: Decoder(
      mcfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.dtype(cfg.model.param_dtype),
      scan_layers=cfg.model.scan_layers, remat=cfg.model.remat))
  graphdef, params, rest = nnx.split(abs_model, nnx.Param, ...)
  p_sh = sharding.state_shardings(params, mesh, cfg.mesh.rules)
  tx = make_optimizer(cfg.optim, cfg.train.steps)
  o_sh = opt_state_shardings(tx, params, p_sh, mesh)
  abs_params = _abstract(params, p_sh)
  abs_opt = _abstract(jax.eval_shape(tx.init, params), o_sh)
  b_sh = batch_shardings(mesh, BATCH_KEYS)
  abs_batch = {k: jax.ShapeDtypeStruct(
      (batch,) if k == "advantages" else (batch, seq_len),
      jnp.int32 if k in INT_KEYS else jnp.float32,
      sharding=b_sh[k]) for k in BATCH_KEYS}
  beta = cfg.grpo.beta > 0
  update, _, _ = make_step_fns(graphdef, rest, tx, cfg, batch // mb, mesh)
  fn = jit_update(update, mesh, p_sh, o_sh, BATCH_KEYS, beta)
  t0 = time.perf_counter()
  with jax.set_mesh(mesh):  # the model pins activations batch-sharded under a set mesh
    lowered = fn.lower(abs_params, abs_params if beta else None, abs_opt, abs_batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
  return {
      "params": n_params, "layers": mcfg.num_layers, "devices": mesh.size,
      "micro_batch": mb, "batch": batch, "seq_len": seq_len,
      "argument_gib": arg / GIB, "output_gib": out / GIB, "temp_gib": temp / GIB,
      "alias_gib": alias / GIB, "peak_gib": (arg + out - alias + temp) / GIB,
      "lower_s": t1 - t0, "compile_s": t2 - t1,
  }


def main(argv) -> None:
  del argv
  from absl import flags
  f = flags.FLAGS
  cfg = f.config
  shape = tuple(int(x) for x in f.mesh.split(","))
  t0 = time.perf_counter()
  r = plan(cfg, shape, f.seq_len, f.layers, f.batch)
  scale = 1.0
  mcfg = model_config(cfg)
  if f.layers and f.layers != mcfg.num_layers:
    scale = mcfg.num_layers / f.layers
  path = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  print(f"config        {path}".rstrip())
  print(f"model         {mcfg.model_type} layers={r['layers']} params={r['params'] / 1e9:.2f}B "
        f"dtype={cfg.model.dtype} master={cfg.model.param_dtype} remat={cfg.model.remat} "
        f"scan={cfg.model.scan_layers} beta={cfg.grpo.beta}")
  print(f"mesh          {shape} (data, fsdp, tensor) = {r['devices']} devices")
  print(f"batch         {r['batch']} x {r['seq_len']} tokens, micro-batch {r['micro_batch']} "
        f"({r['micro_batch'] // sharding.batch_shards(sharding.make_mesh(shape))}/device), "
        f"{r['batch'] // r['micro_batch']} accumulation steps")
  for k in ("argument", "output", "alias", "temp"):
    print(f"{k + ' GiB':14s}{r[k + '_gib']:8.2f}  per device")
  print(f"{'peak GiB':14s}{r['peak_gib']:8.2f}  per device (argument + output - alias + temp)")
  if scale != 1.0:
    print(f"(compiled with {f.layers} of {mcfg.num_layers} layers; not extrapolated)")
  fits = r["peak_gib"] <= f.device_memory_gib
  print(f"fits {f.device_memory_gib:g} GiB: {'yes' if fits else 'NO'}   "
        f"(lower {r['lower_s']:.0f} s, compile {r['compile_s']:.0f} s, "
        f"total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "preset file (configs/*.py)", lock_config=False)
  flags.DEFINE_string("mesh", "1,8,1", "data,fsdp,tensor (simulated CPU devices)")
  flags.DEFINE_float("device_memory_gib", 80.0, "device memory to compare against")
  flags.DEFINE_integer("seq_len", 2048, "tokens per sequence (prompt + completion)")
  flags.DEFINE_integer("layers", 0, "compile with this many layers instead (0 = all)")
  flags.DEFINE_integer("batch", 0, "sequences per step (0 = prompts_per_step * n)")
  flags.mark_flags_as_required(["config"])
  # Accept --device-memory-gib / --seq-len spellings too.
  argv = [a if not a.startswith("--") or a.startswith("--config")
          else "--" + a[2:].split("=", 1)[0].replace("-", "_") + a[2 + len(a[2:].split("=", 1)[0]):]
          for a in sys.argv]
  app.run(main, argv=argv)
