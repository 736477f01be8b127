"""Export a training checkpoint as an HF dir that vLLM and transformers load unchanged.

  python -m pasr_jax.export --workdir=RUN [--step=N] --out=DIR [--dtype=bfloat16] [--force]

Restores only the policy params of an Orbax step (latest by default; the optimizer state is left
on disk) as host numpy arrays, places them in the abstract param tree of a `Decoder` built from
the run's source model config, and writes them with `models.hf.save_hf` (config.json,
safetensors shards + index, tokenizer, chat template, generation config) plus `pasr_export.json`
(where the weights came from).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pasr_jax.checkpoint import path_key
from pasr_jax.workdir import Workdir

DTYPES = {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class ExportError(ValueError):
  """The workdir, step, source model or output dir is unusable; the message says which."""


def _steps(d: Path) -> list[int]:
  # Orbax writes `<step>.orbax-checkpoint-tmp-*` first and renames when done: digits = complete.
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def find_checkpoints(workdir: str) -> tuple[Path, list[int]]:
  """(checkpoint dir, its complete steps) for a training workdir."""
  wd = Workdir(workdir)
  if not wd.root.is_dir():
    raise ExportError(f"--workdir={workdir!r}: no such directory")
  d = wd.checkpoints
  if d.is_dir() and _steps(d):
    return d, _steps(d)
  raise ExportError(f"--workdir={workdir!r}: no Orbax checkpoint steps in {d}")


def read_meta(step_dir: Path) -> dict[str, Any]:
  """The JSON metadata saved with a step ({} when absent)."""
  import orbax.checkpoint as ocp
  if not (step_dir / "meta").is_dir():
    return {}
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
    return dict(ck.restore(step_dir / "meta"))


def restore_params(step_dir: Path) -> dict[str, np.ndarray]:
  """{param path: host array} of the policy params in `<step>/state` (optimizer state skipped).

  The params are the `params` subtree of the saved state (the trainer's
  `state_for_checkpoint()`), or the whole tree when it holds params only.
  """
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as ck:
    tree = ck.metadata(step_dir / "state").item_metadata.tree
    sub = tree.get("params") if isinstance(tree, dict) and "params" in tree else tree
    if not isinstance(sub, dict) or "embed_tokens" not in sub:
      raise ExportError(f"{step_dir}/state: no policy params (expected a 'params' subtree with "
                        f"'embed_tokens'; top-level keys {list(tree)[:10]})")
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), sub)
    target = {"params": target} if sub is not tree else target
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    out = ck.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=sub is not tree))
  out = out["params"] if sub is not tree else out
  return {path_key(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(out)[0]}


def source_model_dir(workdir: str, meta: dict[str, Any], override: str = "") -> str:
  """The HF dir the run started from (its config.json and tokenizer are reused)."""
  wd = Workdir(workdir)
  cands = [override] if override else []
  cfgs = [meta.get("config")]
  run_cfg = wd.config
  if run_cfg.is_file():
    try:
      cfgs.append(json.loads(run_cfg.read_text()))
    except json.JSONDecodeError:
      pass
  for c in cfgs:
    if isinstance(c, dict) and isinstance(c.get("model"), dict) and c["model"].get("path"):
      cands.append(c["model"]["path"])
  cands.append(str(wd.tiny_model))   # where tiny_cpu writes its random model
  for c in cands:
    for d in (c, os.path.join(workdir, c)):
      if os.path.isfile(os.path.join(d, "config.json")):
        return d
  raise ExportError(f"cannot find the run's source model dir (tried {cands}); "
                    "pass --model_dir=HF_DIR")


def build_state(params: dict[str, np.ndarray], model_dir: str):
  """(nnx.State of a Decoder's params filled with `params`, ModelConfig)."""
  from flax import nnx
  from pasr_jax.models.hf import read_config
  from pasr_jax.models.qwen import Decoder
  cfg = read_config(model_dir)
  # Stacked layer params ('layers.<name>...') mean the run used scan_layers.
  scan = any(k.startswith("layers.") and not k.split(".")[1].isdigit() for k in params)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), scan_layers=scan))
  state = nnx.state(abstract, nnx.Param)
  flat = nnx.to_flat_state(state)
  want = {".".join(str(k) for k in path): var for path, var in flat}
  missing, extra = sorted(set(want) - set(params)), sorted(set(params) - set(want))
  if missing or extra:
    raise ExportError(f"checkpoint params do not match {model_dir}/config.json: missing "
                      f"{missing[:5]}, unexpected {extra[:5]}")
  for name, var in want.items():
    if tuple(params[name].shape) != tuple(var.shape):
      raise ExportError(f"param {name}: checkpoint shape {params[name].shape} != model "
                        f"{tuple(var.shape)} from {model_dir}/config.json")
    var.set_value(jnp.asarray(params[name]))
  return nnx.from_flat_state(flat), cfg


def export(workdir: str, out: str, step: int | None = None, dtype: str = "",
           force: bool = False, model_dir: str = "") -> Path:
  """Writes the HF dir for `step` (None = latest) of `workdir` to `out`; returns its path."""
  from pasr_jax.models.hf import save_hf
  if dtype not in DTYPES:
    raise ExportError(f"--dtype={dtype!r}: not one of {sorted(k for k in DTYPES if k)}")
  out_p = Path(out)
  if out_p.exists() and (not out_p.is_dir() or any(out_p.iterdir())) and not force:
    raise ExportError(f"--out={out!r} exists and is not empty; pass --force to replace it")
  ckpt_dir, steps = find_checkpoints(workdir)
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ExportError(f"--step={step}: not in {ckpt_dir} (complete steps: {steps})")
  meta = read_meta(ckpt_dir / str(step))
  src = source_model_dir(workdir, meta, model_dir)
  state, cfg = build_state(restore_params(ckpt_dir / str(step)), src)
  # Write beside the target, then swap, so a failed export never leaves a half-written dir.
  tmp = out_p.with_name(out_p.name + ".export-tmp")
  shutil.rmtree(tmp, ignore_errors=True)
  save_hf(state, cfg, tmp, tokenizer_from=src, dtype=DTYPES[dtype])
  (tmp / "pasr_export.json").write_text(json.dumps(dict(
      workdir=os.path.abspath(workdir), step=step, source_model=os.path.abspath(src),
      policy_version=meta.get("policy_version"), dtype=dtype or "as trained"), indent=2))
  if out_p.exists():
    shutil.rmtree(out_p) if out_p.is_dir() else out_p.unlink()
  tmp.rename(out_p)
  return out_p


def main(argv=None) -> int:
  import argparse
  import sys
  ap = argparse.ArgumentParser(prog="python -m pasr_jax.export", description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="training workdir (holds the checkpoints)")
  ap.add_argument("--out", required=True, help="HF dir to write")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  ap.add_argument("--dtype", default="", help="float32 | bfloat16 | float16 (default: as trained)")
  ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
  ap.add_argument("--model_dir", default="", help="source HF dir (default: from the run config)")
  a = ap.parse_args(argv)
  try:
    path = export(a.workdir, a.out, a.step, a.dtype, a.force, a.model_dir)
  except ExportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
