"""A local judge for a training run: is one answering, and if not, start and stop one.

With `judge.autostart` a run whose local `judge.base_url` is silent starts
`python -m pasr_jax.judge --config.backend=verify` on that host and port as a child process (it dies
with the trainer), logging to the workdir's judge.log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.parse

import httpx

from pasr_jax.config import ConfigError
from pasr_jax.judge.server import die_with_parent, stop_process, wait_healthy


# A judge that wants a key (a hosted API, a judge served beyond the loopback) answers these
# to a request without one, or with a wrong one.
_KEY_REFUSED = (401, 403)


def judge_status(base_url: str, api_key_env: str = "", timeout_s: float = 3.0) -> int | None:
  """HTTP status of GET <base_url>/v1/models, sent with the key from the env var named
  `api_key_env` (if set); None when nothing answers."""
  key = os.environ.get(api_key_env) if api_key_env else None
  headers = {"Authorization": f"Bearer {key}"} if key else {}
  try:
    return httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers,
                     timeout=timeout_s).status_code
  except httpx.HTTPError:
    return None


def judge_answers(base_url: str, timeout_s: float = 3.0) -> bool:
  """True when a judge answers at base_url: GET /v1/models gives 200, or 401/403 (a judge
  that wants a key; `ensure_judge` checks ours at the start of a run)."""
  status = judge_status(base_url, timeout_s=timeout_s)
  return status == 200 or status in _KEY_REFUSED


class LocalJudge:
  """A `python -m pasr_jax.judge --config.backend=verify` child on the host/port of a local
  URL."""

  def __init__(self, base_url: str, log_path: str | os.PathLike, startup_s: float = 120.0):
    u = urllib.parse.urlparse(base_url)
    if u.hostname not in ("127.0.0.1", "localhost") or not u.port:
      raise ConfigError(f"config judge.base_url={base_url!r}: judge.autostart needs a local "
                        "URL with a port (http://127.0.0.1:PORT)")
    self.log_path = str(log_path)
    os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)  # a fresh workdir
    with open(self.log_path, "ab") as logf:  # the child keeps its own descriptor
      self.proc = subprocess.Popen(
          [sys.executable, "-m", "pasr_jax.judge", "--config.backend=verify",
           f"--config.host={u.hostname}", f"--config.port={u.port}"], stdout=logf, stderr=subprocess.STDOUT,
          preexec_fn=die_with_parent)
    if not wait_healthy(base_url.rstrip("/"), self.proc, startup_s):
      self.stop()
      raise ConfigError(f"config judge.base_url={base_url!r}: the autostarted verify judge did "
                        f"not come up (see {self.log_path})")

  def stop(self) -> None:
    stop_process(self.proc, 10.0)


def ensure_judge(judge_cfg, log_path: str | os.PathLike) -> LocalJudge | None:
  """Checks that a judge answers at judge_cfg.base_url and takes our key (the env var named
  by judge.api_key_env); starts a `LocalJudge` there when none answers and judge.autostart is
  set (returned, for the caller to stop), else ConfigError."""
  status = judge_status(judge_cfg.base_url, judge_cfg.api_key_env)
  if status == 200:
    return None
  if status in _KEY_REFUSED:
    env = judge_cfg.api_key_env
    sent = bool(env and os.environ.get(env))
    raise ConfigError(
        f"config judge.base_url={judge_cfg.base_url!r}: the judge refuses "
        f"{'our' if sent else 'a request without a'} key (HTTP {status}); "
        + (f"export {env}=<the judge's key> (judge.api_key_env)" if env else
           "set judge.api_key_env to the name of the env var holding its key"))
  if not judge_cfg.autostart:
    raise ConfigError(f"config judge.base_url={judge_cfg.base_url!r}: no judge answers at "
                      "/v1/models; start one (python -m pasr_jax.judge --config.backend=verify "
                      "--config.port=N) or set judge.autostart=True")
  return LocalJudge(judge_cfg.base_url, log_path)
