"""The arithmetic task (pasr_jax/tasks/arith.py): seeded sets with held-out templates, and
cold-start traces that are well formed, end on the reference answer and, when they correct,
really fix a wrong intermediate value. Fast: no engine; the verify judge's grading code and
the data loader are the real ones."""

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from pasr_jax import answer_format, cold_start, rewards
from pasr_jax.config import ConfigError, RunConfig
from pasr_jax.data import load_rows
from pasr_jax.judge.verify import grade
from pasr_jax.tasks import arith

ROOT = pathlib.Path(__file__).resolve().parents[1]
HARD = arith.Difficulty(max_value=30, max_factor=5, min_ops=1, max_ops=3, ops="+-*/")


def _frames(template: str) -> list[int]:
  return [int(re.search(r"\d+$", part)[0]) for part in template.split("|")]


def test_sets_are_seeded_and_held_out_templates_never_train():
  a = arith.make_split(300, 7, HARD, held_out=False)
  assert a == arith.make_split(300, 7, HARD, held_out=False)
  assert a != arith.make_split(300, 8, HARD, held_out=False)
  test = arith.make_split(300, 7, HARD, held_out=True)
  assert all(set(_frames(r["template"])) <= set(arith.HELD_OUT) for r in test)
  assert not any(set(_frames(r["template"])) & set(arith.HELD_OUT) for r in a)
  assert not {r["template"] for r in a} & {r["template"] for r in test}
  assert not {r["question"] for r in a} & {r["question"] for r in test}
  # The knobs are used: every op occurs, 1..3 steps, each step's arithmetic is right.
  steps = [arith.parse_solution(r["answer"])[0] for r in a + test]
  assert {op for s in steps for _, op, _, _ in s} == set("+-*/")
  assert {len(s) for s in steps} == {1, 2, 3}
  assert all(arith._apply(x, op, y) == c and c >= 0 for s in steps for x, op, y, c in s)


def test_difficulty_knobs_bound_the_numbers():
  rows = arith.make_split(200, 0, arith.Difficulty(max_value=9, max_ops=1, ops="+"), False)
  for r in rows:
    (a, op, b, c), = arith.parse_solution(r["answer"])[0]
    assert op == "+" and 2 <= a <= 9 and 1 <= b <= 9


@pytest.mark.parametrize("kind", arith.TRACE_KINDS)
def test_every_trace_is_well_formed_and_ends_on_the_reference(kind):
  rows = arith.make_split(200, 3, HARD, held_out=False)
  for i, r in enumerate(rows):
    text = arith.trace(r["answer"], kind, np.random.default_rng(i))
    assert rewards.format_reward(text) == 1.0, text
    assert grade("general", r["question"], r["answer"], text) == 1.0, (r, text)
    assert answer_format.count_refines(text) == (kind != "plain")
  # The judge can say no: the same trace against another row's reference scores 0.
  text = arith.trace(rows[0]["answer"], kind, np.random.default_rng(0))
  other = next(r for r in rows if r["answer"].rsplit("####")[1] != rows[0]["answer"].rsplit("####")[1])
  assert grade("general", other["question"], other["answer"], text) == 0.0


def test_a_corrected_trace_holds_a_wrong_value_that_its_refine_fixes():
  eq = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
  for i, r in enumerate(arith.make_split(200, 5, HARD, held_out=False)):
    text = arith.trace(r["answer"], "correct", np.random.default_rng(i))
    before, rest = text.split("<refine>")
    inside, after = rest.split("</refine>")
    a, op, b, wrong = eq.findall(before)[-1]
    a2, op2, b2, fixed = eq.findall(inside)[0]
    assert (a, op, b) == (a2, op2, b2)
    right = arith._apply(int(a), op, int(b))
    assert int(wrong) != right and int(fixed) == right, text
    assert f"not {wrong}" in inside
    # The work after the refine goes on from the fixed value, not the wrong one.
    later = eq.findall(after)
    if later:
      assert int(later[0][0]) == right, text
    final = answer_format.extract_answer(text)
    assert final == r["answer"].rsplit("####", 1)[1].strip()


def test_a_confirming_trace_restates_a_right_step():
  r = arith.make_split(1, 0, HARD, held_out=False)[0]
  text = arith.trace(r["answer"], "confirm", np.random.default_rng(0))
  inside = text.split("<refine>")[1].split("</refine>")[0]
  a, op, b, c = re.search(r"(\d+) ([-+*/]) (\d+) = (\d+)", inside).groups()
  assert arith._apply(int(a), op, int(b)) == int(c) and "Correct" in inside


def test_cold_start_builds_arith_traces_in_the_configured_shares(tmp_path):
  rows = load_rows(str(_write(tmp_path / "rows.jsonl", arith.make_split(400, 1, HARD, False))))
  ts, stats = cold_start.build_set(rows, "sys", refine_fraction=0.25, seed=0, traces="arith",
                                   correct_fraction=0.5)
  assert stats["kept"] == 400 and len(ts) == 400
  assert 160 <= stats["correct"] <= 240 and 60 <= stats["confirm"] <= 140, stats
  assert stats["with_refine"] == stats["correct"] + stats["confirm"]
  assert sum("not " in t[2]["content"] for t in ts) == stats["correct"]
  # A row that is not the task's solution is named, in one line.
  gsm = load_rows(str(ROOT / "configs" / "data" / "gsm8k_train_64.jsonl"))
  with pytest.raises(cold_start.ColdStartError, match=r"traces='arith': row gsm8k_train_64"):
    cold_start.build_set(gsm, "sys", traces="arith")


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_cold_start_keys_are_checked():
  from configs.base import get_base_config
  for key, value, needle in (("traces", "gsm8k", "cold_start.traces='gsm8k': must be one of"),
                             ("correct_fraction", 0.3, "needs cold_start.traces='arith'")):
    c = get_base_config()
    c.cold_start[key] = value
    with pytest.raises(ConfigError, match=re.escape(needle)):
      RunConfig.from_tree(c)


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "pasr_jax.tasks.arith", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def test_command_writes_sets_the_loader_and_judge_read(tmp_path):
  p = _cli(f"--out={tmp_path}", "--n_train=50", "--n_test=20", "--seed=3", "--max_ops=3")
  assert p.returncode == 0, p.stderr
  train = load_rows(str(tmp_path / "train.jsonl"))
  test = load_rows(str(tmp_path / "test.jsonl"))
  assert (len(train), len(test)) == (50, 20)
  meta = json.loads((tmp_path / "meta.json").read_text())
  assert meta["seed"] == 3 and meta["max_ops"] == 3
  for r in test:
    final = r.answer.rsplit("####", 1)[1].strip()
    assert grade("general", r.question, r.answer, f"<answer> {final} </answer>") == 1.0


@pytest.mark.parametrize("flag,needle", [
    ("--ops=+x", "--ops=+x: must be distinct characters"),
    ("--max_ops=4", "--max_ops=4: must lie in [min_ops=1, 3]"),
    ("--n_test=0", "--n_test=0: must be >= 1"),
    ("--max_value=1", "--max_value=1: must be >= 2"),
    ("--n_train=abc", "argument --n_train: invalid int value: 'abc'"),
])
def test_command_bad_flags_fail_in_one_line(tmp_path, flag, needle):
  p = _cli(f"--out={tmp_path / 'o'}", flag)
  assert p.returncode == 2
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"python -m pasr_jax.tasks.arith: {needle}"), lines
  assert not (tmp_path / "o").exists()
