"""python -m pasr_jax.judge --backend verify|vllm [--host 127.0.0.1] [--port 8001] ...

Serves the OpenAI chat API on the host/port: `verify` grades by rule (see
pasr_jax.judge.verify); `vllm` runs vLLM's server for --model DIR. Arguments after `--` go
to vLLM unchanged. The API key is read from the env var named by --api-key-env.
"""

from __future__ import annotations

import argparse
import os
import sys

from pasr_jax.judge import server


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m pasr_jax.judge", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--backend", choices=("verify", "vllm"), required=True)
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8001)
  p.add_argument("--model", default="", help="HF model dir (vllm backend)")
  p.add_argument("--served-model-name", default="",
                 help=f"name in /v1/models (default: {server.VERIFY_MODEL_NAME!r} for "
                 "verify, the model dir's name for vllm)")
  p.add_argument("--api-key-env", default="",
                 help="env var holding the API key; when it is set, requests need it")
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


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  extra: list[str] = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  args = build_parser().parse_args(argv)
  api_key = None
  if args.api_key_env:
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None:
      print(f"pasr_jax.judge: --api-key-env={args.api_key_env}: variable is unset or empty; "
            "serving without a key", file=sys.stderr)
  if args.backend == "verify":
    server.serve_verify(args.host, args.port, api_key, args.latency_ms,
                        args.served_model_name or server.VERIFY_MODEL_NAME,
                        args.max_body_bytes, args.max_concurrency)
    return 0
  if not args.model:
    print("pasr_jax.judge: --backend vllm needs --model DIR", file=sys.stderr)
    return 2
  name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
  return server.serve_vllm(args.model, args.host, args.port, name, api_key, args.dtype,
                           args.max_model_len, not args.no_enforce_eager, extra,
                           args.startup_timeout)


if __name__ == "__main__":
  sys.exit(main())
