"""PASR GRPO training: `python -m pasr_jax.train --config=configs/<preset>.py --config.x=y`.

The command only; its flags and exit codes are `pasr_jax.cli`'s. The run itself (per-step
pipeline, resume, checkpoints) is `pasr_jax.run`; the files it writes are named by
`pasr_jax.workdir.Workdir`.
"""

from pasr_jax import cli
from pasr_jax.run import run

if __name__ == "__main__":
  cli.main("pasr_jax.train", run)
