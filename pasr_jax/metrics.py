"""Writers for what a run reports: JSONL logs (metrics, rollouts), TensorBoard and Weights &
Biases scalars, a PNG.

JSONL logs are append-only. A checkpoint stores each log's byte size (`JsonlLog.tell()`); on
resume the log is cut back to that size, so records of steps that ran after the last checkpoint
(and are now re-run) appear exactly once.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from pasr_jax.config import ConfigError, LoggingCfg


class JsonlLog:
  """An append-only JSON-lines file, flushed after every append."""

  def __init__(self, path: str, truncate_to: int | None = None):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if truncate_to is not None and os.path.exists(path) and os.path.getsize(path) > truncate_to:
      # Drop records written after the checkpoint we resume from: those steps run again.
      os.truncate(path, truncate_to)
    self._f = open(path, "a", encoding="utf-8")

  def append(self, records: Iterable[Mapping[str, Any]]) -> None:
    self._f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    self._f.flush()

  def tell(self) -> int:
    """Bytes written so far (store it in a checkpoint)."""
    self._f.flush()
    return os.path.getsize(self.path)

  def close(self) -> None:
    self._f.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def format_scalars(step: int, scalars: Mapping[str, float], keys: Iterable[str]) -> str:
  """One stdout line with the chosen keys, e.g. `step 3 | reward 0.412 | t_step 5.1s`."""
  parts = [f"step {step}"]
  for k in keys:
    if k in scalars:
      v = scalars[k]
      parts.append(f"{k} {v:.1f}s" if k.startswith("time/") else f"{k} {v:.4g}")
  return " | ".join(parts)


def start_wandb(logging_cfg: LoggingCfg, config: Mapping[str, Any], root: str | os.PathLike):
  """A Weights & Biases run holding `config` (the resolved config), its files under
  `root`/wandb; None when `logging.wandb_project` is "" (off). Named after the workdir unless
  `logging.wandb_run_name` is set; each start of a run (a resume too) is a W&B run of its own."""
  if not logging_cfg.wandb_project:
    return None
  try:
    import wandb  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConfigError(f"config logging.wandb_project={logging_cfg.wandb_project!r} needs the "
                      "optional package wandb, which is not installed: `pip install wandb`, or "
                      "logging.wandb_project=''") from None
  try:
    return wandb.init(project=logging_cfg.wandb_project, mode=logging_cfg.wandb_mode,
                      name=logging_cfg.wandb_run_name or os.path.basename(os.path.abspath(root)),
                      dir=str(root), config=dict(config))
  except wandb.Error as e:  # online without a key, an unknown project/entity, ...
    raise ConfigError(f"config logging.wandb_project={logging_cfg.wandb_project!r} "
                      f"(logging.wandb_mode={logging_cfg.wandb_mode!r}): W&B did not start: "
                      f"{e}. Set WANDB_API_KEY, or logging.wandb_mode=offline") from None


class MetricsWriter:
  """Scalars to a JSONL log (`metrics_path`), with `tb_dir` to TensorBoard (tensorboardX),
  with `wandb_run` (`start_wandb`) to Weights & Biases, whose run it finishes on `close`."""

  def __init__(self, metrics_path: str | os.PathLike, tb_dir: str | os.PathLike | None = None,
               truncate_to: int | None = None, wandb_run=None):
    self.log = JsonlLog(str(metrics_path), truncate_to)
    self._tb = None
    if tb_dir is not None:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(str(tb_dir))
    self._wandb = wandb_run

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    clean = {k: float(v) for k, v in scalars.items()}
    self.log.append([{"step": step, **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}])
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(clean, step=step)

  def write_image(self, name: str, png: str | os.PathLike) -> None:
    """A figure (the reward curve) to Weights & Biases; the PNG itself stays where it is."""
    if self._wandb is not None:
      import wandb  # pylint: disable=import-outside-toplevel
      self._wandb.log({name: wandb.Image(str(png))})

  def close(self) -> None:
    self.log.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


# What a run shows of learning: per step, on one figure and in the end-of-run line.
LEARNING_KEYS = (("rate/format_ok", "format rate"), ("rate/refine", "refine rate"),
                 ("reward/accuracy", "accuracy"), ("len/pasr_mean", "answer length (tokens)"))


def learning_summary(metrics_path: str | os.PathLike) -> str:
  """'format rate a -> b | refine rate ... | accuracy ... | answer length ...': for each of
  LEARNING_KEYS the mean of the first two steps -> the mean of the last two (first -> last step
  with fewer than four; one step's rates move by 1/32 per answer, two halve that noise), plus
  the steps with a nonzero gradient."""
  rows = [r for r in read_jsonl(metrics_path) if r["step"] >= 1]  # not the eval before step 1
  parts = []
  for key, name in LEARNING_KEYS:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if vals:
      k = 2 if len(vals) >= 4 else 1
      a, b = sum(vals[:k]) / k, sum(vals[-k:]) / k
      parts.append(f"{name} {a:.3g} -> {b:.3g}")
  moved = sum(1 for r in rows if (r.get("train/grad_norm") or 0) > 0)
  parts.append(f"steps with train/grad_norm > 0: {moved} of {len(rows)}")
  span = "mean of the first two -> last two steps" if len(rows) >= 4 else "first -> last step"
  return (f"steps {rows[0]['step']}..{rows[-1]['step']} ({span}): " + " | ".join(parts)
          if rows else "")


def plot_reward_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> str:
  """Per step from metrics.jsonl: format rate, refine rate, accuracy and the mean reward
  (left axis) and the mean PASR answer length in tokens (right axis), on one PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib.ticker import MaxNLocator  # pylint: disable=import-outside-toplevel
  rows = read_jsonl(metrics_path)
  fig, ax = plt.subplots(figsize=(8, 4.5))
  right = ax.twinx()
  series = [(k, name, ax) for k, name in LEARNING_KEYS[:3]]
  series += [("reward/mean", "reward (mean)", ax), (*LEARNING_KEYS[3], right)]
  for i, (k, name, axis) in enumerate(series):
    pts = [(r["step"], r[k]) for r in rows if r.get(k) is not None]
    if pts:
      axis.plot(*zip(*pts), marker="o", markersize=3, label=name, color=f"C{i}",
                linestyle="--" if axis is right else "-")
  ax.set_xlabel("step")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
  ax.set_ylabel("rate / accuracy / reward")
  right.set_ylabel("answer length (tokens)")
  ax.grid(alpha=0.3)
  handles = ax.get_legend_handles_labels()
  more = right.get_legend_handles_labels()
  ax.legend(handles[0] + more[0], handles[1] + more[1], loc="best", fontsize=8)
  fig.tight_layout()
  fig.savefig(out_png, dpi=100)
  plt.close(fig)
  return str(out_png)
