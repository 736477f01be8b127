"""The training run: setup, resume, one step at a time, finish.

  run = Run(cfg); run.setup(); run.resume()
  while not run.finished: run.step()
  summary = run.finish(); run.close()          # what `run(cfg)` does

setup: the config is checked and written, data, prompts and judge (a local one autostarted if
asked), JAX (multi-host when mesh.distributed), the model on its mesh, the `Trainer` and the
`Checkpointer`. resume: the newest checkpoint's arrays and `RunState` (step, data cursor, RNG,
policy version, log sizes), or a fresh state; the logs cut back to the checkpoint; the vLLM
engine started (and synced to the restored policy). step: next B questions -> `RolloutStep`
(rollouts, judge, rewards, advantages, batch) -> mu `Trainer` updates -> every k steps a
weight sync -> metrics and rollouts -> every m steps (and at the last or a stopping step) an
Orbax checkpoint. Every path is named by `Workdir`.

Asynchronous rollouts (rollout.max_staleness = K >= 1): while the trainer updates on batch j,
ONE background thread (the rollout thread, `pasr_jax.rollout.ahead`) samples, judges and rewards
batch j+1 with the weights of update j-1 (AReaL's admission rule: batch j may start once
update j-1-K is applied; with one engine one batch is ahead, so staleness is <= 1 <= K).
Batch j always holds the stream's j-th questions and the j-th seed, whatever the timing.
Publishing update j is split: after batch j+1 is collected the main thread copies the
weights to the host (the only part on the trainer's path), and the rollout thread writes
and loads them into the engine before it samples batch j+2 (never during a generation).
Every multi-host collective and the checkpoint stay in the main thread: the checkpoint's
data cursor and RNG are those of the steps trained on, so a batch sampled ahead of a save,
a stop or a crash is sampled again by the resumed run (from the restored policy: its
staleness is 0). A failure of the background batch surfaces in the main thread as the
synchronous loop's error (an `EngineError` takes the engine-retry path below); the wait for
it is bounded by rollout.timeout_s. Every trained batch's staleness (the trainer's policy
version minus the sampling one) is checked to lie in [0, K] and logged (`staleness/*`).

Faults. SIGTERM / the first Ctrl-C set a stop flag: the step in progress finishes and is
saved, or, while it waits on the rollout engine, the step is abandoned (the data cursor and
RNG stay at the last finished step) and the steps done are saved; either way the run ends with
`RunInterrupted` (exit 130). An engine that dies or passes `rollout.timeout_s` is restarted,
given the trainer's weights, and the step retried `rollout.engine_retries` times before its
`EngineError` ends the run. `train.max_nonfinite_steps` steps in a row whose every update was
skipped for a NaN/inf loss or gradient end the run with `TrainingDiverged`; a state with a
non-finite value is never checkpointed.

Multi-host (mesh.distributed, one process per host): each process samples and judges its
share of the step's questions on its own engine, the global batch is built from every
process's rows, and every branch (batch or none, stop) is agreed; process 0 writes the logs,
the config and the curve (see `pasr_jax.multihost`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm
from transformers import AutoTokenizer

from pasr_jax import checks, cold_start, devices, errors, multihost, policy, prompts
from pasr_jax import data as data_lib
from pasr_jax import metrics as metrics_lib
from pasr_jax.checkpoint import Checkpointer, CheckpointMismatchError, RunState
from pasr_jax.config import ConfigError, RunConfig
from pasr_jax.data import Cursor
from pasr_jax.judge.client import JudgeClient
from pasr_jax.judge.local import ensure_judge
from pasr_jax.models.hf import model_digest, save_hf
from pasr_jax.rollout import EngineError
from pasr_jax.rollout.ahead import RolloutAhead
from pasr_jax.rollout.vllm_sampler import VllmSampler
from pasr_jax.step import (FIRST, MAX, RolloutStep, StepOutput, mean_over, merge_scalars,
                           pad_batch)
from pasr_jax.trainer import Trainer
from pasr_jax.workdir import Workdir

log = logging.getLogger("pasr_jax.run")

# The stdout line of each step shows these scalars.
LINE_KEYS = ("reward/mean", "reward/accuracy", "rate/format_ok", "rate/refine", "len/pasr_mean",
             "rate/truncated", "train/grad_norm", "time/rollout", "time/judge", "time/update",
             "time/sync", "time/checkpoint")
# The multi-host reduction of every metric the loop adds to the step's (see step.merge_scalars):
# the trainer's are the same on every process; times and loads take the slowest process.
RUN_REDUCTIONS = {"train/": FIRST, "policy_version": FIRST, "time/": MAX, "sync/": MAX,
                  "staleness/mean": mean_over("answers"), "staleness/frac_": mean_over("answers"),
                  "staleness/max": MAX}


class RunInterrupted(errors.Interrupted):
  """SIGTERM / Ctrl-C ended the run before train.steps; the steps done are saved."""


class TrainingDiverged(errors.Diverged):
  """Too many steps in a row had only non-finite (skipped) updates."""


@dataclasses.dataclass(frozen=True)
class Draw:
  """One step's questions (this process's share) and sampling seed; the data cursor and RNG
  once the step is done."""
  rows: list
  seed: int
  cursor: Cursor
  rng: Any


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


class Run:
  """One training run of `cfg` (see the module docstring for the phases).

  Attributes after `resume`: `state` (the RunState; `state.step` steps are done), `trainer`,
  `sampler`, `scalars` (the last step's), `last_saved` (newest checkpointed step), `ahead`
  (rollout.max_staleness >= 1: the rollout thread and the batch in it; else None).
  """

  def __init__(self, cfg: RunConfig):
    self.cfg = cfg
    cfg.need_files()
    self.wd = Workdir(cfg.workdir)
    self.judge_proc = self.sampler = self.ckpt = self.writer = self.rollouts = None
    self.stop: StopFlag | None = None
    self.stopping = False  # a stop was asked for on some process (agreed at the step's end)
    self.writer_process = True  # process 0 (multi-host: the one that writes logs)
    self.state = None
    self.scalars: dict[str, float] = {}
    self.last_saved = 0
    self._nonfinite_run = 0  # steps in a row whose every update was non-finite (skipped)
    self._ckpt_time = 0.0  # blocking part of the previous step's save, reported with this step
    # rollout.max_staleness >= 1: the rollout thread, and the next step's batch in it.
    self.ahead: RolloutAhead | None = None
    # Versions made by an engine-retry re-sync: the same weights as the version before them
    # (no update between), so they add no staleness.
    self._relabeled: set[int] = set()

  # ---------------------------------------------------------------------------- setup
  def setup(self) -> None:
    """Config written; data, prompts, judge; JAX, model, trainer and checkpointer."""
    cfg, wd = self.cfg, self.wd
    done = devices.setup(cfg)  # JAX's memory fraction and GPUs, before it touches a device
    print(f"[train] devices: {done} ({devices.fraction_reason(cfg)})", flush=True)
    self.rows = data_lib.load_dataset(cfg.data)
    self.prompts = prompts.load_prompts(cfg.prompts)
    self.judge = None
    if cfg.rewards.accuracy_rule == "":
      self.judge_proc = ensure_judge(cfg.judge, wd.judge_log)
      self.judge = JudgeClient(cfg.judge, self.prompts)
    if cfg.mesh.distributed:
      multihost.initialize(cfg.mesh, devices.local_device_ids(cfg.mesh))
    # After the distributed init: it installs JAX's own SIGTERM handler (its preemption
    # notifier), which would otherwise swallow the signal.
    self.stop = StopFlag()
    checks.require(checks.questions_vs_processes(cfg.rollout.prompts_per_step,
                                                 jax.process_count()))
    self.writer_process = multihost.is_writer()
    if self.writer_process:
      wd.root.mkdir(parents=True, exist_ok=True)
      print("[train] resolved config:\n" + cfg.to_json(indent=2), flush=True)
      wd.config.write_text(cfg.to_json(indent=2), encoding="utf-8")
      policy.base_dir(cfg)  # tiny_random: the writer makes it, the others wait
    multihost.barrier("setup: workdir and model dir written")
    # cold_start.enabled (not part of the paper): PASR starts from the format SFT's HF dir.
    self.model_dir = cold_start.ensure(cfg)
    self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
    pol = policy.build_policy(cfg.model, cfg.mesh, self.model_dir)
    self.model_cfg = pol.config
    # The trainer's reference policy: model_dir's weights.
    self.trainer = Trainer(cfg.trainer_cfg(), pol.model, pol.config, pol.mesh)
    del pol
    self.model_digest = model_digest(self.model_dir)
    # Multi-host: saves block. Orbax's async save finishes in a thread whose barriers are
    # device collectives; racing the step's own collectives, they can pair up differently on
    # two hosts, and both wait forever (seen here, under load).
    self.ckpt = Checkpointer(str(wd.checkpoints), keep=cfg.checkpoint.keep,
                             async_save=cfg.checkpoint.async_save and jax.process_count() == 1)

  # ---------------------------------------------------------------------------- resume
  def resume(self) -> None:
    """RunState and arrays from the newest checkpoint (or fresh); logs; sampler; stepper."""
    cfg, wd = self.cfg, self.wd
    restored = None
    if self.ckpt.all_steps():
      if not cfg.resume:
        raise ConfigError(f"config resume=False but {wd.checkpoints} has steps "
                          f"{self.ckpt.all_steps()}: use another workdir or resume=True")
      try:
        restored = self.ckpt.restore_run(self.trainer.state_for_checkpoint())
      except CheckpointMismatchError as e:
        raise ConfigError(f"config workdir={cfg.workdir!r}: {e}") from None
    if restored is not None:
      arrays, self.state = restored
      if self.state.model_digest != self.model_digest:
        raise ConfigError(f"config model.path={self.model_dir!r}: not the model that "
                          f"{wd.checkpoints}/{self.state.step} was trained from (the reference "
                          "policy is rebuilt from model.path on resume; give the same model)")
      self.trainer.restore_from_checkpoint(arrays)
      print(f"[train] resumed from step {self.state.step} (cursor {self.state.cursor}, policy "
            f"version {self.state.policy_version})", flush=True)
    else:
      self.state = RunState.fresh(cfg.seed)
    self.state.model_digest, self.state.model_dir = self.model_digest, self.model_dir
    self.last_saved = self.state.step
    self.stream = data_lib.BatchStream(self.rows, cfg.rollout.prompts_per_step,
                                       cfg.data.shuffle_seed, self.state.cursor)
    if self.writer_process:
      self.writer = metrics_lib.MetricsWriter(
          wd.metrics, wd.tb if cfg.logging.tensorboard else None, self.state.log_bytes["metrics"],
          metrics_lib.start_wandb(cfg.logging, json.loads(cfg.to_json()), wd.root))
      self.rollouts = metrics_lib.JsonlLog(str(wd.rollouts), self.state.log_bytes["rollouts"])

    self.sampler = self.make_sampler()
    # A signal ends a rollout wait at once; with several processes the step is then abandoned
    # by all of them together (`_rollout` agrees on it).
    self.sampler.should_stop = lambda: self.stop.stop or bool(self.ahead and self.ahead.aborting)
    t = time.perf_counter()
    self.sampler.start()  # the engine starts now, so step 1's rollout time is the rollout's
    print(f"[train] vLLM engine up in {time.perf_counter() - t:.1f}s", flush=True)
    if restored is not None:
      self.sampler.sync(self.trainer.model, self.state.policy_version)  # it starts from the base
    self.stepper = RolloutStep(cfg.step_cfg(), self.tokenizer, self.sampler, self.judge, self.prompts)
    if cfg.rollout.max_staleness >= 1:
      self.ahead = RolloutAhead(cfg.rollout.timeout_s)
      g = cfg.train_grpo()
      print(f"[train] asynchronous rollouts: one batch sampled ahead (rollout.max_staleness="
            f"{cfg.rollout.max_staleness}, grpo.tis_cap={g.tis_cap:g}, grpo.is_mask_low="
            f"{g.is_mask_low:g}, grpo.is_mask_high={g.is_mask_high:g})", flush=True)
      if cfg.rollout.vllm.colocate:
        log.warning("rollout.max_staleness=%d with rollout.vllm.colocate=True: the engine and "
                    "the trainer share devices, so sampling ahead overlaps little and costs "
                    "one step of staleness (scripts/launch_gpu.sh gives them GPUs of their own)",
                    cfg.rollout.max_staleness)

  def make_sampler(self):
    """The rollout engine on the run's model dir (not started yet)."""
    return VllmSampler.from_config(self.cfg.rollout, self.model_dir, seed=self.cfg.seed,
                                   cuda_visible_devices=devices.engine_gpus(self.cfg))

  # ---------------------------------------------------------------------------- step
  @property
  def finished(self) -> bool:
    """All train.steps are done, or a stop was asked for (and the step saved)."""
    return self.state.step >= self.cfg.train.steps or self.stopping

  def step(self) -> dict[str, float]:
    """One training step (rollout, update, sync, logs, checkpoint if due); its scalars."""

    cfg, st = self.cfg, self.state
    t_step = time.perf_counter()
    if cfg.rollout.max_staleness == 0:
      draw = self._draw(st.rng)  # st.rng advances only when the step is done
      out = self._rollout(draw.rows, draw.seed)
      scalars = dict(out.scalars)
    else:
      draw, out, waits = self._rollout_ahead()
      scalars = dict(out.scalars, **waits)
    scalars.update(self._staleness(out))
    t = time.perf_counter()
    batch = self._global_batch(out.batch)
    if batch is not None:  # None: on every process, every group had zero variance
      updates, skipped = self.trainer.step, self.trainer.skipped_steps
      for k, v in self.trainer.train_batch(batch).items():  # mu updates inside
        scalars[f"train/{k}"] = float(v)
      all_skipped = self.trainer.skipped_steps - skipped == self.trainer.step - updates
      self._nonfinite_run = self._nonfinite_run + 1 if all_skipped else 0
      if self._nonfinite_run >= cfg.train.max_nonfinite_steps:
        raise TrainingDiverged(
            f"step {st.step + 1}: every update of the last {self._nonfinite_run} steps had a "
            f"NaN/inf loss or gradient and was skipped (train.max_nonfinite_steps="
            f"{cfg.train.max_nonfinite_steps}); the last checkpoint (step {self.last_saved}) "
            "holds finite weights. Lower optim.lr or check the data")
    scalars["time/update"] = time.perf_counter() - t
    t = time.perf_counter()
    if (st.step + 1) % cfg.rollout.sync_every == 0:
      if cfg.rollout.max_staleness == 0:
        for k, v in self.sampler.sync(self.trainer.model, st.policy_version + 1).items():
          scalars[f"sync/{k}"] = float(v)
      st.policy_version += 1  # K >= 1: the next step publishes it (`_snapshot`)
    if cfg.rollout.max_staleness == 0:
      scalars["time/sync"] = time.perf_counter() - t
    scalars["policy_version"] = float(st.policy_version)
    st.step += 1
    st.cursor, st.rng = draw.cursor, draw.rng
    scalars["time/checkpoint"] = self._ckpt_time
    scalars["time/step"] = time.perf_counter() - t_step + self._ckpt_time
    for rec in out.records:
      rec["process"] = jax.process_index()
    parts = multihost.allgather_json({"scalars": scalars, "weights": out.weights,
                                      "records": out.records, "stop": self.stop.stop})
    scalars = merge_scalars([(p["scalars"], p["weights"]) for p in parts],
                            {**out.reductions, **RUN_REDUCTIONS})
    self.stopping = any(p["stop"] for p in parts)  # every process stops at the same step
    if self.writer_process:
      self.rollouts.append([rec for p in parts for rec in p["records"]])
      self.writer.write(st.step, scalars)
    self._ckpt_time = 0.0
    if st.step % cfg.checkpoint.every == 0 or st.step == cfg.train.steps or self.stopping:
      self._ckpt_time = self.save()
    self.scalars = scalars
    return scalars

  def _draw(self, rng) -> Draw:
    """The next batch of the stream and its seed, from the RNG `rng` of the step before."""
    batch_rows = self.stream.next_batch()  # the step's questions: the same on every process
    rng, sub = jax.random.split(rng)
    seed = int(jax.random.randint(sub, (), 0, 2**31 - 1))
    mine = multihost.share(len(batch_rows))
    # Per-prompt seeds of the processes' shares do not overlap (vLLM: seed + i * n).
    seed = (seed + mine.start * 2 * self.cfg.rollout.n) % 2**31
    return Draw(batch_rows[mine], seed, self.stream.cursor, rng)

  def _rollout_ahead(self) -> tuple[Draw, StepOutput, dict[str, float]]:
    """rollout.max_staleness >= 1: this step's batch, sampled in the background during the
    last step (or now, at the first step and after a resume); then, with no generation in
    flight, the newest weights are copied to the host and the next step's batch is
    submitted, to sample after the engine loads them. Every process takes the same branches
    (the host copy is a collective)."""
    st = self.state
    t = time.perf_counter()
    job = self.ahead.take()
    if job is None:
      draw = self._draw(st.rng)
      out = self._rollout(draw.rows, draw.seed)
    else:
      draw, future = job
      out = self._rollout(draw.rows, draw.seed, first=lambda: self.ahead.wait(future))
    times = {"time/wait": time.perf_counter() - t, "time/sync": 0.0}
    if st.step + 1 < self.cfg.train.steps:  # the last step samples nothing ahead
      t = time.perf_counter()
      snap = self._snapshot()
      times["time/sync"] = time.perf_counter() - t
      nxt = self._draw(draw.rng)
      self.ahead.submit(nxt, self._load_and_sample, snap, nxt, st.step + 2)
    return draw, out, times

  def _snapshot(self) -> tuple[Any, int] | None:
    """K >= 1: the trainer's weights copied to the host and their version, when the engine
    holds an older version (the engine loads them in the rollout thread, `_load_and_sample`;
    this copy is all of a sync on the trainer's path); None when it holds the newest. Read
    with no rollout in flight, so the sampler's version is settled."""
    if self.sampler.policy_version == self.state.policy_version:
      return None
    return self.sampler.snapshot(self.trainer.model), self.state.policy_version

  def _load_and_sample(self, snap: tuple[Any, int] | None, draw: Draw, step: int) -> StepOutput:
    """The rollout thread's job: `snap`'s weights into the engine (between generations,
    never during one), then batch `step`; the load's timings join the batch's scalars
    (`sync/*`). A failed load raises here as the step's rollout would (an `EngineError` is
    retried with a fresh engine and a fresh sync; a `SyncError` ends the run)."""
    sync = {} if snap is None else self.sampler.load(*snap)
    out = self.stepper(draw.rows, step, draw.seed)
    out.scalars.update({f"sync/{k}": float(v) for k, v in sync.items()})
    return out

  def _staleness(self, out: StepOutput) -> dict[str, float]:
    """staleness/mean, /max and the histogram /frac_<d> (share of answers d updates behind,
    d = 0..K) of the batch's answers (an engine-retry re-sync is no update);
    outside [0, rollout.max_staleness] is a bug of the run loop."""
    lag = [self._lag(int(r["policy_version"])) for r in out.records]
    k = self.cfg.rollout.max_staleness
    if lag and not 0 <= min(lag) <= max(lag) <= k:
      raise AssertionError(f"step {self.state.step + 1}: staleness {min(lag)}..{max(lag)} "
                           f"outside [0, rollout.max_staleness={k}]")
    hist = {f"staleness/frac_{d}": (lag.count(d) / len(lag) if lag else 0.0)
            for d in range(k + 1)}
    return {"staleness/mean": float(np.mean(lag)) if lag else 0.0,
            "staleness/max": float(max(lag, default=0)), **hist}

  def _lag(self, version: int) -> int:
    """Updates between policy `version` and the trainer's (an engine-retry re-sync's version
    bump is none: same weights)."""
    now = self.state.policy_version
    return now - version - sum(version < r <= now for r in self._relabeled)

  def _drop_ahead(self) -> None:
    """Ends and discards the batch sampled ahead (not trained on: the checkpoint's cursor
    and RNG are before it, so a resumed run samples it again); bounded by rollout.timeout_s."""
    if self.ahead is not None:
      self.ahead.drop()
    self.stream.cursor = self.state.cursor

  def _rollout(self, rows, seed: int, first=None):
    """`RolloutStep` with engine failures handled (see the module docstring). `first`: the
    first attempt's result instead of running the step (the batch sampled in the background);
    it may raise as the step would.

    Every process takes the same branch after each attempt, agreed in one small collective:
    a rollout interrupted by a signal on any process abandons the step on all of them; an
    engine failure on any process makes every process sync the trainer's weights again (the
    gather is a collective; a healthy engine just reloads the same weights) and the failed
    processes retry their share, up to `rollout.engine_retries` times.
    """
    st, retries = self.state, int(self.cfg.rollout.engine_retries)
    out = None
    for attempt in range(retries + 1):
      error = None
      if out is None:
        try:
          out = (first() if attempt == 0 and first is not None else
                 self.stepper(rows, st.step + 1, seed))
        except EngineError as e:
          error = e
      interrupted = error is not None and self.stop.stop
      # Re-sync before a retry when the engine lacks usable weights: a fresh engine after a
      # sync (it holds the model dir's), or a K >= 1 engine whose background load failed
      # (further behind than rollout.max_staleness allows).
      behind = (self.sampler.needs_sync or
                self._lag(self.sampler.policy_version) > self.cfg.rollout.max_staleness)
      flags = multihost.agree([error is not None, interrupted, bool(behind)])
      failed = [i for i, f in enumerate(flags[:, 0]) if f]
      if flags[:, 1].any():
        self._abandon_step()
        raise RunInterrupted(f"interrupted during step {st.step + 1}; the {st.step} steps "
                             "done are saved: run the same command to resume")
      if not failed:
        return out
      where = (f"process {', '.join(map(str, failed))}" if flags.shape[0] > 1 else "")
      what = f"{error}" if error is not None else f"the engine of {where} failed"
      if attempt == retries:
        raise EngineError(f"step {st.step + 1}: {what} (gave up after {retries} restarts, "
                          "rollout.engine_retries); the checkpoint of step "
                          f"{self.last_saved} is intact: run the same command to resume")
      log.warning("step %d: %s%s; restarting the engine and retrying the step (%d of %d)",
                  st.step + 1, what, f" [{where}]" if where and error is not None else "",
                  attempt + 1, retries)
      if flags[:, 2].any():  # the engine lacks the trainer's weights (above)
        st.policy_version += 1
        self._relabeled.add(st.policy_version)
        self.sampler.sync(self.trainer.model, st.policy_version)
    raise AssertionError("unreachable")

  def _abandon_step(self) -> None:
    """Undo the unfinished step's data draw and save the steps done (if not yet saved)."""
    self.stream.cursor = self.state.cursor
    if self.last_saved < self.state.step:
      self.save()
    self.ckpt.wait()

  def _global_batch(self, local: dict | None) -> dict | None:
    """The step's trainer batch from every process's rows (`local`, None if it kept none),
    padded to the agreed rows per process and length; None when no process has rows."""
    shape = (0, 0) if local is None else local.shape
    rows, length = (int(v) for v in multihost.agree(shape).max(axis=0))
    if rows == 0:
      return None
    rows = multihost.rows_per_process(rows, int(self.cfg.optim.micro_batch))
    return multihost.global_batch(pad_batch(local, rows, length, self.stepper.pad_id),
                                  self.trainer.mesh, self.trainer.rules)

  def save(self) -> float:
    """Starts the checkpoint of the steps done; returns the seconds it blocked."""
    t = time.perf_counter()
    sizes = ({"rollouts": self.rollouts.tell(), "metrics": self.writer.log.tell()}
             if self.writer_process else None)
    self.state.log_bytes = multihost.allgather_json(sizes)[0]  # the writer's logs
    self.ckpt.save_run(self.trainer.state_for_checkpoint(), self.state,
                       json.loads(self.cfg.to_json()))
    self.last_saved = self.state.step
    return time.perf_counter() - t

  # ---------------------------------------------------------------------------- finish
  def finish(self) -> dict[str, Any]:
    """Waits for the last save; reward curve and (train.export) HF dir; the summary."""
    wd = self.wd
    self._drop_ahead()
    self.ckpt.wait()
    summary = {"last_step": self.last_saved, "workdir": str(wd.root), "scalars": self.scalars,
               "stopped": self.stopping}
    if self.writer_process and wd.metrics.stat().st_size:
      print(f"[train] learning: {metrics_lib.learning_summary(str(wd.metrics))}", flush=True)
      summary["reward_curve"] = metrics_lib.plot_reward_curve(wd.metrics, wd.reward_curve)
      self.writer.write_image("reward_curve", summary["reward_curve"])
    if self.cfg.train.export and not self.stopping:
      summary["hf"] = str(save_hf(self.trainer.model, self.model_cfg, wd.hf,
                                  tokenizer_from=self.model_dir))
    print(f"[train] done at step {self.last_saved}: checkpoints {wd.checkpoints}, metrics "
          f"{wd.metrics}, rollouts {wd.rollouts}, TensorBoard {wd.tb}"
          + (f", curve {summary['reward_curve']}" if "reward_curve" in summary else "")
          + (f", HF dir {summary['hf']}" if "hf" in summary else ""), flush=True)
    return summary

  def close(self) -> None:
    """Restores signal handlers, closes checkpointer, logs and engine, stops a local judge."""
    if self.ahead is not None:
      self._drop_ahead()  # no generation in flight while the engine closes
      self.ahead.close()
    if self.stop is not None:
      self.stop.restore()
    for closer in (self.ckpt, self.writer, self.rollouts, self.sampler):
      if closer is not None:
        try:
          closer.close()
        except Exception as e:  # keep closing the rest  # pylint: disable=broad-except
          log.warning("closing %s failed: %s", type(closer).__name__, e)
    if self.judge_proc is not None:
      self.judge_proc.stop()


def run(cfg: RunConfig) -> dict[str, Any]:
  """Train per `cfg`; returns a summary (last step, workdir paths, last scalars)."""
  r = Run(cfg)
  cfg = r.cfg
  try:
    r.setup()
    r.resume()
    bar = tqdm(total=cfg.train.steps, initial=r.state.step, desc="train", dynamic_ncols=True,
               file=sys.stdout)
    while not r.finished:
      scalars = r.step()
      bar.update(1)
      bar.set_postfix(reward=f"{scalars['reward/mean']:.3f}", t=f"{scalars['time/step']:.1f}s")
      if r.state.step % cfg.logging.every == 0 or r.finished:
        tqdm.write(metrics_lib.format_scalars(r.state.step, scalars, LINE_KEYS), file=sys.stdout)
    bar.close()
    summary = r.finish()
    if r.state.step < cfg.train.steps:
      raise RunInterrupted(f"stopped by a signal after step {r.state.step} of "
                           f"{cfg.train.steps}; it is saved: run the same command to resume")
    return summary
  finally:
    r.close()
