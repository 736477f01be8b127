"""Training questions: load JSON / JSONL (or TFDS) rows, validate them, stream seeded batches.

A file is read as a JSON array when its first non-blank character is `[`, else as JSONL, whatever
its extension (the seed's `PTR_thought_dataset_sampled.jsonl` is a JSON array). Field names are
mapped explicitly from the config or auto-detected case-insensitively. `BatchStream` walks a
permutation seeded by (seed, epoch); its `Cursor` (epoch, index) is all a checkpoint must store to
continue with the same next batch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pasr_jax import errors
from pasr_jax.config import DataCfg

log = logging.getLogger(__name__)

# Auto-detection order (case-insensitive), from the PASR seed files.
QUESTION_FIELDS = ("question", "instruction", "q", "problem", "prompt")
ANSWER_FIELDS = ("answer", "output", "a", "solution", "ground_truth", "output1",
                 "canonical_solution")


class DataError(errors.UserError):
  """A data file, row or data config value is unusable; the message names file, row and field."""


@dataclasses.dataclass(frozen=True)
class Row:
  """One training question with its reference answer; `id` is stable across runs."""
  question: str
  answer: str
  id: str


def _pick_field(keys: Iterable[str], wanted: str, candidates: Sequence[str]) -> str | None:
  """The actual key matching `wanted` (or the first auto candidate), case-insensitively."""
  by_lower = {k.lower(): k for k in keys}
  if wanted:
    return by_lower.get(wanted.lower())
  for c in candidates:
    if c in by_lower:
      return by_lower[c]
  return None


def _parse_records(path: str) -> list[tuple[int, Any]]:
  """(row number, decoded value) pairs; row numbers are 1-based lines (JSONL) or items (array)."""
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read()
  except FileNotFoundError:
    raise DataError(f"{path}: data file not found") from None
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read data file: {e}") from None
  stripped = text.lstrip()
  if not stripped:
    raise DataError(f"{path}: data file is empty")
  if stripped[0] == "[":
    try:
      items = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: invalid JSON array at line {e.lineno} col {e.colno}: {e.msg}") from None
    return list(enumerate(items, start=1))
  records = []
  for lineno, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      records.append((lineno, json.loads(line)))
    except json.JSONDecodeError as e:
      raise DataError(f"{path}: row {lineno}: invalid JSON: {e.msg}") from None
  return records


def _as_text(value: Any) -> str | None:
  """Strings as they are, numbers as decimal text (some sets store numeric answers); else None."""
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  return None


def rows_from_records(records: Iterable[tuple[int, Any]], source: str, question_field: str = "",
                      answer_field: str = "", max_chars: int = 0) -> list[Row]:
  """Validate decoded records into Rows; `source` names the file in errors and default ids.

  Rows whose question + answer exceed `max_chars` characters (0 = no limit) are skipped and
  logged with their row numbers: one stray 50 MB row would otherwise stall every step it
  lands in (tokenising, judging) without a word.
  """
  rows, too_long = [], []
  base = os.path.basename(source)
  for rowno, rec in records:
    where = f"{source}: row {rowno}"
    if not isinstance(rec, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    qk = _pick_field(rec.keys(), question_field, QUESTION_FIELDS)
    ak = _pick_field(rec.keys(), answer_field, ANSWER_FIELDS)
    for kind, key, wanted, cands in (("question", qk, question_field, QUESTION_FIELDS),
                                     ("answer", ak, answer_field, ANSWER_FIELDS)):
      if key is None:
        asked = repr(wanted) if wanted else "one of " + "|".join(cands)
        raise DataError(f"{where}: no {kind} field ({asked}); row has keys {sorted(rec.keys())}; "
                        f"set data.{kind}_field")
    question, answer = _as_text(rec[qk]), _as_text(rec[ak])
    if question is None or not question.strip():
      raise DataError(f"{where}: field {qk!r} must be a non-empty string, got {rec[qk]!r:.80}")
    if answer is None or not answer.strip():
      raise DataError(f"{where}: field {ak!r} must be a non-empty string or number, "
                      f"got {rec[ak]!r:.80}")
    if max_chars and len(question) + len(answer) > max_chars:
      too_long.append(rowno)
      continue
    rid = rec.get("id", rec.get("unique_id"))
    rid = f"{base}:{rid}" if isinstance(rid, (str, int)) and not isinstance(rid, bool) else f"{base}:{rowno}"
    rows.append(Row(question=question, answer=answer, id=rid))
  if too_long:
    log.warning("%s: skipped %d rows longer than data.max_row_chars=%d characters (rows %s)",
                source, len(too_long), max_chars,
                ", ".join(map(str, too_long[:10])) + (", ..." if len(too_long) > 10 else ""))
  if not rows:
    raise DataError(f"{source}: no rows" + (f" ({len(too_long)} skipped as longer than "
                                             f"data.max_row_chars={max_chars})" if too_long else ""))
  return rows


def load_rows(path: str, question_field: str = "", answer_field: str = "",
              max_chars: int = 0) -> list[Row]:
  """All rows of one JSON-array or JSONL file, validated; raises DataError naming file and row.

  Rows longer than `max_chars` are skipped (see `rows_from_records`)."""
  return rows_from_records(_parse_records(str(path)), str(path), question_field, answer_field,
                           max_chars)


def load_tfds(name: str, data_dir: str, question_field: str = "",
              answer_field: str = "", split: str = "train") -> list[Row]:
  """Rows from a prepared TFDS dataset (random-access `tfds.data_source`); bytes become text.

  Optional: needs `tensorflow_datasets` (works without TensorFlow for array_record datasets).
  """
  try:
    # Lazily: an optional package, needed only with data.tfds_name.
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError(f"data.tfds_name={name!r} needs the optional package tensorflow-datasets, "
                    "which is not installed") from None
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # TFDS raises many types for a missing/unprepared dataset.
    raise DataError(f"data.tfds_name={name!r} (data_dir={data_dir!r}): cannot open: {e}") from None

  def decode(rec):
    return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in rec.items()}

  records = ((i + 1, decode(source[i])) for i in range(len(source)))
  return rows_from_records(records, f"tfds:{name}", question_field, answer_field)


def load_dataset(data_cfg: DataCfg) -> list[Row]:
  """Rows of every file in `data_cfg.files` (in order), then the TFDS source if configured."""
  rows: list[Row] = []
  for path in data_cfg.files:
    rows.extend(load_rows(path, data_cfg.question_field, data_cfg.answer_field,
                          data_cfg.max_row_chars))
  if data_cfg.tfds_name:
    rows.extend(load_tfds(data_cfg.tfds_name, data_cfg.tfds_data_dir,
                          data_cfg.question_field, data_cfg.answer_field))
  if not rows:
    raise DataError("data.files is empty and data.tfds_name is not set: no training questions")
  return rows


@dataclasses.dataclass(frozen=True)
class Cursor:
  """Position of the next row: `index` into the permutation of epoch `epoch`."""
  epoch: int = 0
  index: int = 0

  def to_dict(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Cursor":
    return cls(epoch=int(d["epoch"]), index=int(d["index"]))


class BatchStream:
  """Endless seeded batches of rows; epoch e is `permutation(len(rows))` seeded by (seed, e),
  or the file order when seed is -1.

  A batch that runs past the end of an epoch continues into the next one, so every batch has
  exactly `batch_size` rows and no row repeats inside an epoch.
  """

  def __init__(self, rows: Sequence[Row], batch_size: int, seed: int,
               cursor: Cursor | None = None):
    if batch_size < 1:
      raise DataError(f"rollout.prompts_per_step must be >= 1, got {batch_size}")
    if not rows:
      raise DataError("no rows to stream")
    self.rows = list(rows)
    self.batch_size = batch_size
    self.seed = seed
    self.cursor = cursor or Cursor()
    self._perm_epoch = -1
    self._perm = np.zeros(0, np.int64)

  def _order(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:
      # data.shuffle_seed=-1: file order every epoch, as the original run reads its data.
      self._perm = (np.arange(len(self.rows)) if self.seed == -1 else
                    np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
      self._perm_epoch = epoch
    return self._perm

  def next_batch(self) -> list[Row]:
    """The next `batch_size` rows; advances the cursor."""
    epoch, index = self.cursor.epoch, self.cursor.index
    out = []
    while len(out) < self.batch_size:
      if index >= len(self.rows):
        epoch, index = epoch + 1, 0
      out.append(self.rows[int(self._order(epoch)[index])])
      index += 1
    self.cursor = Cursor(epoch, index)
    return out
