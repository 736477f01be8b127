"""A verify judge whose every answer comes LATENCY_S seconds late (a stand-in for a judge
model's generation time):

  python tests/slow_judge.py LATENCY_S --config.backend=verify [--config.KEY=V ...]

takes the keys of `python -m pasr_jax.judge`. The delay holds each request's body before the
real verify app reads it, so a delayed request counts as in flight (max_concurrency)."""

import asyncio
import functools
import sys

from pasr_jax import cli
from pasr_jax.judge import server


def slowed(app, latency_s: float):
  """`app` (ASGI) with each /v1/chat/completions body delivered `latency_s` late."""
  async def wrapped(scope, receive, send):
    if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
      return await app(scope, receive, send)

    async def late_receive():
      message = await receive()
      if message["type"] == "http.request" and not message.get("more_body"):
        await asyncio.sleep(latency_s)
      return message
    return await app(scope, late_receive, send)
  return wrapped


def serve(cfg: server.ServeCfg, latency_s: float) -> None:
  """The package's verify server, its app slowed."""
  make = server.create_verify_app
  server.create_verify_app = lambda *a, **k: slowed(make(*a, **k), latency_s)
  server.serve_verify(cfg, server.api_key(cfg))


if __name__ == "__main__":
  cli.main("tests/slow_judge.py", functools.partial(serve, latency_s=float(sys.argv.pop(1))),
           schema=server.ServeCfg, preset=False, tune_malloc=False)
