"""HF checkpoint I/O: the one HF <-> Flax name map, `load_hf`, `save_hf`, `hf_tensors`.

`NAME_MAP` is the single declarative table used by import, export and the vLLM weight sync.
Each row maps a Flax param path (`{i}` = layer index) to an HF tensor name and a layout rule:

  "same"     identical layout (embeddings, norm weights)
  "flat"     Flax [heads, head_dim] <-> HF [heads*head_dim] (q/k/v biases)
  ("linear", k)  Flax kernel [out..., in...] with k leading output axes <-> HF weight
             [prod(out), prod(in)] (torch Linear's [out, in]: a reshape, never a transpose)

Rows whose Flax param does not exist in the model (biases without `attention_bias`, q/k norms
without `qk_norm`, lm_head with tied embeddings) are simply skipped, so one table covers
Qwen2, Qwen3 and Llama. With `scan_layers=True` the `layers.{i}` params are stacked on a
leading axis; the map splits/stacks them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from pasr_jax import dtypes
from pasr_jax.layout import is_scanned, path_key, shape_mismatches
from pasr_jax.models.qwen import Decoder, ModelConfig, ModelConfigError
from pasr_jax.sharding import param_sharding, put_global, to_host

# (flax path, HF name, layout)
NAME_MAP: tuple[tuple[str, str, Any], ...] = (
    ("embed_tokens", "model.embed_tokens.weight", "same"),
    ("norm.weight", "model.norm.weight", "same"),
    ("lm_head", "lm_head.weight", ("linear", 1)),
    ("layers.{i}.input_layernorm.weight", "model.layers.{i}.input_layernorm.weight", "same"),
    ("layers.{i}.post_attention_layernorm.weight",
     "model.layers.{i}.post_attention_layernorm.weight", "same"),
    ("layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.q_proj.weight", ("linear", 2)),
    ("layers.{i}.self_attn.k_proj", "model.layers.{i}.self_attn.k_proj.weight", ("linear", 2)),
    ("layers.{i}.self_attn.v_proj", "model.layers.{i}.self_attn.v_proj.weight", ("linear", 2)),
    ("layers.{i}.self_attn.o_proj", "model.layers.{i}.self_attn.o_proj.weight", ("linear", 1)),
    ("layers.{i}.self_attn.q_bias", "model.layers.{i}.self_attn.q_proj.bias", "flat"),
    ("layers.{i}.self_attn.k_bias", "model.layers.{i}.self_attn.k_proj.bias", "flat"),
    ("layers.{i}.self_attn.v_bias", "model.layers.{i}.self_attn.v_proj.bias", "flat"),
    ("layers.{i}.self_attn.q_norm.weight", "model.layers.{i}.self_attn.q_norm.weight", "same"),
    ("layers.{i}.self_attn.k_norm.weight", "model.layers.{i}.self_attn.k_norm.weight", "same"),
    ("layers.{i}.mlp.gate_proj", "model.layers.{i}.mlp.gate_proj.weight", ("linear", 1)),
    ("layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.up_proj.weight", ("linear", 1)),
    ("layers.{i}.mlp.down_proj", "model.layers.{i}.mlp.down_proj.weight", ("linear", 1)),
)
# Buffers some exporters write that carry no parameters.
_IGNORED_HF = re.compile(r".*rotary_emb\.inv_freq$")
# Files copied from `tokenizer_from` next to the weights.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "added_tokens.json", "generation_config.json")
_DEFAULT_SHARD_BYTES = 2 * 1024**3


class HFFormatError(ModelConfigError):
  """An HF checkpoint dir that does not match the model (file/tensor/field named)."""


# ----------------------------------------------------------------------------- layout rules


def hf_shape(flax_shape: Sequence[int], layout: Any) -> tuple[int, ...]:
  """The HF tensor shape for one (unstacked) Flax param shape under `layout`."""
  if layout == "same":
    return tuple(flax_shape)
  if layout == "flat":
    return (math.prod(flax_shape),)
  _, k = layout
  return (math.prod(flax_shape[:k]), math.prod(flax_shape[k:]))


def to_hf(x: np.ndarray, layout: Any) -> np.ndarray:
  """Flax layout -> HF layout (one layer): a reshape (a view) for every layout."""
  return x.reshape(hf_shape(x.shape, layout))


# ----------------------------------------------------------------------------- path plumbing


def _params_by_path(state: nnx.State) -> dict[str, nnx.Variable]:
  flat = nnx.to_flat_state(state)
  return {path_key(path): var for path, var in flat}


def _entries(names: Sequence[str], cfg: ModelConfig, scan_layers: bool
             ) -> Iterator[tuple[str, str, Any, int | None]]:
  """Yields (flax path, HF name, layout, layer or None) for every param in `names`.

  For a scanned model the same flax path appears once per layer, with the layer index.
  """
  present = set(names)
  for flax_tpl, hf_tpl, layout in NAME_MAP:
    if "{i}" not in flax_tpl:
      if flax_tpl in present:
        yield flax_tpl, hf_tpl, layout, None
      continue
    for i in range(cfg.num_layers):
      path = flax_tpl.replace("{i}.", "") if scan_layers else flax_tpl.format(i=i)
      if path in present:
        yield path, hf_tpl.format(i=i), layout, i if scan_layers else None


def _check_all_mapped(names: Sequence[str], cfg: ModelConfig, scan_layers: bool) -> None:
  mapped = {e[0] for e in _entries(names, cfg, scan_layers)}
  unmapped = sorted(set(names) - mapped)
  assert not unmapped, f"Flax params with no row in NAME_MAP: {unmapped}"


# ----------------------------------------------------------------------------- export


def hf_tensors(model_or_state: Decoder | nnx.State, cfg: ModelConfig,
               dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, host numpy array in HF layout) for every param, one at a time.

  Sharded (even multi-process) arrays are gathered to host per param, one copy per host
  (`sharding.to_host`); `dtype` (e.g. jnp.bfloat16) casts on the devices before the gather.
  Used by `save_hf` and by the vLLM weight sync.
  """
  if isinstance(model_or_state, nnx.Module):
    params = _params_by_path(nnx.state(model_or_state, nnx.Param))
    scan_layers = bool(getattr(model_or_state, "scan_layers", False))
  else:
    params = _params_by_path(model_or_state)
    scan_layers = is_scanned(params)
  _check_all_mapped(list(params), cfg, scan_layers)
  host_cache: tuple[str, np.ndarray] | None = None
  for path, hf_name, layout, layer in _entries(list(params), cfg, scan_layers):
    if host_cache is None or host_cache[0] != path:
      value = params[path].get_value()
      host_cache = (path, to_host(value, dtype))
    x = host_cache[1] if layer is None else host_cache[1][layer]
    yield hf_name, to_hf(x, layout)


def write_shards(tensors: Iterable[tuple[str, np.ndarray]], out_dir: Path,
                 max_shard_bytes: int, file_name: Callable[[int], str],
                 write: bool = True) -> tuple[list[tuple[Path, list[str]]], int]:
  """Writes (HF name, host array) pairs as safetensors files of about `max_shard_bytes`
  each, named `file_name(k)`; returns [(file, tensor names)] and the bytes written.

  A file is written by a background thread while the next one fills (numpy copies and the
  safetensors writer run outside the GIL), with at most one write in flight, so the host holds
  about two shards. With `write=False` (multi-process, not process 0) the tensors are still
  consumed (their gathers are collective) but nothing is written. The one writer of
  `save_hf` and the vLLM weight sync."""
  written: list[tuple[Path, list[str]]] = []
  shard: dict[str, np.ndarray] = {}
  size = nbytes = 0
  pending = None
  with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pasr-safetensors") as pool:
    def flush():
      nonlocal shard, size, pending
      if write and shard:
        if pending is not None:
          pending.result()  # raises the writer's error; bounds host memory
        path = out_dir / file_name(len(written))
        pending = pool.submit(save_file, shard, str(path), {"format": "pt"})
        written.append((path, list(shard)))
      shard, size = {}, 0

    for name, x in tensors:
      if shard and size + x.nbytes > max_shard_bytes:
        flush()
      shard[name] = x
      size += x.nbytes
      nbytes += x.nbytes
    flush()
    if pending is not None:
      pending.result()
  return written, nbytes


def save_hf(model: Decoder, cfg: ModelConfig, out_dir: str | os.PathLike,
            tokenizer_from: str | os.PathLike | None = None, dtype: Any = None,
            max_shard_bytes: int = _DEFAULT_SHARD_BYTES) -> Path:
  """Writes an HF dir that transformers and vLLM load unchanged.

  config.json (architectures per model_type), `model.safetensors` or, above
  `max_shard_bytes`, `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`;
  tokenizer files, chat template and generation_config.json copied from `tokenizer_from`.
  Only process 0 writes when running multi-process (all processes must call it: gathers).
  """
  out = Path(out_dir)
  write = jax.process_index() == 0
  if write:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("model*.safetensors*"):
      old.unlink()
  out_dtype = None

  def tensors():
    nonlocal out_dtype
    for name, x in hf_tensors(model, cfg, dtype):
      out_dtype = out_dtype or x.dtype
      yield name, x
  # Temporary names until the shard count is known.
  written, _ = write_shards(tensors(), out, max_shard_bytes,
                            lambda k: f"model-part-{k:05d}.safetensors.tmp", write)
  if not write:
    return out
  if len(written) == 1:
    written[0][0].rename(out / "model.safetensors")
  else:
    n, weight_map, total = len(written), {}, 0
    for k, (tmp, names) in enumerate(written):
      fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
      total += tmp.stat().st_size
      tmp.rename(out / fname)
      weight_map.update({name: fname for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
  hf_cfg = cfg.to_hf_dict()
  if out_dtype is not None:
    hf_cfg["torch_dtype"] = dtypes.name_of(out_dtype)
  (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  if tokenizer_from is not None:
    for fname in _TOKENIZER_FILES:
      src = Path(tokenizer_from) / fname
      if src.is_file():
        shutil.copyfile(src, out / fname)
  if not (out / "generation_config.json").exists():
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id),
                             ("eos_token_id", cfg.eos_token_id),
                             ("pad_token_id", cfg.pad_token_id)) if v is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
  return out


# ----------------------------------------------------------------------------- import


def read_config(path: str | os.PathLike) -> ModelConfig:
  """ModelConfig from `path/config.json`; HFFormatError names the file and the field."""
  cfg_file = Path(path) / "config.json"
  if not cfg_file.is_file():
    raise HFFormatError(f"{cfg_file}: not found")
  try:
    return ModelConfig.from_hf_dict(json.loads(cfg_file.read_text()))
  except json.JSONDecodeError as e:
    raise HFFormatError(f"{cfg_file}: not valid JSON ({e})") from e
  except ModelConfigError as e:
    raise HFFormatError(f"{cfg_file}: {e}") from e


def _tensor_files(path: Path) -> dict[str, Path]:
  """HF tensor name -> safetensors file, from the index or the single file."""
  index = path / "model.safetensors.index.json"
  if index.is_file():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
      raise HFFormatError(f"{index}: no 'weight_map'")
    files = {name: path / fname for name, fname in weight_map.items()}
    for f in set(files.values()):
      if not f.is_file():
        raise HFFormatError(f"{index}: lists {f.name}, which is missing")
    return files
  singles = sorted(path.glob("*.safetensors"))
  if not singles:
    raise HFFormatError(f"{path}: no *.safetensors file and no model.safetensors.index.json")
  files = {}
  for f in singles:
    with safe_open(str(f), framework="numpy") as fh:
      files.update({name: f for name in fh.keys()})
  return files


def tensor_specs(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
  """{HF tensor name: (shape, dtype name)} of an HF dir's safetensors (headers only)."""
  reader = _Reader(_tensor_files(Path(path)))
  return {name: (reader.shape(name), reader.dtype(name)) for name in reader.files}


def model_digest(path: str | os.PathLike, sample_bytes: int = 1 << 20) -> str:
  """A sha256 that tells HF checkpoints apart without reading all of a 15 GB model: every
  tensor's name, shape and dtype, and per safetensors file its size and its first and last
  `sample_bytes` (a fine-tuned copy of the same architecture differs there)."""
  h = hashlib.sha256()
  for name, (shape, dtype) in sorted(tensor_specs(path).items()):
    h.update(f"{name}:{shape}:{dtype};".encode())
  for f in sorted(set(_tensor_files(Path(path)).values())):
    size = f.stat().st_size
    h.update(f"{f.name}:{size};".encode())
    with open(f, "rb") as fh:
      h.update(fh.read(sample_bytes))
      fh.seek(max(0, size - sample_bytes))
      h.update(fh.read(sample_bytes))
  return h.hexdigest()


class _Reader:
  """Keeps safetensors files open while loading; reads one tensor at a time."""

  def __init__(self, files: dict[str, Path]):
    self.files = files
    self._open: dict[Path, Any] = {}

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(name).get_slice(name).get_shape())

  def dtype(self, name: str) -> str:
    """numpy-style dtype name of a stored tensor (float32 for types not listed)."""
    return dtypes.from_safetensors(self._handle(name).get_slice(name).get_dtype())

  def get(self, name: str) -> np.ndarray:
    return self._handle(name).get_tensor(name)

  def _handle(self, name: str):
    f = self.files[name]
    if f not in self._open:
      self._open[f] = safe_open(str(f), framework="numpy")
    return self._open[f]


def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
            mesh: jax.sharding.Mesh | None = None, rules: Sequence | None = None,
            scan_layers: bool = False, remat: bool = False, attention: str = "auto"
            ) -> tuple[Decoder, ModelConfig]:
  """Builds a `Decoder` from an HF dir (single-file or index-sharded safetensors).

  Tensors are read one at a time and each lands directly in its target sharding (from the
  params' logical names and `rules`) when `mesh` is given — the model is never materialised
  whole on the host. Raises HFFormatError for a missing/extra tensor, a shape mismatch (both
  shapes named), a missing config field or an unknown model_type.
  """
  path = Path(path)
  cfg = read_config(path)
  files = _tensor_files(path)
  reader = _Reader(files)
  abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                            param_dtype=param_dtype, scan_layers=scan_layers,
                                            remat=remat, attention=attention))
  graphdef, state = nnx.split(abstract)
  params = _params_by_path(state)
  entries = list(_entries(list(params), cfg, scan_layers))
  _check_all_mapped(list(params), cfg, scan_layers)

  wanted = {e[1] for e in entries}
  missing = sorted(wanted - set(files))
  # Some tied checkpoints still carry a copy of the embedding as lm_head.weight; HF ignores it.
  ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
  extra = sorted(n for n in set(files) - wanted - ignored if not _IGNORED_HF.match(n))
  if missing:
    raise HFFormatError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}"
                        f" ({len(missing)} in all) for model_type={cfg.model_type}")
  if extra:
    raise HFFormatError(f"{path}: unexpected tensors {extra[:8]}"
                        f"{' ...' if len(extra) > 8 else ''} ({len(extra)} in all) for "
                        f"model_type={cfg.model_type}, tie_word_embeddings="
                        f"{cfg.tie_word_embeddings}")

  by_path: dict[str, list[tuple[str, Any, int | None]]] = {}
  for flax_path, hf_name, layout, layer in entries:
    by_path.setdefault(flax_path, []).append((hf_name, layout, layer))

  values = {}
  for flax_path, rows in by_path.items():
    var = params[flax_path]
    full_shape = tuple(var.get_value().shape)
    layer_shape = full_shape[1:] if rows[0][2] is not None else full_shape
    bad = shape_mismatches({n: reader.shape(n) for n, _, _ in rows},
                           {n: hf_shape(layer_shape, layout) for n, layout, _ in rows})
    if bad:
      hf_name, got, want = bad[0]
      raise HFFormatError(f"{files[hf_name]}: tensor {hf_name} has shape {got}, expected "
                          f"{want} (from config.json)")
    if rows[0][2] is None:
      # Every layout keeps the element order: HF -> Flax is a reshape.
      host = reader.get(rows[0][0]).reshape(layer_shape).astype(param_dtype)
    else:  # scanned: stack this param's layers (one param on host at a time)
      host = np.empty(full_shape, dtype=param_dtype)
      for hf_name, _, layer in rows:
        host[layer] = reader.get(hf_name).reshape(layer_shape)
    values[flax_path] = _place(host, var, mesh, rules)
    del host

  for path_tuple, var in nnx.to_flat_state(state):
    if path_key(path_tuple) in values:
      var.set_value(values[path_key(path_tuple)])
  return nnx.merge(graphdef, state), cfg


def _place(host: np.ndarray, var: nnx.Variable, mesh, rules) -> jax.Array:
  if mesh is None:
    return jnp.asarray(host)
  return put_global(host, param_sharding(var, mesh, rules or (), host.shape))
