"""The fast tier's guard (tests/conftest.py): a test that starts a vLLM engine without the
`slow` mark fails, whether the engine would start in the test's process, through the shared
engine fixture, or in a child process. Checked on an inner pytest session of three tests, run
in this process (pytester restores sys.modules after it)."""

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
def test_marked_slow_may():
  _engine_core_child()
'''


@pytest.fixture
def _no_engine_unless_slow():
  """The guard is off for the outer test: the inner tests' fake engine cores are its
  grandchildren (the inner session runs the guard itself)."""
  yield


def test_engines_only_in_tests_marked_slow(pytester, monkeypatch):
  monkeypatch.setenv("PYTHONPATH", f"{ROOT / 'tests'}:{ROOT}")
  pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
  pytester.makeini("[pytest]\nmarkers = slow: slow\n")
  pytester.makepyfile(test_inner=_INNER)
  res = pytester.runpytest_inprocess("-p", "no:cacheprovider")
  # test_child_process itself passes; the guard's failure is its teardown error.
  res.assert_outcomes(passed=2, failed=1, errors=2)
  out = res.stdout.str()
  assert "test_in_process starts a vLLM engine but is not marked @pytest.mark.slow" in out
  assert "test_engine_fixture uses vllm_sampler (a vLLM engine) but is not marked" in out
  assert "test_child_process started a vLLM engine core in a child process" in out
