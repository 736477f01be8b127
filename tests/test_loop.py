"""The training loop's behaviour, pinned: a K = 0 run on `ScriptedSampler` must give bitwise
the parameters, optimizer state and rollouts records that the loop gave when they were
recorded (tests/data/loop_k0.json). A change of the loop's structure (rollout sources, hooks)
must change none of them; a change of the trainer's numerics shows here too (re-record with
`PASR_RECORD_LOOP=1 pytest tests/test_loop.py` only when the change is meant).

No engine starts (the fast tier); about a minute on a loaded 2-core host.
"""

from __future__ import annotations

import hashlib
import json
import os
from unittest import mock

import jax
import numpy as np

from helpers import DATA, ScriptedSampler, load_preset
from pasr_jax import devices, metrics, sharding
from pasr_jax.config import RunConfig
from pasr_jax.run import Run

FIXTURE = DATA / "loop_k0.json"
STEPS = 4


def _cfg(workdir) -> RunConfig:
  tree = load_preset("tiny_cpu")
  tree.workdir = str(workdir)
  tree.rewards.accuracy_rule = "contains"
  tree.data.files = (str(DATA / "say_seven.jsonl"),)
  tree.logging.tensorboard = False
  tree.train.steps = STEPS
  tree.rollout.max_staleness = 0
  tree.rollout.sync_every = 2
  return RunConfig.from_tree(tree)


def _digest(tree) -> str:
  h = hashlib.sha256()
  for x in jax.tree.leaves(tree):
    a = np.ascontiguousarray(np.asarray(sharding.to_host(x)))
    h.update(str((a.dtype, a.shape)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def run_k0(workdir) -> dict:
  """The K = 0 run in this process: digests of its final params and optimizer state, its
  rollouts records (as written), and the sampler's weight syncs."""

  class ScriptedRun(Run):
    def make_sampler(self):
      return ScriptedSampler.for_model_dir(self.model_dir)

  r = ScriptedRun(_cfg(workdir))
  try:
    with mock.patch.object(devices, "setup", lambda cfg: {}):  # JAX is up already
      r.setup()
    r.resume()
    while not r.finished:
      r.step()
    r.finish()
    return {"params": _digest(r.trainer.params), "opt_state": _digest(r.trainer.opt_state),
            "weight_sums": list(r.sampler.weight_sums),
            "rollouts": metrics.read_jsonl(str(workdir / "rollouts.jsonl")),
            "steps": [m["step"] for m in metrics.read_jsonl(str(workdir / "metrics.jsonl"))]}
  finally:
    r.close()


def test_k0_loop_is_bitwise_the_recorded_one(tmp_path):
  got = run_k0(tmp_path / "w")
  if os.environ.get("PASR_RECORD_LOOP") == "1":
    FIXTURE.write_text(json.dumps(got, indent=1) + "\n")
  want = json.loads(FIXTURE.read_text())
  assert got["steps"] == list(range(1, STEPS + 1))
  assert got["rollouts"] == want["rollouts"]
  assert got["weight_sums"] == want["weight_sums"]
  assert got["params"] == want["params"]
  assert got["opt_state"] == want["opt_state"]

