"""paper_eval: the evaluation of the PASR paper's Table 1, as the original run did it.

`python -m pasr_jax.evaluate --config=configs/paper_eval.py --config.model=DIR
--config.data_dir=PATH --config.mode=vanilla|pasr|self_refine|self_refine_oracle`.
First answers greedy, at most 1500 new tokens (`:sampled`: T 0.5, 2048 tokens, as the
original's pasr inference script), after the task instructions of App. B.3;
Self-Refine's review turn sampled at temperature 0.6; Self-Refine+ (the oracle) revises only
the answers the judge scored 0; the judge (binary per task type) at temperature 0.2; the
table is the mean score per set, then the mean over the sets.
"""

import ml_collections

from configs.eval import get_config as eval_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """`configs/paper_eval.py`: greedy, 1500 tokens (the original's README; our Table 1);
  `configs/paper_eval.py:sampled`: T 0.5, 2048 tokens (its pasr inference script)."""
  if variant not in ("", "sampled"):
    raise ValueError(f"--config=configs/paper_eval.py:{variant}: expected '' or 'sampled'")
  c = eval_config()
  c.out_dir = "runs/paper_eval"
  c.datasets = "gsm8k,math,aime24,arc,gpqa,winogrande,commonsenseqa,drop,mmlu,xsum"
  c.max_tokens = 1500
  c.instructions = "paper"
  c.second_turn_temperature = 0.6
  c.oracle_revises = "zero"
  c.reference = "solution"            # the original gave the judge GSM8K's whole worked solution
  if variant == "sampled":
    c.temperature, c.max_tokens = 0.5, 2048
  c.judge.temperature = 0.2
  c.judge.input = "full"
  c.prompts.judge_style = "binary"   # the original's evaluation prompts: 1 or 0 (summaries 0..1)
  c.prompts.builtin = "paper"         # mode pasr: the system prompt the paper presets train with
  return c
