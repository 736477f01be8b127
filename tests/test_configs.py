"""Every preset loads, and the memory plan of a paper preset accounts for every byte class."""

import importlib.util
import re
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PRESETS = ("tiny_cpu", "smollm2_135m", "qwen2_5_7b", "qwen3_8b")


def load_preset(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


@pytest.mark.parametrize("name", TRAIN_PRESETS + ("eval",))
def test_preset_loads(name):
  cfg = load_preset(name)
  assert cfg.workdir if name != "eval" else cfg.model is not None


@pytest.mark.parametrize("name", ("qwen2_5_7b", "qwen3_8b"))
def test_paper_presets_have_paper_hyperparameters_and_need_a_model_dir(name):
  from pasr_jax.config import ConfigError, validate_config
  cfg = load_preset(name)
  assert (cfg.grpo.beta, cfg.grpo.eps_low, cfg.grpo.eps_high) == (0.04, 0.2, 0.2)
  assert (cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.rollout.max_tokens) == (8, 8, 1500)
  assert cfg.optim.lr == 1e-6 and cfg.model.dtype == "bfloat16"
  with pytest.raises(ConfigError, match="model.path"):
    validate_config(cfg)  # the snapshot path is the user's to give


def test_plan_one_layer_of_qwen3_8b_on_8_devices():
  """Arguments = fp32 params + fp32 reference + two AdamW moments, FSDP-split over 8 devices."""
  import jax
  from pasr_jax.plan import plan
  assert jax.device_count() == 8
  cfg = load_preset("qwen3_8b")
  out = plan(cfg, (1, 8, 1), seq_len=128, layers=1, batch=16)
  assert out["layers"] == 1 and out["devices"] == 8
  expected_gib = out["params"] * 4 * 4 / 8 / 2**30
  assert out["argument_gib"] == pytest.approx(expected_gib, rel=0.05)
  assert 0 < out["temp_gib"] and out["peak_gib"] >= out["argument_gib"]


@pytest.mark.parametrize("key,value,needle", [
    ("optim.lr", -0.001, "optim.lr=-0.001: must be > 0"),
    ("grpo.beta", -1.0, "grpo.beta=-1.0: must be >= 0"),
    ("grpo.eps_low", 1.5, "grpo.eps_low=1.5: must be in [0, 1)"),
    ("rollout.temperature", -0.5, "rollout.temperature=-0.5: must be > 0"),
    ("judge.timeout_s", 0.0, "judge.timeout_s=0.0: must be > 0"),
    ("judge.max_unparseable_frac", 2.0, "judge.max_unparseable_frac=2.0"),
    ("rollout.timeout_s", -1.0, "rollout.timeout_s=-1.0"),
    ("data.max_row_chars", -5, "data.max_row_chars=-5"),
    ("rewards.refine_weight", -1.0, "rewards.refine_weight=-1.0"),
])
def test_senseless_values_fail_before_anything_starts(key, value, needle):
  from pasr_jax.config import ConfigError, validate_config
  cfg = load_preset("tiny_cpu")
  node = cfg
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=re.escape(needle)):
    validate_config(cfg)


