"""Asynchronous rollouts (rollout.max_staleness = K, issue #25) with `ScriptedSampler`.

The scripted answers do not depend on the weights, so a K = 1 run trains on exactly the
batches of a K = 0 run (with the same grpo.tis_cap): the parameters must come out bitwise
equal, and only the answers' policy versions differ. Runs are in this process (`Run`, as
`tests/multihost_worker.py` drives it), except the ones killed or stopped by a signal.
None starts a vLLM engine. The runs share their trainer's jitted functions (`_COMPILED`):
each program is traced and compiled once for the module.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from unittest import mock

import jax
import numpy as np
import pytest

from helpers import DATA, ScriptedSampler, assert_group_gone, load_preset, run_train, \
    scripted_config, start_train
from pasr_jax import cli, devices, metrics, sharding
from pasr_jax.config import ASYNC_TIS_CAP, ConfigError, RunConfig
from pasr_jax.judge.client import JudgeError
from pasr_jax.rollout import EngineError, SyncError
from pasr_jax.run import Run

STEPS = 4
RECORDS = 16  # per step: 2 questions x (4 PASR + 4 baseline answers)


# The jitted update and logprob functions by trainer config, shared by this module's runs.
_COMPILED: dict[str, dict] = {}


def _cfg(workdir, k: int, **over) -> RunConfig:
  return scripted_config(workdir, STEPS, rollout__max_staleness=k, **over)


def _run(workdir, k: int, sampler_hook=None, **over) -> dict:
  """One in-process run; its final params (flat), metrics, rollouts, sampler and whatever
  it raised (None if it finished)."""
  class ScriptedRun(Run):
    def setup(self):
      super().setup()
      # The runs' trainers are alike (same model and trainer config): they share jitted
      # functions, so each program is traced and compiled once in this module, not per run.
      self.trainer._fns = _COMPILED.setdefault(repr(self.cfg.trainer_cfg()), {})

    def make_sampler(self):
      s = ScriptedSampler.for_model_dir(self.model_dir)
      return sampler_hook(s) if sampler_hook else s

  r = ScriptedRun(_cfg(workdir, k, **over))
  raised = None
  try:
    # JAX is up in this test process already: the CPU device settings have nothing to do.
    with mock.patch.object(devices, "setup", lambda cfg: {}):
      r.setup()
    r.resume()
    while not r.finished:
      r.step()
    r.finish()
  except Exception as e:  # pylint: disable=broad-except
    raised = e
  finally:
    params = (np.concatenate([np.asarray(sharding.to_host(x)).ravel()
                              for x in jax.tree.leaves(r.trainer.params)])
              if getattr(r, "trainer", None) else None)
    r.close()
  return {"params": params, "raised": raised, "sampler": r.sampler, **_logs(workdir)}


def _logs(workdir) -> dict:
  m, rec = (workdir / "metrics.jsonl", workdir / "rollouts.jsonl")
  return {"metrics": metrics.read_jsonl(str(m)) if m.exists() else [],
          "rollouts": metrics.read_jsonl(str(rec)) if rec.exists() else []}


def _no_version(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k != "policy_version"} for r in records]


def _assert_every_step_once(res: dict, steps: int = STEPS) -> None:
  assert [r["step"] for r in res["metrics"]] == list(range(1, steps + 1))
  assert [r["step"] for r in res["rollouts"]] == [s for s in range(1, steps + 1)
                                                 for _ in range(RECORDS)]


@pytest.fixture(scope="module")
def k1_run(tmp_path_factory):
  """The undisturbed K = 1 run every other run is compared with."""
  res = _run(tmp_path_factory.mktemp("k1") / "w", 1)
  assert res["raised"] is None, res["raised"]
  return res


# ----------------------------------------------------------------------------- config
def test_max_staleness_check_and_tis_default(tmp_path):
  """K is 0 or 1 (the one engine samples at most one batch ahead); the tis_cap that K = 1
  turns on is resolved when the config is built, so the run records the value that ran."""
  for bad in (-1, 2):
    base = load_preset("tiny_cpu")
    base.rollout.max_staleness = bad
    with pytest.raises(ConfigError, match=rf"rollout\.max_staleness={bad}: must be 0 .* or 1 "
                       r".*one engine"):
      RunConfig.from_tree(base)
  sync = _cfg("/tmp/unused", 0)
  assert sync.grpo.tis_cap == 0 and sync.trainer_cfg().grpo.tis_cap == 0
  on = _cfg("/tmp/unused", 1)
  assert on.grpo.tis_cap == ASYNC_TIS_CAP == 2.0 and on.trainer_cfg().grpo.tis_cap == 2.0
  assert json.loads(on.to_json())["grpo"]["tis_cap"] == 2.0
  assert RunConfig.from_tree(json.loads(on.to_json())) == on  # config.json builds the same run
  own = _cfg("/tmp/unused", 1, grpo__tis_cap=5.0)  # a cap the config sets is kept
  assert own.trainer_cfg().grpo.tis_cap == 5.0


def test_scripted_sampler_is_exactly_a_sampler():
  """The test double implements the `Sampler` protocol and no engine handle: a run that
  reached past the protocol (`sampler.llm`, as it once did) would fail with it."""
  from pasr_jax.rollout import Sampler
  s = ScriptedSampler(tokenizer=None)
  assert isinstance(s, Sampler) and not hasattr(s, "llm")
  assert s.needs_sync is False and s.should_stop() is False


# ----------------------------------------------------------------------------- runs
def test_k1_trains_on_the_k0_batches_one_version_behind(tmp_path, k1_run):
  """Same questions, seeds and updates as K = 0 (bitwise equal params); batch 1 sampled by
  version 0 (staleness 0), every later batch one version behind the trainer."""
  k0 = _run(tmp_path / "k0", 0, grpo__tis_cap=ASYNC_TIS_CAP)
  assert k0["raised"] is None, k0["raised"]
  for res in (k0, k1_run):
    _assert_every_step_once(res)
  assert np.array_equal(k0["params"], k1_run["params"])
  assert _no_version(k0["rollouts"]) == _no_version(k1_run["rollouts"])
  assert [r["staleness/max"] for r in k0["metrics"]] == [0.0] * STEPS
  assert [r["staleness/mean"] for r in k1_run["metrics"]] == [0.0, 1.0, 1.0, 1.0]
  assert [r["staleness/max"] for r in k1_run["metrics"]] == [0.0, 1.0, 1.0, 1.0]
  assert [(r["staleness/frac_0"], r["staleness/frac_1"]) for r in k1_run["metrics"]] == \
      [(1.0, 0.0)] + [(0.0, 1.0)] * (STEPS - 1)
  assert [r["policy_version"] for r in k1_run["rollouts"][::RECORDS]] == [0, 0, 1, 2]
  assert [r["policy_version"] for r in k1_run["metrics"]] == [1.0, 2.0, 3.0, 4.0]
  # TIS is on (the K = 1 default): its metrics are logged; the run really trained.
  for r in k1_run["metrics"]:
    assert r["train/tis_ratio_max"] > 0 and 0 < r["train/tis_weight_mean"] <= ASYNC_TIS_CAP
    assert 0 < r["train/tis_ess"] <= 1 and r["train/behaviour_kl"] >= 0
    assert r["train/is_masked_frac"] == 0 and 0 <= r["train/tis_clip_frac"] <= 1
    assert r["train/grad_norm"] > 0
  # The engine got versions 1 .. STEPS-2 (batch j+1 samples version j-1; the last batch is
  # sampled at step STEPS-1), each once and in order, the same weights K = 0 synced.
  assert len(k0["sampler"].weight_sums) == STEPS
  assert k1_run["sampler"].weight_sums == k0["sampler"].weight_sums[:STEPS - 2]


class _Failing:
  """Raises `exc` (EngineError) from the sampler's `method` (generate or load) on the calls
  in `bad` (indices from 0)."""

  def __init__(self, bad, exc=EngineError, method="generate"):
    self.bad, self.exc, self.method = set(bad), exc, method

  def __call__(self, s):
    inner, count = getattr(s, self.method), [0]

    def failing(*a, **kw):
      i, count[0] = count[0], count[0] + 1
      if i in self.bad:
        time.sleep(0.2)
        raise self.exc(f"scripted failure on call {i}")
      return inner(*a, **kw)

    setattr(s, self.method, failing)
    return s


def test_a_background_engine_failure_and_a_failed_background_publish_are_retried(tmp_path,
                                                                                 k1_run):
  """Two faults in one run, at different steps. The background generation of batch 2 fails
  once: the main thread meets it as the synchronous loop does (EngineError) and retries the
  batch with the engine's weights (batches 1-2 are K = 1's, versions included). Then the
  rollout thread's load of version 1 dies with the engine (EngineError): the main thread
  meets it when it waits for batch 3, syncs the trainer's weights to a fresh engine itself
  and samples batch 3 again (a newer version). The run is the same run."""
  res = _run(tmp_path / "w", 1, lambda s: _Failing({0}, method="load")(_Failing({1})(s)))
  assert res["raised"] is None, res["raised"]
  _assert_every_step_once(res)
  assert res["rollouts"][:2 * RECORDS] == k1_run["rollouts"][:2 * RECORDS]
  # Batch 3 came from the main thread's fresh sync: the failed load did happen.
  assert res["rollouts"][2 * RECORDS]["policy_version"] > \
      k1_run["rollouts"][2 * RECORDS]["policy_version"]
  assert _no_version(res["rollouts"]) == _no_version(k1_run["rollouts"])
  assert np.array_equal(res["params"], k1_run["params"])


def test_a_publish_that_fails_ends_the_run_as_a_failed_sync(tmp_path):
  """A load that fails without the engine dying (SyncError: bad weights) is an error, not a
  stale engine: the run ends with the sync's exit code after step 2, whose checkpoint is
  intact."""
  res = _run(tmp_path / "w", 1, _Failing({0}, SyncError, method="load"))
  assert type(res["raised"]) is SyncError, res["raised"]
  assert cli.classify(res["raised"])[0] == 4
  assert [r["step"] for r in res["metrics"]] == [1, 2]
  assert (tmp_path / "w" / "checkpoints" / "2").is_dir()


def test_random_delays_change_nothing_and_the_wait_on_a_stuck_batch_is_bounded(tmp_path,
                                                                             k1_run, caplog):
  """Generation and the engine's weight loads take 0-0.6 s at random (sometimes longer than
  the update, sometimes not), and batch 3's background generation takes 8 s, past
  rollout.timeout_s = 2 (batch 2's would hide behind step 1's compilation). Staleness stays
  in [0, 1], no step is lost or repeated, and the run is the same run. The loads happen in
  the rollout thread: the trainer's path holds only the host copy (`time/sync`), and a load's
  timings reach the next step. The trainer stops waiting on batch 3 after 2 s and takes the
  engine-failure path (EngineError, the batch retried in the main thread; the discarded job's
  load timings with it)."""
  rnd = random.Random(7)
  delays = [rnd.uniform(0.0, 0.6) for _ in range(16)]
  load_delays = [rnd.uniform(0.3, 0.6) for _ in range(16)]
  active, most, stuck = [0], [0], [True]

  def delay(call):  # an ended call is not counted: batch 3's retry is call 2 again
    if call == 2 and stuck[0]:
      stuck[0] = False
      return 8.0
    return delays[call]

  def slow(s):
    s.delay = delay
    s.load_delay = lambda call: load_delays[call]
    inner = s.generate

    def generate(*a, **kw):  # counts the calls in flight at once
      active[0] += 1
      most[0] = max(most[0], active[0])
      try:
        return inner(*a, **kw)
      finally:
        active[0] -= 1

    s.generate = generate
    return s

  with caplog.at_level("WARNING", logger="pasr_jax.run"):
    res = _run(tmp_path / "w", 1, slow, rollout__timeout_s=2.0)
  assert res["raised"] is None, res["raised"]
  assert most[0] == 1  # the late background call was ended before the retry began
  assert "step 3: the background rollout gave no batch within 2 s" in caplog.text, \
      caplog.text
  assert "retrying the step (1 of 1)" in caplog.text
  _assert_every_step_once(res)
  assert all(0 <= r["staleness/max"] <= 1 for r in res["metrics"])
  # Versions 1 and 2 are loaded during steps 2 and 3; version 2's reaches step 4, version 1's
  # went with batch 3's discarded job.
  assert [("sync/total_s" in r) for r in res["metrics"]] == [False, False, False, True]
  assert all(r["time/sync"] < 0.3 for r in res["metrics"]), [r["time/sync"] for r in
                                                              res["metrics"]]
  assert res["rollouts"] == k1_run["rollouts"]  # versions included: admission is not timing
  assert np.array_equal(res["params"], k1_run["params"])


@pytest.mark.parametrize("exc,code,needle", [(EngineError, 4, "gave up after 1 restarts"),
                                             (JudgeError, 3, "scripted failure on call 1")],
                         ids=["engine", "judge"])
def test_a_failure_that_persists_ends_the_async_loop_as_the_sync_one(tmp_path, exc, code,
                                                                     needle):
  """Every generate after the first fails (an engine that stays dead, or a judge error in
  the rollout): with K = 1, where it fails in the background thread, the run ends with the
  synchronous loop's error and exit code (its cases: tests/test_faults.py) after step 1,
  whose checkpoint is intact."""
  res = _run(tmp_path / "w", 1, _Failing(range(1, 99), exc))
  assert type(res["raised"]) is exc and needle in str(res["raised"]), res["raised"]
  assert cli.classify(res["raised"])[0] == code
  assert [r["step"] for r in res["metrics"]] == [1]
  assert (tmp_path / "w" / "checkpoints" / "1").is_dir()


def _flat_params(step_dir) -> np.ndarray:
  from helpers import read_state
  state = read_state(step_dir)
  return np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state["params"])])


# Slow (a subprocess run killed, then resumed in this process). SIGTERM only: it discards a batch in
# flight and resumes from the checkpointed cursor of the trained steps, the path a SIGKILL
# after a save takes too (parametrize with "SIGKILL" to run that case).
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", ["SIGTERM"])
def test_killed_or_stopped_mid_run_then_resumed_matches_the_uninterrupted_run(tmp_path, k1_run,
                                                                              sig, capsys):
  """The scripted train command (K = 1, generation slowed so a batch is in flight) gets
  SIGKILL once step 2 is checkpointed, or SIGTERM once step 2 is logged (generation takes
  longer than an update, so the trainer is then waiting on batch 3: that batch is discarded,
  exit 130); the same command resumes. Final params
  equal the uninterrupted run's; the batch that was in flight is sampled again (once: no gap,
  no duplicate); only its policy version differs: the resumed run samples it from the
  restored policy (staleness 0), where the uninterrupted run sampled it one version behind."""
  w = tmp_path / "w"
  args = ("--config.rewards.accuracy_rule=contains", "--config.rollout.max_staleness=1",
          f"--config.train.steps={STEPS}", f"--config.data.files=('{DATA / 'say_seven.jsonl'}',)",
          "--config.logging.tensorboard=False")
  os.environ["PASR_SCRIPTED_GENERATE_S"] = "1.0" if sig == "SIGKILL" else "5.0"
  try:
    with open(tmp_path / "a.log", "w") as log:
      p = start_train(w, "http://127.0.0.1:9", *args, log=log, scripted=True)
      deadline = time.time() + 420
      done = (lambda: (w / "checkpoints" / "2").is_dir()) if sig == "SIGKILL" else \
          (lambda: len(_logs(w)["metrics"]) >= 2)
      while not done():
        assert p.poll() is None and time.time() < deadline, (tmp_path / "a.log").read_text()[-3000:]
        time.sleep(0.05)
      if sig == "SIGKILL":
        os.killpg(p.pid, signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
      else:
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(60) == 130, (tmp_path / "a.log").read_text()[-3000:]
        stopped = len(_logs(w)["metrics"])
        # Almost always "interrupted during step 3" (the wait on batch 3 ended by the signal);
        # under heavy load the signal may land in step 3's update instead: saved after it.
        assert ("interrupted during step 3" in (tmp_path / "a.log").read_text()
                or stopped == 3), (tmp_path / "a.log").read_text()[-3000:]
  finally:
    del os.environ["PASR_SCRIPTED_GENERATE_S"]
  assert_group_gone(p.pid)
  # The same run resumed in this process (what resumes is the workdir, not the process).
  capsys.readouterr()
  resumed_run = _run(w, 1, _generation_takes(0.5))
  assert resumed_run["raised"] is None, resumed_run["raised"]
  out = capsys.readouterr().out
  resumed = int(out.split("resumed from step ", 1)[1].split()[0])
  assert (2 <= resumed < STEPS) if sig == "SIGKILL" else resumed == stopped, out[-3000:]
  res = _logs(w)
  _assert_every_step_once(res)
  assert _no_version(res["rollouts"]) == _no_version(k1_run["rollouts"])
  want = [r["policy_version"] for r in k1_run["rollouts"]]
  want[resumed * RECORDS:(resumed + 1) * RECORDS] = [resumed] * RECORDS
  assert [r["policy_version"] for r in res["rollouts"]] == want
  assert [r["staleness/max"] for r in res["metrics"]] == \
      [0.0 if s in (1, resumed + 1) else 1.0 for s in range(1, STEPS + 1)]
  assert np.array_equal(_flat_params(w / "checkpoints" / str(STEPS)), k1_run["params"])
  meta = json.loads((w / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
  assert meta["cursor"] == {"epoch": 0, "index": 2 * STEPS}


def _generation_takes(seconds: float):
  def hook(s):
    s.delay = lambda call: seconds
    return s
  return hook


def test_rollout_ahead_bounds_the_wait_ends_the_job_and_drops_it():
  """`Ahead.wait` gives up after timeout_s with an EngineError, having first ended the
  job (`aborting` is what the sampler's should_stop reads); `drop` ends a job and swallows its
  error; one job at a time."""
  from pasr_jax.rollout.source import Ahead
  ahead = Ahead(timeout_s=0.3)
  ended = []

  def generation():  # ends only when asked to, as the vLLM sampler's wait does
    while not ahead.aborting:
      time.sleep(0.01)
    ended.append(time.monotonic())
    raise EngineError("stopped")

  try:
    ahead.submit("batch 3", generation)
    with pytest.raises(AssertionError, match="already sampled ahead"):
      ahead.submit("batch 4", generation)
    key, future = ahead.take()
    assert key == "batch 3" and ahead.take() is None
    t = time.monotonic()
    with pytest.raises(EngineError, match=r"no batch within 0.3 s"):
      ahead.wait(future)
    assert len(ended) == 1 and 0.3 <= ended[0] - t < 5 and not ahead.aborting
    ahead.submit("batch 4", generation)
    ahead.drop()
    assert len(ended) == 2 and ahead.take() is None and not ahead.aborting
    ahead.submit("batch 5", lambda: "sampled")
    assert ahead.wait(ahead.take()[1]) == "sampled"
  finally:
    ahead.close()
