"""Orbax checkpoints of the training state: array pytree (params, optimizer state) + JSON metadata.

Each step directory holds two items: `state` (any pytree of arrays, saved sharded, restored into
the shardings of a template) and `meta` (JSON: the `RunState` (step, data cursor, RNG key,
policy version, log sizes) and the config). Orbax writes a step into a temporary directory
and renames it when complete, so a half-written step is never listed; a listed step that fails to restore (files lost or damaged)
is moved to `<dir>_corrupt/` with a warning and the previous step is used. A readable step
whose array shapes do not fit the run (another model or layout) raises
`CheckpointMismatchError` and is left where it is.

Integrity. `save` refuses a state with a non-finite float (nothing is written, so retention
never replaces a good step with a NaN one) and stores a checksum of every array in `meta`
("checksums"); `restore` recomputes them on what it read and treats a mismatch like an
unreadable step. The checksums are integer sums of the arrays' bit patterns (plain and
position-weighted, mod 2^32), computed on device under jit: exact and independent of the
sharding, so a step saved on 8 devices verifies when restored on 1.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from pasr_jax import errors
from pasr_jax.data import Cursor
from pasr_jax.layout import path_key, shape_mismatches

log = logging.getLogger(__name__)


class CheckpointError(errors.StorageFailure):
  """No usable checkpoint although some exist, or a save failed."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint whose arrays have other shapes than the run's model and optimizer
  (another model or config, or another param layout): nothing is moved aside."""


class ChecksumComputeError(CheckpointError):
  """Computing checksums failed (a bug or a device problem): the step itself is not blamed."""


def _shape_mismatches(stored: Any, abstract: Any) -> list[str]:
  """'path: stored (a, b) != expected (c, d)' for each array whose stored shape differs."""
  def shapes(tree):
    return {path_key(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)
            if getattr(x, "shape", None) is not None}
  return [f"{k}: stored {got} != expected {want}"
          for k, got, want in shape_mismatches(shapes(stored), shapes(abstract))]


def _bit_words(x: jax.Array) -> jax.Array:
  """The array's bit patterns as uint32 (same shape)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  bits = jnp.dtype(f"uint{x.dtype.itemsize * 8}") if x.dtype.itemsize in (1, 2, 4) else None
  if bits is None:  # 8-byte types: fold the two halves
    w = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return w[..., 0] ^ (w[..., 1] * jnp.uint32(0x9E3779B1))
  return jax.lax.bitcast_convert_type(x, bits).astype(jnp.uint32)


@jax.jit
def _digests(arrays: list[jax.Array]) -> jax.Array:
  """[n, 3] uint32: (sum of words, position-weighted sum, count of non-finite floats)."""
  rows = []
  for x in arrays:
    w = _bit_words(x)
    pos = jnp.zeros(w.shape, jnp.uint32)  # flat index, built per axis: no reshape of shards
    stride = 1
    for d in reversed(range(w.ndim)):
      pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
      stride *= w.shape[d]
    weighted = w * (pos * jnp.uint32(2654435761) + jnp.uint32(1))
    bad = (jnp.sum(~jnp.isfinite(x), dtype=jnp.uint32) if jnp.issubdtype(x.dtype, jnp.floating)
           else jnp.uint32(0))
    rows.append(jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(weighted, dtype=jnp.uint32),
                           bad]))
  return jnp.stack(rows) if rows else jnp.zeros((0, 3), jnp.uint32)


def checksums(state: Any) -> tuple[dict[str, list[int]], list[str]]:
  """({array path: checksum}, [paths holding non-finite floats]) of a state pytree.

  Device arrays are summed on device (see the module docstring); host (numpy) leaves get a
  CRC32 of their bytes.
  """
  leaves = [(path_key(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)]
  groups: dict[frozenset, list[tuple[str, jax.Array]]] = {}
  for k, x in leaves:  # one jit call per device set: jit refuses to mix them
    if isinstance(x, jax.Array):
      groups.setdefault(frozenset(x.sharding.device_set), []).append((k, x))
  out, bad = {}, []
  for group in groups.values():
    for (k, _), (a, b, nonfinite) in zip(group, np.asarray(_digests([x for _, x in group]))):
      out[k] = [int(a), int(b)]
      if nonfinite:
        bad.append(k)
  for k, x in leaves:
    if not isinstance(x, jax.Array):
      arr = np.ascontiguousarray(np.asarray(x))
      out[k] = [zlib.crc32(arr.tobytes()), 0]
      if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad.append(k)
  return out, bad


def abstract_like(tree: Any) -> Any:
  """The restore target of a pytree: jax arrays -> ShapeDtypeStructs with their shardings;
  host (numpy) leaves stay as they are and come back as numpy."""
  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(leaf, tree)


def _verify(state: Any, stored: dict[str, list[int]] | None) -> None:
  """Raises CheckpointError if `state`'s checksums differ from those saved with it."""
  if stored is None:
    raise CheckpointError("its meta holds no checksums (every save writes them)")
  try:
    got, bad = checksums(state)
  except Exception as e:  # pylint: disable=broad-except
    raise ChecksumComputeError(f"computing checksums of a restored step failed: {e!r}") from e
  wrong = sorted(k for k in stored if got.get(k) != stored[k])
  missing = sorted(set(got) - set(stored))
  if wrong or missing or bad:
    first = (wrong or missing or bad)[0]
    raise CheckpointError(f"checksum mismatch: {len(wrong)} arrays differ from what was saved, "
                          f"{len(missing)} unlisted, {len(bad)} non-finite (e.g. {first})")


@dataclasses.dataclass
class RunState:
  """Where a run stands, besides its arrays: what a resume needs to continue exactly.

  step: steps done. cursor: the data stream's next row. rng: the run's JAX PRNG key (typed).
  policy_version: weights version the sampler holds. log_bytes: byte size of each JSONL log
  (metrics, rollouts) when the step was saved; a resume cuts the logs back to it.
  model_dir, model_digest: the HF dir the policy started from (`policy.start_dir`; export
  reuses its config and tokenizer) and its `hf.model_digest` (a resume rebuilds the
  reference from that dir and checks it is the same model).
  """
  step: int
  cursor: Cursor
  rng: Any
  policy_version: int = 0
  log_bytes: dict[str, int] = dataclasses.field(
      default_factory=lambda: {"metrics": 0, "rollouts": 0})
  model_dir: str = ""
  model_digest: str = ""

  @classmethod
  def fresh(cls, seed: int) -> "RunState":
    """The state of a run that has not taken a step (no checkpoint: earlier logs are void)."""
    return cls(step=0, cursor=Cursor(), rng=jax.random.key(seed))

  def to_meta(self, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON saved as a step's `meta` item."""
    meta = {"step": self.step, "cursor": self.cursor.to_dict(),
            "rng": np.asarray(jax.random.key_data(self.rng)).tolist(),
            "policy_version": self.policy_version, "log_bytes": dict(self.log_bytes),
            "model_dir": self.model_dir, "model_digest": self.model_digest}
    if config is not None:
      meta["config"] = config
    return meta

  @classmethod
  def from_meta(cls, meta: dict[str, Any]) -> "RunState":
    return cls(step=int(meta["step"]), cursor=Cursor.from_dict(meta["cursor"]),
               rng=jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32)),
               policy_version=int(meta["policy_version"]),
               log_bytes={k: int(v) for k, v in meta["log_bytes"].items()},
               model_dir=str(meta["model_dir"]), model_digest=str(meta["model_digest"]))


class Checkpointer:
  """A `CheckpointManager` over `directory` keeping the `keep` newest steps, optionally async."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    # read_only (export): never create the directory, and leave alone the temporary dirs of
    # a step that a running training is writing right now.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, enable_async_checkpointing=async_save,
        read_only=read_only,
        cleanup_tmp_directories=not read_only)  # remove what a killed run left half-written
    # Explicit handlers so item_metadata can read stored shapes before a restore.
    self._mgr = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Start saving `state` and `meta` as `step` (returns before the write ends when async).

    Raises CheckpointError, writing nothing, if any float in `state` is NaN or infinite.
    """
    sums, bad = checksums(state)
    if bad:
      raise CheckpointError(f"{self.directory}: step {step} not saved: {len(bad)} arrays hold "
                            f"NaN or inf, e.g. {bad[0]}")
    meta = dict(meta, checksums=sums)
    ok = self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if not ok:
      raise CheckpointError(f"{self.directory}: orbax refused to save step {step}")

  def save_run(self, state: Any, run: RunState, config: dict[str, Any] | None = None) -> None:
    """Starts saving the arrays `state` with `run` (and the config) as step `run.step`."""
    self.save(run.step, state, run.to_meta(config))

  def restore_run(self, template: Any) -> tuple[Any, RunState] | None:
    """(arrays shaped like `template`, RunState) of the newest restorable step, or None."""
    out = self.restore(template)
    if out is None:
      return None
    _, state, meta = out
    return state, RunState.from_meta(meta)

  def restore(self, template: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, meta) of the newest restorable step, shaped/sharded like `template`.

    None when the directory has no checkpoint. A step that fails to restore is moved aside
    with a warning and the next older one is tried; if none restores, CheckpointError.
    """
    self.wait()
    steps = self.all_steps()
    if not steps:
      return None
    abstract = abstract_like(template)
    for step in reversed(steps):
      self._check_shapes(step, abstract)
      try:
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
          raise CheckpointError(f"metadata missing or for another step: {meta!r:.200}")
        _verify(out["state"], meta.pop("checksums", None))
        return step, out["state"], meta
      except ChecksumComputeError:
        raise  # our own failure, not the step's: move nothing aside
      except Exception as e:  # Orbax/tensorstore raise many types for damaged files.
        aside = self._move_aside(step)
        log.warning("checkpoint step %d in %s is unreadable or damaged (%s: %.300s); moved to "
                    "%s, using the previous one", step, self.directory, type(e).__name__, e,
                    aside)
    raise CheckpointError(f"{self.directory}: steps {steps} exist but none could be restored")

  def read_params(self, step: int | None = None) -> tuple[int, dict[str, np.ndarray],
                                                         dict[str, Any]]:
    """(step, {param path: host array}, meta) of `step` (default: the latest), for export.

    Only the policy params are read: the `params` subtree of the saved state (the trainer's
    `state_for_checkpoint()`), or the whole state when it holds params only; the optimizer
    state stays on disk. No template or mesh is needed. Checksums are not verified (they are
    of device arrays). CheckpointError when the step or the params are not there.
    """
    self.wait()
    steps = self.all_steps()
    if step is None and steps:
      step = steps[-1]
    if step not in steps:
      raise CheckpointError(f"{self.directory}: no step {step} (complete steps: {steps})")
    meta = dict(self._mgr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"])
    meta.pop("checksums", None)
    tree = self._mgr.item_metadata(step)["state"]
    whole = not (hasattr(tree, "keys") and "params" in tree.keys())
    sub = tree if whole else tree["params"]
    if not hasattr(sub, "keys") or "embed_tokens" not in sub.keys():
      raise CheckpointError(f"{self.directory}/{step}: no policy params (expected a 'params' "
                            f"subtree with 'embed_tokens'; top-level keys {list(tree)[:10]})")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), dict(sub))
    target = target if whole else {"params": target}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    # The manager's state handler restores whole trees only; a partial restore reads the
    # same files through the PyTree handler.
    with ocp.PyTreeCheckpointer() as ck:
      out = ck.restore(os.path.join(self.directory, str(step), "state"),
                       args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                                   partial_restore=not whole))
    out = out if whole else out["params"]
    params = {path_key(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(out)}
    return step, params, meta

  def _check_shapes(self, step: int, abstract: Any) -> None:
    """Raises CheckpointMismatchError if `step`'s stored arrays have other shapes than
    `abstract`'s; a step whose metadata cannot be read is left to the restore (damaged)."""
    try:
      stored = self._mgr.item_metadata(step)["state"]
    except Exception:  # pylint: disable=broad-except
      return
    bad = _shape_mismatches(stored, abstract)
    if bad:
      raise CheckpointMismatchError(
          f"{self.directory}/{step}: {len(bad)} stored arrays do not fit this run's model, "
          f"e.g. {bad[0]}. It was written for another model, config or param layout. "
          f"Nothing was moved or deleted; train in another workdir.")

  def _move_aside(self, step: int) -> str:
    """Move a damaged step out of the manager's view so a later save of that step succeeds;
    returns where it went (kept for inspection, never deleted)."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory + "_corrupt", f"{step}-{int(time.time())}")
    if os.path.exists(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    self._mgr.reload()
    return dst

  def wait(self) -> None:
    """Block until pending async saves are on disk."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
