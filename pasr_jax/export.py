"""Export a training checkpoint as an HF dir that vLLM and transformers load unchanged.

  python -m pasr_jax.export --config.workdir=RUN --config.out=DIR [--config.step=N]
      [--config.dtype=bfloat16] [--config.force=True] [--config.model_dir=HF_DIR]

Restores only the policy params of an Orbax step (latest by default; the optimizer state is left
on disk) as host numpy arrays, places them in the abstract param tree of a `Decoder` built from
the run's source model config, and writes them with `models.hf.save_hf` (config.json,
safetensors shards + index, tokenizer, chat template, generation config) plus `pasr_export.json`
(where the weights came from).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from pasr_jax import cli, dtypes, errors
from pasr_jax.checkpoint import CheckpointError, Checkpointer
from pasr_jax.config import Section, key
from pasr_jax.layout import is_scanned, path_key, shape_mismatches
from pasr_jax.models.hf import read_config, save_hf
from pasr_jax.models.qwen import Decoder
from pasr_jax.workdir import Workdir


class ExportError(errors.UserError):
  """The workdir, step, source model or output dir is unusable; the message says which."""


@dataclasses.dataclass(frozen=True)
class ExportCfg(Section):
  """The keys of `python -m pasr_jax.export`."""
  workdir: str = key("", "training workdir (holds the checkpoints)")
  out: str = key("", "HF dir to write")
  step: int = key(-1, "checkpoint step; -1 = the latest")
  dtype: str = key("", f"{' | '.join(dtypes.NAMES)}; \"\" = as trained")
  force: bool = key(False, "replace a non-empty out dir")
  model_dir: str = key("", 'source HF dir; "" = the one the checkpoint records')

  def check(self):
    self.need(bool(self.workdir), "workdir", "must be set: the training workdir")
    self.need(bool(self.out), "out", "must be set: the HF dir to write")
    self.need(self.step >= -1, "step", "must be a step >= 0, or -1 for the latest")
    self.need(not self.dtype or self.dtype in dtypes.NAMES, "dtype",
              "must be one of " + " | ".join(dtypes.NAMES) + ', or "" (as trained)')


def read_step(workdir: str, step: int | None = None
              ) -> tuple[int, dict[str, np.ndarray], dict[str, Any]]:
  """(step, {param path: host array}, meta) of a training workdir's checkpoint `step`
  (None = latest), read through `checkpoint.Checkpointer` (read-only: a running training
  keeps writing beside it)."""
  wd = Workdir(workdir)
  if not wd.root.is_dir():
    raise ExportError(f"config workdir={workdir!r}: no such directory")
  d = wd.checkpoints
  ck = Checkpointer(str(d), async_save=False, read_only=True) if d.is_dir() else None
  try:
    steps = ck.all_steps() if ck else []
    if not steps:
      raise ExportError(f"config workdir={workdir!r}: no Orbax checkpoint steps in {d}")
    if step is not None and int(step) not in steps:
      raise ExportError(f"config step={step}: not in {d} (complete steps: {steps})")
    try:
      return ck.read_params(None if step is None else int(step))
    except CheckpointError as e:
      raise ExportError(str(e)) from e
  finally:
    if ck:
      ck.close()


def source_model_dir(meta: dict[str, Any], override: str = "") -> str:
  """The HF dir the run's policy started from, as its checkpoint records it (`model_dir` in
  the step's meta; `override` replaces it): its config.json and tokenizer are reused."""
  d = override or str(meta.get("model_dir", ""))
  where = f"config model_dir={d!r}" if override else f"the checkpoint's model_dir={d!r}"
  if not d:
    raise ExportError("the checkpoint records no model dir; pass --config.model_dir=HF_DIR")
  if not os.path.isfile(os.path.join(d, "config.json")):
    raise ExportError(f"{where}: no HF model dir (config.json) there; pass "
                      "--config.model_dir=HF_DIR")
  return d


def build_state(params: dict[str, np.ndarray], model_dir: str):
  """(nnx.State of a Decoder's params filled with `params`, ModelConfig)."""
  cfg = read_config(model_dir)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0),
                                            scan_layers=is_scanned(params)))
  state = nnx.state(abstract, nnx.Param)
  flat = nnx.to_flat_state(state)
  want = {path_key(path): var for path, var in flat}
  missing, extra = sorted(set(want) - set(params)), sorted(set(params) - set(want))
  if missing or extra:
    raise ExportError(f"checkpoint params do not match {model_dir}/config.json: missing "
                      f"{missing[:5]}, unexpected {extra[:5]}")
  bad = shape_mismatches({k: v.shape for k, v in params.items()},
                         {k: v.shape for k, v in want.items()})
  if bad:
    name, got, model = bad[0]
    raise ExportError(f"param {name}: checkpoint shape {got} != model {model} from "
                      f"{model_dir}/config.json")
  for name, var in want.items():
    var.set_value(jnp.asarray(params[name]))
  return nnx.from_flat_state(flat), cfg


def export(cfg: ExportCfg) -> Path:
  """Writes the HF dir for checkpoint `cfg.step` (-1 = latest) of `cfg.workdir` to `cfg.out`;
  returns its path."""
  out_dtype = dtypes.to_dtype(cfg.dtype, "dtype") if cfg.dtype else None
  out_p = Path(cfg.out)
  if out_p.exists() and (not out_p.is_dir() or any(out_p.iterdir())) and not cfg.force:
    raise ExportError(f"config out={cfg.out!r}: exists and is not empty; pass "
                      "--config.force=True to replace it")
  step, params, meta = read_step(cfg.workdir, None if cfg.step < 0 else cfg.step)
  src = source_model_dir(meta, cfg.model_dir)
  state, model_cfg = build_state(params, src)
  # Write beside the target, then swap, so a failed export never leaves a half-written dir.
  tmp = out_p.with_name(out_p.name + ".export-tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  save_hf(state, model_cfg, tmp, tokenizer_from=src, dtype=out_dtype)
  (tmp / "pasr_export.json").write_text(json.dumps(dict(
      workdir=os.path.abspath(cfg.workdir), step=step, source_model=os.path.abspath(src),
      policy_version=meta.get("policy_version"), dtype=cfg.dtype or "as trained"), indent=2))
  if out_p.exists():
    shutil.rmtree(out_p) if out_p.is_dir() else out_p.unlink()
  tmp.rename(out_p)
  return out_p


if __name__ == "__main__":
  # Restores and writes arrays; no decoder runs here, so malloc stays as it is.
  cli.main("python -m pasr_jax.export", lambda cfg: print(f"wrote {export(cfg)}"),
           schema=ExportCfg, preset=False, tune_malloc=False)
