"""Where a training run keeps its files: the one place that names every path of a workdir.

`train`/`run` write there, `export` and the benchmarks read from there; nothing else joins
file names onto a workdir. In a multi-host run the workdir is on a filesystem every host
shares (Orbax writes each host's shards of a checkpoint into it; process 0 writes the rest).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Workdir:
  """The paths of one run's workdir (`root` is made absolute)."""
  root: Path

  def __init__(self, root: str | os.PathLike):
    object.__setattr__(self, "root", Path(os.path.abspath(root)))

  @property
  def config(self) -> Path:
    """The resolved config of the run (JSON), written at every start."""
    return self.root / "config.json"

  @property
  def checkpoints(self) -> Path:
    """Orbax steps `<n>/{state,meta}`."""
    return self.root / "checkpoints"

  @property
  def metrics(self) -> Path:
    """One JSON line of scalars per step."""
    return self.root / "metrics.jsonl"

  @property
  def rollouts(self) -> Path:
    """One JSON line per sampled answer."""
    return self.root / "rollouts.jsonl"

  @property
  def eval(self) -> Path:
    """One JSON line per greedy answer of the evaluation during training (eval.every)."""
    return self.root / "eval.jsonl"

  @property
  def tb(self) -> Path:
    """TensorBoard event files."""
    return self.root / "tb"

  @property
  def reward_curve(self) -> Path:
    return self.root / "reward_curve.png"

  @property
  def hf(self) -> Path:
    """The policy as an HF dir, written at the end when train.export is set."""
    return self.root / "hf"

  @property
  def tiny_model(self) -> Path:
    """The random tiny model that tiny_cpu (model.tiny_random) makes at the first start."""
    return self.root / "tiny_model"

  @property
  def judge_log(self) -> Path:
    """Output of the autostarted local judge (judge.autostart)."""
    return self.root / "judge.log"

  @property
  def cold_start(self) -> Path:
    """The format cold start's SFT workdir (cold_start.enabled)."""
    return self.root / "cold_start"

  @property
  def cold_start_hf(self) -> Path:
    """The cold start's HF dir: where PASR starts from when cold_start.enabled."""
    return self.cold_start / "hf"
