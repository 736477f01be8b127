"""Checks of a run's config tree (configs/base.py) before anything heavy starts.

`validate_config` fails fast, naming the `--config.` key and its value, on values that
cannot work; `ConfigError` is what the `train` command turns into exit code 2.
"""

from __future__ import annotations

import os
from typing import Any


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
  need(cfg.rollout.timeout_s >= 0, "rollout.timeout_s", "must be >= 0 (0 = no limit)")
  need(cfg.rollout.engine_retries >= 0, "rollout.engine_retries", "must be >= 0")
  need(cfg.optim.lr > 0, "optim.lr", "must be > 0 (a negative rate trains backwards)")
  need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
  need(0 <= cfg.optim.b1 < 1, "optim.b1", "must be in [0, 1)")
  need(0 <= cfg.optim.b2 < 1, "optim.b2", "must be in [0, 1)")
  need(cfg.optim.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 = no clipping)")
  need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
  need(cfg.grpo.beta >= 0, "grpo.beta", "must be >= 0 (0 = no KL term)")
  need(0 <= cfg.grpo.eps_low < 1, "grpo.eps_low", "must be in [0, 1)")
  need(cfg.grpo.eps_high >= 0, "grpo.eps_high", "must be >= 0")
  need(cfg.grpo.tis_cap >= 0, "grpo.tis_cap", "must be >= 0 (0 = off)")
  need(cfg.judge.timeout_s > 0, "judge.timeout_s", "must be > 0")
  need(cfg.judge.concurrency >= 1, "judge.concurrency", "must be >= 1")
  need(cfg.judge.retries >= 0, "judge.retries", "must be >= 0")
  need(0 <= cfg.judge.max_unparseable_frac <= 1, "judge.max_unparseable_frac",
       "must be in [0, 1] (1 = never stop)")
  need(cfg.data.max_row_chars >= 0, "data.max_row_chars", "must be >= 0 (0 = no limit)")
  need(cfg.train.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
  for k in ("format_weight", "accuracy_weight", "refine_weight"):
    need(cfg.rewards[k] >= 0, f"rewards.{k}", "must be >= 0")
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
