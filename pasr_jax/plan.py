"""Memory plan: compile the GRPO train step ahead of time for a mesh, print bytes/device.

  python -m pasr_jax.plan --config=configs/qwen2_5_7b.py --mesh=1,8,1 [--device-memory-gib=80]
  .venv-xla-gpu/bin/python -m pasr_jax.plan --config=configs/qwen3_8b.py --mesh=1,4,1 \
      --platform=cuda --gpu=h100

No weights are read: params, reference, AdamW state and the batch are abstract
(`jax.ShapeDtypeStruct` with their shardings) and the step is lowered and compiled;
`compiled.memory_analysis()` then gives per-device argument, output, temp and aliased
(donated) bytes. The architecture comes from `model.hf_config` in the preset or
`model.path`/config.json.

--platform=cpu (default) compiles for `prod(mesh)` forced CPU devices: a close but not exact
proxy for a GPU's buffers (fusion, layouts and attention differ). --platform=cuda compiles
with XLA:GPU itself for `--gpu` GPUs that are not there (pasr_jax.xla_gpu; needs the venv of
`make xla-gpu`), cuDNN attention included; without a device XLA neither autotunes GEMMs nor
sizes cuDNN workspaces, so temp bytes are a lower bound. The fit check compares the peak with
JAX's share of the device (`devices.memory_fraction`: what the trainer gives JAX when vLLM
shares the GPU).
"""

from __future__ import annotations

import math
import os
import sys


def _force_devices() -> None:
  # Must happen before jax is imported anywhere in this process. --platform=cuda needs
  # JAX_PLATFORMS=cpu too: the CUDA plugin then only compiles (no cuInit).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  args = " ".join(sys.argv).replace("--platform ", "--platform=")
  if "--platform=cuda" in args or "--platform=gpu" in args:
    return
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


if __name__ == "__main__":
  _force_devices()

import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from pasr_jax import cli, devices, errors, sharding, xla_gpu  # noqa: E402
from pasr_jax.batch import INT_FIELDS, Batch  # noqa: E402
from pasr_jax.config import RunConfig  # noqa: E402
from pasr_jax.models.qwen import Decoder, ModelConfig, resolve_attention  # noqa: E402
from pasr_jax.tiny import char_vocab, tiny_model_config  # noqa: E402
from pasr_jax.trainer import (BATCH_KEYS, batch_shardings, jit_update,  # noqa: E402
                              make_optimizer, make_step_fns, opt_state_shardings, ref_copy)

GIB = 1024 ** 3


class PlanError(errors.UserError):
  """A preset or flag the plan cannot use."""


def model_config(cfg: RunConfig | ml_collections.ConfigDict, layers: int = 0) -> ModelConfig:
  """The ModelConfig from `model.hf_config` or `model.path`/config.json (optionally fewer layers)."""
  cfg = RunConfig.from_tree(cfg)
  if cfg.model.hf_config:
    d = dict(cfg.model.hf_config)
  elif cfg.model.tiny_random:  # what train writes to <workdir>/tiny_model (untied)
    d = tiny_model_config(len(char_vocab()), tie_word_embeddings=False).to_hf_dict()
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


def plan(cfg: RunConfig | ml_collections.ConfigDict, mesh_shape, seq_len: int, layers: int = 0,
         batch: int = 0, gpu: str = "") -> dict[str, float]:
  """Lowers + compiles the update for abstract inputs; returns per-device bytes and timings.

  With `gpu` (a name in xla_gpu.GPUS) it compiles with XLA:GPU for that many GPUs of one host
  (deviceless) and also returns the cuDNN attention custom calls in the compiled program."""
  cfg = RunConfig.from_tree(cfg)
  mcfg = model_config(cfg, layers)
  dtype = cfg.model.compute_dtype
  target = xla_gpu.GpuTarget(gpu) if gpu else None
  if target:
    mesh = sharding.make_mesh(mesh_shape, xla_gpu.topology_devices(
        target, xla_gpu.devices_on_host(mesh_shape)))
    attention = resolve_attention(cfg.model.attention, dtype, platform="cuda")
    tracing = xla_gpu.cudnn_target(target)
  else:
    mesh = sharding.make_mesh(mesh_shape)
    attention = resolve_attention(cfg.model.attention, dtype)
    tracing = contextlib.nullcontext()
  mb = int(cfg.optim.micro_batch)
  # One update's batch: optim.sequences_per_update rows, or the whole rollout batch (0).
  batch = batch or int(cfg.optim.sequences_per_update) or (
      int(cfg.rollout.prompts_per_step) * int(cfg.rollout.n))
  rules = tuple(cfg.mesh.rules)
  shards = sharding.batch_shards(mesh, rules)
  if batch % mb or mb % shards:
    raise PlanError(f"batch={batch}, optim.micro_batch={mb}, batch shards={shards}: need "
                    f"shards | micro_batch | batch")
  param_dtype = cfg.model.weight_dtype
  abs_model = nnx.eval_shape(lambda: Decoder(
      mcfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
      scan_layers=cfg.model.scan_layers, remat=cfg.model.remat, attention=attention))
  graphdef, params, rest = nnx.split(abs_model, nnx.Param, ...)
  p_sh = sharding.state_shardings(params, mesh, rules)
  tx = make_optimizer(cfg.optim, cfg.train.steps)
  o_sh = opt_state_shardings(tx, params, p_sh, mesh)
  abs_params = _abstract(params, p_sh)
  abs_opt = _abstract(jax.eval_shape(tx.init, params), o_sh)
  b_sh = batch_shardings(mesh, rules, BATCH_KEYS)
  abs_batch = Batch(**{k: jax.ShapeDtypeStruct(
      (batch,) if k == "advantages" else (batch, seq_len),
      jnp.int32 if k in INT_FIELDS else jnp.float32,
      sharding=b_sh[k]) for k in BATCH_KEYS})
  beta = cfg.grpo.beta > 0
  abs_ref = _abstract(jax.eval_shape(lambda p: ref_copy(p, dtype), params), p_sh) if beta else None
  update, _ = make_step_fns(graphdef, rest, tx, cfg.trainer_cfg(), batch // mb, mesh)
  fn = jit_update(update, mesh, rules, p_sh, o_sh, BATCH_KEYS, beta)
  t0 = time.perf_counter()
  # Under use_mesh the model pins activations by the 'batch' rule.
  with sharding.use_mesh(mesh, rules), tracing:
    lowered = fn.lower(abs_params, abs_ref, abs_opt, abs_batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()
  n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
  temp, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
  result = {
      "params": n_params, "layers": mcfg.num_layers, "devices": mesh.size,
      "micro_batch": mb, "batch": batch, "seq_len": seq_len,
      "argument_gib": arg / GIB, "output_gib": out / GIB, "temp_gib": temp / GIB,
      "alias_gib": alias / GIB, "peak_gib": (arg + out - alias + temp) / GIB,
      "lower_s": t1 - t0, "compile_s": t2 - t1, "attention": attention,
      "batch_shards": shards,
  }
  if target:
    calls = xla_gpu.cudnn_attention_calls(compiled.as_text())
    result.update(device_gib=target.memory_bytes / GIB, gpu=target.description,
                cudnn_fwd_calls=calls["forward"], cudnn_bwd_calls=calls["backward"])
  return result


def report(cfg: RunConfig) -> None:
  """`python -m pasr_jax.plan`: the plan of `cfg` for the flags' mesh and platform, printed."""
  f = flags.FLAGS
  shape = tuple(int(x) for x in f.mesh.split(","))
  if f.platform not in ("cpu", "cuda", "gpu"):
    raise PlanError(f"--platform={f.platform!r}: cpu | cuda")
  gpu = f.gpu if f.platform != "cpu" else ""
  t0 = time.perf_counter()
  r = plan(cfg, shape, f.seq_len, f.layers, f.batch, gpu=gpu)
  mcfg = model_config(cfg)
  path = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  print(f"config        {path}".rstrip())
  print(f"model         {mcfg.model_type} layers={r['layers']} params={r['params'] / 1e9:.2f}B "
        f"dtype={cfg.model.dtype} master={cfg.model.param_dtype} remat={cfg.model.remat} "
        f"scan={cfg.model.scan_layers} beta={cfg.grpo.beta} attention={r['attention']}")
  where = f"XLA:GPU for {r['gpu']} (deviceless)" if gpu else "XLA:CPU (forced host devices)"
  print(f"compiled      {where}")
  print(f"mesh          {shape} (data, fsdp, tensor) = {r['devices']} devices")
  print(f"batch         {r['batch']} x {r['seq_len']} tokens, micro-batch {r['micro_batch']} "
        f"({r['micro_batch'] // r['batch_shards']}/device), "
        f"{r['batch'] // r['micro_batch']} accumulation steps")
  for k in ("argument", "output", "alias", "temp"):
    print(f"{k + ' GiB':14s}{r[k + '_gib']:8.2f}  per device")
  print(f"{'peak GiB':14s}{r['peak_gib']:8.2f}  per device (argument + output - alias + temp)")
  if gpu:
    print(f"cuDNN attn    {r['cudnn_fwd_calls']} forward, {r['cudnn_bwd_calls']} backward "
          "custom calls (__cudnn$fmha*)")
    print(f"note          {xla_gpu.NO_AUTOTUNE_NOTE}")
  if f.layers and f.layers != mcfg.num_layers:
    print(f"(compiled with {f.layers} of {mcfg.num_layers} layers; not extrapolated)")
  device_gib = r["device_gib"] if gpu else f.device_memory_gib
  frac = devices.memory_fraction(cfg)
  budget = frac * device_gib
  fits = r["peak_gib"] <= budget
  print(f"fits          {'yes' if fits else 'NO'}: JAX's share {frac:.2f} x {device_gib:.1f} GiB = "
        f"{budget:.1f} GiB ({devices.fraction_reason(cfg)})")
  print(f"time          lower {r['lower_s']:.0f} s, compile {r['compile_s']:.0f} s, "
        f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
  flags.DEFINE_string("mesh", "1,8,1", "data,fsdp,tensor (devices of one host)")
  flags.DEFINE_string("platform", "cpu", "cpu: forced CPU devices | cuda: XLA:GPU, deviceless")
  flags.DEFINE_string("gpu", "h100", f"--platform=cuda target: {' | '.join(xla_gpu.GPUS)}")
  flags.DEFINE_float("device_memory_gib", 80.0, "device memory (--platform=cpu; cuda: the GPU's)")
  flags.DEFINE_integer("seq_len", 2048, "tokens per sequence (prompt + completion)")
  flags.DEFINE_integer("layers", 0, "compile with this many layers instead (0 = all)")
  flags.DEFINE_integer("batch", 0, "sequences per step (0 = prompts_per_step * n)")
  # Accept --device-memory-gib / --seq-len spellings too.
  sys.argv = [a if not a.startswith("--") or a.startswith("--config")
              else "--" + a[2:].split("=", 1)[0].replace("-", "_") + a[2 + len(a[2:].split("=", 1)[0]):]
              for a in sys.argv]
  cli.main("pasr_jax.plan", report)
