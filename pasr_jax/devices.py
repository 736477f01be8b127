"""What JAX gets of the machine, set before it first touches a device.

`setup(cfg)` runs at the start of a training run, before any JAX array exists:
- JAX's share of each GPU: `XLA_PYTHON_CLIENT_MEM_FRACTION` = `memory_fraction(cfg)`. JAX
  otherwise takes 75% at its first op, and a vLLM engine started after it on the same GPU
  then refuses to start (it wants `gpu_memory_utilization` x total free).
- JAX's GPUs: `jax_cuda_visible_devices` from `mesh.cuda_visible_devices` through
  `jax.config.update` (JAX 0.10.2 does not read JAX_CUDA_VISIBLE_DEVICES from the environment).
- JAX's platform: `mesh.platform="cuda"` pins `jax_platforms`, so a CUDA plugin that fails to
  start raises instead of leaving JAX on the CPU with one log line.
Multi-host init (`jax.distributed.initialize` with explicit arguments) is
`pasr_jax.multihost.initialize`, which a run calls after this.

`python -m pasr_jax.devices --config=<preset> [--config.x=y]` applies the same setup and
prints what JAX then sees as JSON (the launch scripts run it with MODULE=pasr_jax.devices).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import jax
from jax._src import xla_bridge

from pasr_jax import cli, errors, multihost
from pasr_jax.config import RunConfig

# JAX's share of a GPU it has to itself; the rest is CUDA context, cuDNN/cuBLAS workspaces and
# NCCL buffers outside JAX's pool.
DEFAULT_FRACTION = 0.9
FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"
CONFLICT_ENV = "XLA_CLIENT_MEM_FRACTION"  # its successor: jaxlib refuses the two together


class DeviceSetupError(errors.UserError):
  """A device setting in the config that cannot be applied (the key is named)."""


def memory_fraction(cfg: RunConfig) -> float:
  """JAX's share of each device: `mesh.memory_fraction` if > 0, else 0.9 minus vLLM's
  `rollout.vllm.gpu_memory_utilization` when the engine shares JAX's GPUs
  (`rollout.vllm.colocate`), else 0.9."""
  frac = float(cfg.mesh.memory_fraction)
  if frac <= 0:
    v = cfg.rollout.vllm
    frac = DEFAULT_FRACTION - (float(v.gpu_memory_utilization) if v.colocate else 0.0)
  if not 0.05 <= frac <= 1.0:
    raise DeviceSetupError(
        f"config mesh.memory_fraction={cfg.mesh.memory_fraction!r} (JAX's share {frac:.2f} with "
        f"rollout.vllm.gpu_memory_utilization={cfg.rollout.vllm.gpu_memory_utilization!r}, "
        f"colocate={cfg.rollout.vllm.colocate!r}) must lie in [0.05, 1]")
  return round(frac, 4)


def fraction_reason(cfg: RunConfig) -> str:
  """Where `memory_fraction(cfg)` comes from, for logs and the plan."""
  if float(cfg.mesh.memory_fraction) > 0:
    return "mesh.memory_fraction"
  v = cfg.rollout.vllm
  if v.colocate:
    return f"{DEFAULT_FRACTION} - vLLM colocated at {v.gpu_memory_utilization}"
  return f"{DEFAULT_FRACTION}, vLLM on other GPUs"


def parse_ids(key: str, text: str) -> list[int]:
  """The device indices of config `key` ("0,1,2"; "" = none); DeviceSetupError naming it."""
  try:
    return [int(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    raise DeviceSetupError(f"config {key}={text!r}: comma-separated device indices") from None


def setup(cfg: RunConfig) -> dict[str, Any]:
  """Applies the config's device settings; must run before JAX first touches a device.

  Returns what was set. Raises DeviceSetupError for unusable values, and if JAX's backends
  are already up (then the fraction and visible devices would be silently ignored)."""
  if xla_bridge.backends_are_initialized():
    raise DeviceSetupError("devices.setup must run before JAX first touches a device "
                           "(its backends are already initialised)")
  m = cfg.mesh
  frac = memory_fraction(cfg)
  if os.environ.get(FRACTION_ENV) not in (None, f"{frac:g}"):
    print(f"[devices] {FRACTION_ENV}={os.environ[FRACTION_ENV]} from the environment replaced by "
          f"{frac:g} ({fraction_reason(cfg)})", file=sys.stderr, flush=True)
  if os.environ.get(CONFLICT_ENV):  # jaxlib raises on both, and the plugin then falls back
    raise DeviceSetupError(f"{CONFLICT_ENV}={os.environ[CONFLICT_ENV]} in the environment: unset "
                           f"it (JAX's share comes from mesh.memory_fraction, set as {FRACTION_ENV})")
  os.environ[FRACTION_ENV] = f"{frac:g}"
  done: dict[str, Any] = {"memory_fraction": frac}
  if m.platform:
    jax.config.update("jax_platforms", m.platform)
    done["platform"] = m.platform
  if m.cuda_visible_devices:
    visible = ",".join(map(str, parse_ids("mesh.cuda_visible_devices", m.cuda_visible_devices)))
    jax.config.update("jax_cuda_visible_devices", visible)
    done["cuda_visible_devices"] = visible
  return done


def local_gpu_count() -> int:
  """GPUs this host shows (`nvidia-smi -L`, limited by CUDA_VISIBLE_DEVICES); 0 without any."""
  if not shutil.which("nvidia-smi"):
    return 0
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return 0
  n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  return min(n, len([x for x in visible.split(",") if x.strip()])) if visible is not None else n


def _own_ids(m) -> list[int]:
  """The process's GPUs the config names: mesh.local_device_ids, else mesh.cuda_visible_devices."""
  return parse_ids("mesh.local_device_ids", m.local_device_ids) or parse_ids(
      "mesh.cuda_visible_devices", m.cuda_visible_devices)


def local_device_ids(mesh_cfg) -> list[int] | None:
  """This process's GPUs for `jax.distributed.initialize(local_device_ids=...)`: the config's
  mesh.local_device_ids, else mesh.cuda_visible_devices, else every GPU the process sees
  (CUDA_VISIBLE_DEVICES' count); None when it sees none. Never left to JAX: under SLURM or
  Open MPI its cluster detection would set them to [local process id], one GPU a process."""
  ids = _own_ids(mesh_cfg)
  if ids:
    return ids
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible is not None:
    return list(range(len([x for x in visible.split(",") if x.strip()]))) or None
  return list(range(local_gpu_count())) or None


def engine_gpus(cfg) -> str | None:
  """CUDA_VISIBLE_DEVICES for this process's colocated vLLM engine: the first
  `rollout.vllm.tensor_parallel_size` of its own GPUs (mesh.local_device_ids or
  mesh.cuda_visible_devices, through the process's CUDA_VISIBLE_DEVICES), so several
  processes on one host do not all put their engines on GPU 0. None: the engine sees what the
  process sees (one process per host, or vLLM on GPUs of its own: rollout.vllm.colocate=False)."""
  v = cfg.rollout.vllm
  ids = _own_ids(cfg.mesh)
  if not v.colocate or not ids:
    return None
  visible = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
  ids = ids[:v.tensor_parallel_size]
  return ",".join(visible[i] if i < len(visible) else str(i) for i in ids)


def describe() -> dict[str, Any]:
  """What JAX sees now (initialises its backends)."""
  stats = jax.local_devices()[0].memory_stats() or {}  # None on CPU
  return {
      "bytes_limit": stats.get("bytes_limit"),  # JAX's pool on a GPU: fraction x total
      "backend": jax.default_backend(),
      "process_index": jax.process_index(), "process_count": jax.process_count(),
      "local_devices": [str(d) for d in jax.local_devices()],
      "device_count": jax.device_count(),
      FRACTION_ENV: os.environ.get(FRACTION_ENV),
      "jax_cuda_visible_devices": xla_bridge.CUDA_VISIBLE_DEVICES.value,
  }


def report(cfg: RunConfig) -> None:
  """`python -m pasr_jax.devices`: the run's device setup (and multi-host init), then what JAX
  sees, as one JSON line."""
  set_ = setup(cfg)
  if cfg.mesh.distributed:  # as a run does (pasr_jax.run)
    multihost.initialize(cfg.mesh, local_device_ids(cfg.mesh))
  print(json.dumps({"set": set_, "jax": describe()}), flush=True)


if __name__ == "__main__":
  cli.main("pasr_jax.devices", report)
