"""Orbax checkpoints on real files: sharded round trip, keep-N, half-written and damaged steps."""

import logging
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasr_jax.checkpoint import Checkpointer, CheckpointError, CheckpointMismatchError


def _state(scale: float):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
  sh = jax.sharding.NamedSharding(mesh, jax.P("x"))
  return {"params": {"w": jax.device_put(jnp.arange(32.0).reshape(16, 2) * scale, sh)},
          "opt": {"mu": jnp.full((3,), scale), "count": jnp.asarray(int(scale), jnp.int32)},
          "host_step": np.asarray(int(scale), np.int64)}


def _meta(step):
  return {"step": step, "cursor": {"epoch": 0, "index": 4 * step}, "rng": [0, step],
          "policy_version": step, "config": {"seed": 0}}


def _save_steps(d, steps, keep=2):
  ck = Checkpointer(str(d), keep=keep, async_save=True)
  for s in steps:
    ck.save(s, _state(float(s)), _meta(s))
  ck.close()


def test_round_trip_keeps_newest_and_shardings(tmp_path):
  _save_steps(tmp_path, [1, 2, 3])
  ck = Checkpointer(str(tmp_path), keep=2)
  assert ck.all_steps() == [2, 3]
  template = _state(0.0)
  step, state, meta = ck.restore(template)
  assert step == 3 and meta == _meta(3)
  np.testing.assert_array_equal(np.asarray(state["params"]["w"]), np.arange(32.0).reshape(16, 2) * 3)
  assert state["params"]["w"].sharding == template["params"]["w"].sharding
  assert int(state["opt"]["count"]) == 3 and state["opt"]["count"].dtype == jnp.int32
  assert isinstance(state["host_step"], np.ndarray) and int(state["host_step"]) == 3


def test_empty_dir_restores_none(tmp_path):
  assert Checkpointer(str(tmp_path / "none")).restore(_state(0.0)) is None


def test_half_written_step_is_ignored(tmp_path):
  _save_steps(tmp_path, [1, 2])
  # What a process killed mid-save leaves: the step in orbax's temporary directory name.
  shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-1234")
  ck = Checkpointer(str(tmp_path))
  assert ck.all_steps()[-1] == 2
  assert ck.restore(_state(0.0))[0] == 2


def test_damaged_latest_falls_back_with_warning(tmp_path, caplog):
  _save_steps(tmp_path, [1, 2, 3], keep=3)
  for data_dir in pathlib.Path(tmp_path / "3" / "state").rglob("d"):
    shutil.rmtree(data_dir)  # array chunks lost, metadata intact: only a real read finds it
  ck = Checkpointer(str(tmp_path), keep=3)
  assert ck.all_steps()[-1] == 3
  with caplog.at_level(logging.WARNING, logger="pasr_jax.checkpoint"):
    step, state, meta = ck.restore(_state(0.0))
  assert step == 2 and meta["cursor"]["index"] == 8
  np.testing.assert_array_equal(np.asarray(state["opt"]["mu"]), [2.0, 2.0, 2.0])
  assert any("step 3" in r.getMessage() and "previous" in r.getMessage() for r in caplog.records)
  assert ck.all_steps() == [1, 2] and os.listdir(str(tmp_path) + "_corrupt")
  ck.save(3, _state(3.5), _meta(3))  # the resumed run can write step 3 again
  ck.wait()
  assert ck.restore(_state(0.0))[0] == 3
  ck.close()


def test_all_damaged_raises(tmp_path):
  _save_steps(tmp_path, [1])
  (tmp_path / "1" / "meta" / "metadata").write_text("{not json")
  with pytest.raises(CheckpointError, match="none could be restored"):
    Checkpointer(str(tmp_path)).restore(_state(0.0))


def test_other_shapes_raise_and_leave_steps_in_place(tmp_path):
  """A checkpoint of another model/layout is not 'damaged': no fallback, nothing moved."""
  _save_steps(tmp_path, [1, 2])
  template = _state(0.0)
  mesh = template["params"]["w"].sharding.mesh
  template["params"]["w"] = jax.device_put(
      jnp.zeros((2, 16)), jax.sharding.NamedSharding(mesh, jax.P(None, "x")))  # transposed
  ck = Checkpointer(str(tmp_path), keep=2)
  with pytest.raises(CheckpointMismatchError,
                     match=r"/2: 1 stored arrays .* params\.w: stored \(16, 2\) != expected \(2, 16\)"):
    ck.restore(template)
  assert ck.all_steps() == [1, 2] and not os.path.exists(str(tmp_path) + "_corrupt")
  assert ck.restore(_state(0.0))[0] == 2  # the same steps still restore into their own shapes


def _mesh_state(n_devices: int, scale: float):
  """Params and AdamW state sharded over the first `n_devices` devices (FSDP-style)."""
  import optax
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n_devices]), ("fsdp",),
                           axis_types=(jax.sharding.AxisType.Auto,))
  sh = jax.sharding.NamedSharding(mesh, jax.P("fsdp"))
  params = {"w": jax.device_put(jnp.arange(64.0).reshape(16, 4) * scale, sh),
            "b": jax.device_put(jnp.full((8,), scale), sh)}
  opt = optax.adamw(1e-3).init(params)
  opt = jax.tree.map(lambda x: x + scale if x.dtype == jnp.float32 else x, opt)
  return {"params": params, "opt_state": opt, "step": np.asarray(int(scale), np.int64)}


@pytest.mark.parametrize("saved_on,restored_on", [(8, 4), (8, 1), (1, 8), (4, 8)])
def test_resume_on_another_mesh(tmp_path, saved_on, restored_on):
  """A run saved on N devices resumes on M with the same params and optimizer state, laid
  out in the new run's shardings, without Orbax's 'unsafe on a different topology' path."""
  import warnings
  saved = _mesh_state(saved_on, 3.0)
  ck = Checkpointer(str(tmp_path), keep=2)
  ck.save(3, saved, _meta(3))
  ck.close()
  template = _mesh_state(restored_on, 0.0)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    step, state, _ = Checkpointer(str(tmp_path)).restore(template)
  assert not [w for w in caught if "different topology" in str(w.message)]
  assert step == 3
  for (path, got), want, tmpl in zip(jax.tree_util.tree_leaves_with_path(state),
                                     jax.tree.leaves(saved), jax.tree.leaves(template)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))
    if isinstance(tmpl, jax.Array):
      assert got.sharding == tmpl.sharding, path
  assert len(state["params"]["w"].sharding.device_set) == restored_on


def test_flipped_bytes_in_newest_step_are_caught_by_checksums(tmp_path, caplog):
  """64 bytes flipped inside the newest step's array data: the step is set aside and named,
  the previous one restored (before checksums it restored garbage and trained on NaN)."""
  def state(step):  # 256 KB of random floats: the data file is mostly this array's bytes
    s = _state(float(step))
    s["params"]["big"] = jax.random.normal(jax.random.key(step), (256, 256))
    return s
  ck = Checkpointer(str(tmp_path), keep=2)
  for step in (1, 2):
    ck.save(step, state(step), _meta(step))
  ck.close()
  files = [f for f in pathlib.Path(tmp_path / "2" / "state").rglob("*")
           if f.is_file() and f.parent.name == "d"]
  big = max(files, key=lambda f: f.stat().st_size)
  assert big.stat().st_size > 200_000, [f.stat().st_size for f in files]
  data = bytearray(big.read_bytes())
  mid = len(data) // 2
  data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  big.write_bytes(bytes(data))
  ck = Checkpointer(str(tmp_path), keep=2)
  with caplog.at_level(logging.WARNING, logger="pasr_jax.checkpoint"):
    step, restored, meta = ck.restore(state(0))
  assert step == 1 and "checksums" not in meta
  np.testing.assert_array_equal(np.asarray(restored["params"]["big"]),
                                np.asarray(state(1)["params"]["big"]))
  msg = " ".join(r.getMessage() for r in caplog.records)
  assert "step 2" in msg and "checksum mismatch" in msg and "params.big" in msg, msg
  assert "_corrupt/2-" in msg and ck.all_steps() == [1]
  ck.close()


def test_non_finite_state_is_never_saved(tmp_path):
  ck = Checkpointer(str(tmp_path), keep=1)
  ck.save(1, _state(1.0), _meta(1))
  bad = _state(2.0)
  bad["opt"]["mu"] = bad["opt"]["mu"].at[1].set(jnp.nan)
  with pytest.raises(CheckpointError, match=r"step 2 not saved: 1 arrays hold NaN or inf, e.g. opt.mu"):
    ck.save(2, bad, _meta(2))
  ck.wait()
  assert ck.all_steps() == [1]  # keep=1: the good step is still there
  assert ck.restore(_state(0.0))[0] == 1
  ck.close()
