"""Real local processes for tests: free ports, the judge server as a subprocess."""

import os
import socket
import subprocess
import sys

from pasr_jax.judge.server import stop_process, wait_healthy


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_judge(*args: str, env: dict | None = None, timeout_s: float = 60.0,
                port: int | None = None):
  """Starts `python -m pasr_jax.judge ARGS` on `port` (default: a free one); returns (process,
  base URL)."""
  port = port or free_port()
  proc = subprocess.Popen(
      [sys.executable, "-m", "pasr_jax.judge", "--host", "127.0.0.1", "--port", str(port), *args],
      env={**os.environ, **(env or {})})
  url = f"http://127.0.0.1:{port}"
  if not wait_healthy(url, proc, timeout_s):
    proc.kill()
    raise RuntimeError(f"judge {args} did not become healthy")
  return proc, url


def stop(proc: subprocess.Popen) -> None:
  """SIGTERM, then SIGKILL after 30 s."""
  stop_process(proc, 30.0)
