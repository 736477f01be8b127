"""Benchmarks -> greedy answers -> judge -> accuracy and token tables (PASR paper, Table 1).

  python -m pasr_jax.evaluate --config=configs/eval.py --config.model=DIR \
      --config.data_dir=PATH --config.datasets=gsm8k,arc --config.mode=pasr --config.limit=50
  python -m pasr_jax.evaluate --config=configs/eval.py --config.model=DIR \
      --config.datasets= --config.data.files="('heldout.jsonl',)"   # your own set only
  python -m pasr_jax.evaluate compare RUN_DIR1 RUN_DIR2 ... [--config.png=FILE] \
      [--config.labels=a,b,...]

The keys, their defaults and checks: `pasr_jax/eval/schema.py` (`EvalRunConfig`, whose preset
is configs/eval.py; `CompareConfig` for `compare`). The judge must be running at
`config.judge.base_url` (e.g. `python -m pasr_jax.judge --config.backend=verify --config.port=8001`). Your
own JSONL / JSON files go in `config.data.files` with the training's field mapping
(`data.question_field`, `data.answer_field`, `data.task_type`), beside or instead of the
registered benchmarks (`config.datasets`). Writes results.json, summary.md, summary.csv,
summary.png and an answer cache to `config.out_dir`; see `pasr_jax/eval/` for the stages.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from pasr_jax import cli
from pasr_jax.eval.benchmarks import load_items, load_user_items, parse_datasets
from pasr_jax.eval.prompts import ChatEncoder
from pasr_jax.eval.report import compare, summarize, write_outputs
from pasr_jax.eval.runner import Runner
from pasr_jax.eval.schema import CompareConfig, EvalRunConfig
from pasr_jax.judge.client import JudgeClient
from pasr_jax.prompts import load_prompts
from pasr_jax.rewards import AccuracyRule
from pasr_jax.rollout.vllm_sampler import VllmSampler


def _default_sampler(cfg: EvalRunConfig) -> Callable[[], Any]:
  return lambda: VllmSampler(cfg.model, cfg.rollout.vllm, seed=cfg.seed,
                             timeout_s=cfg.rollout.timeout_s)


def _default_judge(cfg: EvalRunConfig) -> Callable[[], Any]:
  rule = cfg.rewards.accuracy_rule
  if rule:
    scorer = AccuracyRule(rule)  # imported now: a bad module:function fails before any work
    return lambda: scorer
  return lambda: JudgeClient(cfg.judge, load_prompts(cfg.prompts))


def evaluate(cfg: EvalRunConfig | Any, make_sampler: Callable[[], Any] | None = None,
             make_judge: Callable[[], Any] | None = None) -> dict[str, Any]:
  """Runs `cfg.mode` on `cfg.datasets` and `cfg.data.files` and writes the outputs to
  `cfg.out_dir`. `cfg`: an `EvalRunConfig`, or a preset's tree (typed and checked here).

  make_sampler / make_judge build the sampler and judge client on first need (defaults: vLLM
  from `cfg.rollout`, and `JudgeClient` from `cfg.judge`, or the function that
  `cfg.rewards.accuracy_rule` names); they are closed at the end.
  Returns dict(items=[per-item records], summary=[per-dataset rows], stats=...).
  Raises ConfigError for a value that cannot work, EvalError for missing files and bad model
  dirs.
  """
  cfg = EvalRunConfig.of(cfg)
  rule = cfg.rewards.accuracy_rule
  benches = parse_datasets(cfg.datasets)
  items = [it for b in benches
           for it in load_items(b, cfg.data_dir, cfg.limit, cfg.instructions, cfg.reference)]
  items += load_user_items(cfg.data, cfg.limit, [b.name for b in benches])
  encoder = ChatEncoder(cfg.model)
  runner = Runner(cfg, encoder, make_sampler or _default_sampler(cfg),
                  make_judge or _default_judge(cfg))
  t0 = time.perf_counter()
  try:
    records = runner.run(items)
  finally:
    runner.close()
  stats = dict(runner.stats, wall_s=time.perf_counter() - t0)
  datasets = list(dict.fromkeys(it.dataset for it in items))
  meta = dict(model=cfg.model, mode=cfg.mode, datasets=datasets, limit=cfg.limit,
              max_tokens=cfg.max_tokens, data_dir=cfg.data_dir,
              judge=f"rewards.accuracy_rule={rule}" if rule else cfg.judge.base_url,
              stats=stats)
  write_outputs(cfg.out_dir, records, meta)
  return dict(items=records, summary=summarize(records), stats=stats)


def report(cfg: EvalRunConfig) -> None:
  """`python -m pasr_jax.evaluate`: `evaluate(cfg)`, then the summary table and the stats."""
  out = evaluate(cfg)
  with open(f"{cfg.out_dir}/summary.md", encoding="utf-8") as f:
    print(f.read())
  print("stats:", {k: (round(v, 2) if isinstance(v, float) else v)
                   for k, v in out["stats"].items()})


def compare_runs(cfg: CompareConfig) -> None:
  """`python -m pasr_jax.evaluate compare`: the paired comparison of `cfg.dirs` on stdout."""
  print(compare(cfg.dirs, cfg.png or None, cfg.label_list), end="")


if __name__ == "__main__":
  if sys.argv[1:2] == ["compare"]:
    cli.main("pasr_jax.evaluate compare", compare_runs, schema=CompareConfig, preset=False,
             positional="dirs", argv=sys.argv[:1] + sys.argv[2:], tune_malloc=False)
  else:
    cli.main("pasr_jax.evaluate", report, schema=EvalRunConfig,
             default_config="configs/eval.py", tune_malloc=False)
