"""The run's config, typed: frozen dataclasses per component, built and checked once.

`configs/base.py` stays the one tree of keys and defaults (ml_collections, so presets and
`--config.a.b=v` overrides work as in every JAX project). At the command-line boundary
`RunConfig.from_tree` turns it into the dataclasses below: every key of the tree must be a
field here and every field must be in the tree, each value is coerced to the field's type,
and each section checks its own values. Errors name the `--config.` key and the value.
`Trainer`, `RolloutStep` and the judge client then get only their own sections.
`ConfigError` is what the `train` command turns into exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
from typing import Any, ClassVar

from pasr_jax import dtypes, errors
from pasr_jax.dtypes import NAMES as DTYPE_NAMES

# The choices of config values; the modules that act on them import them from here.
AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
TASK_TYPES = ("general", "multiple_choice", "summary")
PROMPT_SETS = ("ours", "paper")
JUDGE_STYLES = ("binary", "graded")
JUDGE_INPUTS = ("full", "answer")
REFINE_COMPARE = ("mean", "single", "none")


class ConfigError(errors.UserError):
  """A config value is unusable; the message names the key and the value."""


@dataclasses.dataclass(frozen=True)
class Section:
  """One component's keys; subclasses add fields and `check`."""
  _key: ClassVar[str] = ""

  def need(self, ok: bool, field: str, why: str) -> None:
    """Raise ConfigError naming `--config.<section>.<field>` and its value unless `ok`."""
    if not ok:
      key = f"{self._key}.{field}" if self._key else field
      raise ConfigError(f"config {key}={getattr(self, field)!r}: {why}")

  def check(self) -> None:
    """Values that cannot work (overridden per section)."""

  def __post_init__(self):
    self.check()

  @classmethod
  def of(cls, tree: Any) -> Any:
    """This section typed from its ConfigDict / dict (an instance is returned as is)."""
    if isinstance(tree, cls):
      return tree
    return _build(cls, _as_dict(tree), f"{cls._key}." if cls._key else "")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **changes) -> Any:
    """A copy with `changes` (checked again)."""
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ModelCfg(Section):
  _key: ClassVar[str] = "model"
  path: str
  tiny_random: bool
  dtype: str
  param_dtype: str
  scan_layers: bool
  remat: bool
  attention: str
  hf_config: dict | None = None   # paper presets: the architecture, for the memory plan

  def check(self):
    for f in ("dtype", "param_dtype"):
      self.need(getattr(self, f) in DTYPE_NAMES, f, "must be one of " + " | ".join(DTYPE_NAMES))
    self.need(self.attention in ("auto", "xla", "cudnn"), "attention", "auto | xla | cudnn")

  @property
  def compute_dtype(self) -> Any:
    """`dtype` as a numpy/JAX dtype."""
    return dtypes.to_dtype(self.dtype, "model.dtype")

  @property
  def weight_dtype(self) -> Any:
    """`param_dtype` as a numpy/JAX dtype (master weights and optimizer state)."""
    return dtypes.to_dtype(self.param_dtype, "model.param_dtype")


@dataclasses.dataclass(frozen=True)
class MeshCfg(Section):
  _key: ClassVar[str] = "mesh"
  shape: tuple[int, ...]
  distributed: bool
  coordinator_address: str
  num_processes: int
  process_id: int
  local_device_ids: str
  cuda_visible_devices: str
  memory_fraction: float
  heartbeat_timeout_s: float
  rules: tuple

  def check(self):
    self.need(len(self.shape) == 3 and list(self.shape).count(-1) <= 1
              and all(s == -1 or s >= 1 for s in self.shape), "shape",
              "(data, fsdp, tensor): sizes >= 1, at most one -1")
    self.need(0 <= self.memory_fraction < 1, "memory_fraction", "must be in [0, 1) (0 = auto)")
    self.need(self.heartbeat_timeout_s > 0, "heartbeat_timeout_s", "must be > 0")
    self.need(all(len(r) == 2 and isinstance(r[0], str) for r in self.rules), "rules",
              "(logical axis, mesh axis | tuple of mesh axes | None) pairs")


@dataclasses.dataclass(frozen=True)
class DataCfg(Section):
  _key: ClassVar[str] = "data"
  files: tuple[str, ...]
  question_field: str
  answer_field: str
  task_type: str
  shuffle_seed: int
  max_row_chars: int
  tfds_name: str
  tfds_data_dir: str

  def check(self):
    self.need(self.task_type in TASK_TYPES, "task_type", "must be one of " + " | ".join(TASK_TYPES))
    self.need(self.max_row_chars >= 0, "max_row_chars", "must be >= 0 (0 = no limit)")


@dataclasses.dataclass(frozen=True)
class VllmCfg(Section):
  _key: ClassVar[str] = "rollout.vllm"
  max_model_len: int
  gpu_memory_utilization: float
  colocate: bool
  tensor_parallel_size: int
  enforce_eager: bool
  dtype: str
  kv_cache_space_gib: float
  cpu_reserved_cores: int
  sync_dir: str
  sync_fallback_dir: str
  sync_headroom_gib: float

  def check(self):
    self.need(self.max_model_len >= 2, "max_model_len", "must be >= 2")
    self.need(0 < self.gpu_memory_utilization < 1, "gpu_memory_utilization", "must be in (0, 1)")
    self.need(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
    self.need(self.dtype in DTYPE_NAMES, "dtype", "must be one of " + " | ".join(DTYPE_NAMES))
    self.need(self.kv_cache_space_gib > 0, "kv_cache_space_gib", "must be > 0")
    self.need(self.cpu_reserved_cores >= -1, "cpu_reserved_cores", "must be >= -1 (-1 = vLLM's)")
    self.need(self.sync_headroom_gib >= 0, "sync_headroom_gib", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class RolloutCfg(Section):
  _key: ClassVar[str] = "rollout"
  prompts_per_step: int
  n: int
  temperature: float
  top_p: float
  max_tokens: int
  max_prompt_tokens: int
  sync_every: int
  baseline: bool
  timeout_s: float
  engine_retries: int
  vllm: VllmCfg

  def check(self):
    self.need(self.n >= 2, "n", "GRPO needs n >= 2 answers per question")
    self.need(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
    self.need(self.max_tokens >= 1, "max_tokens", "must be >= 1")
    self.need(self.max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
    self.need(self.temperature > 0, "temperature", "must be > 0 (the ratio divides by it)")
    self.need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
    self.need(self.sync_every >= 1, "sync_every", "must be >= 1")
    self.need(self.timeout_s >= 0, "timeout_s", "must be >= 0 (0 = no limit)")
    self.need(self.engine_retries >= 0, "engine_retries", "must be >= 0")
    if self.max_prompt_tokens + self.max_tokens > self.vllm.max_model_len:
      self.vllm.need(False, "max_model_len",
                     "must hold rollout.max_prompt_tokens + rollout.max_tokens")


@dataclasses.dataclass(frozen=True)
class JudgeCfg(Section):
  _key: ClassVar[str] = "judge"
  base_url: str
  model: str
  api_key_env: str
  concurrency: int
  timeout_s: float
  retries: int
  backoff_s: float
  cache_size: int
  input: str
  max_tokens: int
  max_unparseable_frac: float
  temperature: float
  autostart: bool

  def check(self):
    self.need(self.base_url.startswith(("http://", "https://")), "base_url",
              "must be an http(s) URL")
    self.need(self.timeout_s > 0, "timeout_s", "must be > 0")
    self.need(self.concurrency >= 1, "concurrency", "must be >= 1")
    self.need(self.retries >= 0, "retries", "must be >= 0")
    self.need(self.backoff_s >= 0, "backoff_s", "must be >= 0")
    self.need(self.cache_size >= 0, "cache_size", "must be >= 0")
    self.need(self.input in JUDGE_INPUTS, "input", "must be one of " + " | ".join(JUDGE_INPUTS))
    self.need(self.max_tokens >= 1, "max_tokens", "must be >= 1")
    self.need(0 <= self.max_unparseable_frac <= 1, "max_unparseable_frac",
              "must be in [0, 1] (1 = never stop)")
    self.need(self.temperature >= 0, "temperature", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class PromptsCfg(Section):
  _key: ClassVar[str] = "prompts"
  pasr_system_file: str
  plain_system_file: str
  judge_dir: str
  builtin: str
  judge_style: str

  def check(self):
    self.need(self.builtin in PROMPT_SETS, "builtin", "must be one of " + " | ".join(PROMPT_SETS))
    self.need(self.judge_style in JUDGE_STYLES, "judge_style", "must be one of " + " | ".join(JUDGE_STYLES))
    for f in ("pasr_system_file", "plain_system_file"):
      self.need(not getattr(self, f) or os.path.isfile(getattr(self, f)), f, "no such file")
    self.need(not self.judge_dir or os.path.isdir(self.judge_dir), "judge_dir", "no such dir")


@dataclasses.dataclass(frozen=True)
class RewardsCfg(Section):
  _key: ClassVar[str] = "rewards"
  format_weight: float
  accuracy_weight: float
  refine_weight: float
  zeta: float
  accuracy_rule: str
  refine_compare: str
  refine_fixed: float

  def check(self):
    for f in ("format_weight", "accuracy_weight", "refine_weight"):
      self.need(getattr(self, f) >= 0, f, "must be >= 0")
    self.need(self.zeta >= 0, "zeta", "must be >= 0")
    self.need(self.accuracy_rule in ("", "contains"), "accuracy_rule",
              "must be '' (judge) or 'contains'")
    self.need(self.refine_compare in REFINE_COMPARE, "refine_compare",
              " | ".join(REFINE_COMPARE))


@dataclasses.dataclass(frozen=True)
class GrpoCfg(Section):
  _key: ClassVar[str] = "grpo"
  beta: float
  eps_low: float
  eps_high: float
  agg: str
  num_iterations: int
  adv_std_ddof: int
  adv_eps: float
  skip_range: float
  adv_scale: str
  skip_zero_variance: bool
  recompute_old_logps: bool
  tis_cap: float
  mask_truncated: bool
  loss_temperature: float

  def check(self):
    self.need(self.beta >= 0, "beta", "must be >= 0 (0 = no KL term)")
    self.need(0 <= self.eps_low < 1, "eps_low", "must be in [0, 1)")
    self.need(self.eps_high >= 0, "eps_high", "must be >= 0")
    self.need(self.agg in AGGS, "agg", "must be one of " + " | ".join(AGGS))
    self.need(self.num_iterations >= 1, "num_iterations", "must be >= 1")
    self.need(self.adv_std_ddof in (0, 1), "adv_std_ddof", "0 (population) | 1 (sample)")
    self.need(self.adv_eps >= 0, "adv_eps", "must be >= 0")
    self.need(self.skip_range >= 0, "skip_range", "must be >= 0")
    self.need(self.adv_scale in ("group", "batch", "none"), "adv_scale", "group | batch | none")
    self.need(self.tis_cap >= 0, "tis_cap", "must be >= 0 (0 = off)")
    self.need(self.loss_temperature >= 0, "loss_temperature",
              "must be >= 0 (0 = rollout.temperature)")

  def temperature(self, rollout_temperature: float) -> float:
    """The logprob temperature of the loss: loss_temperature, or the sampler's if 0."""
    return float(self.loss_temperature or rollout_temperature)


@dataclasses.dataclass(frozen=True)
class OptimCfg(Section):
  _key: ClassVar[str] = "optim"
  lr: float
  schedule: str
  warmup_steps: int
  weight_decay: float
  b1: float
  b2: float
  clip_norm: float
  micro_batch: int
  sequences_per_update: int

  def check(self):
    self.need(self.lr > 0, "lr", "must be > 0 (a negative rate trains backwards)")
    self.need(self.schedule in ("constant", "cosine"), "schedule", "constant | cosine")
    self.need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
    self.need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
    self.need(0 <= self.b1 < 1, "b1", "must be in [0, 1)")
    self.need(0 <= self.b2 < 1, "b2", "must be in [0, 1)")
    self.need(self.clip_norm >= 0, "clip_norm", "must be >= 0 (0 = no clipping)")
    self.need(self.micro_batch >= 1, "micro_batch", "must be >= 1")
    self.need(self.sequences_per_update >= 0 and self.sequences_per_update % self.micro_batch == 0,
              "sequences_per_update", "must be 0 (the whole rollout batch) or a positive "
              f"multiple of optim.micro_batch={self.micro_batch}")


@dataclasses.dataclass(frozen=True)
class TrainCfg(Section):
  _key: ClassVar[str] = "train"
  steps: int
  seq_multiple: int
  max_nonfinite_steps: int
  export: bool

  def check(self):
    self.need(self.steps >= 1, "steps", "must be >= 1")
    self.need(self.seq_multiple >= 1, "seq_multiple", "must be >= 1")
    self.need(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class CheckpointCfg(Section):
  _key: ClassVar[str] = "checkpoint"
  every: int
  keep: int
  async_save: bool

  def check(self):
    self.need(self.every >= 1, "every", "must be >= 1")
    self.need(self.keep >= 1, "keep", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class SftCfg(Section):
  _key: ClassVar[str] = "sft"
  data: str
  rollouts: str
  workdir: str
  model_path: str
  lr: float
  warmup_frac: float
  epochs: int
  batch_size: int
  max_steps: int
  max_len: int
  clip_norm: float
  checkpoint_every: int
  export: bool

  def check(self):
    self.need(self.lr > 0, "lr", "must be > 0")
    self.need(0 <= self.warmup_frac < 1, "warmup_frac", "must be in [0, 1)")
    self.need(self.epochs >= 1, "epochs", "must be >= 1")
    self.need(self.batch_size >= 1, "batch_size", "must be >= 1")
    self.need(self.max_steps >= 0, "max_steps", "must be >= 0 (0 = no cap)")
    self.need(self.max_len >= 8, "max_len", "must be >= 8")
    self.need(self.clip_norm >= 0, "clip_norm", "must be >= 0")
    self.need(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class ColdStartCfg(Section):
  _key: ClassVar[str] = "cold_start"
  enabled: bool
  max_examples: int
  refine_fraction: float
  lr: float
  epochs: int
  max_steps: int

  def check(self):
    self.need(self.max_examples >= 0, "max_examples", "must be >= 0 (0 = all)")
    self.need(0 <= self.refine_fraction <= 1, "refine_fraction", "must be in [0, 1]")
    self.need(self.lr > 0, "lr", "must be > 0")
    self.need(self.epochs >= 1, "epochs", "must be >= 1")
    self.need(self.max_steps >= 0, "max_steps", "must be >= 0 (0 = no cap)")


@dataclasses.dataclass(frozen=True)
class LoggingCfg(Section):
  _key: ClassVar[str] = "logging"
  tensorboard: bool
  every: int

  def check(self):
    self.need(self.every >= 1, "every", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
  """The whole run; `RunConfig.from_tree(get_config())` is the one place config is read."""
  workdir: str
  seed: int
  resume: bool
  model: ModelCfg
  mesh: MeshCfg
  data: DataCfg
  rollout: RolloutCfg
  judge: JudgeCfg
  prompts: PromptsCfg
  rewards: RewardsCfg
  grpo: GrpoCfg
  optim: OptimCfg
  train: TrainCfg
  checkpoint: CheckpointCfg
  sft: SftCfg
  cold_start: ColdStartCfg
  logging: LoggingCfg

  def check(self):
    self.need(bool(self.workdir), "workdir", "must be set")
    g, r = self.grpo, self.rollout
    if g.temperature(r.temperature) != r.temperature and not (
        g.recompute_old_logps or g.tis_cap > 0):
      g.need(False, "loss_temperature",
             f"differs from rollout.temperature={r.temperature}, whose logprobs the sampler "
             "returns: set grpo.recompute_old_logps=True (or grpo.tis_cap > 0) so the old "
             "logprobs are the trainer's at the loss temperature")

  def need_files(self) -> None:
    """A training run's inputs exist: model.path is an HF dir (unless model.tiny_random) and
    every data file is there. Not part of `check`: `plan` and `sft` read presets whose files
    live on another machine or are not used."""
    m = self.model
    if not m.tiny_random:
      m.need(bool(m.path) and os.path.isfile(os.path.join(m.path, "config.json")), "path",
             "no HF model dir (config.json) there; run `make setup` for SmolLM2")
    for f in self.data.files:
      self.data.need(os.path.isfile(f), "files", f"file {f!r} does not exist")

  @classmethod
  def from_tree(cls, tree: Any) -> RunConfig:
    """The typed config of a ConfigDict / dict tree (a RunConfig is returned as is)."""
    return cls.of(tree)

  def to_json(self, indent: int | None = None) -> str:
    return json.dumps(self.to_dict(), indent=indent)

  def step_cfg(self) -> StepCfg:
    """The rollout step's slice."""
    return StepCfg(rollout=self.rollout, rewards=self.rewards, grpo=self.grpo,
                   task_type=self.data.task_type, judge_input=self.judge.input,
                   seq_multiple=self.train.seq_multiple)

  def trainer_cfg(self) -> TrainerCfg:
    """The trainer's slice."""
    r = self.rollout
    return TrainerCfg(model=self.model, rules=self.mesh.rules, grpo=self.grpo, optim=self.optim,
                      max_tokens=r.max_tokens, temperature=self.grpo.temperature(r.temperature),
                      rows_per_step=r.prompts_per_step * r.n, steps=self.train.steps)


@dataclasses.dataclass(frozen=True)
class StepCfg:
  """What a rollout step (`pasr_jax.step.RolloutStep`) reads: `RunConfig.step_cfg()`."""
  rollout: RolloutCfg
  rewards: RewardsCfg
  grpo: GrpoCfg
  task_type: str       # data.task_type: which judge instruction
  judge_input: str     # judge.input: what of an answer the judge sees
  seq_multiple: int    # train.seq_multiple: the batch length is a multiple of it


@dataclasses.dataclass(frozen=True)
class TrainerCfg:
  """What the trainer (`pasr_jax.trainer.Trainer`) reads: `RunConfig.trainer_cfg()`."""
  model: ModelCfg
  rules: tuple         # mesh.rules: logical axis -> mesh axes, for weights and activations
  grpo: GrpoCfg
  optim: OptimCfg
  max_tokens: int      # rollout.max_tokens: the logit window of the loss
  temperature: float   # the loss's logprob temperature (grpo.loss_temperature or the sampler's)
  rows_per_step: int   # rollout.prompts_per_step x rollout.n answers per step
  steps: int           # train.steps: the optimizer schedule spans steps x updates per step

  @property
  def updates_per_step(self) -> int:
    """Optimizer updates per training step (optim.sequences_per_update, grpo.num_iterations)."""
    per = self.optim.sequences_per_update or self.rows_per_step
    return -(-self.rows_per_step // per) * self.grpo.num_iterations


def _as_dict(tree: Any) -> dict:
  return tree.to_dict() if hasattr(tree, "to_dict") else dict(tree)


def _build(cls: type, d: dict, prefix: str) -> Any:
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - set(fields))
  if unknown:
    raise ConfigError(f"config {prefix}{unknown[0]}: unknown key; keys under "
                      f"{prefix.rstrip('.') or 'the root'}: {', '.join(sorted(fields))}")
  kwargs = {}
  for name, f in fields.items():
    key = prefix + name
    if name not in d:
      if f.default is not dataclasses.MISSING:
        continue
      raise ConfigError(f"config {key}: missing (configs/base.py defines every key)")
    kwargs[name] = _coerce(hints[name], d[name], key)
  return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
  if isinstance(hint, type) and issubclass(hint, Section):
    if not isinstance(value, dict) and not hasattr(value, "to_dict"):
      raise ConfigError(f"config {key}={value!r}: must be a section")
    return _build(hint, _as_dict(value), key + ".")
  origin = typing.get_origin(hint) or hint
  try:
    if origin is bool:
      if not isinstance(value, (bool, int)) or value not in (0, 1):
        raise TypeError
      return bool(value)
    if origin is int:
      if isinstance(value, float) and not value.is_integer():
        raise TypeError
      return int(value)
    if origin is float:
      return float(value)
    if origin is str:
      if not isinstance(value, str):
        raise TypeError
      return value
    if origin is tuple:
      if isinstance(value, str):
        value = (value,)  # data.files="a.jsonl" on the command line: one file
      args = typing.get_args(hint)
      item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
      return tuple(_freeze(_coerce(item, v, key) if item else v) for v in value)
    if origin is dict or hint == (dict | None):
      return None if value is None else _as_dict(value)
  except (TypeError, ValueError):
    pass
  else:
    return value
  raise ConfigError(f"config {key}={value!r}: expected {getattr(hint, '__name__', hint)}")


def _freeze(v: Any) -> Any:
  return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v
