"""PASR GRPO training: `python -m pasr_jax.train --config=configs/<preset>.py --config.x=y`.

The command only: flags, `main`, exit codes. The run itself (per-step pipeline, resume,
checkpoints) is `pasr_jax.run`; the files it writes are named by `pasr_jax.workdir.Workdir`.

Every failure a user can cause or meet ends in one line on stderr, `pasr_jax.train: <what
failed>: <message>`, with what to do, and one exit code per class (`--debug` re-raises it
with its traceback):

  0    done
  2    config, data or prompts (the message names the --config. key, file, row or field)
  3    judge: unreachable, erroring past its retries, or not answering with scores
  4    rollout engine: died or timed out past rollout.engine_retries, or a weight sync failed
  5    checkpoint or disk: nothing restorable, a save refused or failed, disk full
  6    training diverged: train.max_nonfinite_steps steps of NaN/inf updates
  130  interrupted by SIGTERM / Ctrl-C; the steps done are saved, the same command resumes
  1    anything else is a bug: the traceback is printed
"""

from __future__ import annotations

import errno
import logging
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from pasr_jax.run import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config preset file (configs/*.py).",
                                          lock_config=True)
_DEBUG = flags.DEFINE_bool("debug", False, "Re-raise errors with their traceback.")

EXIT_CONFIG, EXIT_JUDGE, EXIT_ENGINE, EXIT_DISK, EXIT_DIVERGED, EXIT_INTERRUPTED = (
    2, 3, 4, 5, 6, 130)


def classify(e: BaseException) -> tuple[int, str] | None:
  """(exit code, what failed) for an error a user can cause or meet; None for a bug."""
  # pylint: disable=import-outside-toplevel
  from pasr_jax.checkpoint import CheckpointError
  from pasr_jax.judge.client import JudgeError
  from pasr_jax.rollout.base import EngineError, SyncError
  from pasr_jax.run import RunInterrupted, TrainingDiverged
  if isinstance(e, RunInterrupted):
    return EXIT_INTERRUPTED, "interrupted"
  if isinstance(e, JudgeError):
    return EXIT_JUDGE, "judge"
  if isinstance(e, (EngineError, SyncError)):
    return EXIT_ENGINE, "rollout engine"
  if isinstance(e, CheckpointError):
    return EXIT_DISK, "checkpoint"
  if isinstance(e, OSError) and e.errno is not None:  # disk full, permissions, ...
    return EXIT_DISK, "disk" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "file system"
  if isinstance(e, TrainingDiverged):
    return EXIT_DIVERGED, "training diverged"
  if isinstance(e, ValueError) and type(e).__module__.startswith("pasr_jax"):
    return EXIT_CONFIG, type(e).__name__  # ConfigError, DataError, PromptError, ...
  return None


# ----------------------------------------------------------------------------- CLI
def _explain_override_error(argv: list[str], err: Exception) -> str:
  """Name the first `--config.a.b=v` whose key the base tree does not have."""
  from configs.base import get_base_config  # pylint: disable=import-outside-toplevel
  base = get_base_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--config."):].split("=", 1)[0]
    node = base
    for i, part in enumerate(dotted.split(".")):
      if not hasattr(node, "keys") or part not in node:
        parent = ".".join(dotted.split(".")[:i]) or "(top level)"
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"unknown config key {dotted!r} in {arg!r}; keys under {parent}: "
                f"{', '.join(known)}")
      node = node[part]
  return f"bad flags: {err}"


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl/ml_collections raise several types for bad overrides
    print(f"pasr_jax.train: {_explain_override_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def config_main(prog: str, fn) -> int:
  """The CLI body of `python -m pasr_jax.train` / `pasr_jax.sft`: logging, the --config preset,
  `fn(cfg)`; known failures print one line and return their exit code (see the module doc)."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it renames
  cfg = _CONFIG.value
  if cfg is None:
    print(f"{prog}: --config=configs/<preset>.py is required", file=sys.stderr)
    return 2
  try:
    fn(cfg)
  except KeyboardInterrupt:  # a second Ctrl-C: no save
    print(f"{prog}: interrupted: stopped at once by a second Ctrl-C; the last "
          "checkpoint is what a rerun resumes from", file=sys.stderr)
    return EXIT_INTERRUPTED
  except Exception as e:  # pylint: disable=broad-except
    known = classify(e)
    if known is None or _DEBUG.value:
      raise
    code, what = known
    print(f"{prog}: {what}: {' '.join(str(e).split())}", file=sys.stderr)
    return code
  return 0


def checked_run(cfg) -> Any:
  """`pasr_jax.preflight`'s checks of this machine (PreflightError: exit 2, one fix per failed
  check), then the run: a config the cluster cannot run fails before any weight loads."""
  from pasr_jax import preflight  # pylint: disable=import-outside-toplevel
  preflight.require(cfg)
  return run(cfg)


def main(argv: list[str]) -> int:
  del argv
  return config_main("pasr_jax.train", checked_run)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
