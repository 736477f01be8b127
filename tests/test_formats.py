"""The single homes of #17: dtype names, param key paths, scan detection, shape checks, a
checkpoint step's params for export, and the batch sharding from the 'batch' rule."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from configs.base import get_base_config
from helpers import tiny_config
from pasr_jax import dtypes, sharding
from pasr_jax.checkpoint import CheckpointError, Checkpointer
from pasr_jax.layout import is_scanned, path_key, shape_mismatches
from pasr_jax.models.qwen import Decoder


@pytest.mark.parametrize("name", dtypes.NAMES)
def test_every_dtype_name_round_trips(name):
  d = dtypes.to_dtype(name, "model.dtype")
  assert d == jnp.dtype(name) and dtypes.name_of(d) == name
  assert dtypes.from_safetensors({"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[name]) == name
  assert np.zeros(2, d).dtype.name == name


def test_bfloat16_is_ml_dtypes_and_unknown_codes_read_as_float32():
  assert dtypes.to_dtype("bfloat16") == np.dtype(ml_dtypes.bfloat16) == jnp.bfloat16
  assert dtypes.name_of(jnp.bfloat16) == "bfloat16"
  assert dtypes.from_safetensors("BF16") == "bfloat16"
  assert dtypes.from_safetensors("I64") == "float32"


def test_bad_dtype_name_names_the_key():
  with pytest.raises(dtypes.DtypeError, match=r"model\.param_dtype='fp32': not one of "
                     r"float32 \| bfloat16 \| float16"):
    dtypes.to_dtype("fp32", "model.param_dtype")
  with pytest.raises(ValueError, match="--dtype='int8'"):
    dtypes.to_dtype("int8", "--dtype")


def test_path_key_spells_tree_nnx_and_orbax_paths_alike():
  tree = {"layers": [{"mlp": {"down_proj": 1}}]}
  (p, _), = jax.tree_util.tree_leaves_with_path(tree)
  assert path_key(p) == "layers.0.mlp.down_proj"
  model = Decoder(tiny_config("qwen2"), rngs=nnx.Rngs(0))
  keys = {path_key(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert "layers.1.mlp.down_proj" in keys and "embed_tokens" in keys
  # An nnx.Variable inside a pytree adds a trailing 'value' level.
  (p, _), = jax.tree_util.tree_leaves_with_path({"w": nnx.Param(jnp.ones(2))})
  assert path_key(p) == "w"


def test_scan_detection_and_shape_mismatches():
  def keys(scan):
    m = nnx.eval_shape(lambda: Decoder(tiny_config("qwen3"), rngs=nnx.Rngs(0), scan_layers=scan))
    return {path_key(p): v.shape for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  flat, stacked = keys(False), keys(True)
  assert not is_scanned(flat) and is_scanned(stacked)
  assert stacked["layers.mlp.up_proj"] == (2,) + flat["layers.0.mlp.up_proj"]
  assert shape_mismatches(flat, flat) == []
  got = dict(flat, embed_tokens=(1, 2), extra=(3,))
  assert shape_mismatches(got, flat) == [("embed_tokens", (1, 2), flat["embed_tokens"])]


def test_read_params_gives_a_steps_params_and_meta_without_touching_the_dir(tmp_path):
  d = tmp_path / "ck"
  ck = Checkpointer(str(d), async_save=False)
  for step in (1, 2):
    state = {"params": {"embed_tokens": jnp.full((4, 3), float(step)),
                        "layers": {"0": {"w": jnp.arange(2.0) * step}}},
             "opt_state": {"mu": jnp.ones((5,))}}
    ck.save(step, state, {"step": step, "policy_version": 10 + step})
  ck.close()
  os.makedirs(d / "3.orbax-checkpoint-tmp-123")  # a step a running training is writing
  ro = Checkpointer(str(d), read_only=True, async_save=False)
  step, params, meta = ro.read_params()
  assert step == 2 and meta["policy_version"] == 12 and "checksums" not in meta
  assert sorted(params) == ["embed_tokens", "layers.0.w"]
  assert isinstance(params["embed_tokens"], np.ndarray)
  np.testing.assert_array_equal(params["layers.0.w"], [0.0, 2.0])
  assert ro.read_params(1)[1]["embed_tokens"][0, 0] == 1.0
  with pytest.raises(CheckpointError, match=r"no step 7 \(complete steps: \[1, 2\]\)"):
    ro.read_params(7)
  ro.close()
  assert (d / "3.orbax-checkpoint-tmp-123").is_dir()
  Checkpointer(str(tmp_path / "none"), read_only=True).close()
  assert not (tmp_path / "none").exists()


def _rules(batch):
  return tuple(r for r in get_base_config().mesh.rules if r[0] != "batch") + (("batch", batch),)


def test_batch_sharding_follows_the_batch_rule():
  mesh = sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8])
  default = tuple(get_base_config().mesh.rules)
  assert sharding.batch_axes(mesh, default) == ("data", "fsdp")
  assert sharding.batch_sharding(mesh, default).spec == PartitionSpec(("data", "fsdp"), None)
  assert sharding.batch_shards(mesh, default) == 4
  assert sharding.logits_spec(mesh, default, 256) == PartitionSpec(("data", "fsdp"), None,
                                                                   "tensor")
  data = _rules("data")
  assert sharding.batch_sharding(mesh, data, 1).spec == PartitionSpec(("data",))
  assert sharding.batch_shards(mesh, data) == 2
  assert sharding.batch_spec(mesh, data, 3, lead=1) == PartitionSpec(None, ("data",), None)
  # The batch takes 'tensor': the logits' vocab dim cannot use it as well.
  assert sharding.logits_spec(mesh, _rules(("data", "tensor")), 256) == PartitionSpec(
      ("data", "tensor"), None, None)
  assert sharding.batch_shards(mesh, _rules(None)) == 1
  with pytest.raises(sharding.MeshError, match=r"mesh\.rules: 'batch' -> 'pipe'"):
    sharding.batch_sharding(mesh, _rules(("data", "pipe")))
