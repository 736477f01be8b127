"""`python -m pasr_jax.train` with `ScriptedSampler` in place of vLLM: no engine starts.

  python tests/scripted_train.py --config=configs/tiny_cpu.py [--config.x=y ...]

The whole command (flags, the run, exit codes, its one-line errors) is the real one; only
`Run.make_sampler` differs. Run-level faults that have nothing to do with the engine (a bad
judge, NaN updates, a full disk) are caused through it in seconds instead of minutes.
PASR_SCRIPTED_GENERATE_S=<seconds> makes every `generate` take that long (a slow engine).
"""

import os
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
  from helpers import ScriptedSampler
  from pasr_jax.run import Run
  seconds = float(os.environ.get("PASR_SCRIPTED_GENERATE_S", "0"))

  def make_sampler(self):
    sampler = ScriptedSampler.for_model_dir(self.model_dir)
    sampler.delay = (lambda call: seconds) if seconds > 0 else None
    return sampler

  Run.make_sampler = make_sampler
  runpy.run_module("pasr_jax.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
