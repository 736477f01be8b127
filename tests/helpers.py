"""What several test modules share: paths, training-run subprocesses, the scripted sampler.

Test modules import from here (and `procs`), never from each other.

`ScriptedSampler` is the one test double of the vLLM sampler. vLLM's samples differ between
engines, so runs split over processes cannot be compared with a one-process run on real
rollouts, and run-level faults (a bad judge, NaN, a full disk) need no engine to be caused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import time
import warnings
from typing import Callable

import numpy as np
import pytest

from pasr_jax.rollout.base import Completion, EngineError, Group

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
# `python tests/scripted_train.py` is `python -m pasr_jax.train` with ScriptedSampler.
SCRIPTED_TRAIN = ROOT / "tests" / "scripted_train.py"


# ----------------------------------------------------------------------------- configs, data
# A system prompt short enough for the char-level tiny model to learn its layout in SFT.
SHORT_SYSTEM = "Think inside <think> </think>, then answer inside <answer> </answer>."


def load_preset(name: str):
  """`configs/<name>.py`'s `get_config()`."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def scripted_config(workdir, steps: int = 4, **over):
  """The tiny_cpu preset for an in-process run on the scripted sampler: `contains` accuracy
  on say_seven.jsonl, `steps` steps, no TensorBoard; then `over` (`section__key=value`)."""
  from pasr_jax.config import RunConfig  # pylint: disable=import-outside-toplevel
  tree = load_preset("tiny_cpu")
  tree.workdir = str(workdir)
  tree.rewards.accuracy_rule = "contains"
  tree.data.files = (str(DATA / "say_seven.jsonl"),)
  tree.logging.tensorboard = False
  tree.train.steps = steps
  for key, value in over.items():
    *parents, leaf = key.split("__")
    node = tree
    for part in parents:
      node = node[part]
    node[leaf] = value
  return RunConfig.from_tree(tree)


def sum_rows(n: int, seed: int = 0) -> list[dict]:
  """Short GSM8K-style rows: 'What is a+b?' with a `<<a+b=c>>` annotation and `#### c`."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    a, b = (int(x) for x in rng.integers(1, 10, 2))
    out.append({"id": i, "question": f"What is {a}+{b}?",
                "answer": f"{a}+{b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"})
  return out


def write_jsonl(path: pathlib.Path, recs: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  return str(path)


# ----------------------------------------------------------------------------- training runs
def env(**extra: str) -> dict[str, str]:
  """This process's environment (8 forced CPU devices, see conftest) with the repo importable."""
  e = dict(os.environ, **extra)
  e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
  return e


def train_cmd(workdir, judge_url: str, *overrides: str, scripted: bool = False) -> list[str]:
  """`python -m pasr_jax.train` on the tiny_cpu preset; `scripted`: with ScriptedSampler."""
  entry = [str(SCRIPTED_TRAIN)] if scripted else ["-m", "pasr_jax.train"]
  return [sys.executable, *entry, "--config=configs/tiny_cpu.py", f"--config.workdir={workdir}",
          f"--config.judge.base_url={judge_url}", *overrides]


def start_train(workdir, judge_url: str, *overrides: str, log=None,
                scripted: bool = False) -> subprocess.Popen:
  """The run in its own process group (so a test can kill the trainer and its engine)."""
  return subprocess.Popen(train_cmd(workdir, judge_url, *overrides, scripted=scripted),
                          cwd=ROOT, env=env(), stdout=log or subprocess.PIPE,
                          stderr=subprocess.STDOUT, start_new_session=True)


def run_train(workdir, judge_url: str, *overrides: str, timeout: float = 420,
              scripted: bool = False) -> str:
  """Runs to the end; asserts exit 0 and that no process of it is left; returns its output."""
  log_path = pathlib.Path(str(workdir) + ".log")
  with open(log_path, "w") as log:
    p = start_train(workdir, judge_url, *overrides, log=log, scripted=scripted)
    rc = p.wait(timeout)
  out = log_path.read_text(errors="replace")
  assert rc == 0, out[-4000:]
  assert_group_gone(p.pid)
  return out


def train_error_lines(stderr: str) -> list[str]:
  """The run's own error lines (`pasr_jax.train: <what>: <message>`)."""
  return [line for line in stderr.splitlines() if line.startswith("pasr_jax.train: ")]


def wait_for_step(workdir: pathlib.Path, proc: subprocess.Popen, step: int,
                  timeout_s: float = 420.0) -> None:
  """Until metrics.jsonl holds `step` lines; fails if the run ends first."""
  from pasr_jax import metrics
  path = workdir / "metrics.jsonl"
  deadline = time.time() + timeout_s
  while not (path.exists() and len(metrics.read_jsonl(str(path))) >= step):
    assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {step}"
    assert time.time() < deadline, f"no step {step} within {timeout_s} s"
    time.sleep(0.2)


def assert_group_gone(pgid: int, wait_s: float = 30.0) -> None:
  """No process of the run's group (trainer, vLLM engine core, judge child) is left."""
  deadline = time.time() + wait_s
  while time.time() < deadline:
    try:
      os.killpg(pgid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.5)
  os.killpg(pgid, signal.SIGKILL)
  pytest.fail(f"processes of run group {pgid} still alive {wait_s}s after it ended")


def read_state(step_dir) -> dict:
  """A checkpoint step's arrays as Orbax restores them (no target)."""
  import orbax.checkpoint as ocp
  with ocp.PyTreeCheckpointer() as ck:
    return ck.restore(pathlib.Path(step_dir) / "state")


def read_meta(step_dir) -> dict:
  """A checkpoint step's RunState and config (JSON)."""
  return json.loads((pathlib.Path(step_dir) / "meta" / "metadata").read_text())


def is_engine_core(proc) -> bool:
  """A vLLM engine core process (vLLM titles it `VLLM::EngineCore`)."""
  try:
    return "EngineCore" in " ".join(proc.cmdline()) + proc.name()
  except Exception:  # it ended meanwhile  # pylint: disable=broad-except
    return False


def kill_engine(trainer) -> list[int]:
  """SIGKILLs the engine cores among `trainer`'s (a psutil.Process) descendants; their pids."""
  cores = [c for c in trainer.children(recursive=True) if is_engine_core(c)]
  for c in cores:
    c.kill()
  return [c.pid for c in cores]


def kill_engine_at_a_publish(sync_dir: pathlib.Path, trainer, at: str,
                             timeout_s: float = 300.0, whole_run: bool = False) -> str:
  """Polls a run's sync dir until a version is being written (`at`="start": the reload
  follows) or until one has been written, loaded and removed (`at`="end": a run sampling
  ahead generates at once); then the trainer (a psutil.Process) is stopped (SIGSTOP), its
  engine core killed, and the trainer continued. `whole_run`: instead, the trainer's process
  group (trainer and engine) is SIGKILLed while stopped, a crash in the middle of the publish.
  Returns the name of the dir it saw."""
  deadline, seen = time.monotonic() + timeout_s, None
  while time.monotonic() < deadline:
    names = os.listdir(sync_dir) if sync_dir.is_dir() else []
    seen = seen or (names[0] if names else None)
    if (at == "start" and names) or (at == "end" and seen and not names):
      trainer.suspend()
      if whole_run:
        if not os.listdir(sync_dir):  # the publish ended before the stop: wait for the next
          trainer.resume()
          continue
        os.killpg(trainer.pid, signal.SIGKILL)
        return seen
      try:
        assert kill_engine(trainer), "no engine core to kill"
      finally:
        trainer.resume()
      return seen
    time.sleep(0.0005)
  raise AssertionError(f"no publish into {sync_dir} within {timeout_s} s")


# ----------------------------------------------------------------------------- scripted sampler
def seven_or_three(prompt_index: int, question: str, k: int) -> str:
  """A question holding "SAME" gets n identical answers (a zero-variance group); any other
  gets answers alternating between "7" (sample 0, 2, ...) and "3"."""
  del prompt_index
  return "<answer>3</answer>" if "SAME" in question or k % 2 else "<answer>7</answer>"


class ScriptedSampler:
  """A `Sampler` whose k-th completion of prompt i is `answer(i, question, k)`, the same on
  any host. Token ids come from `tokenizer` and end with `<|im_end|>`; the "sampler
  logprobs" are fixed numbers. `sync` gathers the weights exactly as the vLLM sampler does
  (`hf_tensors`, one copy per host) and keeps their sum per sync in `weight_sums`.

  Of the sampler it implements the `Sampler` protocol and nothing more (no `llm`), so a run
  that reaches past the protocol fails here. `delay(call_index)` (seconds, default none) is
  waited at the start of every `generate`, ended like the vLLM sampler's wait by
  `should_stop` (EngineError): a slow engine's timing, never its samples; `load_delay(i)`
  likewise at the start of the i-th weight load."""

  def __init__(self, tokenizer, answer: Callable[[int, str, int], str] = seven_or_three,
               version: int = 0, delay: Callable[[int], float] | None = None,
               load_delay: Callable[[int], float] | None = None):
    self.tok, self.answer, self.delay, self.load_delay = tokenizer, answer, delay, load_delay
    self.should_stop: Callable[[], bool] = lambda: False
    self.started = 0   # start() calls
    self._version = version
    self.calls: list[list[list[int]]] = []   # the prompts of each generate call
    self.weight_sums: list[float] = []

  @classmethod
  def for_model_dir(cls, model_dir: str) -> ScriptedSampler:
    from transformers import AutoTokenizer
    return cls(AutoTokenizer.from_pretrained(model_dir))

  @property
  def policy_version(self) -> int:
    return self._version

  @property
  def needs_sync(self) -> bool:
    return False

  def start(self) -> None:
    self.started += 1

  def generate(self, prompt_token_ids, n, temperature=1.0, top_p=1.0, max_tokens=64,
               stop_token_ids=None, seed=None) -> list[Group]:
    del temperature, top_p, stop_token_ids, seed
    if self.delay is not None:  # polls should_stop as the vLLM sampler's wait does
      end = time.monotonic() + self.delay(len(self.calls))
      while time.monotonic() < end:
        if self.should_stop():
          raise EngineError("scripted generate: interrupted (SIGTERM/SIGINT)")
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
    self.calls.append([list(ids) for ids in prompt_token_ids])
    eos = self.tok.convert_tokens_to_ids("<|im_end|>")
    groups = []
    for i, ids in enumerate(prompt_token_ids):
      question = self.tok.decode(ids).rsplit("<|im_start|>user", 1)[-1]
      comps = []
      for k in range(n):
        text = self.answer(i, question, k)
        tokens = list(self.tok(text, add_special_tokens=False)["input_ids"])[:max_tokens - 1]
        tokens.append(eos)
        comps.append(Completion(token_ids=tokens, logprobs=[-0.5 - 0.01 * j for j in
                                                            range(len(tokens))],
                                text=text, finish_reason="stop", policy_version=self._version))
      groups.append(Group(prompt_token_ids=list(ids), completions=comps))
    return groups

  def sync(self, model, version: int) -> dict[str, float]:
    return self.load(self.snapshot(model), version)

  def snapshot(self, model) -> float:
    from pasr_jax.models.hf import hf_tensors
    return sum(float(np.asarray(x, np.float64).sum()) for _, x in hf_tensors(model, model.cfg))

  def load(self, snapshot: float, version: int) -> dict[str, float]:
    if self.load_delay is not None:  # a slow publish (not ended by should_stop: a reload)
      time.sleep(self.load_delay(len(self.weight_sums)))
    self.weight_sums.append(snapshot)
    self._version = version
    return {"total_s": 0.0}

  def close(self) -> None:
    pass


# ----------------------------------------------------------------------------- W&B files
def read_wandb_run(run_dir: pathlib.Path) -> dict:
  """What an offline W&B run (`<dir>/wandb/offline-run-*`) recorded: {"name", "project",
  "config" (without W&B's own keys), "history" (one dict per `log` call)}.

  wandb 0.31 has no reader of its own for the `run-<id>.wandb` file any more; the file is a
  LevelDB-style log (a 7-byte header, 32 KiB blocks, records of a 7-byte header [crc32,
  length, type: full, first, middle, last] and a protobuf `Record`)."""
  import struct

  from wandb.proto import wandb_internal_pb2 as pb
  (path,) = run_dir.glob("run-*.wandb")
  data = path.read_bytes()
  assert data[:4] == b":W&B", path
  out: dict = {"config": {}, "history": []}
  pos, buf = 7, b""
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    buf += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind not in (1, 4):  # first / middle chunk of a record spanning blocks
      continue
    rec = pb.Record()
    rec.ParseFromString(buf)
    buf = b""
    what = rec.WhichOneof("record_type")
    if what == "run":
      out["name"], out["project"] = rec.run.display_name, rec.run.project
      out["config"].update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
    elif what == "config":
      out["config"].update({u.key: json.loads(u.value_json) for u in rec.config.update})
    elif what == "history":
      out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in rec.history.item})
  out["config"].pop("_wandb", None)
  return out


# ----------------------------------------------------------------------------- commands in-process
@contextlib.contextmanager
def command_flags():
  """Around a `pasr_jax.cli.main` call in this process: afterwards absl's flags, the
  command-line layer's `--config` and the root logger are as before, so the next command
  defines its own."""
  from absl import flags

  from pasr_jax import cli
  # pylint: disable-next=protected-access
  assert not cli._HOLDERS, "a command's --config flag is still defined"
  had = set(flags.FLAGS)
  root = logging.getLogger()
  handlers, level = list(root.handlers), root.level
  try:
    yield
  finally:
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in set(flags.FLAGS) - had:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    cli._HOLDERS.clear()  # pylint: disable=protected-access


def run_command(module: str, *args: str,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` run in this process: what `subprocess.run(..., text=True,
  capture_output=True)` would give (returncode, stdout, stderr).

  For what a command does before its work starts (flags, config, preflight, the one-line
  errors and their exit codes): a subprocess would spend its time importing JAX, torch and
  vLLM again. The module's real `__main__` block runs (a `pasr_jax.cli.main` command or an
  argparse one); `env` is set for the call. A bug (an exception the command lets through)
  propagates to the test, as it would end the process with its traceback. Not for what
  depends on a fresh process (settings read before JAX is imported)."""
  saved_argv, saved_env = sys.argv, dict(os.environ)
  os.environ.update(env or {})
  sys.argv = [f"{module.replace('.', '/')}.py", *args]
  out, err, code = io.StringIO(), io.StringIO(), 0
  try:
    with command_flags(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
        warnings.catch_warnings():
      # runpy warns that the module is already imported: its `__main__` block runs anew.
      warnings.simplefilter("ignore", RuntimeWarning)
      runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    if isinstance(e.code, str):  # sys.exit("message"): printed, exit 1, as Python does
      err.write(e.code + "\n")
    code = e.code if isinstance(e.code, int) else (1 if e.code else 0)
  finally:
    sys.argv = saved_argv
    os.environ.clear()
    os.environ.update(saved_env)
  return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def train_in_process(workdir, judge_url: str, *overrides: str) -> subprocess.CompletedProcess:
  """`train_cmd`'s command (`python -m pasr_jax.train` on tiny_cpu) run by `run_command`: for
  runs that end before training starts (config, preflight, judge checks)."""
  return run_command("pasr_jax.train", *train_cmd(workdir, judge_url, *overrides)[3:])


def tiny_config(model_type: str, tie_word_embeddings: bool = True):
  """A random-init-sized ModelConfig of `model_type` (qwen2, qwen3, llama): 2 layers, hidden
  64, vocab 256, GQA 4/2; qwen3's head_dim (32) is not hidden / heads, as in Qwen3."""
  from pasr_jax.models.qwen import ModelConfig  # pylint: disable=import-outside-toplevel
  return ModelConfig(
      model_type=model_type, vocab_size=256, hidden_size=64, intermediate_size=128,
      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32 if model_type == "qwen3" else 16,
      rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
      attention_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
