"""The GRPO update compiled by XLA:GPU for H100s that are not there (pasr_jax.plan --platform=cuda).

Runs in the separate venv `make xla-gpu` builds (.venv-xla-gpu, with the CUDA PJRT plugin); the
main venv never gets the plugin. The tiny preset in bf16 must compile to a program whose
attention is cuDNN flash attention, forward and backward. Each XLA:GPU compile takes about a
minute on this machine's CPUs: those tests are in the slow tier.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_command

ROOT = Path(__file__).resolve().parents[1]
XLA_GPU_PY = ROOT / ".venv-xla-gpu" / "bin" / "python"


def _plan(py, *args, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([str(py), "-m", "pasr_jax.plan", "--config=configs/tiny_cpu.py", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(not XLA_GPU_PY.exists(),
                    reason=".venv-xla-gpu is absent: `make xla-gpu` builds it (`make test` does)")
def test_tiny_update_compiles_for_h100_with_cudnn_attention():
  p = _plan(XLA_GPU_PY, "--config.model.dtype=bfloat16", "--mesh=1,8,1", "--platform=cuda",
            "--gpu=h100", "--seq_len=256")
  assert p.returncode == 0, p.stderr[-3000:]
  out = p.stdout
  assert "XLA:GPU for NVIDIA H100 80GB HBM3 (deviceless)" in out, out
  assert "attention=cudnn" in out, out
  fwd, bwd = map(int, re.search(r"cuDNN attn\s+(\d+) forward, (\d+) backward", out).groups())
  # Policy forward (kept for backward) and reference forward; one backward per policy call.
  assert fwd >= 2 and bwd >= 1, out
  assert "lower bound" in out, out
  # JAX's share with vLLM colocated at the base config's 0.3: 0.9 - 0.3, of the H100's 79.1 GiB.
  assert re.search(r"fits\s+yes: JAX's share 0.60 x 79.1 GiB", out), out


@pytest.mark.slow
@pytest.mark.skipif(not XLA_GPU_PY.exists(),
                    reason=".venv-xla-gpu is absent: `make xla-gpu` builds it (`make test` does)")
def test_xla_attention_compiles_without_cudnn_calls():
  p = _plan(XLA_GPU_PY, "--config.model.dtype=bfloat16", "--config.model.attention=xla",
            "--mesh=1,2,1", "--platform=cuda", "--gpu=a100-80g", "--seq_len=128",
            "--batch=8")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "cuDNN attn    0 forward, 0 backward" in p.stdout, p.stdout
  assert "NVIDIA A100-SXM4-80GB" in p.stdout


def test_cuda_plan_without_the_plugin_says_what_to_do():
  """The main venv has no CUDA plugin: a clear message, not a traceback. (A process of its
  own: the plugin check runs before JAX is first imported.)"""
  p = _plan(sys.executable, "--mesh=1,2,1", "--platform=cuda", "--gpu=h100", timeout=120)
  assert p.returncode == 2, (p.stdout, p.stderr[-2000:])
  assert "make xla-gpu" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_unknown_gpu_is_named():
  p = run_command("pasr_jax.plan", "--config=configs/tiny_cpu.py", "--mesh=1,2,1",
                  "--platform=cuda", "--gpu=h800")
  assert p.returncode == 2 and "--gpu='h800'" in p.stderr and "h100" in p.stderr, p.stderr
