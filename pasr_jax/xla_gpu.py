"""Deviceless XLA:GPU compilation: a mesh of NVIDIA GPUs that are not there.

With the CUDA PJRT plugin installed (`make xla-gpu`: `.venv-xla-gpu`, kept out of the main
venv) and `JAX_PLATFORMS=cpu` (else the plugin fails at `cuInit` and is not registered),
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=<text proto>,
topology="1x1xN")` describes N GPUs of one host, and `jax.jit(f).lower(...).compile()` on
a mesh of its devices runs the real XLA:GPU compiler. `memory_analysis()` then gives the
GPU program's own per-device bytes.

What a device would add: XLA autotunes GEMMs and sizes cuDNN workspaces by running them; with
no device it does neither, so temp bytes are a lower bound.

Target configs (`gpu_targets/<name>.txtpb`, GpuTargetConfig text protos) carry the GPU's
compute capability, memory size and the cuDNN version XLA may assume.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Iterator, Sequence

from pasr_jax import errors

TARGETS_DIR = Path(__file__).parent / "gpu_targets"
GPUS = tuple(sorted(p.stem for p in TARGETS_DIR.glob("*.txtpb")))
NO_AUTOTUNE_NOTE = ("no device: XLA did not autotune GEMMs or size cuDNN workspaces, so temp "
                    "(and peak) bytes are a lower bound")


class XlaGpuError(errors.UserError):
  """The CUDA plugin or a GPU target is not usable here (the message says what to do)."""


class GpuTarget:
  """One GPU target config: its text proto and the few fields the plan reads from it."""

  def __init__(self, name: str):
    path = TARGETS_DIR / f"{name}.txtpb"
    if not path.is_file():
      raise XlaGpuError(f"--gpu={name!r}: no target config {path}; known: {', '.join(GPUS)}")
    self.name, self.path = name, path
    self.text = path.read_text()
    self.memory_bytes = int(self._field("device_memory_size"))
    cc = re.search(r"cuda_compute_capability\s*\{([^}]*)\}", self.text)
    self.compute_capability = (self._int(cc.group(1), "major"), self._int(cc.group(1), "minor"))
    dnn = re.search(r"dnn_version_info\s*\{([^}]*)\}", self.text)
    # cuDNN's own integer encoding (9.7.0 -> 90700), as cudnnGetVersion returns it.
    self.cudnn_version = (self._int(dnn.group(1), "major") * 10000
                          + self._int(dnn.group(1), "minor") * 100
                          + self._int(dnn.group(1), "patch"))
    self.description = self._field("device_description_str").strip('"')

  def _field(self, key: str) -> str:
    m = re.search(rf"^\s*{key}:\s*(\S.*)$", self.text, re.M)
    if not m:
      raise XlaGpuError(f"{self.path}: field {key} is missing")
    return m.group(1).strip()

  @staticmethod
  def _int(block: str, key: str) -> int:
    m = re.search(rf"\b{key}:\s*(\d+)", block)
    return int(m.group(1)) if m else 0  # proto3: an absent int field is 0


def topology_devices(target: GpuTarget, num_devices: int) -> list:
  """`num_devices` devices of one host of `target` GPUs, for `sharding.make_mesh(devices=)`."""
  # Lazily: `plan` sets JAX_PLATFORMS before jax is first imported (see pasr_jax.plan).
  import jax
  from jax.experimental import topologies
  if jax.config.jax_platforms != "cpu":
    raise XlaGpuError("deviceless XLA:GPU needs JAX_PLATFORMS=cpu before jax is imported")
  try:
    topo = topologies.get_topology_desc(platform="cuda", target_config=target.text,
                                        topology=f"1x1x{num_devices}")
  except Exception as e:  # the plugin missing shows up as several error types
    raise XlaGpuError(f"no CUDA compiler here ({type(e).__name__}: {e}); run this with "
                      "the venv `make xla-gpu` builds: .venv-xla-gpu/bin/python") from None
  return list(topo.devices)


@contextlib.contextmanager
def cudnn_target(target: GpuTarget) -> Iterator[None]:
  """Lets JAX's cuDNN attention checks see `target` instead of the local backend.

  jax._src.cudnn.fused_attention_stablehlo (0.10.2) asks the local GPU backend for the
  compute capability (`check_compute_capability`, `is_cuda_compute_capability_equal`) and the
  loaded cuDNN library for its version (`check_cudnn_version`). Deviceless there is neither:
  the capability checks answer "not Hopper" (head_dim > 128 refused) and the version check
  raises "cuDNN not found". This swaps those three functions for the target's values while
  tracing, and restores them after.
  """
  from jax._src.cudnn import fused_attention_stablehlo as fa
  cc = target.compute_capability

  def at_least(capability: str) -> bool:
    return cc >= tuple(int(x) for x in capability.split("."))

  def equal(capability: str) -> bool:
    return cc == tuple(int(x) for x in capability.split("."))

  names = ("check_compute_capability", "is_cuda_compute_capability_equal",
           "check_cudnn_version")
  saved = {n: getattr(fa, n) for n in names}
  fa.check_compute_capability = at_least
  fa.is_cuda_compute_capability_equal = equal
  fa.check_cudnn_version = lambda: target.cudnn_version
  try:
    yield
  finally:
    for n, f in saved.items():
      setattr(fa, n, f)


def cudnn_attention_calls(hlo_text: str) -> dict[str, int]:
  """Counts cuDNN fused-attention custom calls in compiled HLO text, forward and backward."""
  targets = re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', hlo_text)
  return {"forward": sum("Backward" not in t for t in targets),
          "backward": sum("Backward" in t for t in targets)}


def devices_on_host(shape: Sequence[int]) -> int:
  """Devices a (data, fsdp, tensor) mesh shape needs (no -1 allowed: the plan is explicit)."""
  n = 1
  for s in shape:
    if int(s) < 1:
      raise XlaGpuError(f"--mesh={','.join(map(str, shape))}: give every axis explicitly")
    n *= int(s)
  return n
