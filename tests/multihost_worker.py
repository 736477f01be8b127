"""One process of a scripted training run (tests/test_multihost_run.py starts 1 or 2 of them).

  python tests/multihost_worker.py WORKDIR OUT_NPY [--config.x=y ...]

The tiny_cpu run of `pasr_jax.run.Run` with `ScriptedSampler` instead of vLLM; multi-host
when the overrides set mesh.distributed. Every process ends by gathering the final params
(a collective); process 0 saves them, flattened, to OUT_NPY, and every process the checksums
of the weights its sampler received to OUT_NPY.sync<process>.json.
PASR_SCRIPTED_GENERATE_S=<seconds> makes every `generate` take that long (a slow engine), so a
test can kill the processes between two steps.
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(workdir: str, out: str, overrides: list[str]) -> None:
  import jax
  import numpy as np
  from pasr_jax import cli, host_malloc, sharding
  from pasr_jax.config import RunConfig
  host_malloc.keep_freed_memory()  # as pasr_jax.cli.main does
  from pasr_jax.run import Run
  from helpers import ScriptedSampler

  argv = [sys.argv[0], f"--config={ROOT / 'configs' / 'tiny_cpu.py'}",
          f"--config.workdir={workdir}", *overrides]
  cli.parse_flags(argv)
  cfg = RunConfig.from_tree(cli.config())

  seconds = float(os.environ.get("PASR_SCRIPTED_GENERATE_S", "0"))

  class ScriptedRun(Run):
    def make_sampler(self):
      sampler = ScriptedSampler.for_model_dir(self.model_dir)
      sampler.delay = (lambda call: seconds) if seconds > 0 else None
      return sampler

  r = ScriptedRun(cfg)
  try:
    r.setup()
    r.resume()
    while not r.finished:
      r.step()
    r.finish()
    flat = np.concatenate([sharding.to_host(x).ravel()
                           for x in jax.tree.leaves(r.trainer.params)])
    if jax.process_index() == 0:
      np.save(out, flat)
    # The weights each sync gathered on this host (one checksum per sync).
    Path(f"{out}.sync{jax.process_index()}.json").write_text(json.dumps(r.sampler.weight_sums))
    print(f"[worker {jax.process_index()}] prompts {sum(map(len, r.sampler.calls))} "
          f"syncs {len(r.sampler.weight_sums)}", flush=True)
  finally:
    r.close()


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2], sys.argv[3:])
