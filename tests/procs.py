"""Real local processes for tests: free ports, the judge server as a subprocess."""

import os
import pathlib
import socket
import subprocess
import sys

from pasr_jax.judge.server import stop_process, wait_healthy

HERE = pathlib.Path(__file__).resolve().parent


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on right now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_judge(*keys: str, backend: str = "verify", env: dict | None = None,
                timeout_s: float = 60.0, port: int | None = None, latency_s: float = 0.0):
  """Starts `python -m pasr_jax.judge --config.backend=BACKEND KEYS` (`--config.k=v`, and
  after `--` vLLM's arguments) on 127.0.0.1:`port` (default: a free one); returns (process,
  base URL). `latency_s`: a verify judge that answers each request that much later
  (tests/slow_judge.py)."""
  port = port or free_port()
  entry = ([str(HERE / "slow_judge.py"), str(latency_s)] if latency_s
           else ["-m", "pasr_jax.judge"])
  proc = subprocess.Popen(
      [sys.executable, *entry, f"--config.backend={backend}", "--config.host=127.0.0.1",
       f"--config.port={port}", *keys],
      env={**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           **(env or {})})
  url = f"http://127.0.0.1:{port}"
  if not wait_healthy(url, proc, timeout_s):
    proc.kill()
    raise RuntimeError(f"judge {backend} {keys} did not become healthy")
  return proc, url


def stop(proc: subprocess.Popen) -> None:
  """SIGTERM, then SIGKILL after 30 s."""
  stop_process(proc, 30.0)
