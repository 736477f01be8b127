"""python -m pasr_jax.judge --config.backend=verify|vllm [--config.port=8001] ... [-- VLLM_ARGS]

Serves the OpenAI chat API on config.host:config.port: `verify` grades by rule (see
pasr_jax.judge.verify); `vllm` runs vLLM's server for --config.model=DIR. Arguments after
`--` go to vLLM unchanged. The keys: `judge.server.ServeCfg`.

The key fails closed: with --config.api_key_env=VAR every /v1 request needs `Authorization:
Bearer $VAR`, and an unset or empty VAR refuses to start (exit 2). A judge bound beyond the
loopback (e.g. --config.host=0.0.0.0) needs a key unless --config.allow_no_key=True says it
may serve without one.
"""

from __future__ import annotations

import sys

from pasr_jax import cli
from pasr_jax.judge import server

PROG = "python -m pasr_jax.judge"


def serve(cfg: server.ServeCfg) -> None:
  """Serves until SIGINT/SIGTERM; the vllm backend exits with its server's exit code."""
  key = server.api_key(cfg)
  if cfg.backend == "verify":
    server.serve_verify(cfg, key)
    return
  code = server.serve_vllm(cfg, key)
  if code:
    sys.exit(code)


if __name__ == "__main__":
  # The judge runs no decoder in this process (vLLM is a child): malloc stays as it is.
  cli.main(PROG, serve, schema=server.ServeCfg, preset=False, positional="vllm_args",
           tune_malloc=False)
