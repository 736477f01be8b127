"""Preflight: config x mesh x processes x GPUs x environment, checked before any weight loads.

  python -m pasr_jax.preflight --config=configs/qwen3_8b.py [--hosts=2 --gpus-per-host=8]

With `--hosts` / `--gpus-per-host` the cluster is simulated (checks that need the real hosts,
such as the driver or the sync dir's free space, are skipped and say what they will need);
without them the checks run against this machine, as `python -m pasr_jax.train` does first.
Prints one row per check and exits 0, or 2 with one line per failing check naming the fix.

`run_checks(cfg, hosts, gpus_per_host, env)` is pure: `env` (`Env`) carries what was probed
(`probe`), so tests build the environment they need.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import urllib.parse
from pathlib import Path
from typing import Any, Mapping

from absl import flags

from pasr_jax import checks, cli, devices, errors, rewards
from pasr_jax.config import ConfigError, RunConfig
from pasr_jax.judge.local import judge_answers
from pasr_jax.rollout import weight_sync
from pasr_jax.sharding import MeshError, resolve_shape

GIB = 1 << 30
# torch 2.13 and jax[cuda13] (requirements-gpu.txt) are CUDA 13 builds: they need this driver.
MIN_DRIVER = 580
# Above this share of a GPU for JAX + a colocated vLLM, the CUDA contexts, cuBLAS/cuDNN
# workspaces and NCCL buffers outside both pools no longer fit.
MAX_COLOCATED = 0.95
# The graded judge may reason before its number (the original took the last one, uncapped).
MIN_GRADED_TOKENS = 64
CONFLICT_ENV = "XLA_CLIENT_MEM_FRACTION"  # jaxlib refuses it beside XLA_PYTHON_CLIENT_MEM_FRACTION
# The CUDA version torch 2.13 and jax[cuda13] need from the user-mode driver (cuDriverGetVersion).
MIN_CUDA = 13000
GPU_QUERY = "index,compute_mode,memory.used,memory.total"
# What one GPU must keep free beyond JAX's and vLLM's pools (CUDA contexts, NCCL, cuBLAS).
GPU_SLACK = 0.03


class PreflightError(errors.UserError):
  """One or more checks failed; the message lists each fix (exit code 2 in `train`)."""


@dataclasses.dataclass(frozen=True)
class Check:
  """One row of the table: status "ok" | "fail" | "skip", what was found, how to fix it."""
  name: str
  status: str
  detail: str
  fix: str = ""


@dataclasses.dataclass(frozen=True)
class Env:
  """What the checks know of the hosts. `simulated`: hosts and GPUs come from the command
  line, not this machine, so host probes (driver, free space, judge) are not meaningful."""
  vars: Mapping[str, str]
  simulated: bool = True
  driver: str | None = None            # NVIDIA driver version on this host (None: no driver)
  judge_answers: bool | None = None    # GET <judge.base_url>/v1/models answered 200
  sync_free: Mapping[str, int] = dataclasses.field(default_factory=dict)  # dir -> free bytes
  cuda_version: int | None = None      # cuDriverGetVersion of the libcuda loaded (13000 = 13.0)
  gpu_query: str | None = None         # nvidia-smi --query-gpu=GPU_QUERY, csv, noheader, nounits
  c_compiler: str | None = None        # CC / gcc / cc on PATH (Triton); "" none; None unprobed
  python_headers: bool | None = None   # Python.h of this interpreter is installed


# ----------------------------------------------------------------------------- probes
def driver_version() -> str | None:
  """The NVIDIA driver version of this host, from /proc or nvidia-smi; None without one."""
  proc = Path("/proc/driver/nvidia/version")
  if proc.is_file():
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", proc.read_text())
    if m:
      return m.group(1)
  if shutil.which("nvidia-smi"):
    try:
      out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
      return out.split()[0] if out.split() else None
    except (OSError, subprocess.SubprocessError):
      return None
  return None


def cuda_driver_version() -> int | None:
  """The CUDA version the user-mode driver loaded here supports (`cuDriverGetVersion`:
  13000 = 13.0): NVIDIA's forward-compatibility package raises it above the kernel driver's.
  None without a loadable libcuda."""
  try:
    lib = ctypes.CDLL("libcuda.so.1")
    v = ctypes.c_int(0)
    return v.value if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 and v.value else None
  except (OSError, AttributeError):
    return None


def query_gpus() -> str | None:
  """nvidia-smi's `GPU_QUERY` rows of this host (every GPU, by physical index); None without it."""
  if not shutil.which("nvidia-smi"):
    return None
  try:
    return subprocess.run(["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None


def c_compiler(env: Mapping[str, str]) -> str | None:
  """The C compiler Triton would use: $CC, else gcc, else cc on PATH."""
  for name in (env.get("CC", ""), "gcc", "cc"):
    if name and shutil.which(name.split()[0]):
      return shutil.which(name.split()[0])
  return None


def sync_roots(cfg: RunConfig) -> list[str]:
  """The weight sync's directory and its fallback, as `WeightSync` chooses them."""
  v = cfg.rollout.vllm
  return [str(d) for d in weight_sync.sync_roots(v.sync_dir, v.sync_fallback_dir)]


def probe(cfg: Any) -> Env:
  """This machine as it is: environment, driver, judge, free space of the sync dirs."""
  cfg = RunConfig.from_tree(cfg)
  free = {}
  for d in sync_roots(cfg):
    p = Path(d)
    while not p.exists() and p != p.parent:
      p = p.parent  # the dir is made at the first sync: its nearest existing parent
    free[d] = shutil.disk_usage(p).free
  answers = None
  if cfg.rewards.accuracy_rule == "":
    answers = judge_answers(cfg.judge.base_url)
  gpus = shutil.which("nvidia-smi") is not None
  return Env(vars=dict(os.environ), simulated=False, driver=driver_version(),
             judge_answers=answers, sync_free=free,
             cuda_version=cuda_driver_version() if gpus else None,
             gpu_query=query_gpus() if gpus else None,
             c_compiler=c_compiler(os.environ) or "",
             python_headers=Path(sysconfig.get_paths()["include"], "Python.h").is_file())


# ----------------------------------------------------------------------------- model size
def hf_config(cfg: RunConfig) -> dict | None:
  """The architecture: model.hf_config, model.path's config.json, or the tiny model's."""
  m = cfg.model
  if m.hf_config:
    return dict(m.hf_config)
  if m.path and (Path(m.path) / "config.json").is_file():
    return json.loads((Path(m.path) / "config.json").read_text())
  if m.tiny_random:
    from pasr_jax.tiny import char_vocab, tiny_model_config  # pylint: disable=import-outside-toplevel
    return tiny_model_config(len(char_vocab()), tie_word_embeddings=False).to_hf_dict()
  return None


def param_count(hf: Mapping[str, Any]) -> int:
  """Parameters of a Qwen2/Qwen3/Llama-style decoder from its HF config.json."""
  h, v, inter = hf["hidden_size"], hf["vocab_size"], hf["intermediate_size"]
  heads = hf["num_attention_heads"]
  kv = hf.get("num_key_value_heads", heads)
  hd = hf.get("head_dim") or h // heads
  layer = 2 * h * heads * hd + 2 * h * kv * hd + 3 * h * inter + 2 * h
  if hf.get("attention_bias", hf.get("model_type") == "qwen2"):
    layer += heads * hd + 2 * kv * hd
  if hf.get("model_type") == "qwen3":
    layer += 2 * hd  # q/k norms
  return v * h * (1 if hf.get("tie_word_embeddings") else 2) + hf["num_hidden_layers"] * layer + h


# ----------------------------------------------------------------------------- checks
def processes_per_host(cfg: RunConfig, gpus_per_host: int) -> int:
  """Training processes per host: 1, or as many as mesh.local_device_ids' share fits."""
  ids = devices.parse_ids("mesh.local_device_ids", cfg.mesh.local_device_ids)
  return max(1, gpus_per_host // len(ids)) if gpus_per_host and ids else 1


def _local(url: str) -> bool:
  return urllib.parse.urlparse(url).hostname in ("127.0.0.1", "localhost", "::1")


def run_checks(cfg: Any, hosts: int, gpus_per_host: int, env: Env) -> list[Check]:
  """Every check of `cfg` on `hosts` hosts of `gpus_per_host` GPUs each (0: CPU hosts) in
  `env`; a config that does not type-check is the one failing check."""
  try:
    cfg = RunConfig.from_tree(cfg)
  except ConfigError as e:
    return [Check("config", "fail", str(e), str(e))]
  out = [Check("config", "ok", f"{cfg.workdir}: types and values")]
  m = cfg.mesh
  gpu = gpus_per_host > 0

  # Processes and devices. Several processes per host only when local_device_ids splits it.
  local_ids = devices.parse_ids("mesh.local_device_ids", m.local_device_ids)
  cvd = devices.parse_ids("mesh.cuda_visible_devices", m.cuda_visible_devices)
  per_host = processes_per_host(cfg, gpus_per_host)
  procs = hosts * per_host
  if gpu:
    dev_per_proc = len(local_ids or cvd) or gpus_per_host
  else:
    forced = re.search(r"xla_force_host_platform_device_count=(\d+)", env.vars.get("XLA_FLAGS", ""))
    dev_per_proc = int(forced.group(1)) if forced else 1
  total = procs * dev_per_proc
  out.append(Check("processes", "ok" if procs == 1 or hosts == 1 or m.distributed or env.simulated
                   else "fail",
                   f"{procs} process(es) x {dev_per_proc} {'GPU' if gpu else 'CPU device'}(s)",
                   "start one process per host with scripts/launch_multihost.sh "
                   "(mesh.distributed=True)"))
  if local_ids and cvd and local_ids != cvd:
    out.append(Check("local devices", "fail", f"mesh.local_device_ids={m.local_device_ids!r} and "
                     f"mesh.cuda_visible_devices={m.cuda_visible_devices!r} differ",
                     "set only mesh.local_device_ids (JAX's distributed init overrides "
                     "jax_cuda_visible_devices with it)"))
  elif gpu and procs > 1:
    out.append(Check("local devices", "ok", "explicit per process: " + (
        m.local_device_ids or m.cuda_visible_devices or f"all {gpus_per_host} of each host") +
        " (JAX's SLURM/MPI detection would give each process one GPU)"))

  try:
    shape = resolve_shape(m.shape, total)
  except MeshError as e:
    out.append(Check("mesh", "fail", str(e), f"set mesh.shape so data*fsdp*tensor = {total} "
                     "devices, e.g. --config.mesh.shape='(1,-1,1)'"))
    return out
  sizes = dict(zip(("data", "fsdp", "tensor"), shape))
  batch_axes = next((tuple([a] if isinstance(a, str) else a or ()) for n, a in m.rules
                     if n == "batch"), ())
  shards = math.prod(sizes[a] for a in batch_axes)
  rest = total // shards
  out.append(Check("mesh", "ok", f"{shape} over {total} devices; batch split {shards} ways "
                   f"({'*'.join(batch_axes) or 'none'})"))
  if procs > 1 and (shards % procs or dev_per_proc % rest):
    out.append(Check("batch vs processes", "fail",
                     f"the batch is split {shards} ways over {procs} processes of "
                     f"{dev_per_proc} devices; each process must hold its own {shards}/{procs}",
                     "let the batch axes (data, fsdp) span the hosts, e.g. "
                     "--config.mesh.shape='(1,-1,1)'"))

  out.extend(_batch_checks(cfg, shards, procs, hosts, gpus_per_host))
  out.extend(_model_checks(cfg))
  out.extend(_judge_checks(cfg, hosts, procs, env))
  out.extend(_gpu_checks(cfg, gpu, gpus_per_host, per_host, env))
  out.extend(heads_checks(cfg, sizes["tensor"]))
  out.append(model_dir_check(cfg, env))
  if gpu:
    out.extend(_gpu_host_checks(cfg, env))
  out.extend(optional_packages_checks(cfg))
  out.append(_sync_check(cfg, env, gpu))
  if env.vars.get(CONFLICT_ENV):
    out.append(Check("env", "fail", f"{CONFLICT_ENV}={env.vars[CONFLICT_ENV]} is set; the trainer "
                     "sets XLA_PYTHON_CLIENT_MEM_FRACTION and jaxlib refuses both",
                     f"unset {CONFLICT_ENV} (JAX's share comes from mesh.memory_fraction)"))
  return out


def _batch_checks(cfg: RunConfig, shards: int, procs: int, hosts: int,
                  gpus_per_host: int) -> list[Check]:
  """Micro-batches against the batch shards, updates per step, questions per process."""
  r, o, out = cfg.rollout, cfg.optim, []
  rows = r.prompts_per_step * r.n
  spu = o.sequences_per_update or rows
  problem = checks.micro_batch_vs_shards(o.micro_batch, shards)
  if problem:
    want = shards * max(1, -(-o.micro_batch // shards))
    out.append(Check("micro-batch", "fail", problem,
                     f"--config.optim.micro_batch={want}" + (
                         f" --config.optim.sequences_per_update={max(want, spu // want * want)}"
                         if o.sequences_per_update else "") + (
                         " (or the paper preset for this cluster: --config=configs/<preset>.py:"
                         f"{hosts}x{gpus_per_host})" if cfg.model.hf_config and gpus_per_host else "")))
  else:
    updates = -(-rows // spu) * cfg.grpo.num_iterations
    out.append(Check("micro-batch", "ok",
                     f"{o.micro_batch} sequences ({o.micro_batch // shards}/device), "
                     f"{spu} per update, {updates} update(s) per step of {rows} answers"))
  problem = checks.questions_vs_processes(r.prompts_per_step, procs)
  if problem:
    out.append(Check("questions", "fail", problem,
                     f"--config.rollout.prompts_per_step={procs} (or more)"))
  else:
    out.append(Check("questions", "ok", f"{r.prompts_per_step} per step over {procs} "
                     f"process(es): {math.ceil(r.prompts_per_step / procs)} each at most"))

  return out


def _model_checks(cfg: RunConfig) -> list[Check]:
  """A model dir that is here must have a chat template (a base model's may lack one)."""
  tok = Path(cfg.model.path) / "tokenizer_config.json" if cfg.model.path else None
  if tok is None or not tok.is_file():
    return []
  if json.loads(tok.read_text()).get("chat_template") or (tok.parent / "chat_template.jinja").is_file():
    return [Check("chat template", "ok", f"{cfg.model.path}")]
  return [Check("chat template", "fail", f"model.path={cfg.model.path!r}: its tokenizer has no "
                "chat template (prompts are [system, user] chats)",
                f"add a chat_template to {tok} (e.g. the Instruct model's ChatML template)")]


def _judge_checks(cfg: RunConfig, hosts: int, procs: int, env: Env) -> list[Check]:
  j = cfg.judge
  out = []
  if cfg.rewards.accuracy_rule:
    return [Check("judge", "skip", f"rewards.accuracy_rule={cfg.rewards.accuracy_rule!r}: no judge")]
  if "qwen3" in j.model.lower() and j.thinking:
    out.append(Check("judge thinking", "fail", f"judge.model={j.model!r} thinks before it "
                     f"scores, and judge.max_tokens={j.max_tokens} cuts it off",
                     "--config.judge.thinking=False (asks with enable_thinking=False)"))
  if cfg.prompts.judge_style == "graded" and j.max_tokens < MIN_GRADED_TOKENS:
    out.append(Check("judge reply", "fail", f"prompts.judge_style='graded' writes before its "
                     f"score, judge.max_tokens={j.max_tokens} cuts it off",
                     "--config.judge.max_tokens=512 (the original set no cap)"))
  local = _local(j.base_url)
  if local and procs > hosts and j.autostart:
    out.append(Check("judge", "fail", f"judge.autostart with {procs // hosts} processes per host "
                     "would start one judge per process on the same port",
                     "start one judge per host (scripts/serve_judge.sh) and set "
                     "--config.judge.autostart=False"))
  elif env.simulated:
    out.append(Check("judge", "skip", f"needs a judge at {j.base_url}" + (
        " on every host (launch_multihost.sh JUDGE=verify|MODEL_DIR starts one per host), or "
        "one shared judge URL" if local and hosts > 1 else "") + "; checked when the run starts"))
  elif env.judge_answers:
    out.append(Check("judge", "ok", f"answers at {j.base_url}"))
  elif local and j.autostart:
    out.append(Check("judge", "ok", f"nothing at {j.base_url}: the verify judge is started there"))
  else:
    why = (f"config judge.base_url={j.base_url!r}: no judge answers at /v1/models; start one "
           "(python -m pasr_jax.judge --config.backend=verify --config.port=N) or set "
           "judge.autostart=True")
    out.append(Check("judge", "fail", why, why))
  return out


def _gpu_checks(cfg: RunConfig, gpu: bool, gpus_per_host: int, per_host: int, env: Env
                ) -> list[Check]:
  m, v = cfg.mesh, cfg.rollout.vllm
  out = []
  if gpu and m.platform != "cuda":
    out.append(Check("platform", "fail", f"mesh.platform={m.platform!r} on GPU hosts: a CUDA "
                     "plugin that fails to start leaves JAX on the CPU with one log line",
                     "--config.mesh.platform=cuda"))
  elif not gpu and m.platform == "cuda":
    out.append(Check("platform", "fail", "mesh.platform='cuda' but no GPU " + (
        "in the simulated cluster" if env.simulated else "on this host"),
        "--gpus-per-host=N" if env.simulated else "run on a GPU host or --config.mesh.platform=''"))
  else:
    out.append(Check("platform", "ok", m.platform or "JAX's choice (CPU here)"))
  try:  # applied on every platform (devices.setup), so checked on every one
    frac = devices.memory_fraction(cfg)
  except devices.DeviceSetupError as e:
    return out + [Check("memory", "fail", str(e), "lower rollout.vllm.gpu_memory_utilization "
                        "or set mesh.memory_fraction in [0.05, 1)")]
  if not gpu:
    return out
  if env.simulated:
    out.append(Check("driver", "skip", f"each host needs an NVIDIA driver >= {MIN_DRIVER} "
                     "(torch 2.13 and jax[cuda13] are CUDA 13 builds)"))
  elif env.driver is None:
    out.append(Check("driver", "fail", "no NVIDIA driver found (/proc/driver/nvidia/version, "
                     "nvidia-smi)", "install the NVIDIA driver (>= 580)"))
  else:
    out.append(driver_check(env.driver, env.cuda_version))
  if v.colocate and frac + v.gpu_memory_utilization > MAX_COLOCATED:
    out.append(Check("memory", "fail", f"JAX {frac:g} + vLLM {v.gpu_memory_utilization:g} of "
                     f"each GPU > {MAX_COLOCATED}",
                     f"--config.mesh.memory_fraction={MAX_COLOCATED - 0.05 - v.gpu_memory_utilization:.2f}"
                     " (or 0: 0.9 minus vLLM's share)"))
  else:
    out.append(Check("memory", "ok", f"JAX {frac:g} of each GPU ({devices.fraction_reason(cfg)})"))
  if not v.colocate:
    jax_ids = devices.parse_ids("mesh.cuda_visible_devices", m.cuda_visible_devices)
    clash = sorted(set(jax_ids) & set(range(v.tensor_parallel_size)))
    if not jax_ids or clash:
      out.append(Check("engine GPUs", "fail", f"rollout.vllm.colocate=False: vLLM takes visible "
                       f"GPUs 0..{v.tensor_parallel_size - 1}, and JAX takes "
                       f"{m.cuda_visible_devices or 'every GPU'}",
                       "--config.mesh.cuda_visible_devices= the GPUs after vLLM's "
                       "(scripts/launch_gpu.sh sets it)"))
      return out
  engine = devices.engine_gpus(cfg)
  out.append(Check("engine GPUs", "ok", f"vLLM on GPU(s) {engine} of this process's host"
                   if engine else "vLLM on the first visible GPU(s)" + (
                       "" if per_host <= 1 else " (set mesh.local_device_ids per process)")))
  return out


def driver_check(driver: str, cuda_version: int | None) -> Check:
  """The kernel driver `driver` ("570.86.15"), or below MIN_DRIVER a user-mode driver that
  reports CUDA >= 13.0 (`cuda_version`, NVIDIA's forward-compatibility package)."""
  major = int(driver.split(".")[0])
  if major >= MIN_DRIVER:
    return Check("driver", "ok", f"NVIDIA {driver}")
  if cuda_version is not None and cuda_version >= MIN_CUDA:
    return Check("driver", "ok", f"NVIDIA {driver} with the forward-compatible user-mode driver "
                 f"of CUDA {cuda_version // 1000}.{cuda_version % 1000 // 10}")
  found = f", its libcuda reports CUDA {cuda_version // 1000}.{cuda_version % 1000 // 10}" if cuda_version else ""
  return Check("driver", "fail", f"NVIDIA {driver} (CUDA 13 needs >= {MIN_DRIVER}{found})",
               f"upgrade the NVIDIA driver to >= {MIN_DRIVER}, or install NVIDIA's CUDA 13 "
               "forward-compatibility package (cuda-compat-13-0) and put its dir first on "
               "LD_LIBRARY_PATH (docs/gpu.md)")


def heads_checks(cfg: RunConfig, tensor: int) -> list[Check]:
  """vLLM's tensor parallelism and the mesh's tensor axis against the model's attention
  heads and KV heads (from model.hf_config or model.path/config.json)."""
  hf = hf_config(cfg)
  if hf is None:
    return [Check("heads", "skip", "model size unknown (no model.hf_config or config.json)")]
  heads = int(hf["num_attention_heads"])
  kv = int(hf.get("num_key_value_heads") or heads)
  out = []
  tp = cfg.rollout.vllm.tensor_parallel_size
  # vLLM splits the query heads evenly and splits (or, for tp > kv, replicates) the KV heads.
  kv_ok = kv % tp == 0 if tp <= kv else tp % kv == 0
  if heads % tp or not kv_ok:
    good = [n for n in range(1, heads + 1) if heads % n == 0 and (kv % n == 0 if n <= kv else n % kv == 0)]
    out.append(Check("vLLM TP", "fail", f"rollout.vllm.tensor_parallel_size={tp} does not split "
                     f"the model's {heads} attention heads / {kv} KV heads evenly",
                     f"--config.rollout.vllm.tensor_parallel_size= one of {good}"))
  else:
    out.append(Check("vLLM TP", "ok", f"{tp} over {heads} heads / {kv} KV heads"))
  if tensor > 1 and (heads % tensor or kv % tensor):
    out.append(Check("mesh tensor", "fail", f"the mesh's tensor axis of {tensor} does not divide "
                     f"the model's {heads} heads / {kv} KV heads (those weights would be "
                     "replicated on every device)",
                     "set mesh.shape's tensor axis to a divisor of "
                     f"{math.gcd(heads, kv)} (e.g. --config.mesh.shape='(1,-1,1)')"))
  return out


def model_dir_check(cfg: RunConfig, env: Env) -> Check:
  """model.path is an HF model dir on this host: config.json, safetensors, and the same
  architecture as the preset's model.hf_config."""
  m = cfg.model
  if m.tiny_random:
    return Check("model dir", "ok", "model.tiny_random: built at start")
  fix_empty = ("--config.model.path=DIR, a local HF snapshot (config.json, *.safetensors, "
               "tokenizer); nothing is downloaded at run time")
  if env.simulated:
    return Check("model dir", "skip", f"each host needs the HF dir {m.path}" if m.path else
                 "each host needs the HF dir of --config.model.path")
  if not m.path:
    return Check("model dir", "fail", "model.path is empty", fix_empty)
  where = f"model.path={m.path!r} on host {socket.gethostname()}"
  d = Path(m.path)
  if not d.is_dir():
    return Check("model dir", "fail", f"{where}: not there",
                 f"copy the HF snapshot to {m.path} on this host (e.g. `hf download ORG/NAME "
                 f"--local-dir {m.path}`), or point --config.model.path at it")
  if not (d / "config.json").is_file() or not any(d.glob("*.safetensors")):
    return Check("model dir", "fail", f"{where}: no config.json or no *.safetensors: not an HF "
                 "model dir", "point --config.model.path at the dir holding config.json and "
                 "the *.safetensors files")
  if m.hf_config:
    try:
      local = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as e:
      return Check("model dir", "fail", f"{where}: config.json unreadable ({e})",
                   "replace config.json with the model's own")
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    diff = [f"{k} {local.get(k)} != {m.hf_config.get(k)}" for k in keys
            if local.get(k) != m.hf_config.get(k)]
    if diff:
      return Check("model dir", "fail", f"{where}: another model than the preset's ({', '.join(diff)})",
                   "use the preset made for this model (configs/), or the model it names")
  return Check("model dir", "ok", f"{m.path}")


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One row of nvidia-smi's GPU_QUERY."""
  index: int
  compute_mode: str
  used_mib: float
  total_mib: float


def parse_gpu_query(text: str) -> list[Gpu]:
  """Rows of `nvidia-smi --query-gpu=index,compute_mode,memory.used,memory.total
  --format=csv,noheader,nounits` ("0, Default, 1024, 81559"); unreadable rows are left out."""
  gpus = []
  for line in text.splitlines():
    parts = [p.strip() for p in line.split(",")]
    try:
      gpus.append(Gpu(int(parts[0]), parts[1], float(parts[2]), float(parts[3])))
    except (IndexError, ValueError):
      continue
  return gpus


def run_gpus(cfg: RunConfig, vars: Mapping[str, str], all_ids: list[int]
             ) -> tuple[list[int], list[int]]:
  """(JAX's, vLLM's) physical GPU indices for a run of `cfg` started here: JAX on
  mesh.local_device_ids / mesh.cuda_visible_devices (indices into CUDA_VISIBLE_DEVICES),
  vLLM on the first rollout.vllm.tensor_parallel_size of its GPUs."""
  cvd = vars.get("CUDA_VISIBLE_DEVICES")
  visible = all_ids
  if cvd is not None:
    try:
      visible = [int(x) for x in cvd.split(",") if x.strip()]
    except ValueError:  # GPU UUIDs: indices cannot be matched; check every GPU
      visible = all_ids
  m, v = cfg.mesh, cfg.rollout.vllm
  own = devices.parse_ids("mesh.local_device_ids", m.local_device_ids) or devices.parse_ids(
      "mesh.cuda_visible_devices", m.cuda_visible_devices)
  jax_ids = [visible[i] for i in own if i < len(visible)] if own else list(visible)
  if v.colocate:
    engine = jax_ids[:v.tensor_parallel_size]
  else:
    engine = [g for g in visible if g not in jax_ids][:v.tensor_parallel_size] or visible[:v.tensor_parallel_size]
  return jax_ids, engine


def compute_mode_check(cfg: RunConfig, gpus: list[Gpu], jax_ids: list[int],
                       engine_ids: list[int]) -> Check:
  """A GPU that the trainer and vLLM's engine core (two processes) share must admit several
  processes: EXCLUSIVE_PROCESS admits one; PROHIBITED none."""
  by_id = {g.index: g for g in gpus}
  bad = []
  for i in sorted(set(jax_ids) | set(engine_ids)):
    mode = by_id[i].compute_mode.replace(" ", "_").upper() if i in by_id else "DEFAULT"
    shared = i in jax_ids and i in engine_ids
    if mode == "PROHIBITED" or (mode.startswith("EXCLUSIVE") and shared):
      bad.append(f"GPU {i} {mode}")
  if bad:
    return Check("compute mode", "fail", f"{', '.join(bad)}: the trainer and vLLM's engine core "
                 "are two processes on one GPU (rollout.vllm.colocate=True)",
                 f"sudo nvidia-smi -i {','.join(b.split()[1] for b in bad)} -c DEFAULT, or give "
                 "vLLM GPUs of its own (scripts/launch_gpu.sh)")
  return Check("compute mode", "ok", ", ".join(
      f"GPU {g.index} {g.compute_mode}" for g in gpus if g.index in set(jax_ids) | set(engine_ids)))


def gpu_memory_check(cfg: RunConfig, gpus: list[Gpu], jax_ids: list[int],
                     engine_ids: list[int]) -> Check:
  """Memory that other processes (a judge started on the trainer's GPUs) already hold: JAX
  preallocates its share and vLLM refuses to start below its own."""
  frac = devices.memory_fraction(cfg)
  util = cfg.rollout.vllm.gpu_memory_utilization
  by_id = {g.index: g for g in gpus}
  short = []
  for i in sorted(set(jax_ids) | set(engine_ids)):
    if i not in by_id or by_id[i].total_mib <= 0:
      continue
    need = (frac if i in jax_ids else 0.0) + (util if i in engine_ids else 0.0)
    used = by_id[i].used_mib / by_id[i].total_mib
    if used + need > 1.0 - GPU_SLACK:
      short.append(f"GPU {i} has {by_id[i].used_mib / 1024:.1f} of "
                   f"{by_id[i].total_mib / 1024:.1f} GiB in use, this run needs {need:.2f} of it")
  if short:
    return Check("GPU memory", "fail", "; ".join(short) + " (another process: a judge?)",
                 "start the judge on GPUs the trainer does not use (JUDGE_GPUS / "
                 "CUDA_VISIBLE_DEVICES of the judge), or stop what holds them (nvidia-smi)")
  return Check("GPU memory", "ok", f"JAX on GPU(s) {jax_ids}, vLLM on {engine_ids}: free")


def build_tools_check(cc: str | None, python_headers: bool | None) -> Check:
  """Triton (vLLM's kernels) compiles a C launcher at run time: a C compiler and Python.h.
  `cc` None / `python_headers` None: not probed."""
  if cc is None and python_headers is None:
    return Check("build tools", "skip", "not probed")
  missing = ([] if cc or cc is None else ["a C compiler (gcc)"]) + (
      [] if python_headers or python_headers is None else ["the Python headers (Python.h)"])
  if missing:
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    return Check("build tools", "fail", f"no {' and no '.join(missing)}: Triton compiles "
                 "vLLM's kernels at run time and the engine fails mid-start",
                 f"apt-get install gcc python{v}-dev (or your distribution's packages), or "
                 "set CC")
  return Check("build tools", "ok", f"{cc or 'C compiler not probed'}, Python.h")


def _gpu_host_checks(cfg: RunConfig, env: Env) -> list[Check]:
  """Checks that read this GPU host: build tools, compute mode, memory other processes hold."""
  if env.simulated:
    return [Check("GPU host", "skip", "each host needs gcc and the Python headers (Triton), "
                  "GPUs in compute mode DEFAULT, and its GPUs free of other processes")]
  out = [build_tools_check(env.c_compiler, env.python_headers)]
  gpus = parse_gpu_query(env.gpu_query or "")
  if not gpus:
    return out + [Check("compute mode", "skip", "nvidia-smi gave no GPU rows")]
  jax_ids, engine_ids = run_gpus(cfg, env.vars, [g.index for g in gpus])
  out.append(compute_mode_check(cfg, gpus, jax_ids, engine_ids))
  out.append(gpu_memory_check(cfg, gpus, jax_ids, engine_ids))
  return out


def _importable(module: str) -> bool:
  try:
    importlib.import_module(module)
    return True
  except ImportError:
    return False


def optional_packages_checks(cfg: RunConfig) -> list[Check]:
  """The optional packages the config asks for are installed: wandb for
  logging.wandb_project, tensorflow-datasets for data.tfds_name."""
  out = []
  for key, value, module, package in (
      ("logging.wandb_project", cfg.logging.wandb_project, "wandb", "wandb"),
      ("data.tfds_name", cfg.data.tfds_name, "tensorflow_datasets", "tensorflow-datasets")):
    if not value:
      continue
    if _importable(module):
      out.append(Check(package, "ok", f"{key}={value!r}: {package} installed"))
    else:
      out.append(Check(package, "fail", f"{key}={value!r} needs the optional package {package}, "
                       "which is not installed",
                       f"pip install {package} (requirements-gpu.txt pins it), or {key}=''"))
  return out


def _sync_check(cfg: RunConfig, env: Env, gpu: bool) -> Check:
  hf = hf_config(cfg)
  v = cfg.rollout.vllm
  if hf is None:
    return Check("sync dir", "skip", "model size unknown (no model.hf_config or config.json)")
  size = param_count(hf) * (2 if v.dtype in ("bfloat16", "float16") else 4)
  need = size + v.sync_headroom_gib * GIB
  what = f"{size / GIB:.2f} GiB per sync + {v.sync_headroom_gib:g} GiB headroom"
  if env.simulated:
    return Check("sync dir", "skip", f"each host needs {what} on {v.sync_dir or '/dev/shm'}" + (
        " (give containers --shm-size)" if gpu else ""))
  free = list(env.sync_free.items())
  if free and free[0][1] >= need:
    return Check("sync dir", "ok", f"{what}; {free[0][0]} has {free[0][1] / GIB:.1f} GiB")
  if len(free) > 1 and free[1][1] >= need:
    return Check("sync dir", "ok", f"{what}: {free[0][0]} too small, syncs go to {free[1][0]} "
                 "(disk, slower)")
  where = ", ".join(f"{d} {b / GIB:.1f} GiB free" for d, b in free)
  return Check("sync dir", "fail", f"{what}, but {where}",
               "free space there, or point rollout.vllm.sync_dir / sync_fallback_dir at a "
               "larger dir (or lower rollout.vllm.sync_headroom_gib)")


# ----------------------------------------------------------------------------- report
def failures(checks: list[Check]) -> list[Check]:
  return [c for c in checks if c.status == "fail"]


def table(checks: list[Check]) -> str:
  """The checks as aligned rows, then one `fix:` line per failure."""
  w = max(len(c.name) for c in checks)
  rows = [f"{c.status.upper():<5} {c.name:<{w}}  {c.detail}" for c in checks]
  rows += [f"fix {c.name}: {c.fix}" for c in failures(checks)]
  return "\n".join(rows)


def _this_cluster(cfg: RunConfig) -> tuple[int, int]:
  """(hosts, GPUs per host) of a run started here with `cfg`."""
  gpus = devices.local_gpu_count()
  m = cfg.mesh
  procs = m.num_processes if m.distributed and m.num_processes > 0 else 1
  return max(1, procs // processes_per_host(cfg, gpus)), gpus


def require(cfg: Any) -> list[Check]:
  """The checks against this machine (what `train` runs first); PreflightError on a failure."""
  cfg = RunConfig.from_tree(cfg)
  cfg.need_files()  # a missing model dir or data file is named as it always was
  rewards.require_rule(cfg.rewards)
  checks = run_checks(cfg, *_this_cluster(cfg), probe(cfg))
  bad = failures(checks)
  if bad:
    raise PreflightError("; ".join(
        f"{c.name}: {c.detail}" + ("" if c.fix in ("", c.detail) else f" (fix: {c.fix})")
        for c in bad))
  return checks


def report(cfg: RunConfig) -> None:
  """`python -m pasr_jax.preflight`: the table of checks for the simulated cluster
  (`--hosts`/`--gpus-per-host`) or this machine; PreflightError (exit 2) if one fails."""
  f = flags.FLAGS
  if f["hosts"].present or f["gpus-per-host"].present:
    checks = run_checks(cfg, f["hosts"].value, f["gpus-per-host"].value,
                        Env(vars=dict(os.environ)))
  else:
    checks = run_checks(cfg, *_this_cluster(cfg), probe(cfg))
  print(table(checks), flush=True)
  bad = failures(checks)
  if bad:
    raise PreflightError(f"{len(bad)} of {len(checks)} checks failed; the fixes are above")


if __name__ == "__main__":
  flags.DEFINE_integer("hosts", 1, "Simulated cluster: hosts (one process each).")
  flags.DEFINE_integer("gpus-per-host", 0, "Simulated cluster: GPUs per host (0 = CPU).")
  cli.main("pasr_jax.preflight", report, tune_malloc=False)
