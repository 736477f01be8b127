"""Orbax checkpoints of the training state: array pytree (params, optimizer state) + JSON metadata.

Each step directory holds two items: `state` (any pytree of arrays, saved sharded, restored into
the shardings of a template) and `meta` (JSON: step, data cursor, RNG key, policy version,
config). Orbax writes a step into a temporary directory and renames it when complete, so a
half-written step is never listed; a listed step that fails to restore (files lost or damaged)
is moved to `<dir>_corrupt/` with a warning and the previous step is used. A readable step
whose array shapes do not fit the run (another model or layout) raises
`CheckpointMismatchError` and is left where it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No usable checkpoint although some exist, or a save failed."""


class CheckpointMismatchError(CheckpointError):
  """A readable checkpoint whose arrays have other shapes than the run's model and optimizer
  (another model or config, or another param layout): nothing is moved aside."""


def path_key(path: tuple) -> str:
  """A pytree (or Orbax metadata) key path as 'layers.0.mlp.down_proj', without the trailing
  'value' level an nnx.Variable adds."""
  names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  if names and names[-1] == "value":
    names = names[:-1]
  return ".".join(names)


def _shape_mismatches(stored: Any, abstract: Any) -> list[str]:
  """'path: stored (a, b) != expected (c, d)' for each array whose stored shape differs."""
  want = {path_key(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)
          if hasattr(x, "shape")}
  out = []
  for p, m in jax.tree_util.tree_leaves_with_path(stored):
    key, shape = path_key(p), getattr(m, "shape", None)
    if shape is not None and key in want and tuple(shape) != want[key]:
      out.append(f"{key}: stored {tuple(shape)} != expected {want[key]}")
  return out


def abstract_like(tree: Any) -> Any:
  """The restore target of a pytree: jax arrays -> ShapeDtypeStructs with their shardings;
  host (numpy) leaves stay as they are and come back as numpy."""
  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(leaf, tree)


class Checkpointer:
  """A `CheckpointManager` over `directory` keeping the `keep` newest steps, optionally async."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True)  # remove what a killed run left half-written
    # Explicit handlers so item_metadata can read stored shapes before a restore.
    self._mgr = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Start saving `state` and `meta` as `step` (returns before the write ends when async)."""
    ok = self._mgr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if not ok:
      raise CheckpointError(f"{self.directory}: orbax refused to save step {step}")

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
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
          raise CheckpointError(f"metadata missing or for another step: {meta!r:.200}")
        return step, out["state"], meta
      except Exception as e:  # Orbax/tensorstore raise many types for damaged files.
        log.warning("checkpoint step %d in %s is unreadable (%s: %.300s); using the previous one",
                    step, self.directory, type(e).__name__, e)
        self._move_aside(step)
    raise CheckpointError(f"{self.directory}: steps {steps} exist but none could be restored")

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
          f"e.g. {bad[0]}. It was written for another model or config, or by a pasr_jax "
          f"before 2026-11-25 (kernels then were [in, out]; now HF's [out, in]). Nothing was "
          f"moved or deleted; train in another workdir.")

  def _move_aside(self, step: int) -> None:
    """Move a damaged step out of the manager's view so a later save of that step succeeds."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory + "_corrupt", f"{step}-{int(time.time())}")
    if os.path.exists(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    self._mgr.reload()

  def wait(self) -> None:
    """Block until pending async saves are on disk."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.wait_until_finished()
    self._mgr.close()
