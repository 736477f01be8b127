"""The `[train] learning:` line: means of the first two and the last two steps (one step of
32 answers moves a rate by 1/32 per answer), first -> last with fewer than four steps."""

import json

from pasr_jax.metrics import learning_summary


def _write(path, accs):
  path.write_text("".join(json.dumps({"step": i + 1, "reward/accuracy": a,
                                      "train/grad_norm": float(i % 2)}) + "\n"
                          for i, a in enumerate(accs)))
  return path


def test_means_of_the_first_and_last_two_steps(tmp_path):
  line = learning_summary(_write(tmp_path / "m.jsonl", [0.1, 0.3, 0.9, 0.0, 0.4, 0.6]))
  assert line.startswith("steps 1..6 (mean of the first two -> last two steps): ")
  assert "accuracy 0.2 -> 0.5 |" in line
  assert line.endswith("steps with train/grad_norm > 0: 3 of 6")


def test_first_to_last_with_fewer_than_four_steps(tmp_path):
  line = learning_summary(_write(tmp_path / "m.jsonl", [0.1, 0.3, 0.7]))
  assert "(first -> last step)" in line and "accuracy 0.1 -> 0.7 |" in line
