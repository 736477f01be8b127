"""python -m pasr_jax.judge --backend verify|vllm [--host 127.0.0.1] [--port 8001] ...

Serves the OpenAI chat API on the host/port: `verify` grades by rule (see
pasr_jax.judge.verify); `vllm` runs vLLM's server for --model DIR. Arguments after `--` go
to vLLM unchanged.

The key fails closed: with --api-key-env VAR every /v1 request needs `Authorization: Bearer
$VAR`, and an unset or empty VAR refuses to start. A judge bound beyond the loopback
(e.g. --host 0.0.0.0) needs a key unless --allow-no-key says it may serve without one.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from pasr_jax.judge import server

PROG = "python -m pasr_jax.judge"
EXIT_USAGE = 2


def is_loopback(host: str) -> bool:
  """Whether `host` (a bind address) is reachable from this machine only."""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False  # a host name other than localhost may resolve to any interface


def build_parser() -> argparse.ArgumentParser:
  # allow_abbrev=False: `--api-key X` must not be taken as `--api-key-env X`.
  p = argparse.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backend", choices=("verify", "vllm"), required=True)
  p.add_argument("--host", default="127.0.0.1",
                 help="bind address; beyond the loopback a key (or --allow-no-key) is needed")
  p.add_argument("--port", type=int, default=8001)
  p.add_argument("--model", default="", help="HF model dir (vllm backend)")
  p.add_argument("--served-model-name", default="",
                 help=f"name in /v1/models (default: {server.VERIFY_MODEL_NAME!r} for "
                 "verify, the model dir's name for vllm)")
  p.add_argument("--api-key-env", default="",
                 help="name of the env var holding the API key: requests need it, and the "
                 "judge refuses to start when the variable is unset or empty")
  p.add_argument("--allow-no-key", action="store_true",
                 help="serve without a key on a non-loopback --host (anyone who reaches the "
                 "port can use the judge)")
  p.add_argument("--latency-ms", type=float, default=0.0,
                 help="verify: artificial delay per request (benchmarks)")
  p.add_argument("--max-body-bytes", type=int, default=server.MAX_BODY_BYTES,
                 help="verify: larger requests get 413")
  p.add_argument("--max-concurrency", type=int, default=server.MAX_CONCURRENCY,
                 help="verify: connections served at once; more get 503")
  p.add_argument("--dtype", default="float32", help="vllm: weight/compute dtype")
  p.add_argument("--max-model-len", type=int, default=0, help="vllm: 0 = the model's")
  p.add_argument("--no-enforce-eager", action="store_true",
                 help="vllm: allow CUDA graphs (GPU); eager is the CPU default")
  p.add_argument("--startup-timeout", type=float, default=900.0,
                 help="vllm: seconds to wait for /health")
  return p


def api_key(args: argparse.Namespace) -> tuple[str | None, str]:
  """(the key to require or None, "") or (None, why the judge must not start)."""
  if args.api_key_env:
    key = os.environ.get(args.api_key_env) or None
    if key is None:
      return None, (f"--api-key-env={args.api_key_env}: the variable {args.api_key_env} is "
                    f"unset or empty; export {args.api_key_env}=<key>, or drop --api-key-env")
    return key, ""
  if not is_loopback(args.host) and not args.allow_no_key:
    return None, (f"--host={args.host} serves beyond this machine without a key; pass "
                  "--api-key-env VAR (the key in $VAR), or --allow-no-key to serve anyone")
  return None, ""


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  extra: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  args = build_parser().parse_args(argv)
  key, why = api_key(args)
  if why:
    print(f"{PROG}: {why}", file=sys.stderr)
    return EXIT_USAGE
  if args.backend == "verify":
    server.serve_verify(args.host, args.port, key, args.latency_ms,
                        args.served_model_name or server.VERIFY_MODEL_NAME,
                        args.max_body_bytes, args.max_concurrency)
    return 0
  if not args.model:
    print(f"{PROG}: --backend vllm needs --model DIR", file=sys.stderr)
    return EXIT_USAGE
  if not os.path.isfile(os.path.join(args.model, "config.json")):
    print(f"{PROG}: --model={args.model!r}: not an HF model dir (no config.json); pass the "
          "dir of the judge's weights", file=sys.stderr)
    return EXIT_USAGE
  name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
  return server.serve_vllm(args.model, args.host, args.port, name, key, args.dtype,
                           args.max_model_len, not args.no_enforce_eager, extra,
                           args.startup_timeout)


if __name__ == "__main__":
  sys.exit(main())
