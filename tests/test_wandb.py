"""Weights & Biases beside TensorBoard and JSONL: a real short run (ScriptedSampler, tiny
model, verify judge) in offline mode, read back from the files W&B wrote; no network."""

import json
import subprocess

import pytest

from configs.base import get_base_config
from helpers import ROOT, env, read_wandb_run, run_train, train_cmd, train_error_lines
from pasr_jax import metrics
from pasr_jax.config import ConfigError, RunConfig


@pytest.mark.slow
def test_offline_run_logs_the_config_every_step_and_the_reward_curve(tmp_path, judge_url):
  w = tmp_path / "w"
  run_train(w, judge_url, "--config.train.steps=2", "--config.logging.wandb_project=pasr-test",
            "--config.logging.wandb_mode=offline", "--config.logging.tensorboard=False",
            scripted=True)
  (run_dir,) = (w / "wandb").glob("offline-run-*")
  got = read_wandb_run(run_dir)
  assert got["project"] == "pasr-test" and got["name"] == "w"   # named after the workdir
  assert got["config"] == json.loads((w / "config.json").read_text())
  steps = [h for h in got["history"] if "reward/mean" in h]
  want = metrics.read_jsonl(str(w / "metrics.jsonl"))
  assert [h["_step"] for h in steps] == [r["step"] for r in want] == [1, 2]
  for h, r in zip(steps, want):
    for k, v in r.items():
      if k != "step":
        assert h[k] == pytest.approx(v), (r["step"], k)
  # The curve, an image logged with the last step (W&B stores its fields as nested keys).
  curve = {k.split("/", 1)[1]: v for k, v in steps[-1].items() if k.startswith("reward_curve/")}
  assert curve["_type"] == "image-file" and curve["format"] == "png", curve
  assert (run_dir / "files" / curve["path"]).stat().st_size > 1000


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
  p = subprocess.run(train_cmd(tmp_path / "w", "http://127.0.0.1:9",
                               "--config.logging.wandb_mode=sometimes"),
                     cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  ours = train_error_lines(p.stderr)
  assert p.returncode == 2 and len(ours) == 1, p.stderr[-3000:]
  assert "logging.wandb_mode='sometimes': must be one of online | offline" in ours[0]
