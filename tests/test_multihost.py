"""Two OS processes x 4 CPU devices (jax.distributed, gloo) == one process x 8 devices.

The test runs this file as a script in two worker processes; each joins a coordinator on
127.0.0.1, builds the same tiny model, batch and 8-device (2, 2, 2) mesh spanning both
processes, and takes the same GRPO steps as the in-process reference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from procs import free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2


def _setup(mesh_devices):
  """Trainer and batch, identical in every process (seeded)."""
  from flax import nnx

  from configs.base import get_base_config
  from helpers import tiny_config
  from pasr_jax import sharding
  from pasr_jax.batch import Batch
  from pasr_jax.config import RunConfig
  from pasr_jax.models.qwen import Decoder
  from pasr_jax.trainer import Trainer

  c = get_base_config()
  c.mesh.shape = (2, 2, 2)
  c.optim.lr = 1e-3
  c.optim.micro_batch = 4
  c.rollout.max_tokens = 12
  c.grpo.beta = 0.04
  rng = np.random.default_rng(0)
  B, L = 8, 16
  ids = rng.integers(3, 256, (B, L)).astype(np.int32)
  loss = np.zeros((B, L), np.float32)
  loss[:, 4:] = (rng.random((B, L - 4)) < 0.8)
  batch = Batch(input_ids=ids, attention_mask=np.ones((B, L), np.int32),
                positions=np.tile(np.arange(L, dtype=np.int32), (B, 1)), loss_mask=loss,
                old_logps=np.zeros((B, L), np.float32),
                advantages=rng.normal(0, 1, B).astype(np.float32))
  mesh = sharding.make_mesh((2, 2, 2), devices=mesh_devices)
  tr = Trainer(RunConfig.from_tree(c).trainer_cfg(), Decoder(tiny_config("qwen2"), rngs=nnx.Rngs(0)), tiny_config("qwen2"), mesh)
  return tr, batch


def _run(tr, batch):
  """STEPS updates; returns losses, kls and the final params as one flat host vector."""
  import jax

  from pasr_jax import sharding
  lp = tr.logprobs(batch)
  batch = batch.replace(old_logps=(lp * batch.loss_mask).astype(np.float32))
  ms = [tr.update(batch) for _ in range(STEPS)]
  flat = np.concatenate([sharding.to_host(x).ravel() for x in jax.tree.leaves(tr.params)])
  return {"loss": [m["loss"] for m in ms], "kl": [m["kl"] for m in ms],
          "logps_sum": float(lp.sum()), "params": flat.tolist()}


def _worker(pid: int, port: int, out: str) -> None:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  tr, batch = _setup(jax.devices())
  res = _run(tr, batch)
  if pid == 0:
    Path(out).write_text(json.dumps(res))
  jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  import jax
  assert jax.device_count() >= 8
  want = _run(*_setup(jax.devices()[:8]))

  port, out = free_port(), tmp_path / "res.json"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(out)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=420)[0].decode(errors="replace"))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert all(p.returncode == 0 for p in procs), "\n----\n".join(x[-3000:] for x in logs)
  got = json.loads(out.read_text())
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got["kl"], want["kl"], rtol=1e-4, atol=1e-9)
  assert got["logps_sum"] == want["logps_sum"] or abs(got["logps_sum"] / want["logps_sum"] - 1) < 1e-6
  np.testing.assert_allclose(got["params"], want["params"], rtol=0, atol=1e-5)
  assert want["kl"][1] > 0  # the second step really saw a moved policy


if __name__ == "__main__":
  _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
