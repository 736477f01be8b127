"""Weight sync, the trainer's half: params -> HF-named tensors -> a versioned safetensors dir.

`WeightSync.publish(model, version)` casts each param to the engine's dtype on the device,
gathers it to host, converts it with `pasr_jax.models.hf.hf_tensors` (the one HF name map,
shared with `save_hf`), checks names and shapes against the checkpoint the engine was started
from, and writes safetensors (`hf.write_shards`, the writer `save_hf` uses) under a temporary
name in the sync root, renamed to ``<prefix>v<version>`` once complete (a reader never sees a
half-written dir). It returns a `Published` (the dir, its bytes and the seconds taken), a
context manager that removes the dir at its end: the engine (`rollout.engine`) reloads from
it in between. This module knows nothing of the engine.

Two halves. `snapshot(model)` is the device -> host copy alone (a `Snapshot`: every tensor
converted, in host memory); `write(snapshot.tensors, version)` writes it. A run that samples
ahead (rollout.max_staleness >= 1) takes the snapshot on the trainer's path and leaves the
rest to its rollout thread; `publish` streams one tensor at a time instead (host memory:
about two shards, not the model).

Where. The sync root is ``/dev/shm`` when present (tmpfs: no disk I/O). Containers often give
/dev/shm only 64 MB (Docker's default) while a 7B bf16 sync writes ~15 GB, so the free space
of the root is checked first (`shutil.disk_usage` against the bytes to write plus
`headroom_bytes`); when it is short, the sync goes to the fallback directory on disk (the
system temp dir unless configured) and a warning says where.

Failures. Any failure raises `SyncError`, and nothing is left on disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from flax import nnx

from pasr_jax import dtypes
from pasr_jax.config import VllmCfg
from pasr_jax.models.hf import HFFormatError, hf_tensors, tensor_specs, write_shards
from pasr_jax.models.qwen import ModelConfig
from pasr_jax.rollout.base import SyncError

log = logging.getLogger(__name__)

# Bytes per safetensors file written for a sync (vLLM reads every file in the dir); small
# enough that writing one overlaps converting the next.
SHARD_BYTES = 128 << 20


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """A policy's weights on the host, converted: (HF name, array) in HF layout and write
  dtype, their bytes, and the seconds the device -> host copy took."""
  tensors: list[tuple[str, np.ndarray]]
  nbytes: int
  gather_s: float


@dataclasses.dataclass(frozen=True)
class Published:
  """A complete safetensors dir of policy `version`; removed when its `with` block ends.
  `timings`: seconds of gather (device -> host) and convert_write, and bytes written."""
  path: Path
  version: int
  timings: dict[str, float]

  def __enter__(self) -> Published:
    return self

  def __exit__(self, *exc) -> None:
    shutil.rmtree(self.path, ignore_errors=True)


class WeightSync:
  """Writes trainer weights as safetensors dirs for an engine started from `model_dir`."""

  def __init__(self, model_dir: str | os.PathLike, cfg: VllmCfg):
    """`cfg`: the `rollout.vllm` section (dtype, sync_dir, sync_fallback_dir,
    sync_headroom_gib)."""
    self.model_dir = Path(model_dir)
    self.cfg = cfg
    self.sync_root, self.fallback_root = sync_roots(cfg.sync_dir, cfg.sync_fallback_dir)
    self.headroom_bytes = int(cfg.sync_headroom_gib * (1 << 30))  # left free on the root
    self.expected = _checkpoint_spec(self.model_dir)
    self.shard_bytes = SHARD_BYTES
    self.last_root: Path | None = None     # where the last sync wrote
    # The pid in the name lets a later sync remove dirs of processes killed mid-sync.
    self.prefix = f"pasr_sync_{os.getpid()}_"
    self._model_cfg = None

  def publish(self, model, version: int) -> Published:
    """`model`'s params (a `Decoder`, possibly sharded) as the dir of `version`.

    Timings: gather (cast on device, device -> host, one param at a time as it is written),
    convert_write (HF names + safetensors; the Decoder keeps HF's [out, in] kernel layout, so
    converting is a reshape) and bytes.
    """
    gather_s = 0.0
    device_dtype = self._uniform_dtype()
    itemsize = None if device_dtype is None else device_dtype.itemsize
    needed = sum(x.size * (itemsize or x.dtype.itemsize)
                 for x in jax.tree.leaves(_params(model)))

    def gathered() -> Iterator[tuple[str, np.ndarray]]:
      nonlocal gather_s
      it = hf_tensors(model, self._get_model_cfg(model), device_dtype)
      while True:
        t = time.perf_counter()
        try:
          item = next(it)
        except StopIteration:
          return
        except Exception as e:
          raise SyncError(f"sync to version {version}: gathering params failed: {e!r}") from e
        finally:
          gather_s += time.perf_counter() - t
        yield item

    pub = self.write(gathered(), version, needed)
    pub.timings["gather_s"] = gather_s
    pub.timings["convert_write_s"] -= gather_s
    return pub

  def snapshot(self, model) -> Snapshot:
    """`model`'s params copied to host and converted (cast on the device first): the only
    part of a sync that needs the trainer's arrays (multi-host: a collective)."""
    t = time.perf_counter()
    try:
      tensors = [(name, np.ascontiguousarray(np.asarray(arr, dtype=self._write_dtype(name))))
                 for name, arr in hf_tensors(model, self._get_model_cfg(model),
                                             self._uniform_dtype())]
    except Exception as e:
      raise SyncError(f"weight snapshot: gathering params failed: {e!r}") from e
    return Snapshot(tensors, sum(a.nbytes for _, a in tensors), time.perf_counter() - t)

  def write(self, tensors: Iterable[tuple[str, np.ndarray]], version: int,
            nbytes: int | None = None) -> Published:
    """HF-named tensors (HF layout, host arrays) as the dir of `version`.

    Every tensor of the starting checkpoint must be present with its shape; anything else
    raises `SyncError`. `nbytes` (default: the checkpoint's tensors in the write dtype) sizes
    the free-space check.
    """
    t0 = time.perf_counter()
    root = self._choose_root(self._bytes_to_write() if nbytes is None else int(nbytes))
    out_dir = Path(tempfile.mkdtemp(prefix=f"{self.prefix}tmp", dir=root))
    try:
      try:
        written = self._write(tensors, out_dir)
      except SyncError:
        raise
      except Exception as e:
        raise SyncError(f"sync to version {version}: converting/writing tensors to {out_dir} "
                        f"failed: {e!r}") from e
      final = root / f"{self.prefix}v{int(version)}"
      shutil.rmtree(final, ignore_errors=True)
      out_dir = out_dir.rename(final)  # complete: only now may a reader see it
    except BaseException:
      shutil.rmtree(out_dir, ignore_errors=True)
      raise
    return Published(out_dir, int(version), {"convert_write_s": time.perf_counter() - t0,
                                             "bytes": float(written)})

  # --- where -------------------------------------------------------------------------------

  def _choose_root(self, nbytes: int) -> Path:
    """The sync root if it has room for `nbytes` + headroom, else the fallback dir."""
    short = []
    for root in (self.sync_root, self.fallback_root):
      root.mkdir(parents=True, exist_ok=True)
      _remove_orphaned_sync_dirs(root)
      free = shutil.disk_usage(root).free
      if free >= nbytes + self.headroom_bytes:
        if root != self.sync_root and self.last_root != root:
          log.warning("weight sync: %s has %.1f MiB free, the sync writes %.1f MiB (+%.0f MiB "
                      "headroom): writing to %s instead (rollout.vllm.sync_dir / "
                      "sync_fallback_dir)", short[0][0], short[0][1] / 2**20, nbytes / 2**20,
                      self.headroom_bytes / 2**20, root)
        self.last_root = root
        return root
      short.append((root, free))
    raise SyncError("weight sync needs %.1f MiB (+%.0f MiB headroom) but %s" % (
        nbytes / 2**20, self.headroom_bytes / 2**20,
        " and ".join(f"{r} has {f / 2**20:.1f} MiB free" for r, f in short)))

  def _bytes_to_write(self) -> int:
    return sum(int(np.prod(shape)) * self._write_dtype(name).itemsize
               for name, (shape, _) in self.expected.items())

  # --- what --------------------------------------------------------------------------------

  def _write(self, tensors: Iterable[tuple[str, np.ndarray]], out_dir: Path) -> int:
    """Checks and writes tensors as safetensors shards; returns bytes written."""
    seen: set[str] = set()

    def checked():
      for name, arr in tensors:
        arr = np.ascontiguousarray(np.asarray(arr, dtype=self._write_dtype(name)))
        self._check_tensor(name, arr.shape, seen)
        seen.add(name)
        yield name, arr

    _, nbytes = write_shards(checked(), out_dir, self.shard_bytes,
                             lambda k: f"model-{k:05d}.safetensors")
    if self.expected:
      missing = sorted(set(self.expected) - seen)
      if missing:
        raise SyncError(f"sync: {len(missing)} tensors of {self.model_dir} missing, e.g. "
                        f"{missing[:3]}")
    return nbytes

  def _check_tensor(self, name: str, shape: tuple[int, ...], seen: set[str]) -> None:
    if name in seen:
      raise SyncError(f"sync: tensor {name!r} given twice")
    if not self.expected:
      return
    if name not in self.expected:
      raise SyncError(f"sync: tensor {name!r} is not in the checkpoint of {self.model_dir}")
    want = self.expected[name][0]
    if tuple(shape) != want:
      raise SyncError(f"sync: tensor {name!r} has shape {tuple(shape)}, the engine's model "
                      f"({self.model_dir}) has {want}")

  def _write_dtype(self, name: str) -> np.dtype:
    if self.cfg.dtype in dtypes.NAMES:
      return dtypes.to_dtype(self.cfg.dtype, "rollout.vllm.dtype")
    if name in self.expected:      # dtype "auto": keep the checkpoint's dtype
      return dtypes.to_dtype(self.expected[name][1])
    return np.dtype("float32")

  def _uniform_dtype(self) -> np.dtype | None:
    """The one dtype every tensor is written in (cast on the device), or None if they differ
    ("auto" with a mixed-dtype checkpoint: then each is cast on the host)."""
    dtypes = {self._write_dtype(n) for n in self.expected} or {self._write_dtype("")}
    return dtypes.pop() if len(dtypes) == 1 else None

  def _get_model_cfg(self, model):
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    if cfg is not None:
      return cfg
    if self._model_cfg is None:
      hf = json.loads((self.model_dir / "config.json").read_text())
      self._model_cfg = ModelConfig.from_hf_dict(hf)
    return self._model_cfg


def _params(model) -> Any:
  return nnx.state(model, nnx.Param) if isinstance(model, nnx.Module) else model


def _checkpoint_spec(model_dir: Path) -> dict[str, tuple[tuple[int, ...], str]]:
  """{tensor name: (shape, dtype name)} of `model_dir`'s safetensors ({} if it has none)."""
  try:
    return tensor_specs(model_dir)
  except HFFormatError:
    return {}


def _remove_orphaned_sync_dirs(root: Path) -> None:
  """Deletes sync dirs left by processes that died mid-sync (tmpfs holds them in RAM)."""
  for d in root.glob("pasr_sync_*_*"):
    try:
      pid = int(d.name.split("_")[2])
    except (IndexError, ValueError):
      continue
    if pid != os.getpid() and not _pid_alive(pid):
      shutil.rmtree(d, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def default_sync_root() -> Path:
  """/dev/shm/pasr_jax_sync when /dev/shm is writable, else under the system temp dir."""
  shm = Path("/dev/shm")
  if shm.is_dir() and os.access(shm, os.W_OK):
    return shm / "pasr_jax_sync"
  return Path(tempfile.gettempdir()) / "pasr_jax_sync"


def sync_roots(sync_dir: str = "", fallback_dir: str = "") -> tuple[Path, Path]:
  """Where a sync writes, and where it falls back to when that lacks room: the configured
  dirs, else `default_sync_root()` and a dir under the system temp dir."""
  return (Path(sync_dir) if sync_dir else default_sync_root(),
          Path(fallback_dir) if fallback_dir else Path(tempfile.gettempdir()) / "pasr_jax_sync")
