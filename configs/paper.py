"""The PASR paper's GPU training settings, shared by the 7B/8B presets."""

import re

import ml_collections

from configs.base import get_base_config

# The original's optimizer update: micro-batch 2 x accumulation 4 = 8 sequences.
PAPER_SEQUENCES_PER_UPDATE = 8
# all_steps x train_batch_size x trainer processes / (Q_batch_size x num_pre_Q), rounded up.
ORIGINAL_STEPS = -(-3000 * 2 * 2 // (8 * 8))  # 188


def cluster_devices(cluster: str) -> int:
  """GPUs of a preset's cluster argument `HOSTSxGPUS` (`configs/qwen3_8b.py:2x8`); "" = 1x8."""
  m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", cluster or "1x8")
  if not m or not int(m.group(1)) or not int(m.group(2)):
    raise ValueError(f"--config=<preset>.py:{cluster}: the cluster is HOSTSxGPUS, e.g. 1x8 or 2x8")
  return int(m.group(1)) * int(m.group(2))


def batch_sizes(devices: int) -> tuple[int, int]:
  """(optim.micro_batch, optim.sequences_per_update) for FSDP over `devices` GPUs: one
  sequence per GPU per micro-batch (the batch is split over every GPU), and the original's 8
  sequences per update where that is a multiple of the micro-batch; on more GPUs one
  micro-batch per update (2x8: 16 sequences per update, 4 updates per rollout batch of 64)."""
  micro = devices * -(-PAPER_SEQUENCES_PER_UPDATE // devices) if devices <= 8 else devices
  return micro, max(micro, PAPER_SEQUENCES_PER_UPDATE)


def paper_gpu_config(hf_config: dict, workdir: str, cluster: str = "") -> ml_collections.ConfigDict:
  """Base config + the paper's hyper-parameters for a model with this public config.json, on
  `cluster` ("HOSTSxGPUS", default 1x8: the batch sizes depend on the GPU count)."""
  devices = cluster_devices(cluster)
  c = get_base_config()
  c.workdir = workdir
  c.model.path = ""                   # required: the HF snapshot matching hf_config
  c.model.hf_config = dict(hf_config)  # used by the memory plan and to check the snapshot
  c.model.dtype = "bfloat16"          # compute; master weights and AdamW state stay float32
  c.model.param_dtype = "float32"
  c.model.scan_layers = True          # compile time independent of depth
  c.model.remat = True
  c.mesh.shape = (1, -1, 1)           # FSDP over every device (8 GPUs in the paper)
  c.mesh.platform = "cuda"            # a CUDA plugin that fails to start raises (no CPU fallback)
  # NCCL and vLLM use /dev/shm too: leave them room beside a 15 GiB bf16 sync.
  c.rollout.vllm.sync_headroom_gib = 4.0
  # FSDP shards each kernel's first (major) sharable dim, so XLA:GPU all-gathers and
  # reduce-scatters whole rows: on `embed` alone (the minor dim of gate/up/q/k/v) it keeps
  # transposed fp32 copies of those kernels (Qwen3-8B, FSDP=4: 6.6 GiB/device more temp).
  c.mesh.rules = tuple((name, ("tensor", "fsdp")) if name in ("vocab", "heads", "kv_heads", "mlp")
                       else (name, axis) for name, axis in c.mesh.rules)
  # The original run (PASR/config.py, PASR/pasr_main.py; README "fidelity" table): 8 prompts
  # x 8 answers at temperature 0.9, 1500 new tokens; β 0.04 (k3), ε 0.2; AdamW lr 1e-6, no
  # weight decay, no gradient clipping; 8 sequences per optimizer update (micro-batch 2 x
  # accumulation 4 per trainer process), so a rollout batch of 64 answers gives 8 updates.
  c.rollout.prompts_per_step = 8
  c.rollout.n = 8
  c.rollout.temperature = 0.9
  c.rollout.top_p = 1.0
  c.rollout.max_tokens = 1500
  c.rollout.max_prompt_tokens = 512
  c.rollout.vllm.max_model_len = 2048
  c.rollout.vllm.dtype = "bfloat16"
  c.rollout.vllm.gpu_memory_utilization = 0.3
  c.rollout.vllm.enforce_eager = False  # CUDA graphs: decoding is launch-bound without them
  c.grpo.beta = 0.04
  c.grpo.eps_low = 0.2
  c.grpo.eps_high = 0.2
  c.grpo.agg = "seq_mean_token_mean"
  c.grpo.num_iterations = 1
  # (r - mean) / (std + 1e-4), torch's sample std; groups whose rewards span < 1e-4 skipped.
  c.grpo.adv_std_ddof = 1
  c.grpo.adv_eps = 1e-4
  c.grpo.adv_scale = "group"
  c.grpo.skip_zero_variance = True
  c.grpo.skip_range = 1e-4
  c.grpo.mask_truncated = False
  c.optim.lr = 1e-6
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.optim.clip_norm = 0.0             # 0 = no clipping
  # Sequences per micro-batch over all devices: a multiple of the batch shards (every GPU,
  # FSDP) dividing sequences_per_update (see batch_sizes: 8 and 8 on 1x8, 16 and 16 on 2x8).
  c.optim.micro_batch, c.optim.sequences_per_update = batch_sizes(devices)
  # Rewards: format + accuracy + refine, weights 1, strict comparison with the baseline mean.
  c.rewards.format_weight = 1.0
  c.rewards.accuracy_weight = 1.0
  c.rewards.refine_weight = 1.0
  c.rewards.zeta = 0.0
  # The training judge grades 0..1 at temperature 0.2 and sees the whole answer.
  c.prompts.builtin = "paper"
  c.prompts.judge_style = "graded"
  c.prompts.judge_layout = "original"  # system instruction + ### Question / Ground Truth / Answer
  c.judge.temperature = 0.2
  c.judge.input = "full"
  # The original set no reply cap: the graded judge may write before its number (the last
  # number is taken); 16 tokens would cut it off.
  c.judge.max_tokens = 512
  c.judge.thinking = False            # a Qwen3 judge scores at once (Qwen2.5's template ignores it)
  # alpaca_evol_instruct: a JSON array of {"instruction", "output"}.
  c.data.question_field = "instruction"
  c.data.answer_field = "output"
  c.data.task_type = "general"
  # The original's length: all_steps = 3000 (its README; 10000 in its config) trainer
  # micro-steps of train_batch_size 2 sequences on each of its README's 2 trainer processes =
  # 12000 trained sequences = 12000 / (8 x 8) = 187.5 rollout batches (README "fidelity").
  c.train.steps = ORIGINAL_STEPS
  # Batch lengths (prompt + completion, up to 2048) round up to 512: at most 4 update programs
  # to compile per run, instead of one per 64-token length.
  c.train.seq_multiple = 512
  c.checkpoint.every = 50
  return c
