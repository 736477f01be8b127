"""PASR GRPO training: `python -m pasr_jax.train --config=configs/<preset>.py --config.x=y`.

Per step: next B questions -> `RolloutStep` (vLLM rollouts, judge, rewards, advantages, batch)
-> mu `Trainer.update`s -> every k steps a weight sync to vLLM -> metrics, rollouts.jsonl and,
every m steps, an Orbax checkpoint. A run resumes from the newest checkpoint in its workdir
with the same next batch. SIGTERM / Ctrl-C finish the current step, save and exit cleanly.

Workdir: config.json, checkpoints/, metrics.jsonl, rollouts.jsonl, tb/, reward_curve.png,
tiny_model/ (tiny_cpu), hf/ (with train.export).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from typing import Any

from absl import app, flags
from ml_collections import config_flags

log = logging.getLogger("pasr_jax.train")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config preset file (configs/*.py).",
                                          lock_config=True)


class ConfigError(ValueError):
  """A config value is unusable; the message names the key and the value."""


AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")


def validate_config(cfg) -> None:
  """Fail fast, before any engine starts, on values that cannot work."""
  def need(ok: bool, key: str, why: str):
    if not ok:
      raise ConfigError(f"config {key}={_get(cfg, key)!r}: {why}")
  need(cfg.rollout.n >= 2, "rollout.n", "GRPO needs n >= 2 answers per question")
  need(cfg.rollout.prompts_per_step >= 1, "rollout.prompts_per_step", "must be >= 1")
  need(cfg.rollout.max_tokens >= 1, "rollout.max_tokens", "must be >= 1")
  need(cfg.rollout.max_prompt_tokens >= 1, "rollout.max_prompt_tokens", "must be >= 1")
  need(cfg.rollout.max_prompt_tokens + cfg.rollout.max_tokens <= cfg.rollout.vllm.max_model_len,
       "rollout.vllm.max_model_len", "must hold rollout.max_prompt_tokens + rollout.max_tokens")
  need(cfg.rollout.temperature > 0, "rollout.temperature", "must be > 0 (the ratio divides by it)")
  need(0 < cfg.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
  need(cfg.rollout.sync_every >= 1, "rollout.sync_every", "must be >= 1")
  need(cfg.train.steps >= 1, "train.steps", "must be >= 1")
  need(cfg.train.seq_multiple >= 1, "train.seq_multiple", "must be >= 1")
  need(cfg.checkpoint.every >= 1, "checkpoint.every", "must be >= 1")
  need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
  need(cfg.grpo.num_iterations >= 1, "grpo.num_iterations", "must be >= 1")
  need(cfg.grpo.agg in AGGS, "grpo.agg", f"must be one of {AGGS}")
  need(cfg.optim.micro_batch >= 1, "optim.micro_batch", "must be >= 1")
  need(cfg.rewards.accuracy_rule in ("", "contains"), "rewards.accuracy_rule",
       "must be '' (judge) or 'contains'")
  need(cfg.rewards.zeta >= 0, "rewards.zeta", "must be >= 0")
  need(bool(cfg.workdir), "workdir", "must be set")
  if not cfg.model.tiny_random:
    need(bool(cfg.model.path) and os.path.isfile(os.path.join(cfg.model.path, "config.json")),
         "model.path", "no HF model dir (config.json) there; run `make setup` for SmolLM2")
  for f in (cfg.data.files if not isinstance(cfg.data.files, str) else (cfg.data.files,)):
    need(os.path.isfile(f), "data.files", f"file {f!r} does not exist")


def _get(cfg, dotted: str) -> Any:
  for part in dotted.split("."):
    cfg = cfg[part]
  return cfg


# ----------------------------------------------------------------------------- judge server
def judge_answers(base_url: str, timeout_s: float = 3.0) -> bool:
  """True when GET <base_url>/v1/models answers 200."""
  import httpx  # pylint: disable=import-outside-toplevel
  try:
    return httpx.get(base_url.rstrip("/") + "/v1/models", timeout=timeout_s).status_code == 200
  except httpx.HTTPError:
    return False


class LocalJudge:
  """A `python -m pasr_jax.judge --backend verify` child on the host/port of a local URL."""

  def __init__(self, base_url: str, workdir: str, startup_s: float = 120.0):
    u = urllib.parse.urlparse(base_url)
    if u.hostname not in ("127.0.0.1", "localhost") or not u.port:
      raise ConfigError(f"config judge.base_url={base_url!r}: judge.autostart needs a local "
                        "URL with a port (http://127.0.0.1:PORT)")
    # pylint: disable-next=import-outside-toplevel
    from pasr_jax.judge.server import die_with_parent, wait_healthy
    self.log_path = os.path.join(workdir, "judge.log")
    logf = open(self.log_path, "ab")
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "pasr_jax.judge", "--backend", "verify", "--host", u.hostname,
         "--port", str(u.port)], stdout=logf, stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent)
    if not wait_healthy(base_url.rstrip("/"), self.proc, startup_s):
      self.stop()
      raise ConfigError(f"config judge.base_url={base_url!r}: the autostarted verify judge did "
                        f"not come up (see {self.log_path})")

  def stop(self) -> None:
    from pasr_jax.judge.server import stop_process  # pylint: disable=import-outside-toplevel
    stop_process(self.proc, 10.0)


# ----------------------------------------------------------------------------- the run
class _StopFlag:
  """Set by SIGTERM / the first Ctrl-C; the loop saves and exits at the next step boundary."""

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


def _model_dir(cfg) -> str:
  if not cfg.model.tiny_random:
    return cfg.model.path
  from pasr_jax.tiny import make_tiny_model_dir  # pylint: disable=import-outside-toplevel
  d = os.path.join(os.path.abspath(cfg.workdir), "tiny_model")
  if not os.path.isfile(os.path.join(d, "config.json")):
    # Untied, so tiny runs cover the untied path; SmolLM2 (the demo) covers tied heads, whose
    # vLLM-side refresh after a sync is in rollout/vllm_worker.py.
    make_tiny_model_dir(d, seed=cfg.seed, tie_word_embeddings=False)
  return d


def run(cfg) -> dict[str, Any]:
  """Train per `cfg`; returns a summary (last step, workdir paths, last scalars)."""
  validate_config(cfg)  # before the heavy imports: a bad value fails in seconds
  from pasr_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from pasr_jax import pasr  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(cfg.workdir)
  os.makedirs(workdir, exist_ok=True)
  print("[train] resolved config:\n" + cfg.to_json(indent=2), flush=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(cfg.to_json(indent=2))

  rows = data_lib.load_dataset(cfg.data)
  prompts = pasr.load_prompts(cfg.prompts)
  judge_proc = None
  judge = None
  if cfg.rewards.accuracy_rule == "":
    if not judge_answers(cfg.judge.base_url):
      if not cfg.judge.autostart:
        raise ConfigError(f"config judge.base_url={cfg.judge.base_url!r}: no judge answers at "
                          "/v1/models; start one (python -m pasr_jax.judge --backend verify "
                          "--port N) or set judge.autostart=True")
      judge_proc = LocalJudge(cfg.judge.base_url, workdir)
    from pasr_jax.judge.client import JudgeClient  # pylint: disable=import-outside-toplevel
    judge = JudgeClient.from_config(cfg.judge, prompts)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  from pasr_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from pasr_jax.checkpoint import (  # pylint: disable=import-outside-toplevel
      Checkpointer, CheckpointMismatchError)
  from pasr_jax.step import RolloutStep  # pylint: disable=import-outside-toplevel

  sampler = None
  ckpt = None
  writer = None
  rollouts = None
  stop = _StopFlag()
  try:
    from pasr_jax.models.hf import load_hf, save_hf  # pylint: disable=import-outside-toplevel
    from pasr_jax.rollout.vllm_sampler import VllmSampler  # pylint: disable=import-outside-toplevel
    from pasr_jax.sharding import make_mesh  # pylint: disable=import-outside-toplevel
    from pasr_jax.trainer import Trainer  # pylint: disable=import-outside-toplevel

    if cfg.mesh.get("distributed", False):
      jax.distributed.initialize()  # reads JAX_COORDINATOR_ADDRESS etc. (scripts/launch_multihost.sh)
    model_dir = _model_dir(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    mesh = make_mesh(tuple(cfg.mesh.shape))
    model, model_cfg = load_hf(model_dir, dtype=_dtype(cfg.model.dtype),
                               param_dtype=_dtype(cfg.model.param_dtype), mesh=mesh,
                               rules=tuple(cfg.mesh.rules), scan_layers=cfg.model.scan_layers,
                               remat=cfg.model.remat)
    trainer = Trainer(cfg, model, model_cfg, mesh)

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    start, version = 0, 0
    cursor = data_lib.Cursor()
    key = jax.random.key(cfg.seed)
    log_sizes = {"rollouts": 0, "metrics": 0}  # no checkpoint: earlier logs are void
    restored = None
    if ckpt.all_steps():
      if not cfg.resume:
        raise ConfigError(f"config resume=False but {workdir}/checkpoints has steps "
                          f"{ckpt.all_steps()}: use another workdir or resume=True")
      try:
        restored = ckpt.restore(trainer.state_for_checkpoint())
      except CheckpointMismatchError as e:
        raise ConfigError(f"config workdir={cfg.workdir!r}: {e}") from None
    if restored is not None:
      start, state, meta = restored
      trainer.restore_from_checkpoint(state)
      cursor = data_lib.Cursor.from_dict(meta["cursor"])
      version = int(meta["policy_version"])
      key = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
      log_sizes = meta["log_bytes"]
      print(f"[train] resumed from step {start} (cursor {cursor}, policy version {version})",
            flush=True)
    stream = data_lib.BatchStream(rows, cfg.rollout.prompts_per_step, cfg.data.shuffle_seed,
                                  cursor)
    writer = metrics_lib.MetricsWriter(workdir, cfg.logging.tensorboard, log_sizes["metrics"])
    rollouts = metrics_lib.JsonlLog(os.path.join(workdir, "rollouts.jsonl"), log_sizes["rollouts"])

    sampler = VllmSampler.from_config(cfg.rollout, model_dir, seed=cfg.seed)
    t = time.perf_counter()
    _ = sampler.llm  # start the engine now so step 1's rollout time is the rollout's
    print(f"[train] vLLM engine up in {time.perf_counter() - t:.1f}s", flush=True)
    if restored is not None:
      sampler.sync(trainer.model, version)  # the engine starts from the base weights
    stepper = RolloutStep(cfg, tokenizer, sampler, judge, prompts)

    def save(step_done: int) -> float:
      t = time.perf_counter()
      meta = {"step": step_done, "cursor": stream.cursor.to_dict(),
              "rng": np.asarray(jax.random.key_data(key)).tolist(), "policy_version": version,
              "log_bytes": {"rollouts": rollouts.tell(), "metrics": writer.log.tell()},
              "config": json.loads(cfg.to_json())}
      ckpt.save(step_done, trainer.state_for_checkpoint(), meta)
      return time.perf_counter() - t

    last_saved = start
    ckpt_time = 0.0  # blocking part of the previous step's save, reported with this step
    scalars: dict[str, float] = {}
    bar = tqdm(range(start, cfg.train.steps), initial=start, total=cfg.train.steps,
               desc="train", dynamic_ncols=True, file=sys.stdout)
    step = start
    for step in bar:
      t_step = time.perf_counter()
      batch_rows = stream.next_batch()
      key, sub = jax.random.split(key)
      seed = int(jax.random.randint(sub, (), 0, 2**31 - 1))
      out = stepper.run(batch_rows, step + 1, seed)
      scalars = dict(out.scalars)
      t = time.perf_counter()
      if out.batch is not None:  # None: every group had zero variance and was skipped
        for k, v in trainer.train_batch(out.batch).items():  # mu updates inside
          scalars[f"train/{k}"] = float(v)
      scalars["time/update"] = time.perf_counter() - t
      t = time.perf_counter()
      if (step + 1) % cfg.rollout.sync_every == 0:
        for k, v in sampler.sync(trainer.model, version + 1).items():
          scalars[f"sync/{k}"] = float(v)
        version += 1
      scalars["time/sync"] = time.perf_counter() - t
      scalars["policy_version"] = float(version)
      rollouts.append(out.records)
      done = step + 1
      scalars["time/checkpoint"] = ckpt_time
      scalars["time/step"] = time.perf_counter() - t_step + ckpt_time
      writer.write(done, scalars)
      ckpt_time = 0.0
      if done % cfg.checkpoint.every == 0 or done == cfg.train.steps or stop.stop:
        ckpt_time = save(done)
        last_saved = done
      bar.set_postfix(reward=f"{scalars['reward/mean']:.3f}", t=f"{scalars['time/step']:.1f}s")
      tqdm.write(metrics_lib.format_scalars(done, scalars, (
          "reward/mean", "reward/accuracy", "reward/format", "rate/refine", "rate/truncated",
          "time/rollout", "time/judge", "time/update", "time/sync", "time/checkpoint")),
          file=sys.stdout)
      if stop.stop:
        break
    bar.close()
    ckpt.wait()
    summary = {"last_step": last_saved, "workdir": workdir, "scalars": scalars,
               "stopped": stop.stop}
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.getsize(metrics_path):
      summary["reward_curve"] = metrics_lib.plot_reward_curve(
          metrics_path, os.path.join(workdir, "reward_curve.png"))
    if cfg.train.export and not stop.stop:
      summary["hf"] = str(save_hf(trainer.model, model_cfg, os.path.join(workdir, "hf"),
                                  tokenizer_from=model_dir))
    print(f"[train] done at step {last_saved}: checkpoints {workdir}/checkpoints, metrics "
          f"{metrics_path}, rollouts {workdir}/rollouts.jsonl, TensorBoard {workdir}/tb"
          + (f", curve {summary['reward_curve']}" if "reward_curve" in summary else "")
          + (f", HF dir {summary['hf']}" if "hf" in summary else ""), flush=True)
    return summary
  finally:
    stop.restore()
    for closer in (ckpt, writer, rollouts, sampler):
      if closer is not None:
        try:
          closer.close()
        except Exception as e:  # keep closing the rest  # pylint: disable=broad-except
          log.warning("closing %s failed: %s", type(closer).__name__, e)
    if judge_proc is not None:
      judge_proc.stop()


def _dtype(name: str):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
  except KeyError:
    raise ConfigError(f"config model.dtype/param_dtype={name!r}: float32 | bfloat16 | float16") from None


# ----------------------------------------------------------------------------- CLI
def _explain_override_error(argv: list[str], err: Exception) -> str:
  """Name the first `--config.a.b=v` whose key the base tree does not have."""
  from configs.base import get_base_config  # pylint: disable=import-outside-toplevel
  base = get_base_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    dotted = arg[len("--config."):].split("=", 1)[0]
    node = base
    for i, part in enumerate(dotted.split(".")):
      if not hasattr(node, "keys") or part not in node:
        parent = ".".join(dotted.split(".")[:i]) or "(top level)"
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"unknown config key {dotted!r} in {arg!r}; keys under {parent}: "
                f"{', '.join(known)}")
      node = node[part]
  return f"bad flags: {err}"


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # absl/ml_collections raise several types for bad overrides
    print(f"pasr_jax.train: {_explain_override_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> int:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it renames
  cfg = _CONFIG.value
  if cfg is None:
    print("pasr_jax.train: --config=configs/<preset>.py is required", file=sys.stderr)
    return 2
  try:
    run(cfg)
  except ConfigError as e:
    print(f"pasr_jax.train: {e}", file=sys.stderr)
    return 2
  except ValueError as e:  # DataError, PromptError, ...: user input, not a crash
    if type(e).__module__.startswith("pasr_jax"):
      print(f"pasr_jax.train: {type(e).__name__}: {e}", file=sys.stderr)
      return 2
    raise
  return 0


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
