"""Faults survived (issue #16): real processes, real engines, real servers on 127.0.0.1.

Each case causes the fault for real (SIGKILL of a real process, a server that really answers
500 or prose, real damaged files) and asserts what the run did and that nothing was lost.
"""

import os
import signal
import threading
import time

import psutil
import pytest

from pasr_jax.rollout import EngineError, VllmSampler


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  from pasr_jax.tiny import make_tiny_model_dir
  return make_tiny_model_dir(str(tmp_path_factory.mktemp("tiny") / "model"), seed=0)


@pytest.fixture(scope="module")
def tiny_sampler(tiny_dir):
  """A vLLM engine of its own on the tiny model: these tests kill it."""
  with VllmSampler(tiny_dir, max_model_len=512, kv_cache_space_gib=0.25, seed=0) as s:
    yield s


def _engine_core_pids(sampler) -> list[int]:
  manager = sampler.llm.llm_engine.engine_core.resources.engine_manager
  return [p.pid for p in manager.processes]


def _prompts(sampler, k=4):
  tok = sampler.tokenizer
  return [tok.encode(f"question {i}: what is {i}+{i}?") for i in range(k)]


def test_engine_core_killed_mid_generation_raises_and_restarts(tiny_sampler):
  """SIGKILL of the engine core during a rollout: an EngineError within seconds (vLLM alone
  waits forever), the engine closed, and the next call runs on a fresh engine."""
  prompts = _prompts(tiny_sampler)
  tiny_sampler.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=4, seed=0)
  pids = _engine_core_pids(tiny_sampler)
  killed_at = []

  def kill_soon():
    time.sleep(2.0)
    killed_at.append(time.monotonic())
    for pid in pids:
      os.kill(pid, signal.SIGKILL)

  threading.Thread(target=kill_soon, daemon=True).start()
  with pytest.raises(EngineError, match="engine died"):
    # ignore_eos is not exposed: max_tokens large and many answers keep it busy past 2 s
    tiny_sampler.generate(prompts * 16, n=8, temperature=1.0, top_p=1.0, max_tokens=400,
                          seed=1)
  assert killed_at and time.monotonic() - killed_at[0] < 15.0
  assert tiny_sampler._llm is None  # closed; no process of the old engine is left
  assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                 for p in pids)
  groups = tiny_sampler.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=4,
                                 seed=0)
  assert len(groups) == len(prompts) and all(len(g.completions) == 2 for g in groups)


def test_generate_past_its_time_limit_raises(tiny_sampler):
  prompts = _prompts(tiny_sampler)
  tiny_sampler.llm  # engine start is not part of the limit
  tiny_sampler.timeout_s = 0.5
  try:
    t = time.monotonic()
    with pytest.raises(EngineError, match=r"no answer within 0.5 s \(cfg.rollout.timeout_s\)"):
      tiny_sampler.generate(prompts * 16, n=8, temperature=1.0, top_p=1.0, max_tokens=400,
                            seed=2)
    assert time.monotonic() - t < 10.0
  finally:
    tiny_sampler.timeout_s = 0.0


def test_stop_request_ends_the_wait(tiny_sampler):
  prompts = _prompts(tiny_sampler)
  tiny_sampler.llm
  t0 = time.monotonic()
  tiny_sampler.should_stop = lambda: time.monotonic() - t0 > 1.0
  try:
    with pytest.raises(EngineError, match="interrupted"):
      tiny_sampler.generate(prompts * 16, n=8, temperature=1.0, top_p=1.0, max_tokens=400,
                            seed=3)
  finally:
    tiny_sampler.should_stop = lambda: False
