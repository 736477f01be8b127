"""vLLM worker extension used by `VllmSampler.sync` (runs inside vLLM's worker process).

vLLM mixes `SyncExtension` into its worker class (engine arg ``worker_extension_cls``), so
``llm.collective_rpc("pasr_reload_weights", ...)`` calls the method below on every worker.

Why not plain ``collective_rpc("reload_weights")``: vLLM's in-place reload (vllm 0.32,
`model_executor/model_loader/reload/layerwise.py`) re-runs ``process_weights_after_loading``
only for layers that received weights. A tied ``lm_head`` shares its ``weight`` Parameter
with ``embed_tokens`` and receives none itself, so its data changes but anything its quant
method derived from the weight stays stale. On CPU that is the pre-packed GEMM (`cpu_linear`,
built by `dispatch_cpu_unquantized_gemm`), so the logits used the old embedding (up to
2.5 nats logprob error on SmolLM2). We re-run the quant method of every such tied layer.
"""

from __future__ import annotations

import os
import select
import signal
import threading


class SyncExtension:
  """Mixin for vLLM's worker class: methods, and one attribute (`pasr_version`), all named
  pasr_* so nothing of vLLM's is shadowed."""

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

  def pasr_watch_trainer(self, trainer_pid: int) -> bool:
    """Ends the engine when process `trainer_pid` (the one that built the `LLM`) dies.

    vLLM 0.32's engine core has no parent-death check, so a SIGKILLed trainer left it (and
    its worker) running. A daemon thread waits on a pidfd of the trainer, then SIGTERMs
    the engine core (this worker's parent; it shuts its workers down), or this process when
    the worker runs inside the engine core. Returns False where pidfds are unavailable.
    """
    if not hasattr(os, "pidfd_open"):
      return False
    try:
      fd = os.pidfd_open(trainer_pid)
    except OSError:
      return False
    target = os.getppid()
    if target == trainer_pid:   # uniproc executor: this worker is the engine core
      target = os.getpid()

    def wait() -> None:
      select.select([fd], [], [])   # readable once the trainer has exited
      os.kill(target, signal.SIGTERM)

    threading.Thread(target=wait, name="pasr-trainer-watch", daemon=True).start()
    return True


def refresh_tied_layers(model) -> list[str]:
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
    method = getattr(mod, "quant_method", None)
    if not (isinstance(mod, ParallelLMHead) and isinstance(method, UnquantizedEmbeddingMethod)):
      continue
    if any(owners[id(p)] > 1 for p in mod.parameters(recurse=False)):
      method.process_weights_after_loading(mod)
      refreshed.append(name)
  return refreshed
