"""Faults survived (issue #16): real processes, real engines, real servers on 127.0.0.1.

Each case causes the fault for real (SIGKILL of a real process, a server that really answers
500 or prose, a really full filesystem) and asserts what the run did and that nothing was
lost. Faults of the engine run on a real vLLM engine (`slow`); the run-level faults that do
not involve it (config, judge, NaN, disk) run the real train command in this process with
`ScriptedSampler` (`_scripted_run`): the same code paths, minutes faster.
"""

import os
import signal
import subprocess
import threading
import time

import psutil
import pytest

from helpers import (DATA, ScriptedSampler, assert_group_gone, read_state, start_train,
                     train_error_lines, train_in_process)
from pasr_jax import metrics
from pasr_jax.rollout import EngineError, VllmSampler
from procs import free_port, start_judge, stop


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  from pasr_jax.tiny import make_tiny_model_dir
  return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


@pytest.fixture(scope="module")
def tiny_sampler(tiny_dir):
  """A vLLM engine of its own on the tiny model: these tests kill it."""
  with VllmSampler(tiny_dir, max_model_len=512, kv_cache_space_gib=0.25, seed=0) as s:
    yield s


def _engine_core_pids(sampler) -> list[int]:
  sampler.start()
  return [p.pid for p in sampler.engine._internals.processes]


def _prompts(sampler, k=4):
  tok = sampler.tokenizer
  return [tok.encode(f"question {i}: what is {i}+{i}?") for i in range(k)]


@pytest.mark.engine
def test_engine_core_killed_mid_generation_raises_and_restarts(tiny_sampler):
  """SIGKILL of the engine core during a rollout: an EngineError within seconds (vLLM alone
  waits forever), the engine closed, and the next call runs on a fresh engine."""
  prompts = _prompts(tiny_sampler)
  tiny_sampler.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=4, seed=0)
  pids = _engine_core_pids(tiny_sampler)
  killed_at = []

  def kill_soon():
    time.sleep(2.0)
    killed_at.append(time.monotonic())
    for pid in pids:
      os.kill(pid, signal.SIGKILL)

  threading.Thread(target=kill_soon, daemon=True).start()
  with pytest.raises(EngineError, match="engine died"):
    # ignore_eos is not exposed: max_tokens large and many answers keep it busy past 2 s
    tiny_sampler.generate(prompts * 16, n=8, temperature=1.0, top_p=1.0, max_tokens=400,
                          seed=1)
  assert killed_at and time.monotonic() - killed_at[0] < 15.0
  assert not tiny_sampler.engine.running  # closed; no process of the old engine is left
  assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                 for p in pids)
  groups = tiny_sampler.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=4,
                                 seed=0)
  assert len(groups) == len(prompts) and all(len(g.completions) == 2 for g in groups)


@pytest.mark.engine
def test_generate_past_its_time_limit_raises(tiny_sampler):
  prompts = _prompts(tiny_sampler)
  tiny_sampler.start()  # engine start is not part of the limit
  tiny_sampler.engine.timeout_s = 0.5
  try:
    t = time.monotonic()
    with pytest.raises(EngineError, match=r"no answer within 0.5 s \(cfg.rollout.timeout_s\)"):
      tiny_sampler.generate(prompts * 16, n=8, temperature=1.0, top_p=1.0, max_tokens=400,
                            seed=2)
    assert time.monotonic() - t < 10.0
  finally:
    tiny_sampler.engine.timeout_s = 0.0


@pytest.mark.engine
def test_stop_request_ends_the_wait(tiny_sampler):
  prompts = _prompts(tiny_sampler)
  tiny_sampler.start()
  t0 = time.monotonic()
  tiny_sampler.should_stop = lambda: time.monotonic() - t0 > 1.0
  try:
    with pytest.raises(EngineError, match="interrupted"):
      tiny_sampler.generate(prompts * 16, n=8, temperature=1.0, top_p=1.0, max_tokens=400,
                            seed=3)
  finally:
    tiny_sampler.should_stop = lambda: False


@pytest.mark.engine
def test_close_ends_the_engine_without_waiting_for_its_interpreters(tiny_sampler):
  """close() ends the engine core and its worker once they have shut down, not after their
  interpreters' exit (seconds each: vLLM alone then force-kills the core after 5 s)."""
  from pasr_jax.rollout import engine, vllm_internals
  tiny_sampler.start()
  internals = tiny_sampler.engine._internals
  procs = internals._tree()
  assert len(procs) >= 2 and internals.model_pids <= {p.pid for p in procs}
  t = time.monotonic()
  tiny_sampler.close()
  took = time.monotonic() - t
  print(f"close took {took:.2f} s")
  assert all(vllm_internals._gone(p) for p in procs)
  assert took < engine.CLOSE_GRACE_S, took


# ----------------------------------------------------------------------------- whole runs
# `python -m pasr_jax.train` (tiny_cpu preset) in its own process group, or the same command
# with ScriptedSampler (`scripted=True`), or that command in this process (`_scripted_run`).


def _scripted_run(workdir, judge_url: str, *overrides: str):
  """`tests/scripted_train.py`'s command run in this process (`helpers.train_in_process`):
  the whole command (flags, preflight, the run, its one-line errors and exit codes) with
  ScriptedSampler, for faults that need no fresh process. JAX is up in this process already:
  the device settings have nothing to do."""
  from unittest import mock

  from pasr_jax import devices
  from pasr_jax.run import Run
  built = Run.setup

  def setup(self):
    built(self)
    # Runs with the same trainer config (a run and its resume) share the jitted functions:
    # each program is traced and compiled once in this module.
    self.trainer._fns = _COMPILED.setdefault(repr(self.cfg.trainer_cfg()), {})

  with mock.patch.object(Run, "make_sampler",
                         lambda self: ScriptedSampler.for_model_dir(self.model_dir)), \
      mock.patch.object(Run, "setup", setup), mock.patch.object(devices, "setup", lambda cfg: {}):
    return train_in_process(workdir, judge_url, *overrides)


# The jitted update and logprob functions by trainer config, shared by `_scripted_run`s.
_COMPILED: dict[str, dict] = {}


# Faults of a whole real-engine run ride on test_train.py's runs (each run starts an engine):
# the engine core SIGKILLed between steps 1 and 2 in the learning run, the judge down for ~8 s
# and back on its port in the end-to-end test's run a.


class _BadJudge:
  """An OpenAI-compatible server on 127.0.0.1 whose chat replies are `behaviour`: "prose"
  (never a number), "http500", "empty" (200 with an empty body) or "slow" (past the
  client's timeout). /v1/models answers normally."""

  def __init__(self, behaviour: str):
    import asyncio

    import fastapi
    import uvicorn

    app = fastapi.FastAPI()
    self.chat_calls = 0

    @app.get("/v1/models")
    async def models():
      return {"object": "list", "data": [{"id": "bad", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat():
      self.chat_calls += 1
      if behaviour == "http500":
        return fastapi.responses.PlainTextResponse("boom", status_code=500)
      if behaviour == "empty":
        return fastapi.responses.Response(b"", status_code=200, media_type="application/json")
      if behaviour == "slow":
        await asyncio.sleep(30)
      return {"choices": [{"index": 0, "message": {
          "role": "assistant", "content": "What a thoughtful answer, well done!"}}]}

    self.url = f"http://127.0.0.1:{free_port()}"
    port = int(self.url.rsplit(":", 1)[1])
    # A "slow" reply still pending at the end is cut off, not waited for.
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                log_level="warning", timeout_graceful_shutdown=1))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self):
    self.thread.start()
    while not self.server.started:
      time.sleep(0.05)
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(10)


# behaviour, config overrides, what the one error line must say. The scripted step's 16
# answers are 4 distinct (question, answer) pairs, and the client asks once per pair.
_JUDGE_FAULTS = [
    ("prose", (), ["4 of 4 replies hold no score", "What a thoughtful answer, well done!"]),
    ("http500", ("--config.judge.retries=1", "--config.judge.backoff_s=0.05"),
     ["HTTP 500", "failed after 2"]),
    ("empty", ("--config.judge.retries=0",), ["reply is not a chat completion"]),
    ("slow", ("--config.judge.retries=0", "--config.judge.timeout_s=1"),
     ["no reply within 1 s"]),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("behaviour,overrides,needles", _JUDGE_FAULTS,
                         ids=[f[0] for f in _JUDGE_FAULTS])
@pytest.mark.slow
def test_a_bad_judge_ends_the_run_in_one_line_exit_3(tmp_path, behaviour, overrides, needles):
  """A judge that answers in prose, with 500s, with an empty body or too slowly: the run
  stops in its first step with exit 3 and one line saying what the judge did; no step is
  logged as done and nothing is checkpointed."""
  with _BadJudge(behaviour) as judge:
    p = _scripted_run(tmp_path / "w", judge.url, "--config.train.steps=2", *overrides)
    assert judge.chat_calls > 0
  assert p.returncode == 3, p.stderr[-3000:]
  ours = train_error_lines(p.stderr)
  assert len(ours) == 1 and ours[0].startswith("pasr_jax.train: judge: "), p.stderr[-3000:]
  for needle in needles:
    assert needle in ours[0], ours[0]
  assert "Traceback" not in p.stderr
  metrics_path = tmp_path / "w" / "metrics.jsonl"
  assert not metrics_path.exists() or metrics_path.read_text() == ""
  assert not any((tmp_path / "w" / "checkpoints").glob("[0-9]*"))


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_disk_full_ends_in_one_line_and_the_run_resumes(tmp_path):
  """The workdir's filesystem (a 64 MB tmpfs made here) fills up after step 1: exit 5 with one
  line; once there is room again the same command resumes from step 1's checkpoint."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                     capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f"this machine refuses a tmpfs mount: {r.stderr.strip()}")
  try:
    w = mnt / "w"
    filler = mnt / "filler"
    args = ("--config.train.steps=3", "--config.checkpoint.every=1",
            "--config.checkpoint.async_save=False")
    filled = threading.Event()

    def fill():  # once step 1's checkpoint is complete (renamed into place), every free byte
      deadline = time.monotonic() + 300
      while not (w / "checkpoints" / "1").is_dir():
        if time.monotonic() > deadline:
          return
        time.sleep(0.05)
      with open(filler, "wb") as f:
        try:
          while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
        except OSError:
          pass
      filled.set()

    # Every judge call takes 1 s: the disk is full long before step 2 could end.
    judge, url = start_judge(latency_s=1.0)
    try:
      filling = threading.Thread(target=fill, daemon=True)
      filling.start()
      p = _scripted_run(w, url, *args)
      filling.join(60)
      assert filled.is_set(), "no checkpoint of step 1: " + p.stdout[-3000:] + p.stderr[-3000:]
      assert p.returncode == 5, p.stdout[-3000:] + p.stderr[-3000:]
      ours = train_error_lines(p.stderr)
      assert len(ours) == 1 and "No space left on device" in ours[0], p.stderr[-3000:]
      filler.unlink()
      p = _scripted_run(w, url, *args)
      assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
      assert "resumed from step 1" in p.stdout, p.stdout[-3000:]
    finally:
      stop(judge)
    assert [r["step"] for r in metrics.read_jsonl(str(w / "metrics.jsonl"))] == [1, 2, 3]
    rec = metrics.read_jsonl(str(w / "rollouts.jsonl"))
    assert [r["step"] for r in rec] == [s for s in (1, 2, 3) for _ in range(16)]
  finally:
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("override,needle", [
    # Found by the preflight (pasr_jax.preflight) before any weight loads, with the fix.
    ("--config.mesh.shape=(3,-1,1)", "mesh: mesh.shape=(3, -1, 1) does not divide 8 devices"),
    ("--config.optim.micro_batch=3", "optim.micro_batch=3 is not a multiple of the 8 batch "
     "shards (fix: --config.optim.micro_batch=8)"),
    ("--config.model.tiny_random=False", "model.path='': no HF model dir (config.json) there"),
    ("--config.optim.lr=-0.001", "optim.lr=-0.001: must be > 0"),
])
def test_config_faults_end_in_one_line_exit_2(tmp_path, override, needle):
  p = train_in_process(tmp_path / "w", "http://127.0.0.1:9", override,
                       "--config.rewards.accuracy_rule=contains")
  ours = train_error_lines(p.stderr)
  assert p.returncode == 2 and len(ours) == 1 and needle in ours[0], p.stderr[-3000:]
  assert "Traceback" not in p.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.timeout(600)
@pytest.mark.slow
def test_diverging_run_stops_with_exit_6_and_keeps_finite_checkpoints(tmp_path, judge_url):
  """optim.lr=1e30: the first update blows the weights up, every later loss is NaN and its
  update skipped; after train.max_nonfinite_steps such steps the run ends (it trained on
  forever before), and no checkpoint holds a NaN."""
  from pasr_jax.checkpoint import checksums
  w = tmp_path / "w"
  p = _scripted_run(w, judge_url, "--config.optim.lr=1e30", "--config.train.steps=8",
                    "--config.train.max_nonfinite_steps=2",
                    f"--config.data.files=('{DATA / 'say_seven.jsonl'}',)")
  ours = train_error_lines(p.stderr)
  assert p.returncode == 6 and len(ours) == 1, p.stdout[-2000:] + p.stderr[-3000:]
  assert "training diverged: " in ours[0] and "train.max_nonfinite_steps=2" in ours[0]
  m = metrics.read_jsonl(str(w / "metrics.jsonl"))
  assert len(m) < 8 and m[-1]["train/skipped_steps"] >= 1
  steps = list((w / "checkpoints").iterdir())
  assert steps  # the finite ones before the blow-up
  for step_dir in steps:
    _, bad = checksums(read_state(step_dir))
    assert not bad, (step_dir.name, bad)


@pytest.mark.engine
@pytest.mark.timeout(300)
def test_a_trainer_killed_while_its_engine_starts_leaves_no_engine(tmp_path, judge_url):
  """SIGKILL of the trainer alone (not its group) while its vLLM engine core is still
  starting, where the engine cannot watch the trainer yet: the reaper
  (`pasr_jax.rollout.reaper`) kills the engine's processes, and none of the run is left."""
  w = tmp_path / "w"
  with open(tmp_path / "w.log", "w") as log:
    p = start_train(w, judge_url, "--config.train.steps=1", log=log)
    try:
      trainer = psutil.Process(p.pid)
      deadline = time.monotonic() + 240
      while not any("multiprocessing" in " ".join(c.cmdline()) for c in _kids(trainer)):
        assert p.poll() is None and time.monotonic() < deadline, "no engine process started"
        time.sleep(0.1)
      time.sleep(1.0)  # the reaper notes it (it polls every 0.25 s)
      out = (tmp_path / "w.log").read_text(errors="replace")
      assert "vLLM engine up" not in out, "the engine started before the kill: too late"
      kids = _kids(trainer)
      assert any("rollout/reaper.py" in " ".join(c.cmdline()) for c in kids), kids
      trainer.kill()
      p.wait(30)
      gone, alive = psutil.wait_procs(kids, timeout=30)
      assert not alive, [(c.pid, c.name()) for c in alive]
    finally:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
  assert_group_gone(p.pid)


def _kids(proc: psutil.Process) -> list[psutil.Process]:
  out = []
  for c in proc.children(recursive=True):
    try:
      c.cmdline()
      out.append(c)
    except psutil.Error:
      pass
  return out
