"""The tiers' guard (tests/conftest.py): a test that starts a vLLM engine without the `engine`
mark fails, whether the engine would start in the test's process, through the shared engine
fixture, or in a child process; `slow` alone is not enough (`make test` runs the slow tests
that are not `engine` beside the engine ones). `engine` implies `slow`. Checked on an inner
pytest session, run in this process (pytester restores sys.modules after it)."""

import pytest

from helpers import ROOT

pytest_plugins = ["pytester"]

_INNER = '''
import subprocess
import time

import pytest

from pasr_jax.rollout.vllm_sampler import VllmSampler
from pasr_jax.tiny import make_tiny_model_dir


def test_in_process(tmp_path):
  VllmSampler(make_tiny_model_dir(str(tmp_path / "m"))).llm


def test_engine_fixture(vllm_sampler):
  pass


def _engine_core_child():
  # A child titled like vLLM's engine core (what the guard looks for), without vLLM.
  p = subprocess.Popen(["bash", "-c", "exec -a VLLM::EngineCore sleep 30"])
  time.sleep(2.0)
  p.kill()
  p.wait()


def test_child_process():
  _engine_core_child()


@pytest.mark.slow
def test_marked_slow_only():
  _engine_core_child()


@pytest.mark.engine
def test_marked_engine_may():
  _engine_core_child()
'''


@pytest.fixture
def _no_engine_unless_marked():
  """The guard is off for the outer test: the inner tests' fake engine cores are its
  grandchildren (the inner session runs the guard itself)."""
  yield


def test_engines_only_in_tests_marked_engine(pytester, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'tests'}:{ROOT}")
  pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
  pytester.makeini("[pytest]\nmarkers =\n  slow: slow\n  engine: engine\n")
  pytester.makepyfile(test_inner=_INNER)
  res = pytester.runpytest_inprocess("-p", "no:cacheprovider")
  # test_child_process and test_marked_slow_only pass; the guard's failure is their teardown
  # error.
  res.assert_outcomes(passed=3, failed=1, errors=3)
  out = res.stdout.str()
  assert "test_in_process starts a vLLM engine but is not marked @pytest.mark.engine" in out
  assert "test_engine_fixture uses vllm_sampler (a vLLM engine) but is not marked" in out
  assert "test_child_process started a vLLM engine core in a child process" in out
  assert "test_marked_slow_only started a vLLM engine core in a child process" in out
  # `engine` implies `slow`: the fast tier leaves it out.
  fast = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "not slow",
                                       "--collect-only", "-q")  # a second in-process run
  # would import ml_dtypes twice
  assert "test_marked_engine_may" not in fast.stdout.str()
  assert "test_child_process" in fast.stdout.str()
