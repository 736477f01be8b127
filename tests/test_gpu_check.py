"""`python -m pasr_jax.gpu_check --tiny` on CPU: the same code the GPU run takes, at tiny sizes.

The GPU-only row (cuDNN vs XLA attention) cannot run here and must say why; everything else
(the jitted GRPO update through Trainer, the plan's prediction, an Orbax save and restore)
runs for real. The bare GPU machine has no vLLM, so the import chain is checked too.
"""

import os
import subprocess
import sys

from pasr_jax import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the bare GPU image lacks (vLLM) or what the check must not need (the judge's stack).
FORBIDDEN = ("vllm", "torch", "transformers", "httpx", "fastapi", "uvicorn", "math_verify",
             "tensorflow_datasets", "wandb", "pasr_jax.judge", "pasr_jax.rollout")

_SCRIPT = f"""
import sys
from pasr_jax import gpu_check
rc = gpu_check.main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}
                or any(m == f or m.startswith(f + '.') for f in {FORBIDDEN!r}))
print('FORBIDDEN_LOADED', loaded)
sys.exit(rc)
"""


def test_tiny_run_on_cpu_prints_and_writes_the_table(tmp_path):
  out = tmp_path / "table.md"
  # XLA's backend optimizations off: what is checked is the rows, not the tiny update's speed,
  # and the process's time is mostly the update's two compiles (Trainer's and the plan's).
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
                      "--xla_backend_optimization_level=0"}
  p = subprocess.run([sys.executable, "-c", _SCRIPT, "--tiny", f"--out={out}", "--repeats=2"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "FORBIDDEN_LOADED []" in p.stdout, p.stdout[-2000:]
  text = out.read_text()
  lines = [line for line in text.splitlines() if line.startswith("| ")]
  rows = {line.split(" | ")[0][2:]: line for line in lines[1:]}
  assert set(rows) == {"device", "grpo update tiny", "orbax save / restore",
                       "attention cudnn vs xla"}, text
  update = rows["grpo update tiny"].split(" | ")
  # step s, tokens/s: measured numbers; peak "n/a (plan GiB)": CPU has no allocator stats,
  # the plan's prediction is a number.
  assert float(update[3]) > 0 and float(update[4].replace(",", "")) > 0, update
  assert update[6].startswith("n/a (") and float(update[6][5:-1]) > 0, update
  assert update[7].startswith("ok"), update
  assert "equal, checksums ok" in rows["orbax save / restore"]
  assert "skipped: cuDNN attention needs an NVIDIA GPU (backend: cpu)" in rows[
      "attention cudnn vs xla"]
  assert text.strip() in p.stdout


def test_flops_per_token_counts_the_passes_and_the_tied_head():
  m = gpu_check.ModelConfig.from_hf_dict(gpu_check.TINY)
  n = gpu_check.count_params(m)
  embed = m.vocab_size * m.hidden_size
  attn = m.num_layers * 2 * 2 * (128 / 2) * m.num_heads * m.head_dim
  # Tied: the LM head is the embedding matmul, so every parameter is a matmul weight.
  assert gpu_check.train_flops_per_token(m, 128, beta=True, remat=True) == 5 * (2 * n + attn)
  assert gpu_check.train_flops_per_token(m, 128, beta=False, remat=False) == 3 * (2 * n + attn)
  untied = gpu_check.ModelConfig.from_hf_dict(dict(gpu_check.TINY, tie_word_embeddings=False))
  n_untied = gpu_check.count_params(untied)
  assert n_untied == n + embed
  assert gpu_check.train_flops_per_token(untied, 128, False, False) == 3 * (2 * n + attn)


def test_real_shapes_match_the_public_configs():
  """The sizes the GPU run reports: 0.49 B, 1.54 B, and Qwen3-8B whole at 8.19 B."""
  sizes = {name: gpu_check.count_params(gpu_check.ModelConfig.from_hf_dict(hf)) / 1e9
           for name, hf in gpu_check.MODELS.items()}
  assert round(sizes["qwen2.5-0.5b"], 2) == 0.49
  assert round(sizes["qwen2.5-1.5b"], 2) == 1.54
  assert round(sizes["qwen3-8b"], 2) == 8.19
