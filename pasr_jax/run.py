"""The training run: a short loop over a rollout source, the trainer and hooks.

  run = Run(cfg); run.setup(); run.resume()
  while not run.finished: run.step()
  summary = run.finish(); run.close()          # what `run(cfg)` does

A step: the rollout source's next batch (`pasr_jax.rollout.source`: draw, sample, judge,
reward, pack; retries, versions, staleness) -> the trainer's updates -> the source publishes
the new weights -> every process's scalars and records merged -> the hooks
(`pasr_jax.hooks`: evaluation, metrics, stdout, rollouts, checkpoint; export at the end).
The parts are built by `pasr_jax.build`.

Faults. SIGTERM / the first Ctrl-C set a stop flag: the step in progress finishes and is
saved, or, while it waits on the rollout engine, the step is abandoned (the data cursor and
RNG stay at the last finished step) and the steps done are saved; either way the run ends with
`RunInterrupted` (exit 130). Engine failures are the source's (retried, then `EngineError`).
`train.max_nonfinite_steps` steps in a row whose every update was skipped for a NaN/inf loss
or gradient end the run with `TrainingDiverged`; a non-finite state is never checkpointed.
Multi-host: every branch (batch or none, stop) is agreed; process 0 writes the logs.
"""

from __future__ import annotations

import time
from typing import Any

import jax

from pasr_jax import batch as batch_lib, build, devices, errors, hooks, multihost, rewards
from pasr_jax.data import BatchStream
from pasr_jax.rollout import source as sources
from pasr_jax.rollout.vllm_sampler import VllmSampler
from pasr_jax.step import FIRST, MAX, RolloutStep, mean_over, merge_scalars
from pasr_jax.workdir import Workdir

# The multi-host reduction of every metric the loop adds to the step's (see step.merge_scalars):
# the trainer's are the same on every process; times and loads take the slowest process.
RUN_REDUCTIONS = {"train/": FIRST, "policy_version": FIRST, "time/": MAX, "sync/": MAX,
                  "staleness/mean": mean_over("answers"), "staleness/frac_": mean_over("answers"),
                  "staleness/max": MAX}


class RunInterrupted(errors.Interrupted):
  """SIGTERM / Ctrl-C ended the run before train.steps; the steps done are saved."""


class TrainingDiverged(errors.Diverged):
  """Too many steps in a row had only non-finite (skipped) updates."""


class Run:
  """One training run of `cfg`. After `resume`: `state` (the RunState; `state.step` steps are
  done), `trainer`, `sampler`, `source`, `hooks`, `scalars` (the last step's)."""

  def __init__(self, cfg):
    cfg.need_files()
    rewards.require_rule(cfg.rewards)
    self.cfg, self.wd = cfg, Workdir(cfg.workdir)
    self.parts = self.sampler = self.source = self.judge_proc = None
    self.hooks, self.logs, self.scalars = hooks.Hooks(), {}, {}
    self.stopping, self._nonfinite = False, 0

  def setup(self) -> None:
    """The run's parts (`build.build`)."""
    self.parts = build.build(self.cfg, self.wd, lambda p: setattr(self, "judge_proc", p))
    self.trainer, self.model_dir = self.parts.trainer, self.parts.model_dir

  def resume(self) -> None:
    """The state (restored or fresh), the logs, the engine, the rollout source, the hooks;
    at step 0 the evaluation before any update."""
    cfg, p = self.cfg, self.parts
    self.state, restored = build.restore(cfg, self.wd, p)
    config = hooks.dump_config(cfg)
    self.logs = hooks.open_logs(self.wd, cfg, self.state.log_bytes, config)
    self.sampler = self.make_sampler()
    self.sampler.should_stop = lambda: p.stop.stop  # a signal ends the engine's start too
    t = time.perf_counter()
    self.sampler.start()  # the engine starts now, so step 1's rollout time is the rollout's
    print(f"[train] vLLM engine up in {time.perf_counter() - t:.1f}s", flush=True)
    if restored:  # the engine starts from the base weights
      self.sampler.sync(self.trainer.model, self.state.policy_version)
    stepper = RolloutStep(cfg.step_cfg(), p.tokenizer, self.sampler, p.judge, p.prompts)
    stream = BatchStream(p.rows, cfg.rollout.prompts_per_step, cfg.data.shuffle_seed,
                         self.state.cursor)
    self.source = sources.make(cfg, stream, self.state.rng, self.state.policy_version, stepper,
                               self.sampler, lambda: self.trainer.model, lambda: p.stop.stop)
    self.checkpoints = hooks.Checkpointing(p.ckpt, self.trainer, self.state, config, self.logs,
                                           cfg.checkpoint.every)
    shown = hooks.Hooks([hooks.Metrics(self.wd, self.logs.get("metrics")),
                         hooks.Console(cfg.logging.every)])
    self.hooks = hooks.Hooks([*shown, hooks.RolloutsLog(self.logs.get("rollouts")),
                              self.checkpoints])
    if cfg.train.export:
      self.hooks.append(hooks.Export(self.trainer, p.model_cfg, self.wd, p.model_dir))
    if cfg.eval.every:  # first: its scalars join the step's
      ev = hooks.Evaluation(cfg, p.eval_items, stepper, self.source, self.logs.get("eval"))
      self.hooks.insert(0, ev)
      if self.state.step == 0:  # before any update
        shown(hooks.StepInfo(0, ev.evaluate(0), []))

  def make_sampler(self):
    """The rollout engine on the run's model dir (not started yet)."""
    return VllmSampler.from_config(self.cfg.rollout, self.model_dir, seed=self.cfg.seed,
                                   cuda_visible_devices=devices.engine_gpus(self.cfg))

  @property
  def finished(self) -> bool:
    """All train.steps are done, or a stop was asked for (and the step saved)."""
    return self.state.step >= self.cfg.train.steps or self.stopping

  def step(self) -> dict[str, float]:
    """One training step (batch, updates, publish, hooks); its merged scalars."""
    st, t_step = self.state, time.perf_counter()
    try:
      draw, out, scalars = self.source.next_batch(st.step + 1)
    except sources.RolloutInterrupted as e:
      if self.checkpoints.last_saved < st.step:
        self.checkpoints.save()
      self.parts.ckpt.wait()
      raise RunInterrupted(f"{e}; the {st.step} steps done are saved: run the same command "
                           "to resume") from None
    t = time.perf_counter()
    scalars.update(self._update(out.batch))
    scalars["time/update"] = time.perf_counter() - t
    scalars.update(self.source.publish(self.trainer.model, st.step + 1))
    st.policy_version = self.source.version
    scalars["policy_version"] = float(st.policy_version)
    st.step += 1
    st.cursor, st.rng = draw.cursor, draw.rng
    scalars["time/checkpoint"] = self.checkpoints.blocked_s
    scalars["time/step"] = time.perf_counter() - t_step + self.checkpoints.blocked_s
    self.checkpoints.blocked_s = 0.0
    for rec in out.records:
      rec["process"] = jax.process_index()
    parts = multihost.allgather_json({"scalars": scalars, "weights": out.weights,
                                      "records": out.records, "stop": self.parts.stop.stop})
    self.scalars = merge_scalars([(q["scalars"], q["weights"]) for q in parts],
                                 {**out.reductions, **RUN_REDUCTIONS})
    self.stopping = any(q["stop"] for q in parts)  # every process stops at the same step
    self.hooks(hooks.StepInfo(st.step, self.scalars, [r for q in parts for r in q["records"]],
                              st.step == self.cfg.train.steps, self.stopping))
    return self.scalars

  def _update(self, local) -> dict[str, float]:
    """The trainer's updates on the global batch (every process's rows, padded to the agreed
    shape; none when no process kept a row); stops a diverged run."""
    shape = (0, 0) if local is None else local.shape
    rows, length = (int(v) for v in multihost.agree(shape).max(axis=0))
    if rows == 0:
      return {}
    t = self.trainer
    rows = multihost.rows_per_process(rows, int(self.cfg.optim.micro_batch))
    batch = multihost.global_batch(
        batch_lib.pad(local, rows, length, self.source.stepper.pad_id), t.mesh, t.rules)
    updates, skipped = t.step, t.skipped_steps
    scalars = {f"train/{k}": float(v) for k, v in t.train_batch(batch).items()}
    all_skipped = t.skipped_steps - skipped == t.step - updates
    self._nonfinite = self._nonfinite + 1 if all_skipped else 0
    if self._nonfinite >= self.cfg.train.max_nonfinite_steps:
      raise TrainingDiverged(
          f"step {self.state.step + 1}: every update of the last {self._nonfinite} steps had a "
          f"NaN/inf loss or gradient and was skipped (train.max_nonfinite_steps="
          f"{self.cfg.train.max_nonfinite_steps}); the last checkpoint (step "
          f"{self.checkpoints.last_saved}) holds finite weights. Lower optim.lr or check the data")
    return scalars

  def finish(self) -> dict[str, Any]:
    """Drops a batch sampled ahead, waits for the last save, runs the hooks' ends; the
    summary (last step, workdir, last scalars, curve, HF dir, held-out line to print)."""
    self.source.drop()
    summary = {"workdir": str(self.wd.root), "scalars": self.scalars, "stopped": self.stopping}
    self.hooks.finish(summary, self.stopping)
    print(f"[train] done at step {summary['last_step']}: workdir {self.wd.root}"
          + (f", HF dir {summary['hf']}" if "hf" in summary else ""), flush=True)
    return summary

  def close(self) -> None:
    """Restores signal handlers; closes the source, hooks, checkpointer, logs and engine;
    stops a local judge. Each is closed even if another fails."""
    closers = [self.source and self.source.close, self.parts and self.parts.stop.restore,
               self.hooks.close, self.parts and self.parts.ckpt.close,
               *(w.close for w in self.logs.values()), self.sampler and self.sampler.close,
               self.judge_proc and self.judge_proc.stop]
    for close in filter(None, closers):
      try:
        close()
      except Exception as e:  # keep closing the rest  # pylint: disable=broad-except
        print(f"[train] {close.__qualname__} failed: {e}", flush=True)


def run(cfg) -> dict[str, Any]:
  """Train per `cfg`; returns a summary (last step, workdir paths, last scalars)."""
  r = Run(cfg)
  try:
    r.setup()
    r.resume()
    while not r.finished:
      r.step()
    summary = r.finish()
    if r.state.step < cfg.train.steps:
      raise RunInterrupted(f"stopped by a signal after step {r.state.step} of "
                           f"{cfg.train.steps}; it is saved: run the same command to resume")
  finally:
    r.close()
  if "held_out" in summary:  # last, after the engine's own shutdown lines
    print(summary["held_out"], flush=True)
  return summary
