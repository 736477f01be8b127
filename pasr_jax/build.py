"""A training run's parts, built once at its start (`pasr_jax.run.Run` drives them).

`build(cfg)`: the config checked and written, data, prompts and judge (a local one autostarted
if asked), JAX (multi-host when mesh.distributed), the model on its mesh, the `Trainer` and
the `Checkpointer`. `restore(parts)`: the newest checkpoint's arrays and `RunState` (step, data
cursor, RNG, policy version, log sizes), or a fresh state. Every path is named by `Workdir`.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from typing import Any

import jax
from transformers import AutoTokenizer

from pasr_jax import checks, cold_start, devices, hooks, multihost, policy, prompts
from pasr_jax import data as data_lib
from pasr_jax.checkpoint import Checkpointer, CheckpointMismatchError, RunState
from pasr_jax.config import ConfigError, RunConfig
from pasr_jax.eval import during
from pasr_jax.judge.client import JudgeClient
from pasr_jax.judge.local import ensure_judge
from pasr_jax.models.hf import model_digest
from pasr_jax.trainer import Trainer
from pasr_jax.workdir import Workdir


class StopFlag:
  """Set by SIGTERM / the first Ctrl-C; the run saves and ends at the next step boundary."""

  def __init__(self):
    self.stop = False
    self._old = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.stop and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: stop now
    self.stop = True
    print(f"\n[train] got {signal.Signals(signum).name}: finishing this step, saving, exiting",
          file=sys.stderr, flush=True)

  def restore(self):
    for sig, h in self._old.items():
      signal.signal(sig, h)


@dataclasses.dataclass
class Parts:
  """What `build` made. `judge_proc`: the autostarted local judge (or None); `eval_items`:
  the held-out items of eval.files (eval.every > 0)."""
  rows: list
  prompts: Any
  judge: Any
  judge_proc: Any
  stop: StopFlag
  model_dir: str
  model_cfg: Any
  model_digest: str
  tokenizer: Any
  trainer: Trainer
  ckpt: Checkpointer
  eval_items: list


def build(cfg: RunConfig, wd: Workdir, on_judge_proc=lambda proc: None) -> Parts:
  """The run's parts (see the module docstring); prints the start block. `on_judge_proc`
  gets the local judge's process as soon as it runs (so a failure later still stops it)."""
  done = devices.setup(cfg)  # JAX's memory fraction and GPUs, before it touches a device
  rows = data_lib.load_dataset(cfg.data)
  items = (during.load_items(cfg.eval.files, cfg.data.question_field, cfg.data.answer_field,
                             cfg.eval.limit) if cfg.eval.every else [])
  prompt_set = prompts.load_prompts(cfg.prompts)
  judge = judge_proc = None
  if cfg.rewards.accuracy_rule == "":
    judge_proc = ensure_judge(cfg.judge, wd.judge_log)
    on_judge_proc(judge_proc)
    judge = JudgeClient(cfg.judge, prompt_set)
  if cfg.mesh.distributed:
    multihost.initialize(cfg.mesh, devices.local_device_ids(cfg.mesh))
  # After the distributed init: it installs JAX's own SIGTERM handler (its preemption
  # notifier), which would otherwise swallow the signal.
  stop = StopFlag()
  try:
    checks.require(checks.questions_vs_processes(cfg.rollout.prompts_per_step,
                                                 jax.process_count()))
    if multihost.is_writer():
      wd.root.mkdir(parents=True, exist_ok=True)
      wd.config.write_text(cfg.to_json(indent=2), encoding="utf-8")
      policy.base_dir(cfg)  # tiny_random: the writer makes it, the others wait
    multihost.barrier("setup: workdir and model dir written")
    # cold_start.enabled (not part of the paper): PASR starts from the format SFT's HF dir.
    model_dir = cold_start.ensure(cfg)
    pol = policy.build_policy(cfg.model, cfg.mesh, model_dir)
    if multihost.is_writer():
      done = ", ".join(f"{k} {v}" for k, v in done.items()) or "as they are"
      print(hooks.start_block(cfg, f"{done}: {devices.fraction_reason(cfg)}", model_dir,
                              pol.mesh, "rule " + cfg.rewards.accuracy_rule if judge is None
                              else cfg.judge.base_url), flush=True)
    # The trainer's reference policy: model_dir's weights.
    trainer = Trainer(cfg.trainer_cfg(), pol.model, pol.config, pol.mesh)
    # Multi-host: saves block. Orbax's async save finishes in a thread whose barriers are
    # device collectives; racing the step's own collectives, they can pair up differently on
    # two hosts, and both wait forever.
    ckpt = Checkpointer(str(wd.checkpoints), keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save and jax.process_count() == 1)
  except BaseException:
    stop.restore()
    raise
  return Parts(rows, prompt_set, judge, judge_proc, stop, model_dir, pol.config,
               model_digest(model_dir), AutoTokenizer.from_pretrained(model_dir), trainer, ckpt,
               items)


def restore(cfg: RunConfig, wd: Workdir, parts: Parts) -> tuple[RunState, bool]:
  """The newest checkpoint's RunState with its arrays in the trainer, or a fresh state;
  whether one was restored."""
  ckpt, trainer = parts.ckpt, parts.trainer
  restored = None
  if ckpt.all_steps():
    if not cfg.resume:
      raise ConfigError(f"config resume=False but {wd.checkpoints} has steps "
                        f"{ckpt.all_steps()}: use another workdir or resume=True")
    try:
      restored = ckpt.restore_run(trainer.state_for_checkpoint())
    except CheckpointMismatchError as e:
      raise ConfigError(f"config workdir={cfg.workdir!r}: {e}") from None
  if restored is None:
    state = RunState.fresh(cfg.seed)
  else:
    arrays, state = restored
    if state.model_digest != parts.model_digest:
      raise ConfigError(f"config model.path={parts.model_dir!r}: not the model that "
                        f"{wd.checkpoints}/{state.step} was trained from (the reference "
                        "policy is rebuilt from model.path on resume; give the same model)")
    trainer.restore_from_checkpoint(arrays)
    print(f"[train] resumed from step {state.step} (cursor {state.cursor}, policy "
          f"version {state.policy_version})", flush=True)
  state.model_digest, state.model_dir = parts.model_digest, parts.model_dir
  return state, restored is not None
