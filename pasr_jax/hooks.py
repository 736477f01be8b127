"""What a training run does around its steps, each with its own cadence (levanter's hooks).

After every step the run hands a `StepInfo` to its `Hooks`, in order; a hook acts when it is
due (`every` k steps, and at the last step if `at_last`):

  Evaluation     eval.every: greedy answers to held-out items (also at step 0 and the last
                 step); adds eval/* to the step's scalars, appends the answers to eval.jsonl
  Metrics        every step: the scalars to metrics.jsonl, TensorBoard and W&B; the end's
                 learning line and reward curve
  Console        logging.every: one line per step on stdout
  RolloutsLog    every step: the answers' records to rollouts.jsonl
  Checkpointing  checkpoint.every, the last and a stopping step: an Orbax checkpoint
  Export         at the end (train.export, not after a stop): the policy as an HF dir

Process 0 alone writes the logs (`open_logs` gives the others none); evaluation and
checkpoints involve every process.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

from pasr_jax import metrics as metrics_lib
from pasr_jax import multihost
from pasr_jax.eval import during
from pasr_jax.models.hf import save_hf
from pasr_jax.workdir import Workdir

# The stdout line of each step shows these scalars.
LINE_KEYS = ("reward/mean", "reward/accuracy", "rate/format_ok", "rate/refine", "len/pasr_mean",
             "rate/truncated", "train/grad_norm", "eval/accuracy", "time/rollout", "time/judge",
             "time/update", "time/sync", "time/checkpoint", "time/eval")


@dataclasses.dataclass
class StepInfo:
  """A finished step: `step` steps are done; `scalars` and `records` are every process's
  (merged); `last`: step == train.steps; `stopping`: a signal asked the run to end here."""
  step: int
  scalars: dict[str, float]
  records: list[dict[str, Any]]
  last: bool = False
  stopping: bool = False


class Hook:
  """Acts every `every` steps (0: never by cadence) and, if `at_last`, at the last step."""
  every = 1
  at_last = True

  def due(self, info: StepInfo) -> bool:
    return bool(self.every and info.step % self.every == 0) or (self.at_last and info.last)

  def __call__(self, info: StepInfo) -> None:
    """The hook's work on a step it is due at."""

  def finish(self, summary: dict[str, Any], stopped: bool) -> None:
    """At the end of the run (after the last save): may add to `summary`."""

  def close(self) -> None:
    """Frees what it holds; idempotent."""


class Hooks(list):
  """The run's hooks in the order they act."""

  def __call__(self, info: StepInfo) -> None:
    for hook in self:
      if hook.due(info):
        hook(info)

  def finish(self, summary: dict[str, Any], stopped: bool) -> None:
    for hook in self:
      hook.finish(summary, stopped)

  def close(self) -> None:
    for hook in self:
      hook.close()


def open_logs(wd: Workdir, cfg, log_bytes: dict[str, int], config: dict) -> dict[str, Any]:
  """The writer process's logs, cut back to the checkpoint's sizes: "metrics" (a
  `MetricsWriter`: JSONL, TensorBoard, W&B), "rollouts" and "eval" (JSONL); {} elsewhere."""
  if not multihost.is_writer():
    return {}
  return {"metrics": metrics_lib.MetricsWriter(
              wd.metrics, wd.tb if cfg.logging.tensorboard else None, log_bytes.get("metrics"),
              metrics_lib.start_wandb(cfg.logging, config, wd.root)),
          "rollouts": metrics_lib.JsonlLog(str(wd.rollouts), log_bytes.get("rollouts")),
          "eval": metrics_lib.JsonlLog(str(wd.eval), log_bytes.get("eval"))}


def log_sizes(logs: dict[str, Any]) -> dict[str, int]:
  """Each log's size in bytes (what a checkpoint stores; a resume cuts the logs back)."""
  return {k: (v.log if k == "metrics" else v).tell() for k, v in logs.items()}


class Evaluation(Hook):
  """eval.every > 0: greedy answers to the held-out items through the run's own sampler
  (`source.quietly`: no generation in flight, the newest published weights, engine failures
  retried), judged as the run judges (`eval.during`); at step 0 (`start`), every eval.every
  steps and at the last step (not at a stopping one)."""

  def __init__(self, cfg, items, stepper, source, log):
    self.every, self.max_tokens = int(cfg.eval.every), cfg.eval_max_tokens
    self.items, self.stepper, self.source, self.log = items, stepper, source, log
    self.first: tuple[int, float] | None = None  # (step, accuracy) of the first eval
    self.latest: tuple[int, float] | None = None

  def due(self, info):
    return super().due(info) and not info.stopping

  def __call__(self, info):
    info.scalars.update(self.evaluate(info.step))

  def evaluate(self, step: int) -> dict[str, float]:
    """Answers, scores and logs the items with the weights of `step` updates; eval/*."""
    t = time.perf_counter()
    # An engine failure is retried as a rollout's would be; the gather (a collective) waits
    # until every process has its share.
    answers = during.gather(self.source.quietly(
        lambda sampler: during.answer(self.items, self.stepper, sampler, self.max_tokens), step))
    scalars = during.eval_metrics(answers)
    if self.log is not None:
      self.log.append([{"step": step, **a} for a in answers])
    acc = scalars.get("eval/accuracy", 0.0)
    self.first = self.first or (step, acc)
    self.latest = (step, acc)
    scalars["time/eval"] = time.perf_counter() - t
    return scalars

  def finish(self, summary, stopped):
    if self.first is not None and self.latest is not None:
      (s0, a0), (s1, a1) = self.first, self.latest
      summary["held_out"] = (f"held-out accuracy: {100 * a0:.1f}% -> {100 * a1:.1f}% "
                             f"({len(self.items)} items)")
      summary["held_out_steps"] = (s0, s1)


class Metrics(Hook):
  """Every step's scalars to every writer; at the end the learning line and reward curve."""

  def __init__(self, wd: Workdir, writer):
    self.wd, self.writer = wd, writer

  def __call__(self, info):
    if self.writer is not None:
      self.writer.write(info.step, info.scalars)

  def finish(self, summary, stopped):
    if self.writer is not None and self.wd.metrics.stat().st_size:
      print(f"[train] learning: {metrics_lib.learning_summary(str(self.wd.metrics))}",
            flush=True)
      summary["reward_curve"] = metrics_lib.plot_reward_curve(self.wd.metrics,
                                                              self.wd.reward_curve)
      self.writer.write_image("reward_curve", summary["reward_curve"])


class Console(Hook):
  """One stdout line per `logging.every` steps (and at the last)."""

  def __init__(self, every: int):
    self.every = every

  def __call__(self, info):
    print(metrics_lib.format_scalars(info.step, info.scalars, LINE_KEYS), flush=True)


class RolloutsLog(Hook):
  """Every answer's record to rollouts.jsonl."""

  def __init__(self, log):
    self.log = log

  def __call__(self, info):
    if self.log is not None:
      self.log.append(info.records)


class Checkpointing(Hook):
  """An Orbax checkpoint of the steps done every checkpoint.every steps, at the last and at
  a stopping step; `blocked_s`: what the last save blocked the loop (reported with the next
  step)."""

  def __init__(self, ckpt, trainer, state, config: dict, logs: dict[str, Any], every: int):
    self.ckpt, self.trainer, self.state, self.config = ckpt, trainer, state, config
    self.logs, self.every = logs, every
    self.last_saved, self.blocked_s = state.step, 0.0

  def due(self, info):
    return super().due(info) or info.stopping

  def __call__(self, info):
    self.blocked_s = self.save()

  def save(self) -> float:
    """Starts the checkpoint of the steps done; returns the seconds it blocked."""
    t = time.perf_counter()
    sizes = log_sizes(self.logs) if self.logs else None
    self.state.log_bytes = multihost.allgather_json(sizes)[0]  # the writer's logs
    self.ckpt.save_run(self.trainer.state_for_checkpoint(), self.state, self.config)
    self.last_saved = self.state.step
    return time.perf_counter() - t

  def finish(self, summary, stopped):
    self.ckpt.wait()
    summary["last_step"] = self.last_saved


class Export(Hook):
  """train.export: the policy as an HF dir at the end of a run that was not stopped."""
  every, at_last = 0, False

  def __init__(self, trainer, model_cfg, wd: Workdir, tokenizer_from: str):
    self.trainer, self.model_cfg, self.wd, self.tokenizer_from = (trainer, model_cfg, wd,
                                                                  tokenizer_from)

  def finish(self, summary, stopped):
    if not stopped:
      summary["hf"] = str(save_hf(self.trainer.model, self.model_cfg, self.wd.hf,
                                  tokenizer_from=self.tokenizer_from))


def start_block(cfg, devices_done: str, model_dir: str, mesh, judge: str) -> str:
  """The few lines a run prints at its start (the whole config is in config.json)."""
  preset = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "?")
  shape = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
  return "\n".join([
      f"[train] preset {preset}: {cfg.train.steps} steps of {cfg.rollout.prompts_per_step} x "
      f"{cfg.rollout.n} answers",
      f"[train] model {model_dir}",
      f"[train] mesh {shape} on {mesh.devices.size} devices ({devices_done})",
      f"[train] judge {judge}",
      f"[train] workdir {cfg.workdir} (config.json: the whole config)"])


def dump_config(cfg) -> dict:
  """The resolved config as JSON data (config.json, the checkpoint, W&B)."""
  return json.loads(cfg.to_json())
