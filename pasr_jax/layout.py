"""Param tree layout: the one key-path spelling, scan-stacked layer detection, shape checks.

Checkpoints (Orbax metadata, checksums), the HF name map, export and the memory plan all name a
param as a dotted path ('layers.0.mlp.down_proj'); a model built with `scan_layers=True` has
its layers stacked on a leading axis under 'layers.<name>' (no layer index).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence


def path_key(path: Sequence) -> str:
  """A pytree, nnx flat-state or Orbax metadata key path as 'layers.0.mlp.down_proj', without
  the trailing 'value' level an nnx.Variable adds."""
  names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  if names and names[-1] == "value":
    names = names[:-1]
  return ".".join(names)


def is_scanned(keys: Iterable[str]) -> bool:
  """Whether param paths `keys` are those of a scan_layers model ('layers.<name>...', whose
  layers are stacked) rather than one entry per layer ('layers.<i>...')."""
  for k in keys:
    parts = k.split(".")
    if parts[0] == "layers" and len(parts) > 1 and not parts[1].isdigit():
      return True
  return False


def shape_mismatches(got: Mapping[str, Sequence[int]], want: Mapping[str, Sequence[int]]
                     ) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
  """(key, got shape, wanted shape) for each key of both whose shapes differ, in `got`'s
  order (keys missing on either side are the caller's to report)."""
  return [(k, tuple(s), tuple(want[k])) for k, s in got.items()
          if k in want and tuple(s) != tuple(want[k])]
