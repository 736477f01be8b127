"""Dtype names: the one map from the names configs, CLIs and HF files use to dtypes.

A name (`model.dtype`, `model.param_dtype`, `rollout.vllm.dtype`, `export --dtype`) maps to a
numpy dtype, bfloat16 included (ml_dtypes'); that same object is what `jnp.dtype` returns, so
it serves JAX too. safetensors headers spell dtypes as codes ("BF16"); `from_safetensors`
reads them. numpy and ml_dtypes only: the vLLM worker imports this without JAX.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from pasr_jax import errors

NAMES = ("float32", "bfloat16", "float16")
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
           "float16": np.dtype(np.float16)}
_ST_CODES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class DtypeError(errors.UserError):
  """A dtype name that is not one of NAMES; the message names the key it came from."""


def to_dtype(name: str, key: str = "dtype") -> np.dtype:
  """The dtype of `name` (also a jnp dtype); DtypeError naming `key` (e.g. 'model.dtype')."""
  try:
    return _DTYPES[name]
  except (KeyError, TypeError):
    raise DtypeError(f"{key}={name!r}: not one of {' | '.join(NAMES)}") from None


def name_of(dtype: Any) -> str:
  """The name of a dtype (numpy, jnp or ml_dtypes type): 'bfloat16' for bf16."""
  return np.dtype(dtype).name


def from_safetensors(code: str) -> str:
  """The dtype name of a safetensors dtype code; float32 for codes not listed (the dtype
  anything else is converted to)."""
  return _ST_CODES.get(code, "float32")


