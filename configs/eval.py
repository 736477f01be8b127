"""Evaluation config: `python -m pasr_jax.evaluate --config=configs/eval.py --config.model=DIR`.

Paper protocol: greedy decoding, at most 1500 new tokens, one answer per question, a judge scores
each answer against the reference. The judge, vLLM and prompt sections are the training ones.
"""

import ml_collections

from configs.base import get_base_config


def get_config() -> ml_collections.ConfigDict:
  base = get_base_config()
  c = ml_collections.ConfigDict()
  c.model = ""                        # HF dir (config.json + safetensors + tokenizer)
  c.data_dir = "data/pasr/test_dataset"   # root of the benchmark files (PASR seed layout)
  c.datasets = "gsm8k,math,aime24,arc,gpqa,winogrande,commonsenseqa,drop,mmlu,xsum"  # or "all"
  c.mode = "vanilla"                  # vanilla | pasr | self_refine | self_refine_oracle
  c.limit = 0                         # first N questions per dataset (0 = all)
  c.out_dir = "runs/eval"             # results.json, summary.{md,csv,png}, cache/
  c.cache_dir = ""                    # "" = <out_dir>/cache; share one between runs/modes (keys
                                      # hold model, prompt ids, max_tokens, judge: always safe)
  c.max_tokens = 1500                 # new tokens per answer (per turn for self_refine)
  c.batch_size = 64                   # prompts per vLLM generate call (bounds lost work on ^C)
  c.seed = 0
  c.correct_threshold = 0.5           # score >= this counts as right (XSum scores are 0..1)
  c.instructions = "ours"             # task instruction before the question: ours | paper (App. B.3)
  c.second_turn_temperature = 0.0     # self_refine*: sampling temperature of the review turn (paper: 0.6)
  c.oracle_revises = "wrong"          # self_refine_oracle revises: wrong (score < threshold) | zero (paper)
  c.reference = "final"               # judge's reference: final (GSM8K: the number after ####) | solution (whole, the original's)
  c.temperature = 0.0                 # first answers: 0 = greedy (the original's README); infer_pasr.py sampled at 0.5
  c.rollout = base.rollout            # only rollout.vllm.* is used (engine settings)
  c.rollout.vllm.max_model_len = 4096     # long articles (XSum, DROP) + 1500 new tokens
  c.data = base.data                  # your own sets: data.files (JSON / JSONL) read as training
                                      # reads them (data.question_field, answer_field, task_type)
  c.judge = base.judge
  c.rewards = base.rewards            # only rewards.accuracy_rule: a Python function in the judge's place
  c.prompts = base.prompts
  return c
