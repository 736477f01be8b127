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


@pytest.mark.parametrize("name", TRAIN_PRESETS + ("eval", "paper_eval"))
def test_preset_loads(name):
  cfg = load_preset(name)
  assert cfg.workdir if "eval" not in name else cfg.model is not None


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
  """Arguments = fp32 params + bf16 reference + two AdamW moments, FSDP-split over 8 devices."""
  import jax
  from pasr_jax.plan import plan
  assert jax.device_count() == 8
  cfg = load_preset("qwen3_8b")
  out = plan(cfg, (1, 8, 1), seq_len=128, layers=1, batch=16)
  assert out["layers"] == 1 and out["devices"] == 8
  expected_gib = out["params"] * (4 + 2 + 4 + 4) / 8 / 2**30
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



# The original run's values (PASR/config.py, PASR/pasr_main.py; README "Fidelity" table),
# read from each paper preset: one fact per test.
PAPER_PRESETS = ("qwen2_5_7b", "qwen3_8b")


@pytest.fixture(params=PAPER_PRESETS)
def paper(request):
  return load_preset(request.param)


def test_paper_sampling_8_by_8_at_temperature_0_9(paper):
  r = paper.rollout
  assert (r.prompts_per_step, r.n, r.temperature, r.top_p, r.max_tokens) == (8, 8, 0.9, 1.0, 1500)


def test_paper_optimizer_adamw_1e_6_without_clipping(paper):
  o = paper.optim
  assert (o.lr, o.schedule, o.warmup_steps, o.weight_decay) == (1e-6, "constant", 0, 0.0)
  assert o.clip_norm == 0.0
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  import optax
  from pasr_jax.trainer import make_optimizer

  def two_steps(tx):  # a huge gradient, then a small one: clipping changes the second step
    params = {"w": jnp.zeros((2, 2))}
    state = tx.init(params)
    for g in (1e6, 1.0):
      upd, state = tx.update({"w": jnp.full((2, 2), g)}, state, params)
    return np.asarray(upd["w"])
  plain = two_steps(optax.adamw(1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  np.testing.assert_allclose(two_steps(make_optimizer(o, 10)), plain, rtol=1e-6)
  clipped = dict(o.to_dict(), clip_norm=1.0)
  assert not np.allclose(two_steps(make_optimizer(ml_collections.ConfigDict(clipped), 10)),
                         plain, rtol=1e-3)


def test_paper_8_sequences_per_update(paper):
  from pasr_jax.trainer import updates_per_step
  assert paper.optim.sequences_per_update == 8
  assert paper.optim.sequences_per_update % paper.optim.micro_batch == 0
  assert updates_per_step(paper) == 8  # a rollout batch of 64 answers: 8 optimizer updates


def test_paper_loss_clip_0_2_beta_0_04_sequence_mean(paper):
  g = paper.grpo
  assert (g.eps_low, g.eps_high, g.beta, g.agg, g.num_iterations) == (
      0.2, 0.2, 0.04, "seq_mean_token_mean", 1)
  assert not g.mask_truncated


def test_paper_advantages_sample_std_plus_1e_4(paper):
  import numpy as np
  from pasr_jax import grpo
  g = paper.grpo
  assert (g.adv_std_ddof, g.adv_eps, g.adv_scale) == (1, 1e-4, "group")
  r = np.array([0.0, 1.0, 2.0, 1.0])
  adv, _ = grpo.group_advantages(r, 4, g.adv_std_ddof, g.adv_scale, g.adv_eps, g.skip_range)
  np.testing.assert_allclose(adv, (r - 1.0) / (np.std(r, ddof=1) + 1e-4), rtol=1e-6)


def test_paper_skips_groups_whose_rewards_span_less_than_1e_4(paper):
  import numpy as np
  from pasr_jax import grpo
  assert paper.grpo.skip_zero_variance and paper.grpo.skip_range == 1e-4
  r = np.array([1.0, 1.0 + 5e-5, 1.0, 1.0,   0.0, 2e-4, 0.0, 0.0])
  np.testing.assert_array_equal(grpo.flat_groups(r, 4, paper.grpo.skip_range), [True, False])
  assert grpo.flat_groups(r, 4, 0.0).tolist() == [False, False]  # ours by default: exact


def test_paper_training_judge_graded_at_0_2(paper):
  from pasr_jax import prompts
  assert paper.judge.temperature == 0.2 and paper.judge.input == "full"
  assert paper.prompts.judge_style == "graded"
  p = prompts.load_prompts(paper.prompts)
  for task in prompts.TASK_TYPES:
    assert p.judge[task] == prompts.GRADED_JUDGE_INSTRUCTION
  assert "from 0" in prompts.GRADED_JUDGE_INSTRUCTION and "just the" in prompts.GRADED_JUDGE_INSTRUCTION


def test_paper_prompts_refine_as_often_as_needed_and_plain_baseline(paper):
  from pasr_jax import prompts
  p = prompts.load_prompts(paper.prompts)
  assert p.pasr_system == prompts.PAPER_PASR_SYSTEM_PROMPT
  assert "as often as needed" in p.pasr_system and "nothing left to improve" in p.pasr_system
  assert "only when it helps" not in p.pasr_system
  assert p.plain_system == prompts.PAPER_PLAIN_SYSTEM_PROMPT
  assert "helpful AI assistant" in p.plain_system and "reasoning" not in p.plain_system


def test_paper_data_is_alpaca_instruction_output(paper, tmp_path):
  import json
  from pasr_jax import data
  assert (paper.data.question_field, paper.data.answer_field) == ("instruction", "output")
  f = tmp_path / "alpaca.json"
  # Both fields present and a decoy "question": the preset names its fields, no guessing.
  f.write_text(json.dumps([{"question": "x", "instruction": "2+2?", "output": "4"}]))
  paper.data.files = (str(f),)
  rows = data.load_dataset(paper.data)
  assert (rows[0].question, rows[0].answer) == ("2+2?", "4")


def test_prompt_choices_are_checked():
  from pasr_jax import prompts
  cfg = load_preset("tiny_cpu").prompts
  cfg.builtin = "theirs"
  with pytest.raises(prompts.PromptError, match="prompts.builtin='theirs'"):
    prompts.load_prompts(cfg)
  cfg.builtin, cfg.judge_style = "ours", "strict"
  with pytest.raises(prompts.PromptError, match="prompts.judge_style='strict'"):
    prompts.load_prompts(cfg)
