"""Device setup before JAX starts (pasr_jax.devices) and the launch scripts that feed it.

Each case of a setting runs in a fresh process: the settings only count if they are in place
before JAX's backends come up, which an in-process test (JAX already up) cannot show. The train
command's refusal of a bad config, before any setting is made, runs in the test process.
"""

import json
import os
import subprocess
import sys

import pytest

from configs.base import get_base_config
from helpers import ROOT, env, run_command
from pasr_jax import devices
from procs import free_port


def _env(**extra):
  e = env(**extra)
  e.pop(devices.FRACTION_ENV, None)
  return e


def _last_json(text: str) -> dict:
  return json.loads([l for l in text.splitlines() if l.startswith("{")][-1])


def test_memory_fraction_follows_vllm_share():
  c = get_base_config()
  c.rollout.vllm.gpu_memory_utilization = 0.3
  assert devices.memory_fraction(c) == 0.6          # colocated: 0.9 - 0.3
  c.rollout.vllm.colocate = False
  assert devices.memory_fraction(c) == 0.9          # vLLM on its own GPUs
  c.mesh.memory_fraction = 0.45
  assert devices.memory_fraction(c) == 0.45         # set explicitly
  c.mesh.memory_fraction = 0.0
  c.rollout.vllm.colocate = True
  c.rollout.vllm.gpu_memory_utilization = 0.9
  with pytest.raises(devices.DeviceSetupError, match="mesh.memory_fraction"):
    devices.memory_fraction(c)


_PROBE = """
import json, os, sys
from jax._src import xla_bridge
from configs.base import get_base_config
from pasr_jax import devices
c = get_base_config()
c.rollout.vllm.gpu_memory_utilization = 0.35
c.mesh.cuda_visible_devices = "2,3"
if sys.argv[1] == "late":
  import jax
  jax.devices()  # JAX is up: setup must refuse
try:
  devices.setup(c)
except devices.DeviceSetupError as e:
  print(json.dumps({"error": str(e)})); sys.exit(0)
seen = {"env_before_backends": os.environ.get(devices.FRACTION_ENV),
        "backends_up": xla_bridge.backends_are_initialized()}
print(json.dumps(dict(seen, **devices.describe())))
"""


def test_setup_sets_fraction_and_visible_devices_before_jax_starts():
  p = subprocess.run([sys.executable, "-c", _PROBE, "early"], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  out = _last_json(p.stdout)
  assert out["env_before_backends"] == "0.55" and out["backends_up"] is False, out
  assert out[devices.FRACTION_ENV] == "0.55"
  assert out["jax_cuda_visible_devices"] == "2,3", out


def test_setup_refuses_once_jax_is_up():
  p = subprocess.run([sys.executable, "-c", _PROBE, "late"], cwd=ROOT, env=_env(),
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "before JAX first touches a device" in _last_json(p.stdout)["error"]


def test_train_applies_device_setup_first(tmp_path):
  """train.run sets the fraction up front; a bad one fails before anything heavy starts."""
  p = run_command("pasr_jax.train", "--config=configs/tiny_cpu.py", f"--config.workdir={tmp_path}",
                  "--config.rollout.vllm.gpu_memory_utilization=0.88")
  assert p.returncode == 2, p.stderr[-2000:]
  assert "mesh.memory_fraction" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


@pytest.mark.slow  # two processes
def test_launch_multihost_args_reach_jax_distributed():
  """Two processes through scripts/launch_multihost.sh: count, id and device ids arrive."""
  port = free_port()
  procs = []
  for i in range(2):
    env = _env(COORDINATOR=f"127.0.0.1:{port}", NUM_PROCESSES="2", PROCESS_ID=str(i),
               LOCAL_DEVICE_IDS=str(i), MODULE="pasr_jax.devices", PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    procs.append(subprocess.Popen(
        ["scripts/launch_multihost.sh", "--config=configs/tiny_cpu.py"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-2000:]
    outs.append(_last_json(out)["jax"])
  for i, o in enumerate(outs):
    assert (o["process_index"], o["process_count"], o["device_count"]) == (i, 2, 2), o
    assert o["jax_cuda_visible_devices"] == str(i), o


def test_launch_gpu_waits_for_judge_and_limits_jax_devices():
  """scripts/launch_gpu.sh with the verify judge: the trainer side starts only once the judge
  answers /v1/models, with JAX limited to the TRAIN_GPUS (indices after the ROLLOUT_GPUS)."""
  env = _env(JUDGE_BACKEND="verify", JUDGE_PORT=str(free_port()), MODULE="pasr_jax.devices",
             PY=sys.executable, ROLLOUT_GPUS="4,5", TRAIN_GPUS="0,1,2,3")
  # mesh.platform=cpu: the GPU preset pins CUDA, which this CPU machine has not.
  p = subprocess.run(["scripts/launch_gpu.sh", "/nowhere/policy", "/nowhere/judge",
                      "--config.mesh.platform=cpu"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "judge up at" in p.stderr
  o = _last_json(p.stdout)
  assert o["jax"]["jax_cuda_visible_devices"] == "2,3,4,5", o
  assert o["jax"][devices.FRACTION_ENV] == "0.9", o  # vLLM has GPUs of its own


def test_host_malloc_tuning_applies_to_cpu_runs_only():
  """The malloc settings help XLA:CPU's per-step buffers; a GPU host keeps glibc's defaults."""
  from pasr_jax import host_malloc  # pylint: disable=import-outside-toplevel
  assert host_malloc.cpu_run({}, nvidia_driver=False)
  assert not host_malloc.cpu_run({}, nvidia_driver=True)
  assert host_malloc.cpu_run({"JAX_PLATFORMS": "cpu"}, nvidia_driver=True)
  assert not host_malloc.cpu_run({"JAX_PLATFORMS": "cuda"}, nvidia_driver=False)
  assert not host_malloc.cpu_run({"JAX_PLATFORMS": "cuda,cpu"}, nvidia_driver=True)
  # This host has no NVIDIA driver: the settings go in (glibc).
  assert not any(os.path.exists(p) for p in host_malloc.NVIDIA_PATHS)
  assert host_malloc.keep_freed_memory()
