"""PASR GRPO training: `python -m pasr_jax.train --config=configs/<preset>.py --config.x=y`.

The command only; its flags and exit codes are `pasr_jax.cli`'s. It runs `pasr_jax.preflight`'s
checks of this machine first (a config the cluster cannot run fails before any weight loads,
exit 2 with one fix per failed check), then the run itself (`pasr_jax.run`: per-step pipeline,
resume, checkpoints; the files it writes are named by `pasr_jax.workdir.Workdir`).
"""

from typing import Any

from pasr_jax import cli, preflight
from pasr_jax.config import RunConfig
from pasr_jax.run import run


def checked_run(cfg: RunConfig) -> Any:
  """The preflight (`preflight.require`), then the run."""
  preflight.require(cfg)
  return run(cfg)


if __name__ == "__main__":
  cli.main("pasr_jax.train", checked_run)
