"""A local judge for a training run: is one answering, and if not, start and stop one.

With `judge.autostart` a run whose local `judge.base_url` is silent starts
`python -m pasr_jax.judge --backend verify` on that host and port as a child process (it dies
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


def judge_answers(base_url: str, timeout_s: float = 3.0) -> bool:
  """True when GET <base_url>/v1/models answers 200."""
  try:
    return httpx.get(base_url.rstrip("/") + "/v1/models", timeout=timeout_s).status_code == 200
  except httpx.HTTPError:
    return False


class LocalJudge:
  """A `python -m pasr_jax.judge --backend verify` child on the host/port of a local URL."""

  def __init__(self, base_url: str, log_path: str | os.PathLike, startup_s: float = 120.0):
    u = urllib.parse.urlparse(base_url)
    if u.hostname not in ("127.0.0.1", "localhost") or not u.port:
      raise ConfigError(f"config judge.base_url={base_url!r}: judge.autostart needs a local "
                        "URL with a port (http://127.0.0.1:PORT)")
    self.log_path = str(log_path)
    os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)  # a fresh workdir
    with open(self.log_path, "ab") as logf:  # the child keeps its own descriptor
      self.proc = subprocess.Popen(
          [sys.executable, "-m", "pasr_jax.judge", "--backend", "verify", "--host", u.hostname,
           "--port", str(u.port)], stdout=logf, stderr=subprocess.STDOUT,
          preexec_fn=die_with_parent)
    if not wait_healthy(base_url.rstrip("/"), self.proc, startup_s):
      self.stop()
      raise ConfigError(f"config judge.base_url={base_url!r}: the autostarted verify judge did "
                        f"not come up (see {self.log_path})")

  def stop(self) -> None:
    stop_process(self.proc, 10.0)


def ensure_judge(judge_cfg, log_path: str | os.PathLike) -> LocalJudge | None:
  """Checks that a judge answers at judge_cfg.base_url; starts a `LocalJudge` there when
  none does and judge.autostart is set (returned, for the caller to stop), else ConfigError."""
  if judge_answers(judge_cfg.base_url):
    return None
  if not judge_cfg.autostart:
    raise ConfigError(f"config judge.base_url={judge_cfg.base_url!r}: no judge answers at "
                      "/v1/models; start one (python -m pasr_jax.judge --backend verify "
                      "--port N) or set judge.autostart=True")
  return LocalJudge(judge_cfg.base_url, log_path)
