"""The trainer batch: a typed pytree of right-padded token rows, its padding and its packing.

One `Batch` holds B rows of length L. Position t of `loss_mask`, `old_logps` and
`is_weights` scores `input_ids[:, t]` (the trainer reads its logprob from the logits at t-1).
Fields a loss does not read are None: a `Batch` is a pytree whose None fields have no leaves,
so which fields are present is part of its structure (and of a jitted function's cache key).

The rollout step packs prompt + completion rows (`pack` with `prompt_lengths`), SFT packs chat
transcripts with their assistant masks (`pack`), and every process pads its rows to the
agreed rows x length (`pad`) before the global batch is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import struct


class BatchError(ValueError):
  """A batch whose fields or shapes do not fit together: built by our own code (the rollout
  step, SFT), so an internal invariant with its traceback, not a user error."""


@struct.dataclass
class Batch:
  """B right-padded rows of L tokens (numpy or jax arrays).

  input_ids, attention_mask, positions: `[B,L] int32`; loss_mask: `[B,L] float32`, the tokens
  the loss scores; old_logps: `[B,L] float32`, the logprob of each scored token under the
  policy that sampled it (GRPO); advantages: `[B] float32` (GRPO); is_weights: `[B,L]
  float32`, truncated importance weights (GRPO with grpo.tis_cap).
  """
  input_ids: Any
  attention_mask: Any
  positions: Any
  loss_mask: Any = None
  old_logps: Any = None
  advantages: Any = None
  is_weights: Any = None

  @property
  def shape(self) -> tuple[int, int]:
    """(rows B, length L)."""
    b, length = np.shape(self.input_ids)
    return int(b), int(length)

  def fields(self) -> tuple[str, ...]:
    """Names of the fields present (not None), in declaration order."""
    return tuple(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)

  def only(self, names: Sequence[str]) -> Batch:
    """This batch with every field outside `names` set to None; a missing one raises."""
    missing = [n for n in names if getattr(self, n) is None]
    if missing:
      raise BatchError(f"batch is missing {missing} (it has {list(self.fields())})")
    return Batch(**{n: getattr(self, n) for n in FIELDS if n in names})

  def to_dict(self) -> dict[str, Any]:
    """The present fields by name."""
    return {n: getattr(self, n) for n in self.fields()}


FIELDS = tuple(f.name for f in dataclasses.fields(Batch))
# Integer fields; the others are float32.
INT_FIELDS = ("input_ids", "attention_mask", "positions")
# Fields that a padding row copies from row 0 (real tokens keep attention finite); the
# others are 0 there, so a padding row is scored by no loss.
ROW_FIELDS = INT_FIELDS
# Per-row fields (`[B]`); the others are per token (`[B,L]`).
ROW_SCALARS = ("advantages",)


def positions(rows: int, length: int) -> np.ndarray:
  """`[rows, length] int32`: 0..length-1 on every row."""
  return np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()


def pack(ids: Sequence[Sequence[int]], masks: Sequence[Sequence[float]], pad_id: int,
         multiple: int, rows_multiple: int = 1,
         old_logps: Sequence[Sequence[float]] | None = None,
         advantages: Sequence[float] | None = None) -> Batch:
  """Right-padded Batch of token rows: row i is `ids[i]`, its loss_mask `masks[i]` (one
  weight per token) and, when given, its old_logps `old_logps[i]` (one per token, aligned
  with `ids[i]`) and advantage `advantages[i]`.

  Length L = longest row rounded up to `multiple`; the row count is rounded up to
  `rows_multiple` (the micro-batch) by `pad`.
  """
  B = len(ids)
  L = max(1, -(-max(len(r) for r in ids) // multiple) * multiple)
  input_ids = np.full((B, L), pad_id, np.int32)
  attention = np.zeros((B, L), np.int32)
  loss_mask = np.zeros((B, L), np.float32)
  old = np.zeros((B, L), np.float32) if old_logps is not None else None
  for i, row in enumerate(ids):
    n = len(row)
    assert len(masks[i]) == n, (i, len(masks[i]), n)
    input_ids[i, :n] = row
    attention[i, :n] = 1
    loss_mask[i, :n] = masks[i]
    if old is not None:
      assert len(old_logps[i]) == n, (i, len(old_logps[i]), n)
      old[i, :n] = old_logps[i]
  adv = None if advantages is None else np.asarray(advantages, np.float32).reshape(B)
  batch = Batch(input_ids=input_ids, attention_mask=attention, positions=positions(B, L),
                loss_mask=loss_mask, old_logps=old, advantages=adv)
  return pad(batch, -(-B // rows_multiple) * rows_multiple, L, pad_id)


def pack_completions(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     logprobs: Sequence[Sequence[float]], advantages: Sequence[float],
                     scored: Sequence[bool], pad_id: int, multiple: int,
                     rows_multiple: int = 1) -> Batch:
  """The GRPO Batch of prompt+completion rows (`pack`): row i is `prompts[i] +
  completions[i]`; loss_mask is 1 on completion tokens when `scored[i]`, and old_logps holds
  the sampler logprob of those tokens. Padding rows (to `rows_multiple`) are copies of row 0
  with loss_mask 0: a row without scored tokens is no sequence of the loss
  (grpo.loss_denominator, all three aggregations)."""
  ids, masks, olds = [], [], []
  for p, c, lp, s in zip(prompts, completions, logprobs, scored):
    on = bool(s) and len(c) > 0
    ids.append(list(p) + list(c))
    masks.append([0.0] * len(p) + [1.0 if on else 0.0] * len(c))
    olds.append([0.0] * len(p) + (list(lp) if on else [0.0] * len(c)))
  return pack(ids, masks, pad_id, multiple, rows_multiple, olds, advantages)


def empty(length: int, pad_id: int) -> Batch:
  """One row of one attended pad token and nothing scored (GRPO fields): what a process
  that kept no rows this step contributes."""
  ids = np.full((1, length), pad_id, np.int32)
  att = np.zeros((1, length), np.int32)
  att[:, 0] = 1
  return Batch(input_ids=ids, attention_mask=att, positions=positions(1, length),
               loss_mask=np.zeros((1, length), np.float32),
               old_logps=np.zeros((1, length), np.float32),
               advantages=np.zeros((1,), np.float32))


def pad(batch: Batch | None, rows: int, length: int, pad_id: int) -> Batch:
  """`batch` (`[B, L]` / `[B]`, B <= rows, L <= length) padded to `rows` x `length`.

  New columns are padding (pad_id, attention 0, positions continuing, nothing scored). New
  rows copy row 0's ROW_FIELDS and are 0 elsewhere (loss_mask, old_logps, advantages):
  real tokens keep attention finite, and a row without scored tokens adds nothing to the
  loss. With `batch` None, every row is one attended pad token (`empty`).
  """
  if batch is None:
    batch = empty(length, pad_id)
  B, L = batch.shape
  assert B <= rows and L <= length, (B, L, rows, length)
  out = {}
  for k, x in batch.to_dict().items():
    if k in ROW_SCALARS:
      out[k] = np.concatenate([x, np.zeros(rows - B, x.dtype)])
      continue
    y = np.zeros((rows, length), x.dtype)
    y[:B, :L] = x
    if k in ROW_FIELDS:
      y[B:, :L] = x[0]
    if k == "input_ids":
      y[:, L:] = pad_id
    elif k == "positions":
      y[:, L:] = np.arange(L, length, dtype=y.dtype)
    out[k] = y
  return Batch(**out)
