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
import pytest

from helpers import DATA, ScriptedSampler, load_preset, scripted_config
from pasr_jax import devices, metrics, sharding
from pasr_jax.config import ConfigError, RunConfig
from pasr_jax.rollout import EngineError
from pasr_jax.run import Run

FIXTURE = DATA / "loop_k0.json"
STEPS = 4


def _cfg(workdir, **over) -> RunConfig:
  return scripted_config(workdir, STEPS,
                         **{"rollout__max_staleness": 0, "rollout__sync_every": 2, **over})


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



# ----------------------------------------------------------------------------- hooks
def test_eval_metrics_per_bucket():
  """`eval_metrics`: means over the answers, and per difficulty bucket."""
  from pasr_jax.eval.during import eval_metrics
  think = "<think> 3+4 <refine> 3+4 is 7 </refine> </think> <answer> 7 </answer>"
  answers = [{"question": "q1", "reference": "7", "text": think, "score": 1.0, "bucket": "easy",
              "tokens": 10},
             {"question": "q2", "reference": "7", "text": "<answer>3</answer>", "score": 0.0,
              "bucket": "hard", "tokens": 4},
             {"question": "q3", "reference": "7", "text": "7", "score": 1.0, "bucket": "hard",
              "tokens": 1}]
  m = eval_metrics(answers)
  assert m["eval/accuracy"] == 2 / 3 and m["eval/tokens_mean"] == 5.0
  assert m["eval/format_ok"] == 1 / 3 and m["eval/refine_rate"] == 1 / 3
  assert (m["eval/easy/accuracy"], m["eval/easy/refine_rate"]) == (1.0, 1.0)
  assert (m["eval/hard/accuracy"], m["eval/hard/refine_rate"]) == (0.5, 0.0)
  assert eval_metrics([]) == {}


def test_eval_metrics_carry_the_refine_analytics():
  """Evaluation during training logs `eval.refine`'s analytics of its answers: a correcting
  block that turns the wrong first-pass value into the reference chain's is a fix, a confirm
  is not; rates over an empty set are left out rather than logged as 0."""
  from pasr_jax.eval.during import eval_metrics
  ref = "17 + 28 = 45\n45 * 2 = 90\n#### 90"
  fix = ("<think>\n17 + 28 = 35\n<refine> Check: 17 + 20 + 8 = 37 + 8 = 45, not 35. </refine>"
         "\n45 * 2 = 90\n</think>\n<answer>\n90\n</answer>")
  confirm = ("<think>\n17 + 28 = 45\n<refine> Check: 17 + 20 + 8 = 37 + 8 = 45. Correct. "
             "</refine>\n45 * 2 = 90\n</think>\n<answer>\n90\n</answer>")
  answers = [{"question": "q", "reference": ref, "text": t, "score": 1.0, "bucket": "medium",
              "tokens": 30} for t in (fix, confirm)]
  m = eval_metrics(answers)
  assert (m["eval/refine/fixes"], m["eval/refine/breaks"]) == (1.0, 0.0)
  assert (m["eval/refine/blocks/correct"], m["eval/refine/blocks/confirm"]) == (1.0, 1.0)
  assert m["eval/refine/net_fixes_per_100_harder"] == 50.0
  assert "eval/refine/gap" not in m  # no easy answers: G is undefined


def _eval_items(path) -> str:
  """Four held-out items: the scripted sampler answers "7" to two (right) and "3" to the
  two holding "SAME" (wrong)."""
  rows = [{"question": "Say 7.", "answer": "7", "difficulty": "easy"},
          {"question": "SAME: say 7.", "answer": "7", "difficulty": "hard"},
          {"question": "Write seven.", "answer": "7", "difficulty": "hard"},
          {"question": "SAME again.", "answer": "7", "difficulty": "hard"}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


class EvalEngineDiesOnce(ScriptedSampler):
  """The first `generate` (step 0's evaluation) fails as a dead engine's does."""

  failed = 0

  def generate(self, *args, **kw):
    if not self.failed:
      self.failed += 1
      raise EngineError("scripted: the engine died during the evaluation")
    return super().generate(*args, **kw)


def _scripted_run(workdir, sampler=ScriptedSampler, **over):
  class ScriptedRun(Run):
    def make_sampler(self):
      return sampler.for_model_dir(self.model_dir)

  r = ScriptedRun(_cfg(workdir, **over))
  try:
    with mock.patch.object(devices, "setup", lambda cfg: {}):
      r.setup()
    r.resume()
    while not r.finished:
      r.step()
    return r, r.finish()
  finally:
    r.close()


def test_eval_during_training_k1_logs_everywhere_and_quiet_console(tmp_path, capsys):
  """eval.every=3 over 4 steps of K = 1: held-out answers at step 0 (before any update), 3
  and 4 (the last), through the run's own sampler; eval/* in metrics.jsonl (step 0 a line of
  its own) and in the step line; the answers in eval.jsonl; the console is a start block, one
  line per step and the held-out line (`run` prints it last); config.json records the
  tis_cap that ran; the staleness bound holds. The engine dies during step 0's evaluation:
  the evaluation is retried (as a rollout is) and the run goes on."""
  w = tmp_path / "w"
  r, summary = _scripted_run(w, EvalEngineDiesOnce, rollout__max_staleness=1, eval__every=3,
                             eval__files=(_eval_items(tmp_path / "held.jsonl"),),
                             eval__limit=0)
  out = capsys.readouterr().out.strip().splitlines()
  m = metrics.read_jsonl(str(w / "metrics.jsonl"))
  assert [x["step"] for x in m] == [0, 1, 2, 3, 4]
  evals = [x for x in m if "eval/accuracy" in x]
  assert [x["step"] for x in evals] == [0, 3, 4]
  for x in evals:
    assert x["eval/accuracy"] == 0.5 and x["eval/tokens_mean"] == 4.0
    assert x["eval/format_ok"] == 0.0 and x["eval/refine_rate"] == 0.0
    assert x["eval/easy/accuracy"] == 1.0 and x["eval/hard/accuracy"] == 1 / 3
  answers = metrics.read_jsonl(str(w / "eval.jsonl"))
  assert [a["step"] for a in answers] == [0] * 4 + [3] * 4 + [4] * 4
  assert {"question", "reference", "text", "score", "bucket", "tokens"} <= set(answers[0])
  assert all(0 <= x["staleness/max"] <= 1 for x in m[1:])
  assert json.loads((w / "config.json").read_text())["grpo"]["tis_cap"] == 2.0
  # The console: no config dump, one line per step (and step 0's eval), the held-out line last.
  assert not any(line.startswith(("{", "  \"")) for line in out), out
  assert sum(line.startswith("step ") for line in out) == 5
  assert out[-1].startswith("[train] done at step 4"), out[-5:]
  assert summary["held_out"] == "held-out accuracy: 50.0% -> 50.0% (4 items)"  # run() prints it
  assert r.sampler.failed == 1


def test_max_staleness_2_is_refused_with_the_reason():
  tree = load_preset("tiny_cpu")
  tree.rollout.max_staleness = 2
  with pytest.raises(ConfigError, match="one engine"):
    RunConfig.from_tree(tree)


def test_eval_config_and_items(tmp_path):
  """eval.every > 0 needs files; eval.max_tokens must fit the engine beside the prompt;
  `load_items` reads the data's row schema, the bucket field and the limit."""
  from pasr_jax.eval.during import load_items
  tree = load_preset("tiny_cpu")
  tree.eval.every = 2
  with pytest.raises(ConfigError, match=r"eval\.files=\(\): eval\.every > 0 needs"):
    RunConfig.from_tree(tree)
  tree.eval.files = (_eval_items(tmp_path / "held.jsonl"),)
  tree.eval.max_tokens = 10_000
  with pytest.raises(ConfigError, match=r"eval\.max_tokens=10000: .* must fit"):
    RunConfig.from_tree(tree)
  items = load_items(tree.eval.files, limit=3)
  assert [(it.row.question, it.row.answer, it.bucket) for it in items] == [
      ("Say 7.", "7", "easy"), ("SAME: say 7.", "7", "hard"), ("Write seven.", "7", "hard")]
