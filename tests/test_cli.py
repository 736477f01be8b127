"""The package's shape and its command-line layer (pasr_jax.cli): every module imports on its own,
the import graph has no cycle, no function runs past 80 lines, and the exit codes: a user
error is one line and exit 2, an internal invariant failure is a bug (its exception leaves
`cli.main`: a traceback and exit 1). The commands run in this process (helpers.run_command)."""

import ast
import graphlib
import importlib
import pathlib
import sys
import traceback

import pytest

from helpers import command_flags, run_command

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "pasr_jax"


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for p in sorted(PKG.rglob("*.py")):
    parts = p.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
  return out


def _imports(name: str, path: pathlib.Path, modules: dict[str, pathlib.Path]) -> set[str]:
  """The package modules `name` imports (anywhere in the file, lazily or not)."""
  pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative
        base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.add(sub if sub in modules else base)
  return {m for m in out if m in modules and m != name}


def test_import_graph_is_acyclic():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  assert graph["pasr_jax.build"] >= {"pasr_jax.cold_start", "pasr_jax.policy"}  # the parse works
  try:
    order = list(graphlib.TopologicalSorter(graph).static_order())
  except graphlib.CycleError as e:
    raise AssertionError(f"import cycle: {' -> '.join(e.args[1])}") from None
  assert set(order) == set(modules)
  # Library modules never reach up to a command or the command-line layer's users.
  for lib in ("pasr_jax.cold_start", "pasr_jax.sft", "pasr_jax.policy", "pasr_jax.trainer"):
    assert "pasr_jax.run" not in graph[lib] and "pasr_jax.train" not in graph[lib], lib


def test_every_module_imports_on_its_own():
  """Each module imported into a package emptied of every pasr_jax module first: nothing a
  previous import left in sys.modules (or as an attribute of the pasr_jax package) can hide a
  missing import or a cycle. Third-party modules stay cached, so it takes seconds; the
  session's own pasr_jax modules are put back afterwards."""
  from tensorflow_datasets.core import registered

  def ours():
    return {k: v for k, v in sys.modules.items() if k == "pasr_jax" or k.startswith("pasr_jax.")}

  session, failed = ours(), []
  try:
    # The TFDS builder, imported anew, must not collide with the session's registration.
    with registered.skip_registration():
      for name in _modules():
        for k in ours():
          del sys.modules[k]
        try:
          importlib.import_module(name)
        except BaseException:  # pylint: disable=broad-except
          failed.append(name + ":\n" + traceback.format_exc())
  finally:
    for k in ours():
      del sys.modules[k]
    sys.modules.update(session)
  assert not failed, "\n".join(failed)[-5000:]


def test_no_function_over_80_lines():
  long = []
  for path in PKG.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > 80:
          long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
  assert not long, long


def test_user_error_is_one_line_and_exit_2():
  p = run_command("pasr_jax.train", "--config=configs/smollm2_135m.py", "--config.optim.lr=-1")
  assert p.returncode == 2, p.stderr[-2000:]
  assert p.stderr.strip().splitlines() == [
      "pasr_jax.train: ConfigError: config optim.lr=-1.0: must be > 0 (a negative rate trains "
      "backwards)"], p.stderr[-2000:]


def test_internal_invariant_failure_is_a_bug_with_traceback(tmp_path, monkeypatch, capsys):
  """A real trainer on the tiny model handed a batch without its loss inputs: the internal
  invariant "batch is missing [...]" (run and sft always build whole batches) leaves
  `cli.main` as the exception itself (Python then prints its traceback and exits 1), not as
  a one-line user error."""
  import numpy as np

  from pasr_jax import cli, policy
  from pasr_jax.batch import Batch
  from pasr_jax.trainer import Trainer, TrainerError

  def broken(cfg):
    pol = policy.build_policy(cfg.model, cfg.mesh, policy.base_dir(cfg))
    trainer = Trainer(cfg.trainer_cfg(), pol.model, pol.config, pol.mesh)
    ids = np.ones((8, 8), np.int32)
    trainer.update(Batch(input_ids=ids, attention_mask=ids, positions=ids))

  monkeypatch.setattr(sys, "argv", ["pasr_jax/train.py", "--config=configs/tiny_cpu.py",
                                    f"--config.workdir={tmp_path}"])
  with command_flags(), pytest.raises(TrainerError, match="batch is missing"):
    cli.main("pasr_jax.train", broken)
  assert "pasr_jax.train: TrainerError" not in capsys.readouterr().err
