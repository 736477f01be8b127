"""The kinds of failure a user can cause or meet, one base class per exit code.

Modules raise their own subclasses (`ConfigError(UserError)`, `JudgeError(JudgeFailure)`, ...);
`pasr_jax.cli` maps the bases to exit codes and prints one line. Any other exception is a
bug: exit 1 with its traceback. Internal invariants (a batch missing a key, vLLM returning
fewer logprobs than tokens) are therefore NOT subclasses of these. This module imports nothing
of the package, so every module can raise these without an import cycle.
"""

from __future__ import annotations


class UserError(ValueError):
  """Config, data, prompts or a missing file: the message names the key, file, row or field."""


class JudgeFailure(RuntimeError):
  """The judge is unreachable, errors past its retries, or does not answer with scores."""


class EngineFailure(RuntimeError):
  """The rollout engine died or timed out past its retries, or a weight sync failed."""


class StorageFailure(RuntimeError):
  """Nothing restorable, a save refused or failed, a disk full."""


class Diverged(RuntimeError):
  """Training diverged: too many steps of NaN/inf updates."""


class Interrupted(RuntimeError):
  """SIGTERM / Ctrl-C ended the command; what was done is saved."""
