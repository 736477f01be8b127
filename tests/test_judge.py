"""The judge client against real HTTP servers on 127.0.0.1, and the judge servers themselves.

Servers: `python -m pasr_jax.judge --config.backend=verify` as a real subprocess, a scripted
FastAPI app under uvicorn in a thread (500s, slow replies, prose; it counts what it receives),
a port with nothing listening, and `--config.backend=vllm` with SmolLM2 (slow).
"""

import asyncio
import collections
import email.utils
import os
import re
import signal
import subprocess
import sys
import threading
import time

import fastapi
import httpx
import pytest
import uvicorn

from pasr_jax import errors, prompts
from pasr_jax.config import JudgeCfg, PromptsCfg
from pasr_jax.judge import wire
from pasr_jax.judge import JudgeClient, JudgeError, JudgeItem, parse_score
from pasr_jax.judge import server, verify
from pasr_jax.judge.client import retry_after_s
from helpers import load_preset, run_command
from procs import free_port, start_judge, stop

KEY_ENV = "PASR_TEST_JUDGE_KEY"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def verify_url():
  proc, url = start_judge()
  yield url
  stop(proc)


@pytest.fixture(scope="module")
def keyed_verify_url():
  proc, url = start_judge(f"--config.api_key_env={KEY_ENV}", env={KEY_ENV: KEY})
  yield url
  stop(proc)


# ---------------------------------------------------------------- scripted server
class Scripted:
  """FastAPI app whose behaviour is the first path segment: /{mode}/v1/...

  Every request is logged as (mode, question); `in_flight_max` is the peak concurrency.
  """

  def __init__(self):
    self.log = collections.Counter()
    self.models_calls = collections.Counter()
    self.seen_models = set()
    self.bodies = []                   # every chat request body, in order
    self.times = collections.defaultdict(list)   # (mode, question) -> arrival times (monotonic)
    self.in_flight = 0
    self.in_flight_max = 0
    app = fastapi.FastAPI()

    @app.get("/{mode}/v1/models")
    async def models(mode: str):
      self.models_calls[mode] += 1
      return {"object": "list", "data": [{"id": "scripted-judge", "object": "model"}]}

    @app.post("/{mode}/v1/chat/completions")
    async def chat(mode: str, request: fastapi.Request):
      body = await request.json()
      self.seen_models.add(body["model"])
      self.bodies.append(body)
      question = wire.parse_judge_sections(body["messages"][-1]["content"])["question"]
      self.log[(mode, question)] += 1
      self.times[(mode, question)].append(time.monotonic())
      n = self.log[(mode, question)]
      self.in_flight += 1
      self.in_flight_max = max(self.in_flight_max, self.in_flight)
      try:
        if mode == "count":
          await asyncio.sleep(0.05)
          reply = "1"
        elif mode == "flaky":          # 500, 500, then an answer
          if n <= 2:
            return fastapi.responses.JSONResponse({"error": "boom"}, status_code=500)
          reply = "Score: 1"
        elif mode == "slow":           # always past the client's timeout
          await asyncio.sleep(10)
          reply = "1"
        elif mode == "slow_once":      # first attempt past the timeout, then fast
          if n == 1:
            await asyncio.sleep(10)
          reply = "0.75"
        elif mode in ("ratelimit", "ratedate", "busy503") and n <= 2:
          # Twice turned away, asking for a wait: in seconds, as an HTTP date (1 to 2 s on),
          # or a 503 with seconds; then an answer.
          after = (email.utils.formatdate(time.time() + 2, usegmt=True) if mode == "ratedate"
                   else "1")
          return fastapi.responses.JSONResponse(
              {"error": "slow down"}, status_code=503 if mode == "busy503" else 429,
              headers={"Retry-After": after})
        elif mode in ("ratelimit", "ratedate", "busy503"):
          reply = "1"
        elif mode == "ratelimit_always":   # a rate limit that never lifts
          return fastapi.responses.JSONResponse({"error": "slow down"}, status_code=429,
                                                headers={"Retry-After": question.split("-")[0]})
        elif mode == "temperature":    # echoes the sampling temperature it was asked for
          reply = str(body["temperature"])
        elif mode == "prose":
          reply = "The candidate seems to understand the problem well."
        elif mode == "clamp":
          reply = {"a": "I'd say 7", "b": "-3", "c": "<think>1</think> 0.25"}[question]
        else:
          return fastapi.responses.JSONResponse({"error": "bad mode"}, status_code=404)
      finally:
        self.in_flight -= 1
      return {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}

    self.port = free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                log_level="warning"))
    self.thread = threading.Thread(target=self.server.run, daemon=True)

  def __enter__(self):
    self.thread.start()
    deadline = time.monotonic() + 30
    while not self.server.started:
      assert time.monotonic() < deadline, "scripted server did not start"
      time.sleep(0.02)
    return self

  def __exit__(self, *exc):
    self.server.should_exit = True
    self.thread.join(10)


@pytest.fixture(scope="module")
def scripted():
  with Scripted() as s:
    yield s


def client_for(url: str, **judge) -> JudgeClient:
  """A client of the judge at `url` with these `judge` config keys (no key env var)."""
  return JudgeClient(JudgeCfg(base_url=url, api_key_env="", **judge))


def items(n: int, tag: str = "q") -> list[JudgeItem]:
  return [JudgeItem(f"{tag}{i}", "1", "1") for i in range(n)]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("reply,score", [
    ("1", 1.0), ("0", 0.0), ("Score: 0.8", 0.8), ("between 0 and 1: 0.3", 0.3),
    ("7", 1.0), ("-2", 0.0), ("1e-1", 0.1), (".5", 0.5), ("<think>0</think>1", 1.0),
    ("<think>1 2 3</think>no number", None), ("no idea", None), ("", None),
])
def test_parse_score(reply, score):
  assert parse_score(reply) == score


ARC_Q = ("Which should they do?\nA: Put the objects in groups.\nB: Change the ramp.\n"
         "C: Choose other objects.\nD: Record the details.")
GPQA_Q = "Which energy difference?\n\nA) 10^-9 eV\nB) 10^-11 eV\nC) 10^-4 eV\nD) 10^-8 eV\n"
WINO_Q = "Sarah was a better surgeon than Maria so _ got the easier cases.\nOption1: Sarah\nOption2: Maria"


@pytest.mark.parametrize("task,question,gold,answer,expected", [
    # GSM8K: the reference keeps only what follows ####.
    ("general", "", "so 16-3-4 = 9 eggs, 9*2 = 18\n#### 18", "\\boxed{18}", 1.0),
    ("general", "", "so 16-3-4 = 9 eggs, 9*2 = 18\n#### 18", "\\boxed{9}", 0.0),
    ("general", "", "#### 1,000", "<answer>1000</answer>", 1.0),
    ("general", "", "18", "<think>9 at first, <refine>2*9</refine></think><answer>18</answer>",
     1.0),
    ("general", "", "18", "<think>it is 18</think><answer>19</answer>", 0.0),
    # MATH: bare LaTeX references and answers.
    ("general", "", "\\frac{\\pi}{2}", "<answer>\\pi/2</answer>", 1.0),
    ("general", "", "(3, -2)", "The point is $(3,-2)$.", 1.0),
    ("general", "", "x+1", "<answer>1+x</answer>", 1.0),
    ("general", "", "5\\sqrt{2}", "<answer>5\\sqrt{2}</answer>", 1.0),
    ("general", "", "5\\sqrt{2}", "<answer>5</answer>", 0.0),   # not just the leading 5
    # Letter references under the general prompt (CommonsenseQA) and Winogrande numbers.
    ("general", ARC_Q, "D", "<answer>D</answer>", 1.0),
    ("general", ARC_Q, "D", "<answer>Record the details.</answer>", 1.0),
    ("general", WINO_Q, "2", "Maria is the worse surgeon, so the answer is 2", 1.0),
    ("general", WINO_Q, "2", "Option1", 0.0),
    # Prose references (DROP spans).
    ("general", "", "Odoacer", "<answer>It was Odoacer.</answer>", 1.0),
    ("general", "", "Odoacer", "<answer>Theodoric</answer>", 0.0),
    # Multiple choice in the forms models write.
    ("multiple_choice", GPQA_Q, "C", "Step by step...\nAnswer: C", 1.0),
    ("multiple_choice", GPQA_Q, "C", "So the answer is (C) 10^-4 eV.", 1.0),
    ("multiple_choice", GPQA_Q, "C", "\\boxed{C}", 1.0),
    ("multiple_choice", GPQA_Q, "C", "<answer>D) 10^-8 eV</answer>", 0.0),
    ("multiple_choice", GPQA_Q, "C", "I cannot tell.", 0.0),
    ("multiple_choice", ARC_Q, "A", "<answer>A</answer>", 1.0),
    ("multiple_choice", ARC_Q, "Put the objects in groups.", "A. Put the objects in groups.", 1.0),
])
def test_verify_rules(task, question, gold, answer, expected):
  assert verify.grade(task, question, gold, answer) == expected


def test_rouge_l():
  assert verify.rouge_l_f1("a b c d", "a b c d") == 1.0
  assert verify.rouge_l_f1("a b c d", "") == 0.0
  # LCS("a b c d", "a c x d") = 3 -> P = R = 3/4.
  assert verify.rouge_l_f1("a b c d", "a c x d") == pytest.approx(0.75)


def test_verify_server_grades(verify_url):
  q = "Natalia sold clips to 48 friends in April and half as many in May. How many in all?"
  gsm = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72"
  mc_q = "Where would you find magazines?\nA: doctor\nB: bookstore\nC: market\nD: train"
  cases = [
      (JudgeItem(q, gsm, "<think>48+24</think><answer>\\boxed{72}</answer>"), 1.0),
      (JudgeItem(q, gsm, "48 + 24 = 72 clips.\n#### 72"), 1.0),
      (JudgeItem(q, gsm, "She sold 72 clips altogether."), 1.0),
      (JudgeItem(q, gsm, "<think>48+12</think><answer>\\boxed{60}</answer>"), 0.0),
      (JudgeItem(q, gsm, "#### 71"), 0.0),
      (JudgeItem("Simplify 2/4.", "\\frac{1}{2}", "<answer>0.5</answer>"), 1.0),
      (JudgeItem(mc_q, "B", "<answer>B</answer>", "multiple_choice"), 1.0),
      (JudgeItem(mc_q, "B", "The answer is (B).", "multiple_choice"), 1.0),
      (JudgeItem(mc_q, "B", "<answer>bookstore</answer>", "multiple_choice"), 1.0),
      (JudgeItem(mc_q, "B", "Answer: C", "multiple_choice"), 0.0),
      (JudgeItem(mc_q, "B", "\\boxed{b}", "multiple_choice"), 0.0),   # letters are capitals
      (JudgeItem("Summarise.", "the cat sat on the mat", "the cat sat on the mat", "summary"),
       1.0),
      (JudgeItem("Summarise.", "the cat sat on the mat", "stocks fell today", "summary"), 0.0),
  ]
  scores, stats = client_for(verify_url).score_batch([c for c, _ in cases])
  assert scores == [e for _, e in cases]
  assert stats["unparseable"] == 0 and stats["failures"] == 0
  partial, _ = client_for(verify_url).score_batch(
      [JudgeItem("Summarise.", "the cat sat on the mat", "a cat was on the mat", "summary")])
  assert 0.5 < partial[0] < 0.9


def test_verify_app_in_a_thread():
  # math-verify's timeout uses SIGALRM; off the main thread the app must grade without it
  # rather than let math-verify swallow the error and score everything 0.
  from pasr_jax.judge.server import create_verify_app
  port = free_port()
  srv = uvicorn.Server(uvicorn.Config(create_verify_app(), host="127.0.0.1", port=port,
                                      log_level="warning"))
  th = threading.Thread(target=srv.run, daemon=True)
  th.start()
  try:
    while not srv.started:
      time.sleep(0.02)
    scores, _ = client_for(f"http://127.0.0.1:{port}").score_batch(
        [JudgeItem("q", "#### 0.5", "\\frac{1}{2}"), JudgeItem("q", "\\frac{1}{2}", "0.5")])
    assert scores == [1.0, 1.0]     # text matching alone would give 0 for both
  finally:
    srv.should_exit = True
    th.join(10)


def test_verify_server_64_concurrent(verify_url):
  batch = [JudgeItem(f"What is {i}+{i}?", f"#### {2 * i}", f"\\boxed{{{2 * i + i % 2}}}")
           for i in range(64)]
  scores, stats = client_for(verify_url, concurrency=64).score_batch(batch)
  assert scores == [1.0 - i % 2 for i in range(64)]
  assert stats["items"] == 64 and stats["requests"] == 65      # + one GET /v1/models
  assert 0 < stats["latency_ms_p50"] <= stats["latency_ms_p90"] <= stats["latency_ms_p99"]


def test_concurrency_is_bounded(scripted):
  client = client_for(scripted.url + "/count", concurrency=8)
  scores, stats = client.score_batch(items(64, "bound"))
  assert scores == [1.0] * 64
  assert 1 < scripted.in_flight_max <= 8
  assert client.model == "scripted-judge" and scripted.seen_models == {"scripted-judge"}
  client.score_batch(items(4, "again"))
  assert scripted.models_calls["count"] == 1      # the model is discovered once


def test_retries_on_500(scripted):
  client = client_for(scripted.url + "/flaky", retries=3, backoff_s=0.01)
  scores, stats = client.score_batch(items(3, "flaky"))
  assert scores == [1.0, 1.0, 1.0]
  assert stats["retries"] == 6 and stats["failures"] == 0
  assert all(scripted.log[("flaky", f"flaky{i}")] == 3 for i in range(3))


def test_retry_budget_exhausted_on_500(scripted):
  client = client_for(scripted.url + "/flaky", retries=1, backoff_s=0.01)
  with pytest.raises(JudgeError, match="HTTP 500") as e:
    client.score_batch(items(1, "tooflaky"))
  assert e.value.stats["failures"] == 1 and e.value.stats["retries"] == 1


def test_timeout_then_retry_succeeds(scripted):
  client = client_for(scripted.url + "/slow_once", timeout_s=0.5, retries=2, backoff_s=0.01)
  scores, stats = client.score_batch(items(2, "so"))
  assert scores == [0.75, 0.75] and stats["retries"] == 2


def test_server_slower_than_timeout_fails_fast(scripted):
  client = client_for(scripted.url + "/slow", timeout_s=0.3, retries=1, backoff_s=0.01)
  t0 = time.monotonic()
  with pytest.raises(JudgeError, match="no reply within 0.3 s"):
    client.score_batch(items(4, "slow"))
  assert time.monotonic() - t0 < 5      # bounded by timeout * attempts, never hangs


def test_prose_reply_scores_zero_and_is_counted(scripted):
  client = client_for(scripted.url + "/prose", max_unparseable_frac=1.0)
  scores, stats = client.score_batch(items(3, "prose"))
  assert scores == [0.0, 0.0, 0.0] and stats["unparseable"] == 3


def test_mostly_prose_judge_stops_with_its_own_words(scripted):
  """A judge that answers in prose no longer scores everything 0 silently."""
  with pytest.raises(JudgeError, match=r"3 of 3 replies hold no score \(more than "
                     r"judge.max_unparseable_frac=0.5\), e.g. 'The candidate seems to "
                     r"understand the problem well.'") as e:
    client_for(scripted.url + "/prose").score_batch(items(3, "prose2"))
  assert e.value.stats["unparseable"] == 3


@pytest.mark.parametrize("mode,asked", [("ratelimit", 1.0), ("ratedate", 1.0),
                                         ("busy503", 1.0)])
def test_retry_after_is_honoured_and_counted(scripted, mode, asked):
  """A judge that answers 429 (or 503) with `Retry-After` twice, then scores: the client
  waits what it asks (in seconds or as an HTTP date), though its own backoff would be ~10 ms,
  and counts the retries and the rate-limited replies."""
  client = client_for(f"{scripted.url}/{mode}", retries=3, backoff_s=0.01, max_wait_s=30)
  qs = [f"{mode}{i}" for i in range(3)]
  scores, stats = client.score_batch([JudgeItem(q, "1", "1") for q in qs])
  assert scores == [1.0, 1.0, 1.0]
  assert stats["retries"] == 6 and stats["failures"] == 0
  assert stats["rate_limited"] == (0 if mode == "busy503" else 6)
  assert stats["waited_s"] >= 6 * asked
  for q in qs:
    t = scripted.times[(mode, q)]
    assert len(t) == 3
    gaps = [b - a for a, b in zip(t, t[1:])]
    # Never sooner than asked; the slack above it is for a loaded machine.
    assert all(asked - 0.05 <= g < (2.2 if mode == "ratedate" else 1.1) + 3.0 for g in gaps), gaps
  assert client.totals["rate_limited"] == stats["rate_limited"]


def test_rate_limit_past_the_bounded_wait_is_the_judge_error(scripted):
  """A rate limit that never lifts ends, within judge.max_wait_s, in JudgeError (the run's
  exit 3) naming the limit; a wait asked beyond it ends at once, without waiting. (Counts, not
  wall times, carry the assertions: this machine is shared and a request can take seconds.)"""
  client = client_for(scripted.url + "/ratelimit_always", retries=50, backoff_s=0.01,
                      max_wait_s=3.0)
  t0 = time.monotonic()
  with pytest.raises(JudgeError, match=r"gave up after \d+ attempts in \d\.\d s.*the judge "
                     r"asked for 1 s\), would pass judge.max_wait_s=3; last error: HTTP 429 "
                     r"\(rate limited\)") as e:
    client.score_batch([JudgeItem("1-forever", "1", "1")])
  took = time.monotonic() - t0
  st = e.value.stats
  assert st["retries"] >= 1 and st["rate_limited"] == st["retries"] + 1
  assert st["waited_s"] >= st["retries"] * 1.0          # each retry waited what was asked
  assert st["waited_s"] <= took < 3.0 + 2.0             # and the whole stayed bounded
  assert isinstance(e.value, errors.JudgeFailure)
  with pytest.raises(JudgeError, match=r"gave up after 1 attempts.*judge asked for 3600 s") as e:
    client.score_batch([JudgeItem("3600-hour", "1", "1")])
  assert e.value.stats["retries"] == 0 and e.value.stats["waited_s"] == 0


def test_retry_after_values():
  now = 1_000_000_000.0
  assert retry_after_s("3", now) == 3.0 and retry_after_s(" 1.5 ", now) == 1.5
  assert retry_after_s(email.utils.formatdate(now + 10, usegmt=True), now) == 10.0
  assert retry_after_s(email.utils.formatdate(now - 10, usegmt=True), now) == 0.0
  assert retry_after_s("-4", now) == 0.0
  for bad in (None, "", "soon", "nan", "inf"):
    assert retry_after_s(bad, now) is None, bad


def test_backoff_is_jittered_and_capped():
  client = client_for("http://127.0.0.1:1", backoff_s=1.0, backoff_max_s=4.0)
  waits = {r: [client._backoff(r) for _ in range(200)] for r in (1, 2, 3, 6)}
  for r, base in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)):
    assert base / 2 <= min(waits[r]) and max(waits[r]) <= base
    assert len(set(waits[r])) > 100          # not one fixed value: callers spread out


def test_failure_counts_are_right_when_every_item_fails(scripted):
  """Was '(1 of 16 items failed)' when all 16 failed: the rest were cancelled, not fine."""
  client = client_for(scripted.url + "/flaky", retries=0, backoff_s=0.01, concurrency=1)
  with pytest.raises(JudgeError, match=r"\(1 of 16 items failed, 15 stopped unfinished"):
    client.score_batch(items(16, "allfail"))
  scores, _ = client_for(scripted.url + "/clamp").score_batch(
      [JudgeItem(q, "1", "1") for q in "abc"])
  assert scores == [1.0, 0.0, 0.25]


def test_connection_refused_raises_after_retry_budget():
  client = client_for(f"http://127.0.0.1:{free_port()}", model="m", retries=2,
                       backoff_s=0.01, timeout_s=5)
  t0 = time.monotonic()
  with pytest.raises(JudgeError, match="after 3 attempts.*ConnectError") as e:
    client.score_batch(items(5, "down"))
  assert time.monotonic() - t0 < 5
  assert e.value.stats["retries"] >= 2 and e.value.stats["failures"] >= 1


def test_cache_hits_on_repeats(scripted):
  client = client_for(scripted.url + "/count")
  batch = items(3, "cache") + items(3, "cache")     # duplicates inside one batch
  scores, stats = client.score_batch(batch)
  assert scores == [1.0] * 6
  assert stats["cache_hits"] == 3
  assert all(scripted.log[("count", f"cache{i}")] == 1 for i in range(3))
  _, stats = client.score_batch(items(3, "cache"))
  assert stats["cache_hits"] == 3 and stats["requests"] == 0
  assert client.totals["cache_hits"] == 6
  small = client_for(scripted.url + "/count", cache_size=2)
  small.score_batch(items(3, "lru"))                 # lru0 is evicted
  _, stats = small.score_batch(items(3, "lru")[1:])
  assert stats["cache_hits"] == 2
  _, stats = small.score_batch(items(1, "lru"))
  assert stats["cache_hits"] == 0 and scripted.log[("count", "lru0")] == 2


def test_api_key_enforced(keyed_verify_url, monkeypatch):
  r = httpx.post(keyed_verify_url + "/v1/chat/completions", json={"messages": []})
  assert r.status_code == 401 and "error" in r.json()
  assert httpx.get(keyed_verify_url + "/health").status_code == 200
  with pytest.raises(JudgeError, match="401"):
    client_for(keyed_verify_url).score_batch(items(1))
  monkeypatch.setenv("MY_JUDGE_KEY", KEY)
  from configs.base import get_base_config
  cfg = get_base_config().judge
  cfg.update(dict(base_url=keyed_verify_url, concurrency=4, timeout_s=10.0, retries=0,
                  api_key_env="MY_JUDGE_KEY", max_tokens=4))
  scores, _ = JudgeClient(JudgeCfg.of(cfg)).score_batch(items(2))
  assert scores == [1.0, 1.0]


def test_official_openai_client_needs_the_key(keyed_verify_url):
  """The official `openai` client against the keyed verify judge: the right key scores, a
  wrong or missing one gets 401."""
  import openai
  msgs = wire.judge_messages("What is 6 x 7?", "42", "<answer>42</answer>")
  ask = lambda key: openai.OpenAI(base_url=keyed_verify_url + "/v1", api_key=key, max_retries=0,
                                  timeout=30).chat.completions.create(
                                      model=server.VERIFY_MODEL_NAME, messages=msgs, max_tokens=4)
  assert ask(KEY).choices[0].message.content == "1"
  with pytest.raises(openai.AuthenticationError) as e:
    ask("sekret")
  assert e.value.status_code == 401
  r = httpx.post(keyed_verify_url + "/v1/chat/completions", json={"model": "x", "messages": msgs})
  assert r.status_code == 401                       # no Authorization header at all


def test_judge_refuses_to_start_without_its_key():
  """A key asked for but not there refuses to start (exit 2, one line naming the variable);
  a prefix of a key is no key; a judge bound beyond the loopback needs a key or an explicit
  allow_no_key=True. Each refusal comes before anything binds a port."""
  unset = "PASR_TEST_UNSET_KEY_VAR"
  r = run_command("pasr_jax.judge", "--config.backend=verify", f"--config.port={free_port()}",
                  f"--config.api_key_env={unset}", env={unset: ""})
  assert r.returncode == 2 and r.stdout == ""
  assert r.stderr.count("\n") == 1 and f"variable {unset} is unset" in r.stderr, r.stderr
  r = run_command("pasr_jax.judge", "--config.backend=verify", "--config.api_key=sekret")
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert "unknown config key 'api_key'" in r.stderr and "api_key_env" in r.stderr
  r = run_command("pasr_jax.judge", "--config.backend=verify", "--config.max_conc=2")
  assert r.returncode == 2 and "unknown config key 'max_conc'" in r.stderr, r.stderr
  r = run_command("pasr_jax.judge", "--config.backend=verify", f"--config.port={free_port()}",
                  "--config.host=0.0.0.0")
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert "host='0.0.0.0'" in r.stderr and "allow_no_key=True" in r.stderr
  # The decision itself, without binding a public address here.
  from pasr_jax.config import ConfigError
  from pasr_jax.judge.server import ServeCfg, api_key, is_loopback
  public = ServeCfg(backend="verify", host="0.0.0.0", allow_no_key=True)
  assert api_key(public) is None
  os.environ[unset] = KEY
  try:
    assert api_key(ServeCfg(backend="verify", host="0.0.0.0", api_key_env=unset)) == KEY
  finally:
    del os.environ[unset]
  with pytest.raises(ConfigError, match=f"config api_key_env='{unset}'"):
    api_key(ServeCfg(backend="verify", host="0.0.0.0", api_key_env=unset))
  with pytest.raises(ConfigError, match="config host='10.0.0.3'"):
    ServeCfg(backend="verify", host="10.0.0.3")
  assert api_key(ServeCfg(backend="verify")) is None   # loopback: a key is optional
  assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.3",
                                   "judge-host")] == [True, True, True, False, False, False]


def test_no_command_takes_abbreviated_flags():
  """Every argparse parser left in the package refuses prefixes of its flags (the commands
  on `cli.main` refuse unknown keys: the test above)."""
  import pathlib
  root = pathlib.Path(__file__).resolve().parents[1] / "pasr_jax"
  calls = [(p, line) for p in root.rglob("*.py") for line in p.read_text().splitlines()
           if re.search(r"\b(argparse\.ArgumentParser|_Parser)\(", line)
           and not line.lstrip().startswith("class ")]
  assert all("allow_abbrev=False" in line for _, line in calls), calls


def test_malformed_requests_get_4xx(verify_url):
  url = verify_url + "/v1/chat/completions"
  assert httpx.post(url, content=b"{not json").status_code == 400
  assert httpx.post(url, json=[1, 2]).status_code == 400
  assert httpx.post(url, json={"messages": "hi"}).status_code == 400
  assert httpx.post(url, json={"messages": [{"role": "user", "content": 3}]}).status_code == 400
  r = httpx.post(url, json={"messages": [{"role": "user", "content": "grade this"}]})
  assert r.status_code == 400 and "judge sections" in r.json()["error"]["message"]
  assert httpx.get(verify_url + "/health").status_code == 200     # still alive
  # List-of-parts content (newer OpenAI clients) is accepted.
  msgs = wire.judge_messages("q", "3", "3", "general")
  msgs[1]["content"] = [{"type": "text", "text": msgs[1]["content"]}]
  r = httpx.post(url, json={"model": "x", "messages": msgs})
  assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "1"


def test_oversized_and_odd_requests_get_4xx_not_a_crash(verify_url):
  url = verify_url + "/v1/chat/completions"
  big = wire.judge_messages("q", "3", "x" * (2 << 20), "general")   # 2 MB answer
  r = httpx.post(url, json={"model": "x", "messages": big})
  assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]

  def chunked():  # no Content-Length: the limit holds on the streamed body too
    for _ in range(40):
      yield b"x" * 65536
  assert httpx.post(url, content=chunked()).status_code == 413
  assert httpx.post(url, content=b"\xff\xfe\x00garbage").status_code == 400
  assert httpx.post(url, json={"messages": [None, 5]}).status_code == 400
  r = httpx.post(url, json={"model": "x", "messages": wire.judge_messages("q", "3", "3")})
  assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "1"


def test_server_binds_loopback_and_bounds_concurrency():
  """Defaults bind 127.0.0.1 only; past max_concurrency requests in flight, 503."""
  from pasr_jax.judge.server import ServeCfg
  assert ServeCfg(backend="verify").host == "127.0.0.1"
  proc, url = start_judge("--config.max_concurrency=2", latency_s=1.5)
  try:
    async def burst():
      async with httpx.AsyncClient(timeout=30) as c:
        body = {"model": "x", "messages": wire.judge_messages("q", "3", "3")}
        return await asyncio.gather(*[c.post(url + "/v1/chat/completions", json=body)
                                      for _ in range(6)])
    codes = sorted(r.status_code for r in asyncio.run(burst()))
    assert codes == [200, 200, 503, 503, 503, 503], codes
    assert httpx.get(url + "/health").status_code == 200     # still serving afterwards
  finally:
    stop(proc)


def test_bad_items_and_empty_batch(verify_url):
  client = client_for(verify_url)
  assert client.score_batch([]) == ([], client.score_batch([])[1])
  with pytest.raises(ValueError, match="judge item 1: field 'answer'"):
    client.score_batch([JudgeItem("q", "1", "1"), {"question": "q", "ground_truth": "1"}])
  with pytest.raises(prompts.PromptError, match="task_type='essay'"):
    client.score_batch([{"question": "q", "ground_truth": "1", "answer": "1",
                         "task_type": "essay"}])


def test_sync_wrapper_inside_running_loop(verify_url):
  async def inside():
    return client_for(verify_url).score_batch([JudgeItem("q", "2", "2")])
  scores, _ = asyncio.run(inside())
  assert scores == [1.0]


def test_cli_rejects_bad_vllm_model(tmp_path):
  r = run_command("pasr_jax.judge", "--config.backend=vllm")
  assert r.returncode == 2 and "config model=''" in r.stderr and "HF model dir" in r.stderr
  r = run_command("pasr_jax.judge", "--config.backend=vllm", f"--config.model={tmp_path}")
  assert r.returncode == 2 and "no config.json" in r.stderr and str(tmp_path) in r.stderr
  assert r.stderr.count("\n") == 1
  r = run_command("pasr_jax.judge", "--config.backend=verify", "--", "--max-num-seqs", "4")
  assert r.returncode == 2 and "vllm_args=('--max-num-seqs', '4')" in r.stderr, r.stderr
  r = run_command("pasr_jax.judge", "--config.backend=vllm", f"--config.model={tmp_path}",
                  "--config.port=0")
  assert r.returncode == 2 and "config port=0" in r.stderr, r.stderr


@pytest.mark.engine
def test_vllm_backend_with_smollm2(smollm2_dir):
  proc, url = start_judge(f"--config.model={smollm2_dir}", "--config.max_model_len=1024",
                          backend="vllm", timeout_s=600)
  try:
    import psutil
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "vLLM should run as a child process"
    client = client_for(url, timeout_s=120, retries=1, max_tokens=8, concurrency=4)
    batch = [JudgeItem("What is 2+3?", "5", "<answer>5</answer>"),
             JudgeItem("What is 2+3?", "5", "<answer>7</answer>"),
             JudgeItem("Capital of France?", "Paris", "Paris"),
             JudgeItem("Which?\nA: x\nB: y", "B", "B", "multiple_choice")]
    scores, stats = client.score_batch(batch)
    print("smollm2 judge scores", scores, stats)
    # SmolLM2 does not follow grading instructions: every reply is parsed or counted.
    assert client.model == os.path.basename(str(smollm2_dir).rstrip("/"))
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)
    assert stats["failures"] == 0 and stats["unparseable"] <= 4
    assert stats["requests"] >= 5
  finally:
    proc.send_signal(signal.SIGTERM)       # forwarded to the vLLM child
    proc.wait(120)
  assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def _paper_request(scripted, preset: str, mode: str, item: JudgeItem) -> tuple[float, dict]:
  """A paper preset's judge client scores `item` at the scripted server's `mode`: (score,
  the request body the server got)."""
  cfg = load_preset(preset)
  cfg.judge.base_url = f"{scripted.url}/{mode}"
  client = JudgeClient(JudgeCfg.of(cfg.judge),
                       prompts.load_prompts(PromptsCfg.of(cfg.prompts)))
  scores, _ = client.score_batch([item])
  body = [b for b in scripted.bodies if item.question in b["messages"][-1]["content"]][0]
  return scores[0], body


def test_paper_training_judge_is_graded_at_temperature_0_2(scripted):
  """The paper preset's judge: the graded instruction (0..1) at temperature 0.2."""
  score, body = _paper_request(scripted, "qwen2_5_7b", "temperature",
                               JudgeItem("paper-judge", "4", "2 + 2 = 4"))
  assert score == 0.2
  assert body["temperature"] == 0.2
  assert body["messages"][0] == {"role": "system", "content": prompts.GRADED_JUDGE_INSTRUCTION}
  assert "scale from 0" in prompts.GRADED_JUDGE_INSTRUCTION


def test_paper_judge_request_is_the_originals_layout_uncapped_without_thinking(scripted):
  """The paper preset asks as the original did: its system instruction, then `### Question`,
  `### Ground Truth`, `### Answer` blocks; no 16-token reply cap (graded judges write before
  the number); and a Qwen3 judge is told not to think (chat_template_kwargs)."""
  score, body = _paper_request(scripted, "qwen3_8b", "count", JudgeItem("layout-q", "4", "it is 4"))
  assert score == 1.0
  assert body["messages"][1]["content"] == (
      "### Question:\nlayout-q\n\n### Ground Truth:\n4\n\n### Answer:\nit is 4")
  assert body["max_tokens"] == 512
  assert body["chat_template_kwargs"] == {"enable_thinking": False}
  base = JudgeClient(load_preset("tiny_cpu").judge)  # base defaults: no extra field
  assert base.extra_body == {} and base.cfg.max_tokens == 16


def test_verify_server_grades_the_original_layout(verify_url):
  msgs = wire.judge_messages("What is 6 x 7?", "42", "<answer> 42 </answer>", layout="original")
  wrong = wire.judge_messages("What is 6 x 7?", "42", "<answer> 41 </answer>", layout="original")
  for m, want in ((msgs, "1"), (wrong, "0")):
    r = httpx.post(verify_url + "/v1/chat/completions", json={
        "model": "verify", "messages": m, "max_tokens": 512,
        "chat_template_kwargs": {"enable_thinking": False}}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].strip() == want


# ---------------------------------------------------------------- scripts/serve_judge.sh
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _serve_judge(*args: str, gpu: bool, tmp_path, **env) -> subprocess.CompletedProcess:
  """scripts/serve_judge.sh ARGS with PRINT_CMD=1 (the command it would exec). `gpu`: an
  `nvidia-smi` on PATH — a stub, as this machine has no GPU — so the script takes its GPU
  branch; without it, PATH holds no nvidia-smi."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  stub = bin_dir / "nvidia-smi"
  if gpu:
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
  elif stub.exists():
    stub.unlink()
  path = os.pathsep.join([str(bin_dir)] + [p for p in os.environ["PATH"].split(os.pathsep)
                                           if not os.path.exists(os.path.join(p, "nvidia-smi"))])
  base = {k: v for k, v in os.environ.items() if not k.startswith(("JUDGE_", "CUDA_VISIBLE"))}
  return subprocess.run(["scripts/serve_judge.sh", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=60, env={**base, "PATH": path, "PRINT_CMD": "1", **env})


def _judge_argv(printed: str) -> list[str]:
  """The pasr_jax.judge arguments of a printed command line."""
  import shlex
  cmd = shlex.split(printed)
  return cmd[cmd.index("pasr_jax.judge") + 1:]


def _serve_cfg(argv: list[str]):
  """The judge's config from its `--config.k=v` arguments, parsed as `cli.main` parses them."""
  from helpers import command_flags
  from pasr_jax import cli
  from pasr_jax.judge.server import ServeCfg
  with command_flags():
    rest = cli.parse_flags(["judge", *argv], schema=ServeCfg, preset=False)
    assert rest == ["judge"], rest
    cfg = ServeCfg.of(cli.config())
  return cfg


def test_serve_judge_aliases_need_the_local_dir(tmp_path):
  """`vllm 32b|14b`: the hub id's dir under JUDGE_MODELS, or one line saying where it was
  looked for and what to do (before any engine starts)."""
  r = _serve_judge("vllm", "32b", gpu=True, tmp_path=tmp_path, JUDGE_MODELS=str(tmp_path / "m"))
  assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
  assert "32b = Qwen/Qwen2.5-32B-Instruct" in r.stderr
  assert f"{tmp_path}/m/Qwen2.5-32B-Instruct" in r.stderr and "JUDGE_MODELS" in r.stderr
  r = _serve_judge("vllm", str(tmp_path / "nowhere"), gpu=False, tmp_path=tmp_path)
  assert r.returncode == 2 and "not an HF model dir" in r.stderr, r.stderr
  for alias, name in (("32b", "Qwen2.5-32B-Instruct"), ("14b", "Qwen2.5-14B-Instruct")):
    (tmp_path / "m" / name).mkdir(parents=True)
    (tmp_path / "m" / name / "config.json").write_text("{}")
  r = _serve_judge("vllm", "14b", "8002", gpu=False, tmp_path=tmp_path,
                   JUDGE_MODELS=str(tmp_path / "m"))
  assert r.returncode == 0, r.stderr
  argv = _judge_argv(r.stdout)
  assert f"--config.model={tmp_path}/m/Qwen2.5-14B-Instruct" in argv
  assert argv[-1] == "--" and "--tensor-parallel-size" not in argv   # CPU: no TP


@pytest.mark.parametrize("env,tp", [({}, "2"), ({"CUDA_VISIBLE_DEVICES": "4,5,6,7"}, "4"),
                                    ({"CUDA_VISIBLE_DEVICES": "4,5", "JUDGE_TP": "1"}, "1")])
def test_serve_judge_gives_a_gpu_judge_tp_and_a_context_that_fits(tmp_path, env, tp):
  """On a GPU host the 32B judge gets tensor parallelism (JUDGE_TP, else its visible GPUs,
  else 2) and an 8192-token context; flags after `--` reach vLLM after ours; the command
  parses as python -m pasr_jax.judge's."""
  d = tmp_path / "m" / "Qwen2.5-32B-Instruct"
  d.mkdir(parents=True)
  (d / "config.json").write_text("{}")
  r = _serve_judge("vllm", "32b", "8001", "--config.served_model_name=judge", "--",
                   "--max-num-seqs", "64", gpu=True, tmp_path=tmp_path,
                   JUDGE_MODELS=str(tmp_path / "m"), **env)
  assert r.returncode == 0, r.stderr
  argv = _judge_argv(r.stdout)
  ours, vllm = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  assert vllm == ["--tensor-parallel-size", tp, "--max-num-seqs", "64"]
  cfg = _serve_cfg(ours)
  assert (cfg.max_model_len, cfg.dtype, cfg.enforce_eager) == (8192, "auto", False)
  assert cfg.served_model_name == "judge" and cfg.model == str(d)


def test_serve_judge_beyond_the_loopback_needs_a_key(tmp_path):
  """JUDGE_HOST=0.0.0.0: without JUDGE_API_KEY the judge refuses to start (one line naming
  the fix); JUDGE_ALLOW_NO_KEY=1 or the key lets it."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JUDGE_")}
  r = subprocess.run(["scripts/serve_judge.sh", "verify", str(free_port())], cwd=ROOT,
                     capture_output=True, text=True, timeout=60,
                     env={**env, "JUDGE_HOST": "0.0.0.0", "PY": sys.executable})
  assert r.returncode == 2 and "allow_no_key=True" in r.stderr and "Traceback" not in r.stderr
  r = _serve_judge("verify", "8001", gpu=False, tmp_path=tmp_path, JUDGE_HOST="0.0.0.0",
                   JUDGE_ALLOW_NO_KEY="1")
  assert _judge_argv(r.stdout)[-1] == "--config.allow_no_key=True"
  assert _serve_cfg(_judge_argv(r.stdout)).allow_no_key
  r = _serve_judge("verify", "8001", gpu=False, tmp_path=tmp_path, JUDGE_HOST="0.0.0.0",
                   JUDGE_API_KEY="k")
  assert _judge_argv(r.stdout)[-1] == "--config.api_key_env=JUDGE_API_KEY"
  assert "k" not in _judge_argv(r.stdout)        # the key stays in the env, not in argv


def test_a_run_checks_its_key_against_a_keyed_judge(keyed_verify_url, monkeypatch, tmp_path):
  """A judge that wants a key is a judge that answers (preflight's probe); the run's start
  (`ensure_judge`, before any weights load) sends our key and refuses, naming the variable,
  when the judge does not take it; with the right key nothing is started."""
  from pasr_jax.config import ConfigError
  from pasr_jax.judge.local import ensure_judge, judge_answers
  assert judge_answers(keyed_verify_url)
  assert not judge_answers(f"http://127.0.0.1:{free_port()}")
  cfg = JudgeCfg(base_url=keyed_verify_url, api_key_env="PASR_TEST_RUN_KEY", autostart=True)
  log = tmp_path / "judge.log"
  monkeypatch.delenv("PASR_TEST_RUN_KEY", raising=False)
  with pytest.raises(ConfigError, match=r"refuses a request without a key \(HTTP 401\); "
                     r"export PASR_TEST_RUN_KEY=<the judge's key>"):
    ensure_judge(cfg, log)
  monkeypatch.setenv("PASR_TEST_RUN_KEY", "wrong")
  with pytest.raises(ConfigError, match=r"refuses our key \(HTTP 401\)"):
    ensure_judge(cfg, log)
  monkeypatch.setenv("PASR_TEST_RUN_KEY", KEY)
  assert ensure_judge(cfg, log) is None and not log.exists()
