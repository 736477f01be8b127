"""Preflight (pasr_jax.preflight): every mistake a config, mesh, cluster or environment can
cause is named, with its fix, before any weight loads; the paper presets pass on 1 and 2
nodes of 8 GPUs. The checks are pure functions of (config, hosts, GPUs, probed environment);
the command-line and train-command cases run the real commands (in the test process where the
check ends before JAX's backend starts; a subprocess where a fresh process matters).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import paper, qwen2_5_7b, qwen2_5_7b_base, qwen3_8b, smollm2_135m, tiny_cpu
from helpers import run_command
from pasr_jax import preflight
from pasr_jax.config import RunConfig
from pasr_jax.preflight import Env, run_checks

ROOT = Path(__file__).resolve().parents[1]
PAPER = {"qwen2_5_7b": qwen2_5_7b, "qwen2_5_7b_base": qwen2_5_7b_base, "qwen3_8b": qwen3_8b}


def _sim(**env) -> Env:
  return Env(vars=env)


def _failed(checks) -> dict[str, str]:
  return {c.name: c.fix for c in checks if c.status == "fail"}


def _with(cfg, **overrides):
  """`cfg` with `a__b=v` overrides (`--config.a.b=v`)."""
  cfg.update_from_flattened_dict({k.replace("__", "."): v for k, v in overrides.items()})
  return cfg


@pytest.mark.parametrize("hosts", [1, 2])
@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_presets_pass_on_1_and_2_nodes_of_8_gpus(name, hosts):
  cfg = PAPER[name].get_config(f"{hosts}x8")
  checks = run_checks(cfg, hosts, 8, _sim())
  assert not _failed(checks), preflight.table(checks)
  micro = next(c for c in checks if c.name == "micro-batch").detail
  # The original's 8 sequences per update on 8 GPUs; 16 (4 updates of 64 answers) on 16.
  assert micro.startswith("8 sequences (1/device), 8 per update, 8 update" if hosts == 1 else
                          "16 sequences (1/device), 16 per update, 4 update"), micro


def test_paper_preset_of_one_node_fails_on_two_naming_the_preset_argument():
  fixes = _failed(run_checks(qwen3_8b.get_config(), 2, 8, _sim()))
  assert "micro-batch" in fixes and "configs/<preset>.py:2x8" in fixes["micro-batch"], fixes


def test_paper_batch_sizes_keep_8_sequences_per_update_where_the_mesh_allows():
  assert [paper.batch_sizes(n) for n in (1, 2, 4, 8, 16, 32)] == [
      (8, 8), (8, 8), (8, 8), (8, 8), (16, 16), (32, 32)]
  with pytest.raises(ValueError, match="HOSTSxGPUS"):
    paper.cluster_devices("two nodes")


@pytest.mark.parametrize("overrides, hosts, gpus, check, fix", [
    # micro-batch vs batch shards: SmolLM2's 2 on 8 GPUs (issue #24 item 1)
    ({}, 1, 8, "micro-batch", "--config.optim.micro_batch=8"),
    ({"mesh__shape": (1, 3, 1)}, 1, 8, "mesh", "data*fsdp*tensor = 8"),
    ({"mesh__shape": (1, 1, -1)}, 2, 8, "batch vs processes", "span the hosts"),
    ({"rollout__prompts_per_step": 1}, 2, 8, "questions", "prompts_per_step=2"),
    ({"mesh__platform": ""}, 1, 8, "platform", "--config.mesh.platform=cuda"),
    ({"mesh__platform": "cuda"}, 1, 0, "platform", "--gpus-per-host"),
    ({"mesh__memory_fraction": 0.8}, 1, 8, "memory", "--config.mesh.memory_fraction=0.60"),
    ({"rollout__vllm__colocate": False}, 1, 8, "engine GPUs", "mesh.cuda_visible_devices"),
    ({"rollout__vllm__colocate": False, "mesh__cuda_visible_devices": "0,1,2"}, 1, 8,
     "engine GPUs", "mesh.cuda_visible_devices"),
    ({"mesh__local_device_ids": "0,1", "mesh__cuda_visible_devices": "2,3"}, 1, 8,
     "local devices", "only mesh.local_device_ids"),
    ({"judge__model": "Qwen3-32B", "judge__thinking": True}, 1, 8, "judge thinking",
     "--config.judge.thinking=False"),
    ({"mesh__local_device_ids": "0,1,2,3", "judge__autostart": True}, 1, 8, "judge",
     "one judge per host"),
    ({"judge__max_tokens": 16}, 1, 8, "judge reply", "--config.judge.max_tokens=512"),
])
def test_each_config_mistake_fails_naming_its_fix(overrides, hosts, gpus, check, fix):
  cfg = smollm2_135m.get_config() if check == "micro-batch" else qwen3_8b.get_config()
  fixes = _failed(run_checks(_with(cfg, **overrides), hosts, gpus, _sim()))
  assert check in fixes and fix in fixes[check], fixes


def _model_dir(tmp_path, hf) -> str:
  """An HF dir as preflight sees one: config.json and a safetensors file."""
  d = tmp_path / "model"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(hf))
  (d / "model.safetensors").write_bytes(b"")
  return str(d)


def test_environment_mistakes_fail_naming_their_fix(tmp_path):
  cfg = _with(qwen3_8b.get_config(), model__path=_model_dir(tmp_path, qwen3_8b.HF_CONFIG))
  conflict = _failed(run_checks(cfg, 1, 8, _sim(XLA_CLIENT_MEM_FRACTION="0.5")))
  assert "unset XLA_CLIENT_MEM_FRACTION" in conflict["env"], conflict
  real = dict(simulated=False, judge_answers=True, sync_free={"/dev/shm": 64 << 20,
                                                             "/tmp": 1 << 40})
  old = _failed(run_checks(cfg, 1, 8, Env(vars={}, driver="570.86.15", **real)))
  assert ">= 580" in old["driver"], old
  none = _failed(run_checks(cfg, 1, 8, Env(vars={}, driver=None, **real)))
  assert "install the NVIDIA driver" in none["driver"], none
  ok = run_checks(cfg, 1, 8, Env(vars={}, driver="580.65.06", **real))
  assert not _failed(ok), preflight.table(ok)
  sync = next(c for c in ok if c.name == "sync dir")
  assert "syncs go to /tmp" in sync.detail, sync  # 64 MB /dev/shm: the fallback dir
  full = _failed(run_checks(cfg, 1, 8, Env(vars={}, driver="580.65.06", **dict(
      real, sync_free={"/dev/shm": 1 << 30, "/tmp": 1 << 30}))))
  assert "sync_dir" in full["sync dir"], full
  silent = _failed(run_checks(cfg, 1, 8, Env(vars={}, driver="580.65.06", **dict(
      real, judge_answers=False))))
  assert "no judge answers" in silent["judge"], silent


def test_sizes_of_the_models_synced():
  assert round(preflight.param_count(qwen2_5_7b.HF_CONFIG) / 1e9, 2) == 7.62  # published size
  assert round(preflight.param_count(qwen3_8b.HF_CONFIG) / 1e9, 2) == 8.19


def _cli(*args):
  return run_command("pasr_jax.preflight", *args)


def test_command_prints_the_table_and_exits_0_or_2_with_the_fix():
  p = _cli("--config=configs/qwen2_5_7b.py:2x8", "--gpus-per-host=8", "--hosts=2")
  assert p.returncode == 0, p.stdout + p.stderr[-2000:]
  assert "OK    micro-batch" in p.stdout and "16 per update" in p.stdout, p.stdout
  p = _cli("--config=configs/smollm2_135m.py", "--gpus-per-host=8")
  assert p.returncode == 2, p.stdout + p.stderr[-2000:]
  assert "fix micro-batch: --config.optim.micro_batch=8" in p.stdout, p.stdout


def test_train_runs_the_checks_first(tmp_path):
  """The train command on this machine: a sync dir without room fails in seconds, exit 2,
  before the model or vLLM is touched (nothing is written to the workdir)."""
  wd = tmp_path / "run"
  p = run_command("pasr_jax.train", "--config=configs/tiny_cpu.py", f"--config.workdir={wd}",
                  "--config.judge.autostart=True", "--config.rollout.vllm.sync_headroom_gib=1000000")
  assert p.returncode == 2, p.stderr[-2000:]
  assert "sync dir:" in p.stderr and "sync_headroom_gib" in p.stderr, p.stderr[-2000:]
  assert not wd.exists()


def test_tiny_preset_passes_on_this_machine():
  cfg = _with(tiny_cpu.get_config(), judge__autostart=True)
  checks = run_checks(cfg, *preflight._this_cluster(preflight.RunConfig.from_tree(cfg)),
                      preflight.probe(cfg))
  assert not _failed(checks), preflight.table(checks)


def test_a_model_dir_without_a_chat_template_fails(tmp_path, smollm2_dir):
  """A base model's snapshot without a template (prompts are chats); the SmolLM2 dir has one."""
  import shutil as sh
  bare = tmp_path / "base"
  sh.copytree(smollm2_dir, bare)
  tok = bare / "tokenizer_config.json"
  d = __import__("json").loads(tok.read_text())
  d.pop("chat_template", None)
  tok.write_text(__import__("json").dumps(d))
  (bare / "chat_template.jinja").unlink(missing_ok=True)
  fixes = _failed(run_checks(_with(qwen2_5_7b_base.get_config(), model__path=str(bare)), 1, 8,
                             _sim()))
  assert "add a chat_template to" in fixes["chat template"], fixes
  ok = run_checks(_with(qwen2_5_7b_base.get_config(), model__path=str(smollm2_dir)), 1, 8, _sim())
  assert next(c for c in ok if c.name == "chat template").status == "ok"


def test_paper_training_length_is_the_originals_trained_sequences():
  # 3000 micro-steps x 2 sequences x 2 trainer processes / 64 answers per rollout batch.
  assert qwen3_8b.get_config().train.steps == 188


def test_each_process_on_a_host_gets_its_own_engine_gpu(monkeypatch):
  """Two processes of 4 GPUs on an 8-GPU host: each colocated engine on its first own GPU,
  through the process's CUDA_VISIBLE_DEVICES; the local GPUs passed to JAX explicitly."""
  from pasr_jax import devices
  from pasr_jax.config import RunConfig
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7,6,5,4,3,2,1,0")
  cfg = RunConfig.from_tree(_with(qwen3_8b.get_config(), mesh__local_device_ids="4,5,6,7"))
  assert devices.engine_gpus(cfg) == "3"
  assert devices.local_device_ids(cfg.mesh) == [4, 5, 6, 7]
  two = RunConfig.from_tree(_with(qwen3_8b.get_config(), mesh__local_device_ids="0,1,2,3",
                                  rollout__vllm__tensor_parallel_size=2))
  assert devices.engine_gpus(two) == "7,6"
  assert devices.local_device_ids(RunConfig.from_tree(qwen3_8b.get_config()).mesh) == list(range(8))
  alone = RunConfig.from_tree(_with(qwen3_8b.get_config(), rollout__vllm__colocate=False))
  assert devices.engine_gpus(alone) is None  # vLLM on GPUs of its own: the first visible ones
  checks = run_checks(cfg, 2, 8, _sim())
  assert "vLLM on GPU(s) 3" in next(c for c in checks if c.name == "engine GPUs").detail


def test_cuda_pinned_jax_never_falls_back_to_the_cpu():
  """mesh.platform=cuda on a host without a usable CUDA backend: JAX raises instead of running
  on the CPU (what a failed CUDA plugin otherwise does, with one log line); cpu pins the CPU."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("JAX_PLATFORMS", None)
  args = [sys.executable, "-m", "pasr_jax.devices", "--config=configs/tiny_cpu.py"]
  # Both processes at once: each spends its time importing JAX, on a core of its own.
  procs = {platform: subprocess.Popen(args + [f"--config.mesh.platform={platform}"], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
           for platform in ("cuda", "cpu")}
  try:
    out = {platform: p.communicate(timeout=300) + (p.returncode,)
           for platform, p in procs.items()}
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
  stdout, stderr, rc = out["cuda"]
  assert rc != 0 and '"backend": "cpu"' not in stdout, stdout + stderr[-2000:]
  stdout, stderr, rc = out["cpu"]
  assert rc == 0 and '"backend": "cpu"' in stdout and '"platform": "cpu"' in stdout, (
      stdout + stderr[-2000:])


def test_train_refuses_both_memory_fraction_variables(tmp_path):
  p = run_command("pasr_jax.train", "--config=configs/tiny_cpu.py",
                  f"--config.workdir={tmp_path / 'w'}", "--config.judge.autostart=True",
                  env={"XLA_CLIENT_MEM_FRACTION": "0.5"})
  assert p.returncode == 2 and "unset XLA_CLIENT_MEM_FRACTION" in p.stderr, p.stderr[-2000:]


# ---- checks that read a GPU host. No GPU here: each decision function is tested on the real
# inputs it reads there (nvidia-smi's CSV, the driver strings, cuDriverGetVersion's integer).

# `nvidia-smi --query-gpu=index,compute_mode,memory.used,memory.total --format=csv,noheader,nounits`
# on an 8 x H100 host whose GPU 0 is in EXCLUSIVE_PROCESS mode and GPUs 6, 7 serve a judge.
SMI = """0, Exclusive_Process, 4, 81559
1, Default, 4, 81559
2, Default, 4, 81559
3, Default, 4, 81559
4, Default, 4, 81559
5, Default, 4, 81559
6, Default, 73240, 81559
7, Default, 73240, 81559
"""


def test_driver_below_580_passes_only_with_a_forward_compatible_user_mode_driver():
  assert preflight.driver_check("580.65.06", None).status == "ok"
  fwd = preflight.driver_check("570.86.15", 13000)  # cuda-compat-13-0 first on LD_LIBRARY_PATH
  assert fwd.status == "ok" and "forward-compatible" in fwd.detail and "CUDA 13.0" in fwd.detail
  old = preflight.driver_check("535.183.01", 12020)
  assert old.status == "fail" and "CUDA 12.2" in old.detail, old
  assert "cuda-compat-13-0" in old.fix and ">= 580" in old.fix
  assert preflight.driver_check("550.54.15", None).status == "fail"


def test_probes_of_this_host_give_what_the_checks_read():
  """This host has no NVIDIA driver: no libcuda, no nvidia-smi rows; the build tools probed."""
  env = preflight.probe(tiny_cpu.get_config())
  assert env.cuda_version is None and env.gpu_query is None
  assert env.c_compiler is not None and env.python_headers is not None
  assert preflight.cuda_driver_version() is None  # no libcuda.so.1 on this machine


@pytest.mark.parametrize("tp, ok", [(1, True), (2, True), (4, True), (28, True), (3, False),
                                    (8, False), (7, False)])
def test_vllm_tensor_parallelism_must_split_heads_and_kv_heads(tp, ok):
  cfg = _with(qwen2_5_7b.get_config(), rollout__vllm__tensor_parallel_size=tp)  # 28 / 4 heads
  fixes = _failed(run_checks(cfg, 1, 8, _sim()))
  assert ("vLLM TP" not in fixes) == ok, fixes
  if not ok:
    assert "tensor_parallel_size= one of [1, 2, 4, 28]" in fixes["vLLM TP"], fixes


def test_mesh_tensor_axis_must_divide_heads_and_kv_heads():
  fixes = _failed(run_checks(_with(qwen2_5_7b.get_config(), mesh__shape=(1, 1, 8)), 1, 8, _sim()))
  assert "mesh tensor" in fixes and "divisor of 4" in fixes["mesh tensor"], fixes
  fixes = _failed(run_checks(_with(qwen2_5_7b.get_config(), mesh__shape=(1, 4, 2),
                                   optim__micro_batch=8), 1, 8, _sim()))
  assert "mesh tensor" not in fixes, fixes


def test_model_dir_is_checked_on_the_host_where_it_runs(tmp_path):
  real = dict(simulated=False, judge_answers=True, driver="580.65.06",
              sync_free={"/dev/shm": 1 << 40})
  cfg = qwen2_5_7b.get_config()
  gone = _failed(run_checks(_with(cfg, model__path=str(tmp_path / "nope")), 1, 8,
                            Env(vars={}, **real)))
  assert "not there" in preflight.model_dir_check(RunConfig.from_tree(_with(
      qwen2_5_7b.get_config(), model__path=str(tmp_path / "nope"))), Env({}, simulated=False)).detail
  assert "model dir" in gone and "hf download" in gone["model dir"], gone
  empty = tmp_path / "empty"
  empty.mkdir()
  fixes = _failed(run_checks(_with(qwen2_5_7b.get_config(), model__path=str(empty)), 1, 8,
                             Env(vars={}, **real)))
  assert "config.json" in fixes["model dir"], fixes
  other = _model_dir(tmp_path, qwen3_8b.HF_CONFIG)  # a Qwen3-8B dir under the Qwen2.5 preset
  check = preflight.model_dir_check(RunConfig.from_tree(_with(
      qwen2_5_7b.get_config(), model__path=other)), Env({}, simulated=False))
  assert check.status == "fail" and "another model" in check.detail, check
  assert "hidden_size 4096 != 3584" in check.detail, check
  sim = preflight.model_dir_check(RunConfig.from_tree(qwen2_5_7b.get_config()), _sim())
  assert sim.status == "skip"


def test_nvidia_smi_rows_are_parsed():
  gpus = preflight.parse_gpu_query(SMI + "garbage\n")
  assert len(gpus) == 8 and gpus[0] == preflight.Gpu(0, "Exclusive_Process", 4.0, 81559.0)


def test_exclusive_process_gpu_refuses_trainer_and_engine_together():
  gpus = preflight.parse_gpu_query(SMI)
  colocated = RunConfig.from_tree(qwen2_5_7b.get_config())
  jax_ids, engine = preflight.run_gpus(colocated, {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5"},
                                       [g.index for g in gpus])
  assert (jax_ids, engine) == ([0, 1, 2, 3, 4, 5], [0])
  check = preflight.compute_mode_check(colocated, gpus, jax_ids, engine)
  assert check.status == "fail" and "GPU 0 EXCLUSIVE_PROCESS" in check.detail, check
  assert "nvidia-smi -i 0 -c DEFAULT" in check.fix
  # launch_gpu.sh's split: vLLM on visible GPUs 0,1 (physical 4,5), JAX on 2.. (0..3): no GPU shared.
  split = RunConfig.from_tree(_with(qwen2_5_7b.get_config(), rollout__vllm__colocate=False,
                                    mesh__cuda_visible_devices="2,3,4,5",
                                    rollout__vllm__tensor_parallel_size=2))
  jax_ids, engine = preflight.run_gpus(split, {"CUDA_VISIBLE_DEVICES": "4,5,0,1,2,3"},
                                       [g.index for g in gpus])
  assert (jax_ids, engine) == ([0, 1, 2, 3], [4, 5])
  assert preflight.compute_mode_check(split, gpus, jax_ids, engine).status == "ok"
  prohibited = preflight.parse_gpu_query("0, Prohibited, 4, 81559\n")
  assert preflight.compute_mode_check(split, prohibited, [0], [1]).status == "fail"


def test_gpus_held_by_a_judge_are_refused_for_the_trainer():
  gpus = preflight.parse_gpu_query(SMI)
  cfg = RunConfig.from_tree(qwen2_5_7b.get_config())  # JAX 0.6 of every GPU, vLLM 0.3 of GPU 0
  check = preflight.gpu_memory_check(cfg, gpus, list(range(8)), [0])
  assert check.status == "fail" and "GPU 6 has 71.5 of 79.6 GiB in use" in check.detail, check
  assert "JUDGE_GPUS" in check.fix
  assert preflight.gpu_memory_check(cfg, gpus, list(range(6)), [0]).status == "ok"
  # The whole check on a probed host: judge on 6,7 and the trainer on every GPU.
  real = dict(simulated=False, judge_answers=True, driver="580.65.06", cuda_version=13000,
              sync_free={"/dev/shm": 1 << 40}, gpu_query=SMI.replace("Exclusive_Process", "Default"),
              c_compiler="/usr/bin/gcc", python_headers=True)
  fixes = _failed(run_checks(cfg, 1, 8, Env(vars={}, **real)))
  assert set(fixes) == {"GPU memory", "model dir"}, fixes


def test_build_tools_for_triton():
  assert preflight.build_tools_check("/usr/bin/gcc", True).status == "ok"
  no_cc = preflight.build_tools_check("", True)
  assert no_cc.status == "fail" and "gcc" in no_cc.fix and "C compiler" in no_cc.detail
  no_h = preflight.build_tools_check("/usr/bin/gcc", False)
  assert no_h.status == "fail" and "Python.h" in no_h.detail and "-dev" in no_h.fix
  assert preflight.build_tools_check(None, None).status == "skip"


def test_optional_packages_are_checked_before_the_run(monkeypatch):
  """wandb and tensorflow-datasets are installed here; their absence is caused for real by
  blocking the import (sys.modules[name] = None makes `import name` raise ImportError)."""
  cfg = _with(qwen2_5_7b.get_config(), logging__wandb_project="pasr", data__tfds_name="json_qa/x")
  checks = {c.name: c for c in run_checks(cfg, 1, 8, _sim())}
  assert checks["wandb"].status == "ok" and checks["tensorflow-datasets"].status == "ok"
  monkeypatch.setitem(sys.modules, "wandb", None)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  fixes = _failed(run_checks(cfg, 1, 8, _sim()))
  assert "pip install wandb" in fixes["wandb"], fixes
  assert "pip install tensorflow-datasets" in fixes["tensorflow-datasets"], fixes
  assert not {"wandb", "tensorflow-datasets"} & {c.name for c in run_checks(
      qwen2_5_7b.get_config(), 1, 8, _sim())}


def test_a_missing_wandb_is_one_line_naming_the_package(monkeypatch, tmp_path):
  """metrics.start_wandb without wandb installed (import blocked as above): a ConfigError
  (exit 2, one line) naming the package and the key, not an ImportError traceback."""
  from pasr_jax import metrics
  monkeypatch.setitem(sys.modules, "wandb", None)
  cfg = RunConfig.from_tree(_with(qwen2_5_7b.get_config(), logging__wandb_project="pasr"))
  with pytest.raises(preflight.ConfigError, match="needs the optional package wandb") as e:
    metrics.start_wandb(cfg.logging, {}, tmp_path)
  assert "\n" not in str(e.value)
