"""The arithmetic task (pasr_jax/tasks/arith.py): seeded sets with held-out templates, and
cold-start traces that are well formed, end on the reference answer and, when they correct,
really fix a wrong intermediate value. Fast: no engine; the verify judge's grading code and
the data loader are the real ones."""

import json
import pathlib
import re

import numpy as np
import pytest

from pasr_jax import answer_format, cold_start, rewards
from pasr_jax.config import ConfigError, RunConfig
from pasr_jax.data import load_rows
from pasr_jax.judge.verify import grade
from pasr_jax.tasks import arith
from helpers import run_command

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


_EQ = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def _check_value(inside: str) -> int:
  """The value a refine block's check ends on: its last `= N` before `, not` / `. Correct`."""
  body = re.split(r", not \d+\.|\. Correct\.", inside)[0]
  return int(re.findall(r"= (\d+)", body)[-1])


def test_a_corrected_trace_holds_a_wrong_value_that_its_refine_fixes():
  for i, r in enumerate(arith.make_split(200, 5, HARD, held_out=False)):
    text = arith.trace(r["answer"], "correct", np.random.default_rng(i))
    before, rest = text.split("<refine>")
    inside, after = rest.split("</refine>")
    a, op, b, wrong = _EQ.findall(before)[-1]
    right = arith._apply(int(a), op, int(b))
    assert int(wrong) != right and _check_value(inside) == right, text
    assert inside.strip().endswith(f", not {wrong}.")
    # The work after the refine goes on from the fixed value, not the wrong one.
    later = _EQ.findall(after)
    if later:
      assert int(later[0][0]) == right, text
    final = answer_format.extract_answer(text)
    assert final == r["answer"].rsplit("####", 1)[1].strip()


def test_a_confirming_trace_checks_a_right_step_another_way():
  r = arith.make_split(1, 0, HARD, held_out=False)[0]
  text = arith.trace(r["answer"], "confirm", np.random.default_rng(0))
  inside = text.split("<refine>")[1].split("</refine>")[0]
  before = text.split("<refine>")[0]
  a, op, b, c = _EQ.findall(before)[-1]
  assert arith._apply(int(a), op, int(b)) == int(c) == _check_value(inside)
  assert "Correct" in inside and f"{a} {op} {b} = {c}" not in inside.split(",")[0]


@pytest.mark.parametrize("a,op,b,text", [
    (17, "+", 28, "17 + 20 + 8 = 37 + 8 = 45"),
    (17, "+", 8, "10 + 7 + 8 = 10 + 15 = 25"),
    (3, "+", 4, "7 - 4 = 3, so 3 + 4 = 7"),
    (45, "-", 17, "45 - 10 - 7 = 35 - 7 = 28"),
    (45, "-", 8, "37 + 8 = 45, so 45 - 8 = 37"),
    (17, "*", 4, "10 * 4 + 7 * 4 = 40 + 28 = 68"),
    (3, "*", 4, "3 + 3 + 3 + 3 = 12"),
    (68, "/", 4, "17 * 4 = 68, so 68 / 4 = 17"),
])
def test_the_check_computes_the_step_another_way(a, op, b, text):
  assert arith.check(a, op, b) == text


def test_every_check_is_right_and_never_the_step_itself():
  for a in range(0, 120):
    for op, bs in (("+", range(1, 21)), ("-", range(1, 21)), ("*", range(2, 5)),
                   ("/", range(2, 5))):
      for b in bs:
        if (op == "-" and b > a) or (op == "/" and a % b):
          continue
        c = arith._apply(a, op, b)
        text = arith.check(a, op, b)
        assert text.endswith(f"= {c}") and text.split(",")[0] != f"{a} {op} {b} = {c}"
        # Every side of the check's chain has one value (`/` only divides exactly here).
        sides = {eval(side) for side in text.split(",")[0].split("=")}  # noqa: S307
        assert len(sides) == 1, text


def test_slips_are_realistic_wrong_values():
  rng = np.random.default_rng(0)
  assert arith._no_carry(17, "+", 28) == 35 and arith._no_carry(45, "-", 17) == 32
  assert arith._no_carry(17, "*", 4) == 48 and arith._no_carry(12, "+", 3) is None
  for a, op, b in ((17, "+", 28), (5, "*", 4), (68, "/", 4), (3, "-", 2)):
    c = arith._apply(a, op, b)
    ws = {arith.slip(a, op, b, rng) for _ in range(50)}
    assert c not in ws and min(ws) >= 0
    assert ws <= {c - 10, c + 10, c - 1, c + 1, arith._no_carry(a, op, b)}, ws


def test_buckets_tag_rows_by_their_operations():
  rows = arith.make_split(300, 2, arith.Difficulty(), False, buckets=("easy", "medium", "hard"))
  assert [r["difficulty"] for r in rows[:3]] == ["easy", "medium", "hard"]
  for r in rows:
    steps = arith.parse_solution(r["answer"])[0]
    ops = [op for _, op, _, _ in steps]
    if r["difficulty"] == "easy":
      assert len(ops) == 1 and ops[0] in "+-" and all(x <= 20 and y <= 20 for x, _, y, _ in steps)
    elif r["difficulty"] == "medium":
      assert len(ops) == 2
    else:
      assert len(ops) == 3 and set(ops) & {"*", "/"}
  with pytest.raises(arith.ArithError, match="config buckets='easy,extreme': must be distinct"):
    arith.parse_buckets("easy,extreme")


def test_out_of_template_problems_share_no_sentence_frame_with_the_generator():
  oot = arith.make_split(200, 0, arith.Difficulty(), True, buckets=("easy", "medium", "hard"),
                         out_of_template=True)
  frames = {f.split("{")[0].strip() for fs in arith.FRAMES.values() for f in fs}
  for r in oot:
    assert all(p.startswith("oot-") for p in r["template"].split("|"))
    for sentence in re.split(r"(?<=[.?]) ", r["question"]):
      assert not any(fr and sentence.startswith(fr) and len(fr) > 4 for fr in frames), sentence
  # Every generator verb sentence is absent; the questions and answers still agree.
  assert all(arith.parse_solution(r["answer"]) for r in oot)
  test = arith.make_split(200, 0, arith.Difficulty(), True)
  assert not {r["question"] for r in oot} & {r["question"] for r in test}


def test_plain_trace_is_the_solution_without_tags():
  r = arith.make_split(1, 0, HARD, held_out=False)[0]
  text = arith.plain_trace(r["answer"])
  assert "<" not in text and text == r["answer"].strip()
  assert grade("general", r["question"], r["answer"], text) == 1.0


def test_cold_start_builds_arith_traces_in_the_configured_shares(tmp_path):
  rows = load_rows(str(_write(tmp_path / "rows.jsonl", arith.make_split(400, 1, HARD, False))))
  ts, stats = cold_start.build_set(rows, "sys", refine_fraction=0.25, seed=0, traces="arith",
                                   correct_fraction=0.5)
  assert stats["kept"] == 400 and len(ts) == 400
  assert 160 <= stats["correct"] <= 240 and 60 <= stats["confirm"] <= 140, stats
  assert stats["with_refine"] == stats["correct"] + stats["confirm"]
  assert sum(", not " in t[2]["content"] for t in ts) == stats["correct"]
  # Plain-prompt transcripts: the same solutions without tags, under the plain system prompt.
  ts, stats = cold_start.build_set(rows, "sys", refine_fraction=0.25, seed=0, traces="arith",
                                   correct_fraction=0.5, plain_fraction=0.5,
                                   plain_system="plain")
  plain = [t for t in ts if t[0]["content"] == "plain"]
  assert len(plain) == stats["plain_prompt"] and 160 <= len(plain) <= 240
  assert len(ts) == 400 + len(plain)
  by_q = {r.question: r.answer for r in rows}
  assert all(t[2]["content"] == by_q[t[1]["content"]].strip() for t in plain)
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
                             ("correct_fraction", 0.3, "needs cold_start.traces='arith'"),
                             ("plain_fraction", 0.3, "needs cold_start.traces='arith'")):
    c = get_base_config()
    c.cold_start[key] = value
    with pytest.raises(ConfigError, match=re.escape(needle)):
      RunConfig.from_tree(c)


def _cli(*args):
  """`python -m pasr_jax.tasks.arith ARGS`, run in this process (helpers.run_command)."""
  return run_command("pasr_jax.tasks.arith", *args)


def test_command_writes_sets_the_loader_and_judge_read(tmp_path):
  p = _cli(f"--config.out={tmp_path}", "--config.n_train=50", "--config.n_test=20",
           "--config.seed=3", "--config.difficulty.max_ops=3")
  assert p.returncode == 0, p.stderr
  train = load_rows(str(tmp_path / "train.jsonl"))
  test = load_rows(str(tmp_path / "test.jsonl"))
  assert (len(train), len(test)) == (50, 20)
  meta = json.loads((tmp_path / "meta.json").read_text())
  assert meta["seed"] == 3 and meta["max_ops"] == 3
  for r in test:
    final = r.answer.rsplit("####", 1)[1].strip()
    assert grade("general", r.question, r.answer, f"<answer> {final} </answer>") == 1.0
  assert not (tmp_path / "out_of_template.jsonl").exists()
  p = _cli(f"--config.out={tmp_path / 'b'}", "--config.n_train=30", "--config.n_test=12",
           "--config.buckets=easy,hard", "--config.n_out_of_template=9")
  assert p.returncode == 0, p.stderr
  oot = [json.loads(x) for x in (tmp_path / "b" / "out_of_template.jsonl").read_text().splitlines()]
  assert len(oot) == 9 and {r["difficulty"] for r in oot} == {"easy", "hard"}
  assert len(load_rows(str(tmp_path / "b" / "out_of_template.jsonl"))) == 9


@pytest.mark.parametrize("flag,needle", [
    ("--config.difficulty.ops=+x", "config difficulty.ops='+x': must be distinct characters"),
    ("--config.difficulty.max_ops=4", "config difficulty.max_ops=4: must lie in [min_ops=1, 3]"),
    ("--config.n_test=0", "config n_test=0: must be >= 1"),
    ("--config.difficulty.max_value=1", "config difficulty.max_value=1: must be >= 2"),
    ("--config.n_train=abc", "--config.n_train=abc: invalid literal for int()"),
    ("--config.buckets=easy,easy", "config buckets='easy,easy': must be distinct names"),
    ("--config.n_out_of_template=-1", "config n_out_of_template=-1: must be >= 0"),
    ("--config.max_ops=3", "unknown config key 'max_ops'; keys under (top level): buckets, "
     "difficulty,"),
])
def test_command_bad_flags_fail_in_one_line(tmp_path, flag, needle):
  p = _cli(f"--config.out={tmp_path / 'o'}", flag)
  assert p.returncode == 2
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("python -m pasr_jax.tasks.arith: "), lines
  assert needle in lines[0], lines
  assert not (tmp_path / "o").exists()
