"""Every part of vLLM that is not its public `LLM` API and that pasr_jax relies on (vllm 0.32).

What the public API does not offer is reached here and only here:

* the engine client's private state (`Internals`): the queue `LLM.generate` waits on and the
  futures `collective_rpc` waits on, which a dead engine core leaves waiting forever (a
  watchdog puts an exception into them), the engine core processes and vLLM's "engine dead"
  flag, and the client's shutdown;
* the worker extension (`SyncExtension`, mixed into vLLM's worker class by the engine argument
  ``worker_extension_cls``) and its RPC names: a reload that also rebuilds the kernels of tied
  layers, the version each worker holds, a watch on the trainer's process, and a fast exit;
* the engine arguments, environment variables and logger that the engine is configured with;
* the executor (`ForkingExecutor`): the engine core is spawned (the trainer holds JAX's threads,
  which a fork would copy mid-flight), but its workers are forked from it, as vLLM does by
  default, instead of each importing vLLM and torch again.

`check_installed()` runs before the first engine starts and raises `VllmUnsupported`, naming
what the installed vLLM lacks, instead of a safety (the watchdog, the version check) silently
switching off; `Internals` checks the live objects of each started engine the same way.
tests/test_vllm_internals.py checks every item against the installed vLLM.

This module is imported inside vLLM's worker processes (for `SyncExtension`): vLLM and psutil
are imported where used, so that import stays cheap.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import select
import signal
import threading
import time
from typing import Any, Callable

from pasr_jax import errors

# The worker extension and its RPCs (methods of SyncExtension, run on every worker).
WORKER_EXTENSION = f"{__name__}.SyncExtension"
RPC_RELOAD = "pasr_reload_weights"
RPC_VERSION = "pasr_loaded_version"
RPC_ATTACH = "pasr_attach"

# Environment variables the engine's processes read at their start (set for the engine only,
# see `engine`'s scoped env): spawn, not fork, for its engine core; cores kept free of the
# CPU model's threads; the log level of vLLM's own processes.
ENV_MULTIPROC_METHOD = "VLLM_WORKER_MULTIPROC_METHOD"
ENV_CPU_RESERVED_CORES = "VLLM_CPU_NUM_OF_RESERVED_CPU"
ENV_LOG_LEVEL = "VLLM_LOGGING_LEVEL"
ENV_VARS = (ENV_MULTIPROC_METHOD, ENV_CPU_RESERVED_CORES, ENV_LOG_LEVEL)

# `vllm.LLM` keyword arguments beyond the model's basics, each an `EngineArgs` field.
ENGINE_ARGS = ("worker_extension_cls", "distributed_executor_backend", "logprobs_mode",
               "kv_cache_memory_bytes", "enable_chunked_prefill", "max_num_batched_tokens",
               "use_tqdm_on_load")
LOGPROBS_MODE = "processed_logprobs"  # see vllm_sampler's docstring

# vLLM's processes are named (setproctitle) "VLLM::EngineCore", "VLLM::Worker", ...; the
# reaper (a script that imports nothing of the package) matches the same prefix.
PROCESS_TITLE_PREFIX = "VLLM"

# After its workers are gone, what is left of an engine core's shutdown is on the host
# (closing its queues); past this it is killed rather than waited for through the
# interpreter's exit.
CORE_TAIL_S = 0.5


class VllmUnsupported(errors.UserError):
  """The installed vLLM lacks something pasr_jax relies on (it was written against 0.32)."""


def _unsupported(what: str, why: str) -> VllmUnsupported:
  import vllm
  return VllmUnsupported(f"the installed vLLM ({vllm.__version__}) lacks {what}, which pasr_jax "
                         f"needs {why}; install the vLLM version of requirements.txt")


def _attr(obj: Any, name: str, why: str, kind: type | tuple[type, ...] | None = None) -> Any:
  """`obj.name`, which must exist (and be a `kind`): else VllmUnsupported."""
  if not hasattr(obj, name):
    raise _unsupported(f"{type(obj).__name__}.{name}", why)
  value = getattr(obj, name)
  if kind is not None and not isinstance(value, kind):
    raise _unsupported(f"{type(obj).__name__}.{name} of type {kind}", why)
  return value


def _source_has(obj: Any, needle: str, what: str, why: str) -> None:
  if needle not in inspect.getsource(obj):
    raise _unsupported(what, why)


# --- checks of the installed vLLM (no engine needed) ----------------------------------------

def _check_client() -> None:
  from vllm.v1.engine import core_client
  from vllm.v1.engine.llm_engine import LLMEngine
  why = "to reach the engine core's client"
  _source_has(LLMEngine.__init__, "self.engine_core = ", "LLMEngine.engine_core", why)
  _attr(core_client, "SyncMPClient", why)
  _attr(core_client.SyncMPClient, "shutdown", "to end the engine")
  if "timeout" not in inspect.signature(core_client.SyncMPClient.shutdown).parameters:
    raise _unsupported("SyncMPClient.shutdown(timeout=...)", "to end the engine in bounded time")


def _check_waits() -> None:
  from vllm.v1.engine import core_client
  why = "to end a wait on a dead engine (its watchdog)"
  _source_has(core_client.SyncMPClient.__init__, "self.outputs_queue = queue.Queue",
              "SyncMPClient.outputs_queue (a queue.Queue)", why)
  _source_has(core_client.SyncMPClient.get_output, "self.outputs_queue.get()",
              "SyncMPClient.get_output reading outputs_queue", why)
  _source_has(core_client.MPClient.__init__, "self.utility_results:",
              "MPClient.utility_results (pending collective_rpc futures)", why)


def _check_processes() -> None:
  import dataclasses
  from vllm.v1.engine import core_client, utils
  why = "to watch and end the engine core's processes"
  fields = {f.name for f in dataclasses.fields(core_client.BackgroundResources)}
  for name in ("engine_manager", "engine_dead"):
    if name not in fields:
      raise _unsupported(f"BackgroundResources.{name}", why)
  _source_has(utils.CoreEngineProcManager.__init__, "self.processes: list[BaseProcess]",
              "CoreEngineProcManager.processes", why)


def _check_dead_error() -> None:
  from vllm.v1.engine import exceptions
  _attr(exceptions, "EngineDeadError", "to tell a dead engine from a failed call")


def _check_engine_args() -> None:
  import dataclasses
  import typing
  from vllm.config.model import LogprobsMode
  from vllm.engine.arg_utils import EngineArgs
  fields = {f.name for f in dataclasses.fields(EngineArgs)}
  for name in ENGINE_ARGS:
    if name not in fields:
      raise _unsupported(f"the engine argument {name}", "to configure the engine")
  if LOGPROBS_MODE not in typing.get_args(LogprobsMode):
    raise _unsupported(f'logprobs_mode="{LOGPROBS_MODE}"', "for tempered sampler logprobs")


def _check_env_vars() -> None:
  import vllm.envs as envs
  for name in ENV_VARS:
    if name not in envs.environment_variables:
      raise _unsupported(f"the environment variable {name}", "to configure its processes")


def _check_logger() -> None:
  from vllm import logger
  if "vllm" not in logger.DEFAULT_LOGGING_CONFIG["loggers"]:
    raise _unsupported('the "vllm" logger', "to set its log level (rollout.vllm.log_level)")


def _check_worker() -> None:
  from vllm.model_executor.layers import vocab_parallel_embedding as vpe
  from vllm.v1.worker import worker_base
  from vllm.v1.worker.gpu_worker import Worker
  why = "for the weight sync's reload (SyncExtension)"
  _source_has(worker_base.WorkerWrapperBase.init_worker, "worker_extension_cls",
              "ParallelConfig.worker_extension_cls", why)
  _attr(Worker, "reload_weights", why)
  _source_has(Worker, "self.model_runner: GPUModelRunner = ", "Worker.model_runner", why)
  from vllm.v1.worker.gpu_model_runner import GPUModelRunner
  _attr(GPUModelRunner, "get_model", why)
  if "weights_path" not in inspect.signature(GPUModelRunner.reload_weights).parameters:
    raise _unsupported("GPUModelRunner.reload_weights(weights_path=...)", why)
  _attr(vpe, "ParallelLMHead", why)
  _attr(_attr(vpe, "UnquantizedEmbeddingMethod", why), "process_weights_after_loading", why)


def _check_executor() -> None:
  from vllm.v1.executor.multiproc_executor import MultiprocExecutor
  from vllm.utils import system_utils
  why = "to fork the engine's workers from its core (ForkingExecutor)"
  _source_has(MultiprocExecutor._init_executor, "context = get_mp_context()",
              "MultiprocExecutor starting its workers with get_mp_context()", why)
  _source_has(system_utils.get_mp_context, "envs.VLLM_WORKER_MULTIPROC_METHOD",
              f"get_mp_context() reading {ENV_MULTIPROC_METHOD}", why)


def _check_process_titles() -> None:
  import importlib.util
  import vllm.envs as envs
  from vllm.utils import system_utils
  why = "to find the engine's processes when the trainer dies (rollout/reaper.py)"
  _source_has(system_utils.set_process_title, 'setproctitle(f"{prefix}::{name}")',
              "process titles <prefix>::<name>", why)
  if envs.VLLM_PROCESS_NAME_PREFIX != PROCESS_TITLE_PREFIX:
    raise _unsupported(f"process titles {PROCESS_TITLE_PREFIX}::<name>", why)
  if importlib.util.find_spec("setproctitle") is None:
    raise _unsupported("setproctitle (its process titles)", why)


# Each internal's check, by name; `check_installed` runs them all.
CHECKS: dict[str, Callable[[], None]] = {
    "client": _check_client, "waits": _check_waits, "processes": _check_processes,
    "dead_error": _check_dead_error, "engine_args": _check_engine_args,
    "env_vars": _check_env_vars, "logger": _check_logger, "worker": _check_worker,
    "process_titles": _check_process_titles, "executor": _check_executor,
}
# Checked where the code that needs them runs: in the worker (`pasr_attach`), the rest here.
_WORKER_CHECKS = ("worker",)
_checked = False


def check_installed() -> None:
  """Raises VllmUnsupported if the installed vLLM lacks an internal this process uses (once;
  the worker's are checked in the worker, at the engine's start)."""
  global _checked
  if not _checked:
    for name, check in CHECKS.items():
      if name not in _WORKER_CHECKS:
        check()
    _checked = True


def set_log_level(level: str) -> None:
  """This process's "vllm" logger at `level` (its processes take `ENV_LOG_LEVEL`)."""
  logging.getLogger("vllm").setLevel(level)


def is_engine_dead(e: BaseException) -> bool:
  from vllm.v1.engine.exceptions import EngineDeadError
  return isinstance(e, EngineDeadError)


# --- one started engine ---------------------------------------------------------------------

class Internals:
  """The private parts of one started `vllm.LLM`, resolved (and checked) at its start."""

  def __init__(self, llm: Any):
    from vllm.v1.engine.core_client import SyncMPClient
    client = _attr(_attr(llm, "llm_engine", "to reach its engine"), "engine_core",
                   "to reach the engine core's client")
    if not isinstance(client, SyncMPClient):
      raise VllmUnsupported(
          f"the vLLM engine runs in this process ({type(client).__name__}, "
          "VLLM_ENABLE_V1_MULTIPROCESSING=0?): pasr_jax needs its engine core in a child "
          "process, to watch it and end a wait on it")
    import queue
    self.llm = llm
    self.client = client
    self.model_pids: set[int] = set()  # processes that run the model (see `attach`)
    self.outputs_queue = _attr(client, "outputs_queue", "for the watchdog", queue.Queue)
    self.utility_results = _attr(client, "utility_results", "for the watchdog", dict)
    self.resources = _attr(client, "resources", "to watch the engine core")
    _attr(self.resources, "engine_dead", "to watch the engine core", bool)
    manager = _attr(self.resources, "engine_manager", "to watch the engine core")
    self.processes = list(_attr(manager, "processes", "to watch the engine core", list))
    if not self.processes:
      raise VllmUnsupported("the vLLM engine reports no engine core process")
    # Handles taken now: they never stand for another process that reuses a pid later.
    self._handles = _handles(p.pid for p in self.processes)

  def attach(self, trainer_pid: int) -> None:
    """Sets up each worker (`SyncExtension.pasr_attach`): a watch on `trainer_pid`, and a
    short exit; notes which processes run the model."""
    self.model_pids = set(self.llm.collective_rpc(RPC_ATTACH, args=(trainer_pid,)))
    self._handles += _handles(self.model_pids - {h.pid for h in self._handles})

  def _tree(self) -> list:
    """The engine's processes: its engine cores, the workers `attach` noted (also once their
    engine core is gone) and every descendant of them that is still running."""
    import psutil
    tree = {h.pid: h for h in self._handles}
    for h in self._handles:
      with contextlib.suppress(psutil.Error):
        if h.is_running():
          tree.update((c.pid, c) for c in h.children(recursive=True))
    return list(tree.values())

  def dead(self) -> str | None:
    """Why the engine is dead ("" unknown), or None while it runs."""
    gone = [p for p in self.processes if not p.is_alive()]
    if gone:
      return ", ".join(f"{p.name} pid {p.pid} exit code {p.exitcode}" for p in gone)
    return "" if self.resources.engine_dead else None

  def fail_waits(self, err: Exception) -> None:
    """Ends every wait on the engine with `err`: `LLM.generate`'s on the output queue and
    `collective_rpc`'s (and other utility calls') on their futures."""
    self.outputs_queue.put_nowait(err)
    for fut in list(self.utility_results.values()):
      if not fut.done():
        with contextlib.suppress(Exception):  # resolved meanwhile
          fut.set_exception(err)

  def shutdown(self, grace_s: float) -> None:
    """Ends the engine's processes, waiting on them only while they may need it.

    vLLM's own shutdown runs (SIGTERM to the engine core, which ends its workers): each
    process that runs the model (the workers; the engine core when it runs the model itself)
    frees its memory, device memory included, in that shutdown and then exits (`pasr_attach`
    keeps its interpreter's exit short). At most `grace_s` is given to them; the rest (an
    engine core whose workers are gone: what is left of its shutdown is on the host) gets
    `CORE_TAIL_S` more; then everything the engine started that is still there is killed,
    rather than waited for through its interpreter's exit.
    """
    import psutil
    tree = self._tree()
    # Before `attach` told which processes run the model, every one may.
    holders = [p for p in tree if p.pid in self.model_pids] or tree
    failed: list[BaseException] = []

    def vllm_shutdown():
      try:
        self.client.shutdown(timeout=grace_s)
      except BaseException as e:  # pylint: disable=broad-except
        failed.append(e)

    t0 = time.monotonic()
    thread = threading.Thread(target=vllm_shutdown, name="pasr-engine-shutdown", daemon=True)
    try:
      thread.start()
    except RuntimeError:  # no new threads while the interpreter exits (Python >= 3.12)
      thread = None
      vllm_shutdown()     # vLLM's own shutdown alone, bounded by grace_s
    _wait_gone(holders, t0 + grace_s)
    _wait_gone(tree, min(t0 + grace_s, time.monotonic() + CORE_TAIL_S))
    for p in tree:
      with contextlib.suppress(psutil.Error):
        if not _gone(p):
          p.kill()
    if thread is not None:
      thread.join(grace_s + 5.0)
    _wait_gone(tree, time.monotonic() + 5.0)
    if failed:
      raise failed[0]


# --- the executor ---------------------------------------------------------------------------

_FORKING_EXECUTOR = "ForkingExecutor"


def forking_executor() -> type:
  """`ForkingExecutor`, vLLM's multiprocess executor with its workers forked from the engine
  core (an `LLM(distributed_executor_backend=...)` value; CPU only, where vLLM always runs
  its workers in processes of their own).

  The trainer spawns the engine core (ENV_MULTIPROC_METHOD): a fork would copy JAX's threads
  mid-flight. The core holds no JAX and has run no parallel region yet, so its workers can be
  forked from it, which saves each of them importing vLLM and torch again. Built on first
  use, under this module's name: a spawned engine core finds it here when it unpickles its
  config."""
  cls = globals().get(_FORKING_EXECUTOR)
  if cls is None:
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    class ForkingExecutor(MultiprocExecutor):
      def __init__(self, *args, **kwargs):
        os.environ[ENV_MULTIPROC_METHOD] = "fork"  # read by get_mp_context as workers start
        super().__init__(*args, **kwargs)

    ForkingExecutor.__module__, ForkingExecutor.__qualname__ = __name__, _FORKING_EXECUTOR
    cls = globals()[_FORKING_EXECUTOR] = ForkingExecutor
  return cls


def __getattr__(name: str) -> Any:
  if name == _FORKING_EXECUTOR:
    return forking_executor()
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shutdown_unchecked(llm: Any) -> None:
  """vLLM's own shutdown of an engine whose internals did not check out (`Internals`)."""
  llm.llm_engine.engine_core.shutdown()


def _handles(pids) -> list:
  import psutil
  out = []
  for pid in pids:
    with contextlib.suppress(psutil.Error):
      out.append(psutil.Process(pid))
  return out


def _gone(p) -> bool:
  import psutil
  try:
    return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
  except psutil.Error:
    return True


def _wait_gone(procs: list, deadline: float) -> None:
  """Polls until every process in `procs` has exited or `deadline` (time.monotonic) passes.
  Polling, not waiting: the engine cores are reaped by multiprocessing, which vLLM joins."""
  while not all(_gone(p) for p in procs) and time.monotonic() < deadline:
    time.sleep(0.02)


# --- the engine's RPCs ------------------------------------------------------------------------

def reload(llm: Any, path: str, version: int) -> list[list[str]]:
  """Every worker reloads its weights from `path` and then holds `version`; per worker, the
  tied layers it rebuilt."""
  return llm.collective_rpc(RPC_RELOAD, kwargs={"weights_path": path, "version": version})


def loaded_versions(llm: Any) -> list[int | None]:
  """The policy version each worker holds (None: the weights the engine started with)."""
  return llm.collective_rpc(RPC_VERSION)


class SyncExtension:
  """Mixin for vLLM's worker class (``worker_extension_cls``), run inside its worker
  processes: methods and one attribute (`pasr_version`), all named pasr_* so nothing of
  vLLM's is shadowed.

  Why not plain ``collective_rpc("reload_weights")``: vLLM's in-place reload re-runs
  ``process_weights_after_loading`` only for layers that received weights. A tied
  ``lm_head`` shares its ``weight`` Parameter with ``embed_tokens`` and receives none itself,
  so its data changes but anything its quant method derived from the weight stays stale. On
  CPU that is the pre-packed GEMM (`cpu_linear`), so the logits used the old embedding (up to
  2.5 nats logprob error on SmolLM2). We re-run the quant method of every such tied layer.
  """

  def pasr_reload_weights(self, weights_path: str, version: int | None = None) -> list[str]:
    """vLLM's in-place reload from `weights_path`, then refreshes tied layers; the worker
    then holds policy `version` (what `pasr_loaded_version` reports).

    Returns the names of the modules whose processed weights were rebuilt.
    """
    self.pasr_version = None  # a reload that fails half way leaves no version at all
    self.reload_weights(weights_path=weights_path)
    refreshed = refresh_tied_layers(self.model_runner.get_model())
    self.pasr_version = version
    return refreshed

  def pasr_loaded_version(self) -> int | None:
    """The policy version of the last completed reload; None: the weights the engine was
    started from (or a failed reload's)."""
    return getattr(self, "pasr_version", None)

  def pasr_attach(self, trainer_pid: int) -> int:
    """Prepares this worker's end; returns its pid.

    Its exit: once vLLM's shutdown has run (the model's memory freed) and every exit handler
    after it, the interpreter's own teardown would still take seconds (collecting the whole
    object graph, unloading thousands of modules) for nothing the process's end does not
    reclaim anyway; `_exit_promptly` ends the process there.

    The trainer (where pidfds exist): vLLM's engine core has no parent-death check, so a SIGKILLed trainer left it
    (and its worker) running. A daemon thread waits on a pidfd of the trainer, then SIGTERMs
    the engine core (this worker's parent; it shuts its workers down), or this process when
    the worker runs inside the engine core.
    """
    import atexit
    for name in _WORKER_CHECKS:
      CHECKS[name]()
    atexit.register(_exit_promptly)
    logging.getLogger(RELOAD_LOGGER).addFilter(_computed_cache_warning)
    if not hasattr(os, "pidfd_open"):
      return os.getpid()
    try:
      fd = os.pidfd_open(trainer_pid)
    except OSError:
      return os.getpid()
    target = os.getppid()
    if target == trainer_pid:   # uniproc executor: this worker is the engine core
      target = os.getpid()

    def wait() -> None:
      select.select([fd], [], [])   # readable once the trainer has exited
      os.kill(target, signal.SIGTERM)

    threading.Thread(target=wait, name="pasr-trainer-watch", daemon=True).start()
    return os.getpid()


# vLLM's in-place reload warns "<layer>: Failed to load weights" for every layer whose buffers
# the checkpoint does not hold. A rotary embedding's cos/sin cache is computed, never saved, so
# every sync would warn once per model; other layers still warn.
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _computed_cache_warning(record: logging.LogRecord) -> bool:
  """False (drop) for the reload's warning about a rotary embedding."""
  return not (record.msg == "%s: Failed to load weights" and record.args
              and str(record.args[0]).endswith("RotaryEmbedding"))


def _exit_promptly() -> None:
  """The last exit step of a worker: the other exit handlers, then the process's end.

  Registered last, so it runs first: it runs the rest itself (it is unregistered first, so
  it does not run twice) and exits with status 0 (vLLM watches its workers' ends, not their
  status) before the interpreter's teardown."""
  import atexit
  import sys
  atexit.unregister(_exit_promptly)
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  for stream in (sys.stdout, sys.stderr):
    with contextlib.suppress(Exception):
      stream.flush()
  os._exit(0)


def refresh_tied_layers(model: Any) -> list[str]:
  """Re-runs ``process_weights_after_loading`` of LM heads that share their weight.

  The embedding the head is tied to was processed by the reload (it received the weights).
  Only `UnquantizedEmbeddingMethod` (an unquantized `ParallelLMHead`) is re-run: it derives
  its kernel from ``layer.weight`` without changing the weight, so running it again is
  idempotent (a no-op off CPU). Quantized methods may transform the weight in place and
  must not run twice, so they are left alone. Untied heads are processed by the reload.
  """
  from vllm.model_executor.layers.vocab_parallel_embedding import (
      ParallelLMHead, UnquantizedEmbeddingMethod)

  owners: dict[int, int] = {}
  modules = list(model.named_modules())
  for _, mod in modules:
    for p in mod.parameters(recurse=False):
      owners[id(p)] = owners.get(id(p), 0) + 1
  refreshed = []
  for name, mod in modules:
    method = getattr(mod, "quant_method", None)  # layers without one are not LM heads
    if not (isinstance(mod, ParallelLMHead) and isinstance(method, UnquantizedEmbeddingMethod)):
      continue
    if any(owners[id(p)] > 1 for p in mod.parameters(recurse=False)):
      method.process_weights_after_loading(mod)
      refreshed.append(name)
  return refreshed
