"""Weights & Biases: config errors. What a real run logs to W&B (offline, read back from the
files W&B wrote) is asserted on test_multihost_run.py's scripted runs, which log to W&B anyway."""

import pytest

from configs.base import get_base_config
from helpers import train_error_lines, train_in_process
from pasr_jax import metrics
from pasr_jax.config import ConfigError, RunConfig


def test_online_without_a_key_is_a_config_error_naming_the_key(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))     # no ~/.netrc, no W&B settings: no key
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.delenv("WANDB_MODE", raising=False)
  cfg = get_base_config()
  cfg.logging.wandb_project = "pasr-test"
  with pytest.raises(ConfigError, match=r"logging.wandb_project='pasr-test' "
                                        r"\(logging.wandb_mode='online'\): W&B did not start"):
    metrics.start_wandb(RunConfig.from_tree(cfg).logging, {}, tmp_path)
  cfg.logging.wandb_project = ""
  assert metrics.start_wandb(RunConfig.from_tree(cfg).logging, {}, tmp_path) is None  # off


def test_unknown_mode_ends_in_one_line_exit_2(tmp_path):
  p = train_in_process(tmp_path / "w", "http://127.0.0.1:9",
                       "--config.logging.wandb_mode=sometimes")
  ours = train_error_lines(p.stderr)
  assert p.returncode == 2 and len(ours) == 1, p.stderr[-3000:]
  assert "logging.wandb_mode='sometimes': must be one of online | offline" in ours[0]
