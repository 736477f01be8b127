"""Async client for an OpenAI-compatible judge: scores answers in [0, 1], concurrently.

Each item becomes `wire.judge_messages(...)` sent to `POST {base_url}/v1/chat/completions`.
The score is the last number of the reply, clamped to [0, 1]; a reply without a number
scores 0 and is counted. Connection errors, timeouts, 429 and 5xx are retried with
exponential backoff; when an item still fails after the retry budget the whole batch raises
`JudgeError`, so a judge that stays down stops training instead of hanging it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping, Sequence

import httpx
import numpy as np

from pasr_jax import errors
from pasr_jax.config import JudgeCfg
from pasr_jax.judge.wire import JudgeItem, judge_messages
from pasr_jax.prompts import Prompts

_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_RETRY_STATUS = (408, 429)


class JudgeError(errors.JudgeFailure):
  """The judge could not be reached or answered wrongly beyond the retry budget.

  `stats` holds the counters of the batch up to the failure."""

  def __init__(self, message: str, stats: dict[str, float] | None = None):
    super().__init__(message)
    self.stats = stats or {}


def parse_score(reply: str) -> float | None:
  """Last number of `reply` (after any </think>), clamped to [0, 1]; None if there is none."""
  if "</think>" in reply:
    reply = reply.rsplit("</think>", 1)[1]
  found = _NUMBER_RE.findall(reply)
  if not found:
    return None
  value = float(found[-1])
  if math.isnan(value):
    return None
  return min(1.0, max(0.0, value))


class _Retryable(Exception):
  pass


@dataclasses.dataclass
class _BatchStats:
  requests: int = 0          # HTTP attempts sent
  retries: int = 0
  failures: int = 0          # items that failed after the retry budget
  unparseable: int = 0
  unparseable_example: str = ""   # the first reply without a score, quoted in errors
  cache_hits: int = 0
  latencies: list[float] = dataclasses.field(default_factory=list)   # seconds, per success

  def as_dict(self, n_items: int) -> dict[str, float]:
    lat = np.asarray(self.latencies or [0.0]) * 1000.0
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return {"items": float(n_items), "requests": float(self.requests),
            "retries": float(self.retries), "failures": float(self.failures),
            "unparseable": float(self.unparseable), "cache_hits": float(self.cache_hits),
            "latency_ms_p50": float(p50), "latency_ms_p90": float(p90),
            "latency_ms_p99": float(p99)}


class JudgeClient:
  """Scores batches of `JudgeItem`s (or mappings with the same keys) against a judge URL.

  concurrency: requests in flight at most. timeout_s: whole-request deadline per attempt.
  retries: extra attempts after the first. backoff_s: first wait, doubled per retry.
  cache_size: scores kept (least recently used dropped), keyed by a digest of the prompt.
  max_unparseable_frac: a batch in which more of the new replies than this hold no number
    raises JudgeError quoting one (a judge that answers in prose would score everything 0).
  """

  def __init__(self, base_url: str, model: str = "", api_key: str | None = None,
               concurrency: int = 32, timeout_s: float = 60.0, retries: int = 3,
               max_tokens: int = 16, backoff_s: float = 0.5, backoff_max_s: float = 8.0,
               prompts: Prompts | None = None, cache_size: int = 200_000,
               max_unparseable_frac: float = 0.5, temperature: float = 0.0,
               thinking: bool = True):
    if concurrency < 1:
      raise ValueError(f"judge.concurrency={concurrency}: must be >= 1")
    if timeout_s <= 0:
      raise ValueError(f"judge.timeout_s={timeout_s}: must be > 0")
    if retries < 0:
      raise ValueError(f"judge.retries={retries}: must be >= 0")
    if temperature < 0:
      raise ValueError(f"judge.temperature={temperature}: must be >= 0")
    self.base_url = base_url.rstrip("/")
    self.model = model
    self.concurrency = concurrency
    self.timeout_s = timeout_s
    self.retries = retries
    self.max_tokens = max_tokens
    self.temperature = float(temperature)
    # Off: a Qwen3 judge answers at once instead of spending judge.max_tokens on thinking.
    self.extra_body = {} if thinking else {"chat_template_kwargs": {"enable_thinking": False}}
    self.backoff_s = backoff_s
    self.backoff_max_s = backoff_max_s
    self.prompts = prompts or Prompts()
    self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Keys are digests of the full prompt: a long run judges millions of long answers.
    self._cache: collections.OrderedDict[bytes, float] = collections.OrderedDict()
    self.cache_size = cache_size
    self.max_unparseable_frac = float(max_unparseable_frac)
    self.totals: dict[str, float] = {}

  @classmethod
  def from_config(cls, cfg: JudgeCfg, prompts: Prompts | None = None) -> JudgeClient:
    """From the `judge` section; the key comes from the env var named by cfg.api_key_env."""
    env = cfg.api_key_env
    return cls(base_url=cfg.base_url, model=cfg.model,
               api_key=(os.environ.get(env) or None) if env else None,
               concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, retries=cfg.retries,
               max_tokens=cfg.max_tokens, backoff_s=cfg.backoff_s, cache_size=cfg.cache_size,
               prompts=prompts, max_unparseable_frac=cfg.max_unparseable_frac,
               temperature=cfg.temperature, thinking=cfg.thinking)

  # ------------------------------------------------------------------ public API
  def score_batch(self, items: Sequence[JudgeItem | Mapping[str, str]]
                  ) -> tuple[list[float], dict[str, float]]:
    """Blocking `ascore_batch`, callable from plain code and from inside a running loop."""
    try:
      asyncio.get_running_loop()
    except RuntimeError:
      return asyncio.run(self.ascore_batch(items))
    # A loop already runs in this thread (e.g. a notebook): use a private one elsewhere.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      return pool.submit(asyncio.run, self.ascore_batch(items)).result()

  async def ascore_batch(self, items: Sequence[JudgeItem | Mapping[str, str]]
                         ) -> tuple[list[float], dict[str, float]]:
    """Scores in [0, 1] (item order) and this batch's stats: items, requests, retries,
    failures, unparseable, cache_hits, latency_ms_p50/p90/p99. Raises JudgeError."""
    stats = _BatchStats()
    keyed = [self._messages(i, it) for i, it in enumerate(items)]
    keys = [hashlib.sha256(json.dumps(m, ensure_ascii=False).encode()).digest()
            for m in keyed]
    todo: dict[bytes, list[dict[str, str]]] = {}
    scores: dict[bytes, float] = {}
    for k, m in zip(keys, keyed):
      if k in self._cache:
        self._cache.move_to_end(k)
        scores[k] = self._cache[k]
        stats.cache_hits += 1
      elif k in todo:
        stats.cache_hits += 1
      else:
        todo[k] = m
    tasks: dict[bytes, asyncio.Task] = {}
    if todo:
      limits = httpx.Limits(max_connections=self.concurrency,
                            max_keepalive_connections=self.concurrency)
      async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers,
                                   timeout=self.timeout_s, limits=limits) as http:
        try:
          if not self.model:
            self.model = await self._discover_model(http, stats)
          sem = asyncio.Semaphore(self.concurrency)
          async with asyncio.TaskGroup() as tg:
            tasks = {k: tg.create_task(self._score_one(http, sem, m, stats))
                     for k, m in todo.items()}
        except* JudgeError as eg:
          self._accumulate(stats, len(items))
          first = eg.exceptions[0]
          stopped = sum(1 for t in tasks.values() if t.cancelled())
          raise JudgeError(f"{first} ({stats.failures} of {len(todo)} items failed, {stopped} "
                           "stopped unfinished after that)", stats.as_dict(len(items))) from first
      for k, t in tasks.items():
        scores[k] = self._cache[k] = t.result()
      while len(self._cache) > self.cache_size:
        self._cache.popitem(last=False)
    self._accumulate(stats, len(items))
    if todo and stats.unparseable > self.max_unparseable_frac * len(todo):
      raise JudgeError(
          f"judge at {self.base_url}: {stats.unparseable} of {len(todo)} replies hold no score "
          f"(more than judge.max_unparseable_frac={self.max_unparseable_frac:g}), e.g. "
          f"{stats.unparseable_example!r:.300}. The judge model does not answer the grading "
          "prompt with a number: use another judge model, or the rule-based one "
          "(python -m pasr_jax.judge --backend verify)", stats.as_dict(len(items)))
    return [scores[k] for k in keys], stats.as_dict(len(items))

  # ------------------------------------------------------------------ internals
  def _messages(self, index: int, item: JudgeItem | Mapping[str, str]
                ) -> list[dict[str, str]]:
    get = item.get if isinstance(item, Mapping) else (lambda k, d=None: getattr(item, k, d))
    fields = {k: get(k, d) for k, d in (("question", None), ("ground_truth", None),
                                         ("answer", None), ("task_type", "general"))}
    for k, v in fields.items():
      if not isinstance(v, str):
        raise ValueError(f"judge item {index}: field {k!r} must be a string, got {v!r:.80}")
    return judge_messages(**fields, templates=self.prompts.judge, layout=self.prompts.judge_layout)

  def _accumulate(self, stats: _BatchStats, n_items: int) -> None:
    for k, v in stats.as_dict(n_items).items():
      if not k.startswith("latency"):
        self.totals[k] = self.totals.get(k, 0.0) + v

  async def _attempts(self, what: str, stats: _BatchStats, send):
    """Run `send()` until it returns, retrying `_Retryable` with exponential backoff."""
    last = ""
    for attempt in range(self.retries + 1):
      if attempt:
        stats.retries += 1
        await asyncio.sleep(min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)))
      stats.requests += 1
      try:
        # A hard deadline per attempt: httpx timeouts are per socket operation, so a
        # server that trickles bytes could otherwise hold a request forever.
        async with asyncio.timeout(self.timeout_s):
          return await send()
      except TimeoutError:
        last = f"no reply within {self.timeout_s:g} s"
      except httpx.TransportError as e:
        last = f"{type(e).__name__}: {e}"
      except _Retryable as e:
        last = str(e)
    stats.failures += 1
    raise JudgeError(f"judge at {self.base_url}: {what} failed after {self.retries + 1} "
                     f"attempts; last error: {last}")

  async def _discover_model(self, http: httpx.AsyncClient, stats: _BatchStats) -> str:
    async def send() -> str:
      r = await http.get("/v1/models")
      if r.status_code >= 500 or r.status_code in _RETRY_STATUS:
        raise _Retryable(f"HTTP {r.status_code}")
      if r.status_code != 200:
        raise JudgeError(f"judge at {self.base_url}: GET /v1/models -> HTTP {r.status_code}: "
                         f"{r.text[:200]}")
      try:
        return r.json()["data"][0]["id"]
      except (ValueError, KeyError, IndexError, TypeError) as e:
        raise JudgeError(f"judge at {self.base_url}: /v1/models lists no model "
                         f"({r.text[:200]!r}); set judge.model") from e
    return await self._attempts("GET /v1/models", stats, send)

  async def _score_one(self, http: httpx.AsyncClient, sem: asyncio.Semaphore,
                       messages: list[dict[str, str]], stats: _BatchStats) -> float:
    body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
            "temperature": self.temperature, **self.extra_body}

    async def send() -> str:
      t0 = time.perf_counter()
      r = await http.post("/v1/chat/completions", json=body)
      if r.status_code >= 500 or r.status_code in _RETRY_STATUS:
        raise _Retryable(f"HTTP {r.status_code}")
      if r.status_code != 200:
        # 4xx is our request or our key being wrong: retrying cannot help.
        stats.failures += 1
        raise JudgeError(f"judge at {self.base_url}: HTTP {r.status_code}: {r.text[:300]}")
      try:
        content = r.json()["choices"][0]["message"]["content"] or ""
      except (ValueError, KeyError, IndexError, TypeError) as e:
        stats.failures += 1
        raise JudgeError(f"judge at {self.base_url}: reply is not a chat completion: "
                         f"{r.text[:300]!r}") from e
      stats.latencies.append(time.perf_counter() - t0)
      return content

    async with sem:
      reply = await self._attempts("POST /v1/chat/completions", stats, send)
    score = parse_score(reply)
    if score is None:
      stats.unparseable += 1
      stats.unparseable_example = stats.unparseable_example or reply
      return 0.0
    return score
