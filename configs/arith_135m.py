"""arith_135m: PASR on generated arithmetic word problems with SmolLM2-135M-Instruct, on CPU.

The experiment's preset (`make experiment`) and the demo's (`make demo`). The task
(`pasr_jax/tasks/arith.py`) exists because SmolLM2-135M scores ~4 % on GSM8K: the refine reward
compares an answer's accuracy with the baseline's mean, so it can only pay +1 where that mean
lies strictly between 0 and 1. The data below are committed (nothing is generated at run time):

  python -m pasr_jax.tasks.arith --config.out=configs/data/arith --config.n_train=1000 \\
      --config.n_test=500 --config.seed=0 --config.buckets=easy,medium,hard \\
      --config.n_out_of_template=300

(configs/data/arith/meta.json records the settings): a third of the rows in each difficulty
bucket (tagged `difficulty`), and an out-of-template set (`evaluate --config.datasets=arith_oot`). Each value below says why it was chosen.
`--config=configs/arith_135m.py:demo` is `make demo`'s shorter run (see the end).
"""

import os

from configs.base import get_base_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def _smollm2_dir() -> str:
  # Where `make setup` (scripts/prepare_model.py) puts the converted model; nothing is made here.
  from pasr_jax.smollm2 import smollm2_dir  # pylint: disable=import-outside-toplevel
  return str(smollm2_dir())


def get_config(variant: str = ""):
  if variant not in ("", "demo"):
    raise ValueError(f"configs/arith_135m.py:{variant}: the variants are '' and 'demo'")
  c = get_base_config()
  c.workdir = "runs/arith"
  c.model.path = _smollm2_dir()
  c.mesh.shape = (1, -1, 1)
  c.data.files = (os.path.join(_HERE, "data", "arith", "train.jsonl"),)
  c.data.task_type = "general"
  # 4 questions x 8 answers (+ 4 x 8 baseline answers): 8 answers per group give the group
  # mean and the baseline mean a resolution of 1/8, and 32 PASR answers a step make the
  # per-step rates readable (the last experiment's 2 x 4 had no visible trend).
  c.rollout.prompts_per_step = 4
  c.rollout.n = 8
  # The traces are 35-90 tokens (<= 87 with 3 steps and a correcting refine); 128 leaves room
  # for a T=1 answer that wanders and keeps a training row (prompt ~220 + answer) within 384
  # positions: step time grows with the padded length. Measured (experiment, 4 steps): 0.8 % of
  # PASR answers cut, but 21 % of the baseline's plain-prompt prose answers.
  c.rollout.max_tokens = 128
  c.rollout.max_prompt_tokens = 256   # PASR system prompt 160 tokens + chat markup + question: 210-235
  c.rollout.vllm.max_model_len = 384  # 256 + 128
  c.rollout.vllm.kv_cache_space_gib = 1
  c.judge.base_url = "http://127.0.0.1:8001"
  c.judge.autostart = True
  c.judge.concurrency = 16
  # No KL term: it would add a reference forward to every update on 2 cores, and over this
  # few updates the clipped ratio (eps 0.2) and the small lr bound the drift anyway.
  c.grpo.beta = 0.0
  # Groups whose 8 rewards are equal carry no advantage: dropped (the trainer skips them).
  c.grpo.skip_zero_variance = True
  # 1e-5 with clipping at 1.0: at 2e-6 (the last experiment) 15 updates moved no answer; the
  # sign-like Adam step moves each weight by up to ~1e-5 per update, 4 updates per step.
  c.optim.lr = 1e-5
  c.optim.clip_norm = 1.0
  c.optim.sequences_per_update = 8   # the original's 2 x 4 accumulation: 4 updates per step
  c.optim.micro_batch = 2            # 49k-vocab fp32 logits: the 24 GiB host is shared (an
                                     # experiment run at 4 was OOM-killed under other load)
  # NOT part of the PASR paper: SmolLM2-135M writes 0 of 64 answers in the PASR format. SFT
  # first on the task's traces (pasr_jax/tasks/arith.py): 40 % make a realistic slip and
  # correct it inside <refine>, 20 % re-check a random step and confirm it, 40 % do not
  # refine; each check computes the step another way (tens and ones, or the inverse).
  # Correcting traces give RL a behaviour to select; plain ones leave it room to not refine.
  # Half the rows are also written without tags under the plain prompt, so that the baseline
  # (the same policy under the plain prompt) is this model not refining, in the same short
  # layout, never cut at max_tokens, rather than untrained prose.
  c.cold_start.enabled = True
  c.cold_start.traces = "arith"
  c.cold_start.correct_fraction = 0.4
  c.cold_start.refine_fraction = 0.2
  c.cold_start.plain_fraction = 0.5
  c.cold_start.lr = 2e-4
  c.cold_start.epochs = 1
  c.cold_start.max_steps = 32         # of sft.batch_size 8: 256 traces, ~1/3 of them plain
  c.sft.batch_size = 8
  c.sft.checkpoint_every = 4          # a killed cold start on a busy host loses <= 4 updates
  c.train.steps = 10
  c.train.export = True
  c.checkpoint.every = 2             # a killed run loses at most 2 steps (~5 min)
  c.checkpoint.keep = 1
  if variant == "demo":
    # `make demo` (< 12 min on 2 idle cores): half the cold start (its NLL is flat after ~8
    # updates) and 2 questions x 8 answers per step, twice as fast as 4 x 8.
    c.workdir = "runs/demo"
    c.cold_start.max_steps = 12
    c.rollout.prompts_per_step = 2
    c.train.steps = 6
    # Greedy answers to 100 held-out items (the test split's unseen frames) before the first
    # update and after the last, through the run's own engine: the demo's last line.
    c.eval.every = c.train.steps
    c.eval.files = (os.path.join(_HERE, "data", "arith", "test.jsonl"),)
    c.eval.limit = 100
  return c
