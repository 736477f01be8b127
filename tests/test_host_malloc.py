"""pasr_jax keeps freed host memory: repeated XLA:CPU steps stop page-faulting (host_malloc)."""

import os
import subprocess
import sys

import pytest

# A jitted step with 64 MiB temporaries, run 3 times after warm-up; prints the minor page
# faults of those 3 runs. Each run in its own process: the settings are process-wide.
_SCRIPT = """
import resource
from pasr_jax import host_malloc
host_malloc.keep_freed_memory()  # as pasr_jax.cli.main does, before JAX starts its threads
import jax, jax.numpy as jnp
y = jnp.ones((4096, 4096), jnp.float32) * 1e-3
step = jax.jit(lambda y: (jnp.exp(y) @ y).sum())
step(y).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  step(y).block_until_ready()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, host_malloc.keep_freed_memory())
"""


def _faults(mode: str | None) -> tuple[int, bool]:
  env = {k: v for k, v in os.environ.items() if k != "PASR_JAX_HOST_MALLOC"}
  env["XLA_FLAGS"] = ""  # one device: the forced 8 would split the threads
  if mode:
    env["PASR_JAX_HOST_MALLOC"] = mode
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                       text=True, timeout=300, check=True).stdout.split()
  return int(out[0]), out[1] == "True"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
@pytest.mark.slow
def test_steps_reuse_freed_memory_and_opt_out_restores_glibc_default():
  tuned, applied = _faults(None)
  default, applied_default = _faults("system")
  assert applied and not applied_default
  # One 64 MiB buffer is 16k pages; glibc's default maps and faults in every temporary of
  # every run again (measured here: ~3M faults), the tuned process reuses its heap.
  assert default > 3 * 16_384, default
  assert tuned < 1_000, tuned
