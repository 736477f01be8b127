"""The config of `python -m pasr_jax.evaluate` and of `evaluate compare`: every key with its type,
default, help and checks (the sections of `pasr_jax.config` reused whole).

`configs/eval.py` is the preset of `EvalRunConfig` (every key at its default, then the
evaluation's own values); `cli.main` types it with `EvalRunConfig.of`, so a value that cannot
work stops the command before any model work, naming the `--config.` key and the value.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from pasr_jax.config import (DataCfg, JudgeCfg, PromptsCfg, RewardsCfg, Section, VllmCfg, key,
                             section)
from pasr_jax.eval.benchmarks import (BENCHMARKS, INSTRUCTION_SETS, REFERENCES,
                                      dataset_names)

MODES = ("vanilla", "pasr", "self_refine", "self_refine_oracle")
TWO_TURN_MODES = ("self_refine", "self_refine_oracle")
ORACLE_REVISES = ("wrong", "zero")
# Prompt tokens a two-turn mode's review request takes beside the first answer, and the
# smallest room left for the question itself.
REVIEW_TOKENS, MIN_PROMPT_TOKENS = 96, 32


@dataclasses.dataclass(frozen=True)
class EvalRolloutCfg(Section):
  """The engine's part of training's rollout section: the answers' lengths are the eval's own
  (max_tokens), so training's length rule (max_prompt_tokens + max_tokens) does not apply."""
  _key: ClassVar[str] = "rollout"
  timeout_s: float = key(1800.0, "one generate call; past it (or engine death) the run fails")
  vllm: VllmCfg = section(VllmCfg, "the vLLM engine (training's keys)")

  def check(self):
    self.need(self.timeout_s >= 0, "timeout_s", "must be >= 0 (0 = no limit)")


@dataclasses.dataclass(frozen=True)
class EvalRunConfig(Section):
  """One evaluation: benchmarks and the user's files -> answers -> judge -> tables."""
  model: str = key("", "HF dir (config.json + safetensors + tokenizer); required")
  data_dir: str = key("data/pasr/test_dataset", "root of the benchmark files (PASR seed layout)")
  datasets: str = key(
      "gsm8k,math,aime24,arc,gpqa,winogrande,commonsenseqa,drop,mmlu,xsum",
      'comma-separated benchmarks, "all" = the paper\'s ten, "" = data.files only')
  mode: str = key("vanilla", " | ".join(MODES))
  limit: int = key(0, "first N questions per dataset (0 = all)")
  out_dir: str = key("runs/eval", "results.json, summary.{md,csv,png}, cache/")
  cache_dir: str = key(
      "", '"" = <out_dir>/cache; one can be shared between runs and modes (its keys hold '
      "model, prompt ids, max_tokens and judge)")
  max_tokens: int = key(1500, "new tokens per answer (per turn for the self_refine modes)")
  batch_size: int = key(64, "prompts per generate call (bounds the work a Ctrl-C loses)")
  seed: int = key(0, "sampling seed of answers with a temperature > 0")
  correct_threshold: float = key(0.5, "score >= this counts as right (XSum scores are 0..1)")
  instructions: str = key(
      "ours", "task instruction before the question: ours | paper (App. B.3)")
  second_turn_temperature: float = key(
      0.0, "self_refine*: sampling temperature of the review turn (paper: 0.6)")
  oracle_revises: str = key(
      "wrong", "self_refine_oracle revises: wrong (score < correct_threshold) | zero (paper)")
  reference: str = key(
      "final", "judge's reference: final (GSM8K: the number after ####) | solution (whole)")
  temperature: float = key(0.0, "first answers: 0 = greedy")
  rollout: EvalRolloutCfg = section(
      EvalRolloutCfg, "the engine (rollout.vllm.*) and its time limit")
  data: DataCfg = section(
      DataCfg, "your own sets: data.files (JSON / JSONL) read as training reads them "
      "(data.question_field, answer_field, task_type)")
  judge: JudgeCfg = section(JudgeCfg, "the accuracy judge")
  rewards: RewardsCfg = section(
      RewardsCfg, "only rewards.accuracy_rule: a function in the judge's place")
  prompts: PromptsCfg = section(PromptsCfg, "system and judge prompts")

  def check(self):
    self.need(bool(self.model), "model", "must be set: --config.model=HF_DIR")
    self.need(self.mode in MODES, "mode", "must be one of " + " | ".join(MODES))
    names = dataset_names(self.datasets)
    unknown = [n for n in names if n not in BENCHMARKS]
    self.need(not unknown, "datasets",
              f"unknown dataset(s) {unknown}; known: {', '.join(sorted(BENCHMARKS))} (or all)")
    self.need(bool(names) or bool(self.data.files), "datasets",
              "is empty and so is data.files; give e.g. --config.datasets=gsm8k,arc, or your "
              "own JSONL as --config.data.files=(FILE,)")
    self.need(self.limit >= 0, "limit", "must be >= 0 (0 = all)")
    self.need(self.max_tokens >= 1, "max_tokens", "must be >= 1")
    self.need(self.batch_size >= 1, "batch_size", "must be >= 1")
    self.need(0 <= self.correct_threshold <= 1, "correct_threshold", "must be in [0, 1]")
    for f in ("temperature", "second_turn_temperature"):
      self.need(getattr(self, f) >= 0, f, "must be >= 0 (0 = greedy)")
    self.need(self.instructions in INSTRUCTION_SETS, "instructions",
              "must be one of " + " | ".join(INSTRUCTION_SETS))
    self.need(self.oracle_revises in ORACLE_REVISES, "oracle_revises",
              "must be one of " + " | ".join(ORACLE_REVISES))
    self.need(self.reference in REFERENCES, "reference",
              "must be one of " + " | ".join(REFERENCES))
    self.data.need(not self.data.tfds_name, "tfds_name", "evaluate reads data.files only; "
                   "write the split to JSONL and pass it as data.files")
    self.need(self.prompt_budget >= MIN_PROMPT_TOKENS, "max_tokens",
              f"leaves {self.prompt_budget} tokens for a prompt in rollout.vllm.max_model_len="
              f"{self.rollout.vllm.max_model_len} (mode {self.mode}); lower it or raise that")

  @property
  def two_turn(self) -> bool:
    """Whether the mode asks a second (review) turn."""
    return self.mode in TWO_TURN_MODES

  @property
  def prompt_budget(self) -> int:
    """Tokens of a first-turn prompt: what the engine holds less the answer(s) and, in a
    two-turn mode, the review request."""
    turns = 2 if self.two_turn else 1
    return (self.rollout.vllm.max_model_len - self.max_tokens * turns
            - (REVIEW_TOKENS if self.two_turn else 0))


@dataclasses.dataclass(frozen=True)
class CompareConfig(Section):
  """`python -m pasr_jax.evaluate compare DIR1 DIR2 ...`: paired comparison of result dirs."""
  dirs: tuple[str, ...] = key(
      (), "evaluation output dirs, the command's arguments; the first is the reference")
  png: str = key("", '"" = none; else also write accuracy (95 % CI) and tokens to this PNG')
  labels: str = key("", 'comma-separated run names, one per dir ("" = from the dir names)')

  @property
  def label_list(self) -> list[str] | None:
    """`labels` split at the commas (None when empty)."""
    return [s.strip() for s in self.labels.split(",")] if self.labels else None
