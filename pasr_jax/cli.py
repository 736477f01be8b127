"""The command-line layer of every command: the `--config` flag, the typed config, exit codes.

  python -m pasr_jax.<command> [--config=configs/<preset>.py] [--config.a.b=v ...] [--debug]

`main(prog, fn, schema)` parses the flags, types the config with the command's schema (a
`config.Section`: `RunConfig` for the training commands; its `of` checks every value), calls
`fn(cfg)` and exits. A command without a preset file starts from its schema's defaults.
A failure a user can cause or meet ends in one line on stderr,
`<prog>: <what failed>: <message>`, and one exit code per kind (`pasr_jax.errors`):

  0    done
  2    config, data, prompts or a missing file (the message names the key, file, row or field)
  3    judge: unreachable, erroring past its retries, or not answering with scores
  4    rollout engine: died or timed out past rollout.engine_retries, or a weight sync failed
  5    checkpoint or disk: nothing restorable, a save refused or failed, disk full
  6    training diverged: train.max_nonfinite_steps steps of NaN/inf updates
  130  interrupted by SIGTERM / Ctrl-C; the steps done are saved, the same command resumes
  1    anything else is a bug: the traceback is printed (`--debug` prints it for the rest too)
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import sys
import typing
from collections.abc import Callable
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from ml_collections import ConfigDict

from pasr_jax import errors, host_malloc
from pasr_jax.config import RunConfig, defaults

EXIT_USER, EXIT_STORAGE, EXIT_INTERRUPTED = 2, 5, 130
# (kind, exit code, what failed); a UserError is named by its own class (ConfigError, ...).
KINDS: tuple[tuple[type[BaseException], int, str], ...] = (
    (errors.UserError, EXIT_USER, ""),
    (errors.JudgeFailure, 3, "judge"),
    (errors.EngineFailure, 4, "rollout engine"),
    (errors.StorageFailure, EXIT_STORAGE, "checkpoint"),
    (errors.Diverged, 6, "training diverged"),
    (errors.Interrupted, EXIT_INTERRUPTED, "interrupted"),
)


_HOLDERS: list[flags.FlagHolder] = []  # --config, --debug once defined


def _flags(argv: list[str] | None = None, schema: type = RunConfig,
           preset: bool = True) -> list[flags.FlagHolder]:
  """`--config` and `--debug`, defined at the first call: importing this module (as `run`
  does through `devices`) defines no flag. With `preset`, `--config` names a preset file and
  the `--config.a.b` overrides are registered from the preset named in `argv` (default
  sys.argv), so the first call must see the real one; without, `--config.a.b` overrides
  `schema`'s defaults."""
  if not _HOLDERS:
    if preset:
      holder = config_flags.DEFINE_config_file(
          "config", None, "Config preset file (configs/*.py).", lock_config=True,
          sys_argv=list(argv or sys.argv))
    else:
      holder = config_flags.DEFINE_config_dict(
          "config", ConfigDict(defaults(schema)), "The command's keys.", lock_config=True,
          sys_argv=list(argv or sys.argv))
    _HOLDERS.extend((holder,
                     flags.DEFINE_bool("debug", False, "Re-raise errors with their traceback.")))
  return _HOLDERS


def classify(e: BaseException) -> tuple[int, str] | None:
  """(exit code, what failed) for an error a user can cause or meet; None for a bug."""
  for kind, code, what in KINDS:
    if isinstance(e, kind):
      return code, what or type(e).__name__
  if isinstance(e, OSError) and e.errno is not None:  # disk full, permissions, ...
    return EXIT_STORAGE, "disk" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "file system"
  return None


def unknown_key(dotted: str, schema: type = RunConfig) -> str | None:
  """Why `dotted` is not a key of `schema` (the keys beside it), or None if it is."""
  node: Any = schema
  parts = dotted.split(".")
  for i, part in enumerate(parts):
    fields = ({f.name: f for f in dataclasses.fields(node)}
              if dataclasses.is_dataclass(node) else {})
    if part not in fields:
      if not fields and i:  # inside a dict-valued key (model.hf_config): any key goes
        return None
      parent = ".".join(parts[:i]) or "(top level)"
      return f"unknown config key {dotted!r}; keys under {parent}: {', '.join(sorted(fields))}"
    node = typing.get_type_hints(node)[part]
  return None


def _override_error(argv: list[str], err: Exception, schema: type) -> str:
  """Names the first `--config.a.b=v` whose key `schema` does not have."""
  for arg in argv[1:]:
    if arg.startswith("--config."):
      why = unknown_key(arg[len("--config."):].split("=", 1)[0], schema)
      if why:
        return f"{why} (in {arg!r})"
  return f"bad flags: {' '.join(str(err).split())}"


def parse_flags(argv: list[str], prog: str = "pasr_jax", schema: type = RunConfig,
                preset: bool = True) -> list[str]:
  """absl's flag parsing of `argv` with `--config`; a bad flag or override exits 2 with one
  line. Returns the arguments left over."""
  try:
    # A config_dict flag applies the overrides as it is defined.
    _flags(argv, schema, preset)
    return flags.FLAGS(argv)
  except Exception as e:  # absl/ml_collections raise several types for bad overrides
    print(f"{prog}: {_override_error(argv, e, schema)}", file=sys.stderr)
    sys.exit(EXIT_USER)


def config() -> Any:
  """The parsed `--config` preset (a ConfigDict; None when not given)."""
  return _flags()[0].value


def call(prog: str, fn: Callable[[Any], Any], cfg: Any) -> int:
  """`fn(cfg)`; a known failure prints one line and returns its exit code, a bug raises."""
  try:
    fn(cfg)
  except KeyboardInterrupt:  # a second Ctrl-C: no save
    print(f"{prog}: interrupted: stopped at once by a second Ctrl-C; the last "
          "checkpoint is what a rerun resumes from", file=sys.stderr)
    return EXIT_INTERRUPTED
  except Exception as e:  # pylint: disable=broad-except
    known = classify(e)
    if known is None or (_HOLDERS and flags.FLAGS.is_parsed() and _HOLDERS[1].value):
      raise
    code, what = known
    print(f"{prog}: {what}: {' '.join(str(e).split())}", file=sys.stderr)
    return code
  return 0


def main(prog: str, fn: Callable[[Any], Any], schema: type = RunConfig,
         default_config: str = "", preset: bool = True, positional: str = "",
         argv: list[str] | None = None, tune_malloc: bool = True) -> None:
  """The `__main__` of a command: flags, logging, `fn(cfg)`, exit code (module doc).

  `cfg` is the config typed by `schema.of` (a `config.Section` subclass). With `preset`,
  `--config` names a preset file (`default_config` when none is given; without one it is
  required); without, the config starts from `schema`'s defaults. `positional` names a tuple
  key that the command's positional arguments fill (`evaluate compare DIR ...`); otherwise a
  positional argument is an error. `argv` defaults to sys.argv. `tune_malloc`: the command
  runs the decoder in this process, so host_malloc's settings go in before JAX starts."""
  if tune_malloc:
    host_malloc.keep_freed_memory()
  argv = list(sys.argv if argv is None else argv)
  if preset and default_config and not any(
      a.startswith("--config=") or a == "--config" for a in argv):
    argv.insert(1, f"--config={default_config}")

  def body(rest: list[str]) -> int:
    if len(rest) > 1 and not positional:
      print(f"{prog}: unexpected arguments {rest[1:]}", file=sys.stderr)
      return EXIT_USER
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it renames
    # The console keeps one line per step: httpx logs every judge request at INFO, JAX each
    # backend it fails to find (TPU on every host).
    for name in ("httpx", "jax._src.xla_bridge"):
      logging.getLogger(name).setLevel(logging.WARNING)
    tree = config()
    if tree is None:
      print(f"{prog}: --config=configs/<preset>.py is required", file=sys.stderr)
      return EXIT_USER
    if positional:
      with tree.unlocked():
        tree[positional] = tuple(rest[1:])
    return call(prog, lambda t: fn(schema.of(t)), tree)

  app.run(body, argv=argv, flags_parser=functools.partial(
      parse_flags, prog=prog, schema=schema, preset=preset))
