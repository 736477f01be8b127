"""The run's config: every key with its type, default, help and checks, in one place.

Each section is a frozen dataclass whose fields are `key(default, help)`; `check` rejects values
that cannot work, naming the `--config.` key and the value. `base_tree()` is the ml_collections
tree of every key at its default (`configs/base.py` returns it; presets override from there,
and `--config.a.b=v` works as in every JAX project). At the command-line boundary
(`pasr_jax.cli`) `RunConfig.from_tree` turns a preset's tree back into the dataclasses: every
key must be a field, each value is coerced to the field's type and checked. `Trainer`,
`RolloutStep` and the judge client then get only their own sections. `python -m
pasr_jax.config` lists every key with its default and help.

Adding a key: one line `name: type = key(default, "help")` in its section, a check if some
values cannot work, and the code that reads it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import typing
from typing import Any, ClassVar

import ml_collections

from pasr_jax import dtypes, errors
from pasr_jax.dtypes import NAMES as DTYPE_NAMES

# The choices of config values; the modules that act on them import them from here.
AGGS = ("seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm")
WANDB_MODES = ("online", "offline")
TASK_TYPES = ("general", "multiple_choice", "summary")
PROMPT_SETS = ("ours", "paper")
JUDGE_STYLES = ("binary", "graded")
JUDGE_LAYOUTS = ("sections", "original")
JUDGE_INPUTS = ("full", "answer")
REFINE_COMPARE = ("mean", "single", "none")
COLD_START_TRACES = ("reference", "arith")
ATTENTIONS = ("auto", "xla", "cudnn")
ADV_SCALES = ("group", "batch", "none")
SCHEDULES = ("constant", "cosine")
# grpo.tis_cap when rollout.max_staleness >= 1 and the config leaves it at 0: batches sampled
# one update behind are weighted by min(pi_current / pi_sampler, 2.0) per token.
ASYNC_TIS_CAP = 2.0
# rewards.accuracy_rule naming a Python function: `package.module:function`.
_FUNCTION_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class ConfigError(errors.UserError):
  """A config value is unusable; the message names the key and the value."""


def key(default: Any, help: str) -> Any:  # pylint: disable=redefined-builtin
  """A config key: its default and its one-line help (`python -m pasr_jax.config` lists them)."""
  return dataclasses.field(default=default, metadata={"help": help})


def section(cls: type, help: str) -> Any:  # pylint: disable=redefined-builtin
  """A config section: its keys at their defaults, and a one-line help."""
  return dataclasses.field(default_factory=cls, metadata={"help": help})


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
  path: str = key("", "HF dir (config.json + safetensors + tokenizer)")
  tiny_random: bool = key(False, "tiny_cpu: build and save a random tiny Qwen at start")
  dtype: str = key("float32", "compute dtype: float32 on CPU, bfloat16 on GPU")
  param_dtype: str = key("float32", "master weights and optimizer state")
  scan_layers: bool = key(False, "lax.scan over layers: compile time independent of depth")
  remat: bool = key(False, "recompute activations in the backward pass (memory for compute)")
  attention: str = key(
      "auto", "auto (cuDNN flash attention on GPU in bf16, else xla) | xla | cudnn")
  hf_config: dict | None = key(
      None, "the HF config.json as a dict (paper presets): the memory plan's architecture")

  def check(self):
    for f in ("dtype", "param_dtype"):
      self.need(getattr(self, f) in DTYPE_NAMES, f, "must be one of " + " | ".join(DTYPE_NAMES))
    self.need(self.attention in ATTENTIONS, "attention", "must be one of " + " | ".join(ATTENTIONS))

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
  shape: tuple[int, ...] = key((1, -1, 1), "(data, fsdp, tensor); one entry may be -1 = the rest")
  distributed: bool = key(False, "multi-host: one process per host (scripts/launch_multihost.sh)")
  coordinator_address: str = key("", 'host:port of process 0; "" = JAX detects it (SLURM, MPI)')
  num_processes: int = key(0, "0 = JAX detects it")
  process_id: int = key(-1, "-1 = JAX detects it")
  local_device_ids: str = key("", 'this process\'s GPUs, e.g. "0,1,2,3" ("" = all it sees)')
  cuda_visible_devices: str = key("", 'JAX\'s GPUs (indices in CUDA_VISIBLE_DEVICES), "" = all')
  memory_fraction: float = key(0.0, "JAX's share of each GPU; 0 = 0.9 - vLLM's share if colocated")
  platform: str = key("", '"" = JAX\'s choice; "cuda": pinned, no silent CPU fallback')
  heartbeat_timeout_s: float = key(
      100.0, "a process silent this long counts as dead (raise on overloaded hosts)")
  rules: tuple = key(
      (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
       ("kv_heads", "tensor"), ("head_dim", None), ("mlp", "tensor"), ("layers", None),
       ("norm", None)),
      "logical axis -> mesh axis (or None = replicated), for weights and activations alike; "
      "'batch' shards the batch, activations and logits (pasr_jax/sharding.py)")

  def check(self):
    self.need(len(self.shape) == 3 and list(self.shape).count(-1) <= 1
              and all(s == -1 or s >= 1 for s in self.shape), "shape",
              "(data, fsdp, tensor): sizes >= 1, at most one -1")
    self.need(0 <= self.memory_fraction < 1, "memory_fraction", "must be in [0, 1) (0 = auto)")
    self.need(self.heartbeat_timeout_s > 0, "heartbeat_timeout_s", "must be > 0")
    self.need(self.platform in ("", "cuda", "cpu"), "platform", "'' (JAX's choice) | cuda | cpu")
    self.need(all(len(r) == 2 and isinstance(r[0], str) for r in self.rules), "rules",
              "(logical axis, mesh axis | tuple of mesh axes | None) pairs")


@dataclasses.dataclass(frozen=True)
class DataCfg(Section):
  _key: ClassVar[str] = "data"
  files: tuple[str, ...] = key((), "JSON arrays or JSONL, detected by content")
  question_field: str = key("", '"" = auto: question | instruction | Q | problem')
  answer_field: str = key("", '"" = auto: answer | output | A | solution')
  task_type: str = key("general", "judge prompt: general | multiple_choice | summary")
  shuffle_seed: int = key(0, "permutation per epoch; -1 = file order (the original's)")
  max_row_chars: int = key(200_000, "longer rows (question + answer) are skipped and logged")
  tfds_name: str = key("", "optional TFDS builder name (with data.tfds_data_dir)")
  tfds_data_dir: str = key("", "TFDS data dir of data.tfds_name")

  def check(self):
    self.need(self.task_type in TASK_TYPES, "task_type", "must be one of " + " | ".join(TASK_TYPES))
    self.need(self.max_row_chars >= 0, "max_row_chars", "must be >= 0 (0 = no limit)")


@dataclasses.dataclass(frozen=True)
class VllmCfg(Section):
  _key: ClassVar[str] = "rollout.vllm"
  max_model_len: int = key(2048, "tokens per sequence the engine holds (prompt + answer)")
  gpu_memory_utilization: float = key(0.3, "vLLM's share of each GPU it runs on")
  colocate: bool = key(True, "the engine shares JAX's GPUs (its share comes out of JAX's)")
  tensor_parallel_size: int = key(1, "GPUs per vLLM engine")
  enforce_eager: bool = key(True, "no CUDA graphs (faster start; GPU decoding is slower)")
  dtype: str = key("float32", "the engine's weights and activations dtype")
  kv_cache_space_gib: float = key(2.0, "CPU only (VLLM_CPU_KVCACHE_SPACE)")
  cpu_reserved_cores: int = key(
      0,
      "CPU only: cores kept free of the model's threads for vLLM's engine loop (-1 = vLLM's "
      "default, 1); 0 is faster on an idle host, 1 on a loaded one (docs/performance.md)")
  sync_dir: str = key("", '"" = /dev/shm if present, else a temp dir')
  sync_fallback_dir: str = key("", 'used when sync_dir lacks room ("" = the temp dir)')
  sync_headroom_gib: float = key(0.25, "free space a sync leaves on sync_dir")
  log_level: str = key("WARNING", "vLLM's log level: DEBUG | INFO | WARNING | ERROR")

  def check(self):
    self.need(self.max_model_len >= 2, "max_model_len", "must be >= 2")
    self.need(self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level",
              "must be one of DEBUG | INFO | WARNING | ERROR")
    self.need(0 < self.gpu_memory_utilization < 1, "gpu_memory_utilization", "must be in (0, 1)")
    self.need(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
    self.need(self.dtype in DTYPE_NAMES, "dtype", "must be one of " + " | ".join(DTYPE_NAMES))
    self.need(self.kv_cache_space_gib > 0, "kv_cache_space_gib", "must be > 0")
    self.need(self.cpu_reserved_cores >= -1, "cpu_reserved_cores", "must be >= -1 (-1 = vLLM's)")
    self.need(self.sync_headroom_gib >= 0, "sync_headroom_gib", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class RolloutCfg(Section):
  _key: ClassVar[str] = "rollout"
  prompts_per_step: int = key(8, "B questions per step")
  n: int = key(8, "answers per question (and baseline answers per question)")
  temperature: float = key(1.0, "sampling temperature of the rollouts")
  top_p: float = key(1.0, "nucleus sampling of the rollouts (1 = off)")
  max_tokens: int = key(1500, "new tokens per answer")
  max_prompt_tokens: int = key(512, "longer prompts are truncated from the left and counted")
  sync_every: int = key(1, "push trainer weights to vLLM every k steps")
  baseline: bool = key(True, "also sample n answers without the refine prompt")
  timeout_s: float = key(1800.0, "one sampler call; past it (or engine death) the step fails")
  engine_retries: int = key(1, "after an engine failure: restart, re-sync, retry the step")
  max_staleness: int = key(
      0, "K: 0 = sample, then train (synchronous); 1 = the next batch is sampled in the "
      "background while this one trains (staleness <= 1; turns on grpo.tis_cap=2.0 when "
      "left at 0)")
  vllm: VllmCfg = section(VllmCfg, "the vLLM engine")

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
    self.need(self.max_staleness in (0, 1), "max_staleness",
              "must be 0 (synchronous) or 1 (one batch sampled ahead): the run has one engine, "
              "which samples at most one batch ahead, so no batch is ever more than one update "
              "behind and K >= 2 would promise an overlap that never happens")
    if self.max_prompt_tokens + self.max_tokens > self.vllm.max_model_len:
      self.vllm.need(False, "max_model_len",
                     "must hold rollout.max_prompt_tokens + rollout.max_tokens")


@dataclasses.dataclass(frozen=True)
class JudgeCfg(Section):
  _key: ClassVar[str] = "judge"
  base_url: str = key(
      "http://127.0.0.1:8001", "OpenAI-compatible judge server (/v1/chat/completions)")
  model: str = key("", '"" = ask /v1/models once')
  api_key_env: str = key("PASR_JUDGE_API_KEY", "name of the env var holding the key, if any")
  concurrency: int = key(32, "judge requests in flight")
  timeout_s: float = key(60.0, "per request")
  retries: int = key(8, "per request, on connection errors, timeouts, 408, 429 and 5xx")
  backoff_s: float = key(
      0.5, "first retry wait in s when the server names none (Retry-After), doubled per "
      "retry, jittered")
  backoff_max_s: float = key(8.0, "longest retry wait of the backoff")
  max_wait_s: float = key(
      300.0, "a request's whole time, its attempts and waits included; past it, the judge "
      "error (exit 3)")
  cache_size: int = key(200_000, "judged prompts remembered (LRU), keyed by a prompt digest")
  input: str = key("full", "what the judge sees: full (the original) | answer")
  max_tokens: int = key(16, "tokens of a judge reply (a score)")
  max_unparseable_frac: float = key(0.5, "more replies without a score in a batch stop the run")
  temperature: float = key(0.0, "sampling temperature of the judge (original: 0.2)")
  thinking: bool = key(
      True, "False: requests carry chat_template_kwargs enable_thinking=False (Qwen3 judges)")
  autostart: bool = key(
      False, "local base_url silent: start `python -m pasr_jax.judge --config.backend=verify`")

  def check(self):
    self.need(self.base_url.startswith(("http://", "https://")), "base_url",
              "must be an http(s) URL")
    self.need(self.timeout_s > 0, "timeout_s", "must be > 0")
    self.need(self.concurrency >= 1, "concurrency", "must be >= 1")
    self.need(self.retries >= 0, "retries", "must be >= 0")
    self.need(self.backoff_s >= 0, "backoff_s", "must be >= 0")
    self.need(self.backoff_max_s >= self.backoff_s, "backoff_max_s", "must be >= backoff_s")
    self.need(self.max_wait_s > 0, "max_wait_s", "must be > 0")
    self.need(self.cache_size >= 0, "cache_size", "must be >= 0")
    self.need(self.input in JUDGE_INPUTS, "input", "must be one of " + " | ".join(JUDGE_INPUTS))
    self.need(self.max_tokens >= 1, "max_tokens", "must be >= 1")
    self.need(0 <= self.max_unparseable_frac <= 1, "max_unparseable_frac",
              "must be in [0, 1] (1 = never stop)")
    self.need(self.temperature >= 0, "temperature", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class PromptsCfg(Section):
  _key: ClassVar[str] = "prompts"
  pasr_system_file: str = key("", '"" = built-in; else a text file with the system prompt')
  plain_system_file: str = key(
      "", '"" = built-in; else a text file with the baseline\'s system prompt')
  judge_dir: str = key("", "optional dir with general.txt / multiple_choice.txt / summary.txt")
  builtin: str = key("ours", "built-in system prompts: ours | paper (the original's meaning)")
  judge_style: str = key(
      "binary", "built-in judge: binary (1/0) | graded (0..1, the original's training judge)")
  judge_layout: str = key(
      "sections", "judge request: sections (ours) | original (### Question/Ground Truth/Answer)")

  def check(self):
    self.need(self.builtin in PROMPT_SETS, "builtin", "must be one of " + " | ".join(PROMPT_SETS))
    self.need(self.judge_style in JUDGE_STYLES, "judge_style", "must be one of " + " | ".join(JUDGE_STYLES))
    self.need(self.judge_layout in JUDGE_LAYOUTS, "judge_layout",
              "must be one of " + " | ".join(JUDGE_LAYOUTS))
    for f in ("pasr_system_file", "plain_system_file"):
      self.need(not getattr(self, f) or os.path.isfile(getattr(self, f)), f, "no such file")
    self.need(not self.judge_dir or os.path.isdir(self.judge_dir), "judge_dir", "no such dir")


@dataclasses.dataclass(frozen=True)
class RewardsCfg(Section):
  _key: ClassVar[str] = "rewards"
  format_weight: float = key(1.0, "weight of the format reward (+1 well-formed, -1 not)")
  accuracy_weight: float = key(1.0, "weight of the judge's accuracy in [0, 1]")
  refine_weight: float = key(1.0, "weight of the refine reward (vs the baseline's accuracy)")
  zeta: float = key(0.0, "tolerance around the baseline mean (original: strict)")
  accuracy_rule: str = key(
      "", '"" = the judge; "contains" = 1 if the extracted answer holds the row\'s answer; '
      '"module:function" = your Python function, called in-process the way TRL calls reward '
      "functions (fn(prompts=, completions=, answer=) -> one number in [0, 1] per completion); "
      "no judge is asked")
  refine_compare: str = key(
      "mean", 'mean (PASR) | single ("w/o multi-answer") | none ("w/o comparison"), paper Table 2')
  refine_fixed: float = key(1.0, "refine_compare=none: the reward of any answer with a refinement")

  def check(self):
    for f in ("format_weight", "accuracy_weight", "refine_weight"):
      self.need(getattr(self, f) >= 0, f, "must be >= 0")
    self.need(self.zeta >= 0, "zeta", "must be >= 0")
    rule = self.accuracy_rule
    self.need(rule in ("", "contains") or bool(_FUNCTION_RE.match(rule)), "accuracy_rule",
              "must be '' (the judge), 'contains' or 'module:function' "
              "(e.g. 'my_pkg.rewards:score')")
    self.need(self.refine_compare in REFINE_COMPARE, "refine_compare",
              " | ".join(REFINE_COMPARE))


@dataclasses.dataclass(frozen=True)
class GrpoCfg(Section):
  _key: ClassVar[str] = "grpo"
  beta: float = key(0.04, "KL weight (k3); 0 skips the reference forward")
  eps_low: float = key(0.2, "PPO clip below: ratio >= 1 - eps_low")
  eps_high: float = key(0.2, "PPO clip above: ratio <= 1 + eps_high")
  agg: str = key(
      "seq_mean_token_mean",
      "loss aggregation: seq_mean_token_mean (PASR) | token_mean (DAPO) | "
      "seq_mean_token_sum_norm (Dr.GRPO)")
  num_iterations: int = key(1, "mu: updates per rollout batch")
  adv_std_ddof: int = key(0, "0 population std | 1 sample std (torch.std, the original)")
  adv_eps: float = key(1e-4, "advantage = (r - mean) / (std + adv_eps)")
  skip_range: float = key(0.0, '"zero variance": group reward max - min <= this (original: < 1e-4)')
  adv_scale: str = key("group", "group | batch | none")
  skip_zero_variance: bool = key(True, "drop groups within grpo.skip_range from the batch")
  recompute_old_logps: bool = key(False, "use trainer logprobs instead of the sampler's")
  tis_cap: float = key(
      0.0, ">0: the loss weights each token by min(pi_trainer / pi_sampler, tis_cap), the "
      "trainer's logprobs recomputed as old_logps (decoupled PPO with a truncated weight); "
      "0 = off, or ASYNC_TIS_CAP (2.0) with rollout.max_staleness = 1, set when the config is built")
  is_mask_low: float = key(
      0.0, ">0: drop from the loss tokens whose pi_trainer / pi_sampler < this (recomputes "
      "the trainer's logprobs); 0 = off")
  is_mask_high: float = key(
      0.0, ">0: drop from the loss tokens whose pi_trainer / pi_sampler > this (recomputes "
      "the trainer's logprobs); 0 = off")
  mask_truncated: bool = key(False, "drop loss on completions cut at max_tokens")
  loss_temperature: float = key(
      0.0, "logprob temperature of the loss; 0 = rollout.temperature (original: 1.0)")

  def check(self):
    self.need(self.beta >= 0, "beta", "must be >= 0 (0 = no KL term)")
    self.need(0 <= self.eps_low < 1, "eps_low", "must be in [0, 1)")
    self.need(self.eps_high >= 0, "eps_high", "must be >= 0")
    self.need(self.agg in AGGS, "agg", "must be one of " + " | ".join(AGGS))
    self.need(self.num_iterations >= 1, "num_iterations", "must be >= 1")
    self.need(self.adv_std_ddof in (0, 1), "adv_std_ddof", "0 (population) | 1 (sample)")
    self.need(self.adv_eps >= 0, "adv_eps", "must be >= 0")
    self.need(self.skip_range >= 0, "skip_range", "must be >= 0")
    self.need(self.adv_scale in ADV_SCALES, "adv_scale", "must be one of " + " | ".join(ADV_SCALES))
    self.need(self.tis_cap >= 0, "tis_cap", "must be >= 0 (0 = off)")
    self.need(0 <= self.is_mask_low < 1, "is_mask_low", "must be in [0, 1) (0 = off)")
    self.need(self.is_mask_high == 0 or self.is_mask_high > 1, "is_mask_high",
              "must be 0 (off) or > 1")
    self.need(self.loss_temperature >= 0, "loss_temperature",
              "must be >= 0 (0 = rollout.temperature)")

  @property
  def trainer_old_logps(self) -> bool:
    """Whether the trainer recomputes old_logps itself (once per rollout batch): asked for,
    or needed by the behaviour weight (tis_cap) or the ratio band (is_mask_low/high)."""
    return bool(self.recompute_old_logps or self.tis_cap > 0 or self.ratio_band)

  @property
  def ratio_band(self) -> bool:
    """Whether the ratio band (is_mask_low / is_mask_high) drops tokens from the loss."""
    return self.is_mask_low > 0 or self.is_mask_high > 0

  def temperature(self, rollout_temperature: float) -> float:
    """The logprob temperature of the loss: loss_temperature, or the sampler's if 0."""
    return float(self.loss_temperature or rollout_temperature)


@dataclasses.dataclass(frozen=True)
class OptimCfg(Section):
  _key: ClassVar[str] = "optim"
  lr: float = key(1e-6, "AdamW learning rate (paper: 1e-6)")
  schedule: str = key("constant", "constant | cosine")
  warmup_steps: int = key(0, "linear warm-up updates")
  weight_decay: float = key(0.0, "AdamW decoupled weight decay (matrices only)")
  b1: float = key(0.9, "AdamW beta1")
  b2: float = key(0.999, "AdamW beta2")
  clip_norm: float = key(1.0, "global-norm gradient clipping; 0 = none")
  micro_batch: int = key(2, "sequences per micro-batch (gradient accumulation)")
  sequences_per_update: int = key(0, "sequences per optimizer update; 0 = the whole rollout batch")

  def check(self):
    self.need(self.lr > 0, "lr", "must be > 0 (a negative rate trains backwards)")
    self.need(self.schedule in SCHEDULES, "schedule", "must be one of " + " | ".join(SCHEDULES))
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
  steps: int = key(100, "training steps (rollout batch + updates each)")
  seq_multiple: int = key(64, "batch length rounded up to this (fewer jit shapes)")
  max_nonfinite_steps: int = key(3, "steps in a row with only NaN/inf (skipped) updates: stop")
  export: bool = key(False, "at the end write the policy as an HF dir to <workdir>/hf")

  def check(self):
    self.need(self.steps >= 1, "steps", "must be >= 1")
    self.need(self.seq_multiple >= 1, "seq_multiple", "must be >= 1")
    self.need(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class CheckpointCfg(Section):
  _key: ClassVar[str] = "checkpoint"
  every: int = key(10, "save every k steps (and at the last or a stopping step)")
  keep: int = key(3, "newest checkpoints kept")
  async_save: bool = key(True, "write checkpoints in the background (single host)")

  def check(self):
    self.need(self.every >= 1, "every", "must be >= 1")
    self.need(self.keep >= 1, "keep", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class SftCfg(Section):
  _key: ClassVar[str] = "sft"
  data: str = key("", 'JSONL of {"messages": [{role, content}, ...]} transcripts')
  rollouts: str = key("", "or a run's rollouts.jsonl: harvest good refinement paths")
  workdir: str = key("", '"" = <workdir>/sft (checkpoints/, metrics.jsonl, hf/)')
  model_path: str = key("", '"" = model.path (e.g. a PASR run\'s exported hf/)')
  lr: float = key(1e-5, "peak learning rate (paper App. A.1: 1e-5)")
  warmup_frac: float = key(0.1, "linear warm-up over this share of the steps, then cosine")
  epochs: int = key(2, "passes over the transcripts")
  batch_size: int = key(2, "sequences per update (paper: 1 x accumulation 2)")
  max_steps: int = key(0, ">0: stop after this many updates (schedule spans them)")
  max_len: int = key(1024, "tokens per transcript; longer ones are dropped and counted")
  clip_norm: float = key(1.0, "global-norm gradient clipping; 0 = none")
  checkpoint_every: int = key(50, "save every k updates (and at the last)")
  export: bool = key(True, "write <sft workdir>/hf at the end")

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
  enabled: bool = key(
      False,
      "NOT part of the paper: SFT on the training file's solutions in the PASR "
      "layout first (pasr_jax/cold_start.py)")
  max_examples: int = key(0, "0 = every usable training row")
  refine_fraction: float = key(
      0.5, "share of examples with a <refine> re-check that confirms a step")
  traces: str = key("reference", "reference (the data's solutions) | arith (pasr_jax/tasks/arith.py)")
  correct_fraction: float = key(0.0, "arith: share whose step is wrong and fixed in <refine>")
  plain_fraction: float = key(
      0.0, "arith: share of rows also written without tags under the plain (baseline) prompt")
  lr: float = key(1e-4, "the cold start's SFT peak learning rate")
  epochs: int = key(1, "passes over the cold-start set")
  max_steps: int = key(0, '>0: cap on SFT updates ("a few minutes")')

  def check(self):
    self.need(self.max_examples >= 0, "max_examples", "must be >= 0 (0 = all)")
    self.need(0 <= self.refine_fraction <= 1, "refine_fraction", "must be in [0, 1]")
    self.need(self.traces in COLD_START_TRACES, "traces",
              "must be one of " + " | ".join(COLD_START_TRACES))
    self.need(0 <= self.correct_fraction <= 1 - self.refine_fraction, "correct_fraction",
              f"must be in [0, 1 - refine_fraction={self.refine_fraction}]")
    self.need(self.traces == "arith" or self.correct_fraction == 0, "correct_fraction",
              "needs cold_start.traces='arith' (reference solutions have no step to get wrong)")
    self.need(0 <= self.plain_fraction <= 1, "plain_fraction", "must be in [0, 1]")
    self.need(self.traces == "arith" or self.plain_fraction == 0, "plain_fraction",
              "needs cold_start.traces='arith'")
    self.need(self.lr > 0, "lr", "must be > 0")
    self.need(self.epochs >= 1, "epochs", "must be >= 1")
    self.need(self.max_steps >= 0, "max_steps", "must be >= 0 (0 = no cap)")


@dataclasses.dataclass(frozen=True)
class EvalCfg(Section):
  _key: ClassVar[str] = "eval"
  every: int = key(0, "greedy answers to held-out items every k steps, at step 0 and at the "
                   "last step (0 = off); through the run's own engine, between steps")
  files: tuple[str, ...] = key((), "held-out items: JSON arrays or JSONL, the rows of `data` "
                               "(data.question_field/answer_field); a `difficulty` or `bucket` "
                               "field makes per-bucket metrics")
  limit: int = key(100, "the first k items of eval.files (0 = all)")
  max_tokens: int = key(0, "new tokens per greedy answer (0 = rollout.max_tokens)")

  def check(self):
    self.need(self.every >= 0, "every", "must be >= 0 (0 = off)")
    self.need(self.limit >= 0, "limit", "must be >= 0 (0 = all)")
    self.need(self.max_tokens >= 0, "max_tokens", "must be >= 0 (0 = rollout.max_tokens)")
    self.need(self.every == 0 or bool(self.files), "files", "eval.every > 0 needs held-out files")


@dataclasses.dataclass(frozen=True)
class LoggingCfg(Section):
  _key: ClassVar[str] = "logging"
  tensorboard: bool = key(True, "also write TensorBoard event files to <workdir>/tb")
  every: int = key(1, "the step line on stdout every k steps (metrics.jsonl: every step)")
  wandb_project: str = key("", '"" = off; else the W&B project (process 0 logs)')
  wandb_mode: str = key("online", "online | offline (into <workdir>/wandb; `wandb sync` it)")
  wandb_run_name: str = key("", '"" = the workdir\'s name; every start is its own W&B run')

  def check(self):
    self.need(self.every >= 1, "every", "must be >= 1")
    self.need(self.wandb_mode in WANDB_MODES, "wandb_mode",
              "must be one of " + " | ".join(WANDB_MODES))


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
  """The whole run; `RunConfig.from_tree(get_config())` is the one place config is read."""
  workdir: str = key("runs/default", "checkpoints, metrics, rollouts.jsonl, config.json")
  seed: int = key(0, "seeds the run's RNG (sampling seeds, the tiny model, SFT order)")
  resume: bool = key(True, "continue from the latest checkpoint in workdir if any")
  model: ModelCfg = section(ModelCfg, "the policy model")
  mesh: MeshCfg = section(MeshCfg, "devices, mesh and processes")
  data: DataCfg = section(DataCfg, "training questions")
  rollout: RolloutCfg = section(RolloutCfg, "sampling the answers")
  judge: JudgeCfg = section(JudgeCfg, "the accuracy judge")
  prompts: PromptsCfg = section(PromptsCfg, "system and judge prompts")
  rewards: RewardsCfg = section(RewardsCfg, "the reward of an answer")
  grpo: GrpoCfg = section(GrpoCfg, "the GRPO loss and advantages")
  optim: OptimCfg = section(OptimCfg, "the optimizer")
  train: TrainCfg = section(TrainCfg, "the training loop")
  checkpoint: CheckpointCfg = section(CheckpointCfg, "Orbax checkpoints")
  sft: SftCfg = section(
      SftCfg, "PASR+IFT (paper App. A.1): `python -m pasr_jax.sft`; also runs the cold start")
  cold_start: ColdStartCfg = section(
      ColdStartCfg, "NOT part of the PASR paper: a format cold start for models that cannot "
      "write the layout (SmolLM2-135M: 0/64 well-formed)")
  eval: EvalCfg = section(EvalCfg, "greedy evaluation on held-out items during training")
  logging: LoggingCfg = section(LoggingCfg, "metrics output")

  def __post_init__(self):
    # Derived defaults are resolved here, when the config is built, so config.json and the
    # checkpoint record the values that ran: off-policy batches (K >= 1) need the truncated
    # importance weight, so a tis_cap left at 0 becomes ASYNC_TIS_CAP.
    if self.rollout.max_staleness >= 1 and self.grpo.tis_cap == 0:
      object.__setattr__(self, "grpo", self.grpo.replace(tis_cap=ASYNC_TIS_CAP))
    super().__post_init__()

  def check(self):
    self.need(bool(self.workdir), "workdir", "must be set")
    g, r = self.grpo, self.rollout
    if r.max_prompt_tokens + self.eval_max_tokens > r.vllm.max_model_len:
      self.eval.need(False, "max_tokens", "rollout.max_prompt_tokens + eval.max_tokens must fit "
                     f"rollout.vllm.max_model_len={r.vllm.max_model_len}")
    if g.temperature(r.temperature) != r.temperature and not g.trainer_old_logps:
      g.need(False, "loss_temperature",
             f"differs from rollout.temperature={r.temperature}, whose logprobs the sampler "
             "returns: set grpo.recompute_old_logps=True (or grpo.tis_cap > 0) so the old "
             "logprobs are the trainer's at the loss temperature")

  def need_files(self) -> None:
    """A training run's inputs exist: model.path is an HF dir (unless model.tiny_random),
    every data file is there (rewards.accuracy_rule's function: `rewards.require_rule`). Not part of
    `check`: `plan` and `sft` read presets whose files live on another machine or are not
    used."""
    m = self.model
    if not m.tiny_random:
      m.need(bool(m.path) and os.path.isfile(os.path.join(m.path, "config.json")), "path",
             "no HF model dir (config.json) there; run `make setup` for SmolLM2")
    for f in self.data.files:
      self.data.need(os.path.isfile(f), "files", f"file {f!r} does not exist")
    for f in self.eval.files:
      self.eval.need(os.path.isfile(f), "files", f"file {f!r} does not exist")

  @property
  def eval_max_tokens(self) -> int:
    """New tokens per greedy eval answer: eval.max_tokens, or rollout.max_tokens if 0."""
    return int(self.eval.max_tokens or self.rollout.max_tokens)

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
    return TrainerCfg(model=self.model, rules=self.mesh.rules, grpo=self.grpo,
                      optim=self.optim,
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
    if name not in d:  # a tree made from base_tree() has every key
      raise ConfigError(f"config {key}: missing (base_tree() has every key)")
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


def defaults(cls: type) -> dict[str, Any]:
  """Every key of the Section class `cls` at its default, without checking them (a command's
  required key defaults to "")."""
  return {f.name: (defaults(f.default_factory) if f.default_factory is not dataclasses.MISSING
                   else f.default) for f in dataclasses.fields(cls)}


def base_tree() -> ml_collections.ConfigDict:
  """Every key at its default, as the ml_collections tree presets start from."""
  return ml_collections.ConfigDict(RunConfig().to_dict())


def describe(cls: type = RunConfig, prefix: str = "") -> list[str]:
  """One line per key, `dotted.key = default  # help`, after a `# section: help` line."""
  out = []
  for f in dataclasses.fields(cls):
    if f.default_factory is not dataclasses.MISSING:  # a section
      out.append(f"# {prefix}{f.name}: {f.metadata['help']}")
      out.extend(describe(f.default_factory, f"{prefix}{f.name}."))
    else:
      out.append(f"{prefix}{f.name} = {f.default!r}  # {f.metadata['help']}")
  return out


if __name__ == "__main__":
  print("\n".join(describe()))
