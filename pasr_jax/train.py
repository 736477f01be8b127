"""PASR GRPO training: `python -m pasr_jax.train --config=configs/<preset>.py --config.x=y`.

The command only: flags, `main`, exit codes (0 done or stopped by SIGTERM / Ctrl-C after
saving; 2 bad config, data or prompts, with a message naming the key, file or field). The run
itself (per-step pipeline, resume, checkpoints) is `pasr_jax.run`; the files it writes are
named by `pasr_jax.workdir.Workdir`.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from pasr_jax.config import ConfigError
from pasr_jax.run import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config preset file (configs/*.py).",
                                          lock_config=True)


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


def main(argv: list[str]) -> int:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it renames
  cfg = _CONFIG.value
  if cfg is None:
    print("pasr_jax.train: --config=configs/<preset>.py is required", file=sys.stderr)
    return 2
  try:
    run(cfg)
  except ConfigError as e:
    print(f"pasr_jax.train: {e}", file=sys.stderr)
    return 2
  except ValueError as e:  # DataError, PromptError, ...: user input, not a crash
    if type(e).__module__.startswith("pasr_jax"):
      print(f"pasr_jax.train: {type(e).__name__}: {e}", file=sys.stderr)
      return 2
    raise
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
