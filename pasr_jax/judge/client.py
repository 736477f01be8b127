"""Async client for an OpenAI-compatible judge: scores answers in [0, 1], concurrently.

Each item becomes `wire.judge_messages(...)` sent to `POST {base_url}/v1/chat/completions`.
The score is the last number of the reply, clamped to [0, 1]; a reply without a number
scores 0 and is counted. Connection errors, timeouts, 408, 429 and 5xx are retried after what
the server's `Retry-After` asks, else after a jittered exponential backoff, within a bounded
total wait per request (judge.max_wait_s); when an item still fails the whole batch raises
`JudgeError`, so a judge that stays down stops training instead of hanging it. Retries and
rate-limited replies are counted in the batch's stats.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import datetime
import email.utils
import hashlib
import json
import math
import os
import random
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


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
  """Seconds a `Retry-After` header value asks to wait: delta-seconds or an HTTP date (from
  `now`, a POSIX time; default the clock); None when absent or unreadable, never < 0."""
  if not value:
    return None
  value = value.strip()
  try:
    seconds = float(value)
  except ValueError:
    try:
      when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
      return None
    if when.tzinfo is None:  # an HTTP date is GMT; a zone-less one is read as such
      when = when.replace(tzinfo=datetime.timezone.utc)
    seconds = when.timestamp() - (time.time() if now is None else now)
  return max(0.0, seconds) if math.isfinite(seconds) else None


class _Retryable(Exception):
  """A failed attempt worth another: `retry_after` is what the server asked to wait (s)."""

  def __init__(self, message: str, retry_after: float | None = None,
               rate_limited: bool = False):
    super().__init__(message)
    self.retry_after = retry_after
    self.rate_limited = rate_limited


def _retryable(r: httpx.Response) -> _Retryable | None:
  """The retryable failure of response `r` (408, 429, 5xx), None for any other status."""
  if r.status_code < 500 and r.status_code not in _RETRY_STATUS:
    return None
  limited = r.status_code == 429
  return _Retryable(f"HTTP {r.status_code}" + (" (rate limited)" if limited else ""),
                    retry_after_s(r.headers.get("retry-after")), limited)


@dataclasses.dataclass
class _BatchStats:
  requests: int = 0          # HTTP attempts sent
  retries: int = 0
  rate_limited: int = 0      # 429 replies
  waited_s: float = 0.0      # slept before retries
  failures: int = 0          # items that failed after the retry budget
  unparseable: int = 0
  unparseable_example: str = ""   # the first reply without a score, quoted in errors
  cache_hits: int = 0
  latencies: list[float] = dataclasses.field(default_factory=list)   # seconds, per success

  def as_dict(self, n_items: int) -> dict[str, float]:
    lat = np.asarray(self.latencies or [0.0]) * 1000.0
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return {"items": float(n_items), "requests": float(self.requests),
            "retries": float(self.retries), "rate_limited": float(self.rate_limited),
            "waited_s": float(self.waited_s), "failures": float(self.failures),
            "unparseable": float(self.unparseable), "cache_hits": float(self.cache_hits),
            "latency_ms_p50": float(p50), "latency_ms_p90": float(p90),
            "latency_ms_p99": float(p99)}


class JudgeClient:
  """Scores batches of `JudgeItem`s (or mappings with the same keys) against the judge of
  the `judge` config section `cfg` (its keys are checked by `JudgeCfg`).

  Per request: at most judge.concurrency in flight, judge.timeout_s per attempt, up to
  judge.retries retries within judge.max_wait_s in all. A retry waits what the server's
  `Retry-After` asks (seconds or an HTTP date), else a jittered exponential backoff from
  judge.backoff_s (capped at judge.backoff_max_s). Scores are cached (judge.cache_size, least
  recently used dropped) by a digest of the prompt. A batch in which more than
  judge.max_unparseable_frac of the new replies hold no number raises JudgeError quoting one
  (a judge that answers in prose would score everything 0). The key is read from the env var
  named by judge.api_key_env.
  """

  def __init__(self, cfg: JudgeCfg, prompts: Prompts | None = None):
    self.cfg = cfg
    self.base_url = cfg.base_url.rstrip("/")
    self.model = cfg.model
    # Off: a Qwen3 judge answers at once instead of spending judge.max_tokens on thinking.
    self.extra_body = ({} if cfg.thinking else
                       {"chat_template_kwargs": {"enable_thinking": False}})
    self.prompts = prompts or Prompts()
    key = (os.environ.get(cfg.api_key_env) or None) if cfg.api_key_env else None
    self._headers = {"Authorization": f"Bearer {key}"} if key else {}
    # Keys are digests of the full prompt: a long run judges millions of long answers.
    self._cache: collections.OrderedDict[bytes, float] = collections.OrderedDict()
    self._rng = random.Random()
    self.totals: dict[str, float] = {}

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
      cfg = self.cfg
      limits = httpx.Limits(max_connections=cfg.concurrency,
                            max_keepalive_connections=cfg.concurrency)
      async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers,
                                   timeout=cfg.timeout_s, limits=limits) as http:
        try:
          if not self.model:
            self.model = await self._discover_model(http, stats)
          sem = asyncio.Semaphore(cfg.concurrency)
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
      while len(self._cache) > self.cfg.cache_size:
        self._cache.popitem(last=False)
    self._accumulate(stats, len(items))
    frac = self.cfg.max_unparseable_frac
    if todo and stats.unparseable > frac * len(todo):
      raise JudgeError(
          f"judge at {self.base_url}: {stats.unparseable} of {len(todo)} replies hold no score "
          f"(more than judge.max_unparseable_frac={frac:g}), e.g. "
          f"{stats.unparseable_example!r:.300}. The judge model does not answer the grading "
          "prompt with a number: use another judge model, or the rule-based one "
          "(python -m pasr_jax.judge --config.backend=verify)", stats.as_dict(len(items)))
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

  def _backoff(self, retry: int) -> float:
    """The wait before retry number `retry` (1-based) when the server names none: "equal
    jitter" — half of min(backoff_max_s, backoff_s * 2**(retry - 1)) fixed, half random, so
    the concurrent requests a busy judge turned away do not all come back at once."""
    base = min(self.cfg.backoff_max_s, self.cfg.backoff_s * 2 ** (retry - 1))
    return base / 2 + self._rng.uniform(0.0, base / 2)

  async def _attempts(self, what: str, stats: _BatchStats, send):
    """Run `send()` until it returns, retrying `_Retryable` failures, connection errors and
    timeouts up to judge.retries times, all within judge.max_wait_s of the first attempt."""
    cfg = self.cfg
    start = time.monotonic()
    deadline = start + cfg.max_wait_s
    last, asked = "", None
    attempts = 0
    while True:
      if attempts:
        if attempts > cfg.retries:
          why = f"failed after {attempts} attempts (judge.retries={cfg.retries})"
          break
        # What the server asked for, a little later so its callers do not return together.
        wait = (asked * self._rng.uniform(1.0, 1.1) if asked is not None
                else self._backoff(attempts))
        if time.monotonic() + wait >= deadline:
          ask = f" (the judge asked for {asked:g} s)" if asked is not None else ""
          why = (f"gave up after {attempts} attempts in {time.monotonic() - start:.1f} s: the "
                 f"next retry, {wait:.1f} s later{ask}, would pass judge.max_wait_s="
                 f"{cfg.max_wait_s:g}")
          break
        stats.retries += 1
        stats.waited_s += wait
        await asyncio.sleep(wait)
      attempts += 1
      stats.requests += 1
      limit = min(cfg.timeout_s, deadline - time.monotonic())
      asked = None
      try:
        # A hard deadline per attempt: httpx timeouts are per socket operation, so a
        # server that trickles bytes could otherwise hold a request forever.
        async with asyncio.timeout(limit):
          return await send()
      except TimeoutError:
        last = f"no reply within {limit:g} s"
      except httpx.TransportError as e:
        last = f"{type(e).__name__}: {e}"
      except _Retryable as e:
        last, asked = str(e), e.retry_after
        stats.rate_limited += e.rate_limited
    stats.failures += 1
    raise JudgeError(f"judge at {self.base_url}: {what} {why}; last error: {last}")

  async def _discover_model(self, http: httpx.AsyncClient, stats: _BatchStats) -> str:
    async def send() -> str:
      r = await http.get("/v1/models")
      if (retry := _retryable(r)) is not None:
        raise retry
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
    body = {"model": self.model, "messages": messages, "max_tokens": self.cfg.max_tokens,
            "temperature": float(self.cfg.temperature), **self.extra_body}

    async def send() -> str:
      t0 = time.perf_counter()
      r = await http.post("/v1/chat/completions", json=body)
      if (retry := _retryable(r)) is not None:
        raise retry
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
