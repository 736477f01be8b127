"""The vLLM internals pasr_jax relies on (`pasr_jax.rollout.vllm_internals`), against the
installed vLLM: each check fails, naming what is missing, when an upgrade drops one.

The fast tests read the installed vLLM's classes and sources (no engine); the slow one checks
the live objects of the session engine.
"""

import inspect
import logging
import queue

import psutil
import pytest

from pasr_jax.rollout import vllm_internals as vi


@pytest.mark.parametrize("name", sorted(vi.CHECKS))
def test_the_installed_vllm_has_it(name):
  vi.CHECKS[name]()


def test_a_missing_internal_is_named():
  """What a check raises when vLLM lacks the attribute: the attribute, and what it is for."""
  class Client:
    pass

  with pytest.raises(vi.VllmUnsupported, match=r"Client\.outputs_queue.*for the watchdog"):
    vi._attr(Client(), "outputs_queue", "for the watchdog")
  with pytest.raises(vi.VllmUnsupported, match="lacks SyncMPClient.nothing_like_this"):
    from vllm.v1.engine.core_client import SyncMPClient
    vi._source_has(SyncMPClient, "nothing_like_this", "SyncMPClient.nothing_like_this", "x")


def test_the_worker_extension_fits_vllms_worker():
  """vLLM refuses an extension that shadows a worker attribute; ours names everything pasr_*
  and defines every RPC the engine calls."""
  from vllm.v1.worker.gpu_worker import Worker
  ours = {n for n in vars(vi.SyncExtension) if not n.startswith("__")}
  assert ours == {vi.RPC_RELOAD, vi.RPC_VERSION, vi.RPC_ATTACH}
  assert not ours & set(dir(Worker))
  assert vi.WORKER_EXTENSION == "pasr_jax.rollout.vllm_internals.SyncExtension"


def test_the_reaper_matches_vllms_process_titles():
  """The reaper, a script that imports nothing of the package, keeps its own copy."""
  from pasr_jax.rollout import reaper
  assert reaper.ENGINE_TITLE_PREFIX == vi.PROCESS_TITLE_PREFIX


def test_log_level_is_set_on_vllms_logger():
  old = logging.getLogger("vllm").level
  try:
    vi.set_log_level("ERROR")
    assert logging.getLogger("vllm.anything").getEffectiveLevel() == logging.ERROR
  finally:
    logging.getLogger("vllm").setLevel(old)


def test_log_level_is_a_checked_config_key():
  from pasr_jax.config import ConfigError, VllmCfg
  assert VllmCfg().log_level == "WARNING"
  with pytest.raises(ConfigError, match=r"rollout.vllm.log_level='LOUD'"):
    VllmCfg(log_level="LOUD").check()


def test_only_the_rotary_caches_reload_warning_is_dropped():
  """The reload's per-layer warning comes from the logger and format the filter names; a
  rotary embedding's (a computed cache) is dropped, any other layer's kept."""
  from vllm.model_executor.model_loader.reload import layerwise
  assert layerwise.logger.name == vi.RELOAD_LOGGER
  assert '"%s: Failed to load weights"' in inspect.getsource(layerwise)

  def record(layer):
    return logging.LogRecord(vi.RELOAD_LOGGER, logging.WARNING, "layerwise.py", 1,
                             "%s: Failed to load weights", (layer,), None)

  assert not vi._computed_cache_warning(record("RotaryEmbedding"))
  assert not vi._computed_cache_warning(record("Llama3RotaryEmbedding"))
  assert vi._computed_cache_warning(record("QKVParallelLinear"))


def test_importing_the_extension_does_not_import_jax():
  """vLLM's workers import this module; JAX would cost them seconds at start and exit."""
  import subprocess
  import sys
  code = ("import sys; import pasr_jax.rollout.vllm_internals; "
          "print(sorted(m for m in ('jax', 'flax', 'vllm', 'torch') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]", out


@pytest.mark.engine
def test_live_engine_internals(vllm_sampler):
  """The session engine's private objects are what `Internals` expects."""
  vllm_sampler.start()
  internals = vllm_sampler.engine._internals
  assert isinstance(internals.outputs_queue, queue.Queue)
  assert isinstance(internals.utility_results, dict)
  assert internals.processes and all(p.is_alive() for p in internals.processes)
  assert internals.dead() is None
  # attach noted the processes that run the model: on CPU one worker, a child of the core.
  core = psutil.Process(internals.processes[0].pid)
  assert internals.model_pids == {p.pid for p in core.children()} and internals.model_pids
  assert vi.loaded_versions(vllm_sampler.llm) == [vllm_sampler.engine.held_version()]
  assert inspect.ismethod(vllm_sampler.llm.llm_engine.engine_core.shutdown)
