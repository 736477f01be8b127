"""Benchmarks -> greedy answers -> judge -> accuracy and token tables (PASR paper, Table 1).

  python -m pasr_jax.evaluate --config=configs/eval.py --config.model=DIR \
      --config.data_dir=PATH --config.datasets=gsm8k,arc --config.mode=pasr --config.limit=50
  python -m pasr_jax.evaluate --config=configs/eval.py --config.model=DIR \
      --config.datasets= --config.data.files="('heldout.jsonl',)"   # your own set only
  python -m pasr_jax.evaluate compare RUN_DIR1 RUN_DIR2 ... [--png=FILE] [--labels=a,b,...]

The judge must be running at `config.judge.base_url` (e.g. `python -m pasr_jax.judge --backend
verify --port 8001`). Your own JSONL / JSON files go in `config.data.files` with the
training's field mapping (`data.question_field`, `data.answer_field`, `data.task_type`), beside
or instead of the registered benchmarks (`config.datasets`). Writes results.json, summary.md,
summary.csv, summary.png and an answer cache to `config.out_dir`; see `pasr_jax/eval/` for the
stages.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from pasr_jax import cli
from pasr_jax.config import DataCfg, JudgeCfg, PromptsCfg, RewardsCfg, VllmCfg
from pasr_jax.eval.benchmarks import EvalError, load_items, load_user_items, parse_datasets
from pasr_jax.eval.prompts import ChatEncoder, check_mode
from pasr_jax.eval.report import compare, summarize, write_outputs
from pasr_jax.eval.runner import Runner
from pasr_jax.judge.client import JudgeClient
from pasr_jax.prompts import load_prompts
from pasr_jax.rewards import AccuracyRule
from pasr_jax.rollout.vllm_sampler import VllmSampler


def _default_sampler(cfg) -> Callable[[], Any]:
  # Only the engine's settings and time limit: the rest of the rollout section is training's,
  # and its length check (max_prompt_tokens + max_tokens) does not apply to eval's max_tokens.
  return lambda: VllmSampler(cfg.model, VllmCfg.of(cfg.rollout.vllm), seed=int(cfg.seed),
                             timeout_s=float(cfg.rollout.timeout_s))


def accuracy_rule(cfg) -> str:
  """The eval config's rewards.accuracy_rule ("" = the judge), checked as training's is."""
  return RewardsCfg.of(cfg.rewards).accuracy_rule if "rewards" in cfg else ""


def _default_judge(cfg) -> Callable[[], Any]:
  rule = accuracy_rule(cfg)
  if rule:
    scorer = AccuracyRule(rule)  # imported now: a bad module:function fails before any work
    return lambda: scorer
  return lambda: JudgeClient(JudgeCfg.of(cfg.judge), load_prompts(PromptsCfg.of(cfg.prompts)))


def evaluate(cfg, make_sampler: Callable[[], Any] | None = None,
             make_judge: Callable[[], Any] | None = None) -> dict[str, Any]:
  """Runs `cfg.mode` on `cfg.datasets` and `cfg.data.files` and writes the outputs to
  `cfg.out_dir`.

  make_sampler / make_judge build the sampler and judge client on first need (defaults: vLLM
  from `cfg.rollout`, and `JudgeClient` from `cfg.judge`, or the function that
  `cfg.rewards.accuracy_rule` names); they are closed at the end.
  Returns dict(items=[per-item records], summary=[per-dataset rows], stats=...).
  Raises EvalError for unknown datasets or modes, missing files and bad model dirs.
  """
  if not cfg.model:
    raise EvalError("config.model is empty; give --config.model=HF_DIR")
  check_mode(cfg.mode)
  data_cfg = DataCfg.of(cfg.data) if "data" in cfg else DataCfg()
  benches = parse_datasets(cfg.datasets) if cfg.datasets or not data_cfg.files else []
  items = [it for b in benches
           for it in load_items(b, cfg.data_dir, int(cfg.limit), cfg.instructions,
                                 cfg.reference)]
  items += load_user_items(data_cfg, int(cfg.limit), [b.name for b in benches])
  encoder = ChatEncoder(cfg.model)
  runner = Runner(cfg, encoder, make_sampler or _default_sampler(cfg),
                  make_judge or _default_judge(cfg), accuracy_rule(cfg))
  t0 = time.perf_counter()
  try:
    records = runner.run(items)
  finally:
    runner.close()
  stats = dict(runner.stats, wall_s=time.perf_counter() - t0)
  datasets = list(dict.fromkeys(it.dataset for it in items))
  meta = dict(model=cfg.model, mode=cfg.mode, datasets=datasets,
              limit=int(cfg.limit), max_tokens=int(cfg.max_tokens), data_dir=cfg.data_dir,
              judge=(f"rewards.accuracy_rule={accuracy_rule(cfg)}" if accuracy_rule(cfg)
                     else cfg.judge.base_url), stats=stats)
  write_outputs(cfg.out_dir, records, meta)
  return dict(items=records, summary=summarize(records), stats=stats)


def _compare_main(argv: list[str]) -> int:
  ap = argparse.ArgumentParser(prog="python -m pasr_jax.evaluate compare", allow_abbrev=False,
                               description="Paired comparison of result dirs on the same items "
                               "(accuracy CIs, McNemar p, refinement analysis).")
  ap.add_argument("dirs", nargs="+", help="evaluation output dirs; the first is the reference")
  ap.add_argument("--png", default="", help="also write accuracy (95 %% CI) and tokens here")
  ap.add_argument("--labels", default="",
                  help="comma-separated run names, one per dir (default: from the dir names)")
  args = ap.parse_args(argv)
  labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
  try:
    print(compare(args.dirs, args.png or None, labels), end="")
  except EvalError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def report(cfg) -> None:
  """`python -m pasr_jax.evaluate`: `evaluate(cfg)`, then the summary table and the stats."""
  out = evaluate(cfg)
  with open(f"{cfg.out_dir}/summary.md", encoding="utf-8") as f:
    print(f.read())
  print("stats:", {k: (round(v, 2) if isinstance(v, float) else v)
                   for k, v in out["stats"].items()})


if __name__ == "__main__":
  if len(sys.argv) > 1 and sys.argv[1] == "compare":
    sys.exit(_compare_main(sys.argv[2:]))
  cli.main("pasr_jax.evaluate", report, schema=None, default_config="configs/eval.py",
           tune_malloc=False)
