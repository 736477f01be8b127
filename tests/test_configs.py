"""Every preset loads, and the memory plan of a paper preset accounts for every byte class."""

import re
import os

import pytest

from helpers import ROOT, load_preset
from pasr_jax.config import DataCfg, PromptsCfg

TRAIN_PRESETS = ("tiny_cpu", "smollm2_135m", "arith_135m", "qwen2_5_7b", "qwen2_5_7b_base",
                 "qwen3_8b")


@pytest.mark.parametrize("name", TRAIN_PRESETS + ("eval", "paper_eval"))
def test_preset_loads(name):
  cfg = load_preset(name)
  assert cfg.workdir if "eval" not in name else cfg.model is not None


@pytest.mark.parametrize("name", ("qwen2_5_7b", "qwen2_5_7b_base", "qwen3_8b"))
def test_paper_presets_have_paper_hyperparameters_and_need_a_model_dir(name):
  from pasr_jax.config import ConfigError, RunConfig
  cfg = load_preset(name)
  assert (cfg.grpo.beta, cfg.grpo.eps_low, cfg.grpo.eps_high) == (0.04, 0.2, 0.2)
  assert (cfg.rollout.prompts_per_step, cfg.rollout.n, cfg.rollout.max_tokens) == (8, 8, 1500)
  assert cfg.optim.lr == 1e-6 and cfg.model.dtype == "bfloat16"
  with pytest.raises(ConfigError, match="model.path"):
    RunConfig.from_tree(cfg).need_files()  # the snapshot path is the user's to give


@pytest.mark.slow
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
  from pasr_jax.config import ConfigError, RunConfig
  cfg = load_preset("tiny_cpu")
  node = cfg
  *parents, leaf = key.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(ConfigError, match=re.escape(needle)):
    RunConfig.from_tree(cfg)



# The original run's values (PASR/config.py, PASR/pasr_main.py; README "Fidelity" table),
# read from each paper preset: one fact per test.
PAPER_PRESETS = ("qwen2_5_7b", "qwen2_5_7b_base", "qwen3_8b")


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
  import numpy as np
  import optax
  from pasr_jax.config import OptimCfg
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
  assert not np.allclose(two_steps(make_optimizer(OptimCfg.of(clipped), 10)),
                         plain, rtol=1e-3)


def test_paper_8_sequences_per_update(paper):
  from pasr_jax.config import RunConfig
  assert paper.optim.sequences_per_update == 8
  assert paper.optim.sequences_per_update % paper.optim.micro_batch == 0
  assert RunConfig.from_tree(paper).trainer_cfg().updates_per_step == 8  # a rollout batch of 64 answers: 8 optimizer updates


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
  p = prompts.load_prompts(PromptsCfg.of(paper.prompts))
  for task in prompts.TASK_TYPES:
    assert p.judge[task] == prompts.GRADED_JUDGE_INSTRUCTION
  assert "from 0" in prompts.GRADED_JUDGE_INSTRUCTION and "just the" in prompts.GRADED_JUDGE_INSTRUCTION


def test_paper_prompts_refine_as_often_as_needed_and_plain_baseline(paper):
  from pasr_jax import prompts
  p = prompts.load_prompts(PromptsCfg.of(paper.prompts))
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
  rows = data.load_dataset(DataCfg.of(paper.data))
  assert (rows[0].question, rows[0].answer) == ("2+2?", "4")


def test_prompt_choices_are_checked():
  from pasr_jax import prompts
  from pasr_jax.config import ConfigError
  cfg = load_preset("tiny_cpu").prompts
  cfg.builtin = "theirs"
  with pytest.raises(ConfigError, match="prompts.builtin='theirs': must be one of ours | paper"):
    prompts.load_prompts(PromptsCfg.of(cfg))
  cfg.builtin, cfg.judge_style = "ours", "strict"
  with pytest.raises(ConfigError, match="prompts.judge_style='strict'"):
    prompts.load_prompts(PromptsCfg.of(cfg))


# ---------------------------------------------------------------- the typed config itself
def _base():
  from configs.base import get_base_config
  return get_base_config()


def leaf_keys(tree, prefix=""):
  """Every dotted key of a config tree (sections expanded; model.hf_config is one key)."""
  out = []
  for k, v in (tree.to_dict() if hasattr(tree, "to_dict") else dict(tree)).items():
    if isinstance(v, dict) and k != "hf_config":
      out.extend(leaf_keys(v, f"{prefix}{k}."))
    else:
      out.append(prefix + k)
  return out


def _set(cfg, dotted, value):
  *parents, leaf = dotted.split(".")
  node = cfg
  for part in parents:
    node = node[part]
  with node.ignore_type():
    node[leaf] = value


def test_the_typed_config_has_exactly_the_base_trees_keys():
  import dataclasses
  from pasr_jax.config import RunConfig
  cfg = _base()
  typed = RunConfig.from_tree(cfg)
  assert sorted(leaf_keys(typed.to_dict())) == sorted(leaf_keys(cfg))
  with pytest.raises(dataclasses.FrozenInstanceError):
    typed.optim.lr = 1.0  # type: ignore[misc]
  assert RunConfig.from_tree(typed) is typed  # typed once; passing it on does not re-check


@pytest.mark.parametrize("name", TRAIN_PRESETS)
def test_every_training_preset_types(name):
  from pasr_jax.config import RunConfig
  typed = RunConfig.from_tree(load_preset(name))
  assert typed.rollout.vllm.max_model_len >= typed.rollout.max_prompt_tokens


def test_no_dead_keys_every_config_key_is_read_by_the_code():
  """Each key of configs/base.py is read as `.<key>` in a module of pasr_jax/ that handles its
  section (names `.<section>` or the section's class, e.g. `RewardsCfg`). In config.py the
  `check` methods do not count: a key that is only validated is still dead."""
  from pasr_jax import config
  sources = []
  for root, _, files in os.walk(os.path.join(ROOT, "pasr_jax")):
    for f in files:
      if f.endswith(".py"):
        text = open(os.path.join(root, f), encoding="utf-8").read()
        if f == "config.py":
          text = re.sub(r"  def check\(self\):\n(?:    .*\n|\n)*", "", text)
        sources.append(text)
  classes = {c._key: c.__name__ for c in vars(config).values()
             if isinstance(c, type) and issubclass(c, config.Section) and c._key}
  dead = []
  for key in leaf_keys(_base()):
    *parts, name = key.split(".")
    section = ".".join(parts)
    if not section:  # workdir, seed, resume
      ok = any(re.search(rf"\bcfg\.{name}\b", s) for s in sources)
    else:
      handles = rf"\.{parts[-1]}\b|\b{classes[section]}\b"
      ok = any(re.search(handles, s) and re.search(rf"\.{name}\b", s) for s in sources)
    if not ok:
      dead.append(key)
  assert not dead, f"config keys no code reads: {dead}"


def _wrong_type(value):
  if isinstance(value, bool):
    return "maybe"
  if isinstance(value, (int, float)):
    return "abc"
  if isinstance(value, str):
    return 1.5
  return 7  # tuples


def test_every_key_with_a_wrong_type_is_named():
  from pasr_jax.config import ConfigError, RunConfig
  for key in leaf_keys(_base()):
    cfg = _base()
    node = cfg
    for part in key.split("."):
      node = node[part]
    _set(cfg, key, _wrong_type(node))
    with pytest.raises(ConfigError, match=rf"config {re.escape(key)}="):
      RunConfig.from_tree(cfg)


@pytest.mark.parametrize("key,value,needle", [
    ("grpo.agg", "mean", "grpo.agg='mean': must be one of"),
    ("rollout.vllm.max_model_len", 100, "rollout.vllm.max_model_len=100: must hold"),
    ("rollout.n", 1, "rollout.n=1"),
    ("optim.schedule", "linear", "optim.schedule='linear'"),
    ("mesh.shape", (1, -1, -1), "mesh.shape=(1, -1, -1)"),
    ("model.dtype", "fp8", "model.dtype='fp8'"),
    ("judge.input", "question", "judge.input='question'"),
    ("logging.every", 0, "logging.every=0"),
    ("cold_start.refine_fraction", 1.5, "cold_start.refine_fraction=1.5"),
    ("sft.warmup_frac", 1.0, "sft.warmup_frac=1.0"),
    ("prompts.pasr_system_file", "/no/such/prompt.txt", "prompts.pasr_system_file="),
])
def test_each_bad_value_names_its_key(key, value, needle):
  from pasr_jax.config import ConfigError, RunConfig
  cfg = _base()
  _set(cfg, key, value)
  with pytest.raises(ConfigError, match=re.escape(needle)):
    RunConfig.from_tree(cfg)


def test_an_unknown_or_missing_key_is_named():
  from pasr_jax.config import ConfigError, RunConfig
  cfg = _base()
  cfg.optim.lrr = 1e-3  # a preset's typo
  with pytest.raises(ConfigError, match=r"config optim\.lrr: unknown key; keys under optim: "):
    RunConfig.from_tree(cfg)
  d = _base().to_dict()
  del d["judge"]["timeout_s"]
  with pytest.raises(ConfigError, match=r"config judge\.timeout_s: missing"):
    RunConfig.from_tree(d)


def test_missing_inputs_are_named_before_a_run_starts(tmp_path):
  from pasr_jax.config import ConfigError, RunConfig
  cfg = load_preset("tiny_cpu")
  cfg.data.files = (str(tmp_path / "nope.jsonl"),)
  with pytest.raises(ConfigError, match=r"config data\.files=.*nope\.jsonl' does not exist"):
    RunConfig.from_tree(cfg).need_files()
  cfg = load_preset("smollm2_135m")
  cfg.model.path = str(tmp_path)
  with pytest.raises(ConfigError, match=r"config model\.path=.*no HF model dir"):
    RunConfig.from_tree(cfg).need_files()


def test_every_key_has_help_and_base_py_is_the_schema():
  """Keys, defaults and help live in pasr_jax.config; configs/base.py is that tree, and
  `python -m pasr_jax.config` lists every key with its default and help."""
  import dataclasses
  import subprocess
  import sys
  from pasr_jax import config

  def fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
      if f.default_factory is not dataclasses.MISSING:
        yield f"{prefix}{f.name}", f
        yield from fields(f.default_factory, f"{prefix}{f.name}.")
      else:
        yield f"{prefix}{f.name}", f
  every = dict(fields(config.RunConfig))
  no_help = [k for k, f in every.items() if len(f.metadata.get("help", "")) < 8]
  assert not no_help, f"config keys without help: {no_help}"
  assert _base().to_dict() == config.base_tree().to_dict()
  assert sorted(leaf_keys(_base())) == sorted(
      k for k, f in every.items() if f.default_factory is dataclasses.MISSING)
  out = subprocess.run([sys.executable, "-m", "pasr_jax.config"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=True).stdout
  assert "optim.lr = 1e-06  # AdamW learning rate (paper: 1e-6)" in out.splitlines()
  assert len([l for l in out.splitlines() if " = " in l]) == len(leaf_keys(_base()))
