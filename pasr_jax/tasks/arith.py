"""Generated integer arithmetic word problems, and their cold-start traces in the PASR layout.

Why: SmolLM2-135M scores ~4 % on GSM8K, so PASR's refine reward (accuracy against the
baseline's mean) is almost never +1 there. Here the difficulty is a knob (number range, count
and mix of operations), tuned so that the cold-started model is right on roughly a third to a
half of the held-out items.

A problem is a start sentence, 1-3 operation sentences and a question, each drawn from a list
of sentence frames. The last two frames of every list are held out: test problems use only
those, training problems never do, and the two sets use different seeds. A held-out frame is a
new sentence around a verb the training frames use ("After that, she sells 4 of them." vs
"She sells 4 stickers."): what is held out is the wording, not the arithmetic's vocabulary.
(Held-out frames with new verbs, "hands 5 to a neighbour" for -, left the cold-started 135M
model at 3 % in the pilot: it cannot map an unseen verb to an operation.) Rows are JSONL with
`question` and a GSM8K-style `answer` (one `a op b = c` line per step, then `#### c`), which
the data loader and the `verify` judge read unchanged; `template` names the frames used.

Difficulty buckets (`--config.buckets=easy,medium,hard`): each row is drawn from one bucket in turn
and tagged with it (`difficulty`): easy = 1 operation of + or - on numbers <= 20, medium = 2
operations of + - * /, hard = 3 operations with at least one * or /. The out-of-template set
(`--config.n_out_of_template=N`) is phrased from OOT_FRAMES, sentence templates written apart from
FRAMES (other sentence shapes and verbs), as a new user might phrase the same problems: a gain
there is a gain in solving, not in familiarity with the generator's wording.

The cold-start traces re-check a step with a different computation than the step itself
(`check`): a split into tens and ones (`17 * 4` as `10 * 4 + 7 * 4 = 40 + 28 = 68`), or the
inverse operation (`68 / 4 = 17` as `17 * 4 = 68`); a correcting trace first makes a realistic
slip (a lost carry or borrow, off by ten, off by one) that its check then fixes.
`plain_trace` is the same solution without tags, for the plain prompt (the baseline).

  python -m pasr_jax.tasks.arith --config.out=DIR [--config.n_train=2000] [--config.n_test=400] \\
      [--config.seed=0] [--config.difficulty.max_value=20] [--config.difficulty.max_factor=4] \\
      [--config.difficulty.min_ops=1] [--config.difficulty.max_ops=2] \\
      [--config.difficulty.ops=+-*/] [--config.buckets=easy,medium,hard] \\
      [--config.n_out_of_template=300]

writes DIR/train.jsonl, DIR/test.jsonl, [DIR/out_of_template.jsonl] and DIR/meta.json (the
command's settings). The keys: `ArithCfg`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from pasr_jax import answer_format, cli, errors
from pasr_jax.config import ConfigError, Section, key, section

OPS = "+-*/"
TRACE_KINDS = ("plain", "confirm", "correct")
HELD_OUT = (4, 5)   # frame indices used only by test problems, in every frame list

NAMES = (("Mia", "f"), ("Tom", "m"), ("Ana", "f"), ("Leo", "m"), ("Zoe", "f"), ("Sam", "m"),
         ("Ivy", "f"), ("Max", "m"), ("Eva", "f"), ("Ben", "m"), ("Lily", "f"), ("Omar", "m"),
         ("Nora", "f"), ("Raj", "m"), ("Emma", "f"), ("Jack", "m"), ("Sara", "f"), ("Luis", "m"),
         ("Hana", "f"), ("Finn", "m"), ("Rosa", "f"), ("Kai", "m"), ("Ella", "f"), ("Noah", "m"))
ITEMS = ("apples", "stickers", "marbles", "coins", "books", "cookies", "pencils", "stamps",
         "cards", "shells", "beads", "eggs", "balloons", "candies", "toy cars", "flowers")

# Frames per sentence kind; {n} is the number, the rest name the person and the item.
FRAMES: dict[str, tuple[str, ...]] = {
    "start": ("{name} has {n} {item}.",
              "{name} starts the day with {n} {item}.",
              "There are {n} {item} in {name}'s box.",
              "{name} collected {n} {item}.",
              "In {name}'s bag there are {n} {item}.",
              "{name} has a pile of {n} {item}."),
    "+": ("{Pron} buys {n} more.",
          "{Pron} finds {n} more {item}.",
          "A friend gives {obj} {n} more {item}.",
          "{Pron} gets {n} more {item} as a gift.",
          "After that, {pron} buys {n} more {item}.",
          "Later, {name} finds {n} more of them."),
    "-": ("{Pron} gives away {n} of them.",
          "{Pron} loses {n} {item}.",
          "{Pron} sells {n} {item}.",
          "{Pron} uses {n} of the {item}.",
          "After that, {pron} sells {n} of them.",
          "Later, {name} loses {n} of the {item}."),
    "*": ("Then {pron} has {n} times as many {item} as before.",
          "The number of {item} grows {n} times.",
          "Each of {poss} {item} is traded for {n} new ones.",
          "{Pron} buys enough to have {n} times as many.",
          "After that, the number of {item} grows {n} times.",
          "Later, {name} has {n} times as many as before."),
    "/": ("{Pron} splits the {item} equally into {n} bags and keeps one bag.",
          "{Pron} divides the {item} into {n} equal groups and keeps one group.",
          "{Pron} packs them equally into {n} boxes and keeps one box.",
          "{Pron} splits them into {n} equal piles and keeps one pile.",
          "After that, {pron} splits them equally into {n} boxes and keeps one box.",
          "Later, {name} packs the {item} equally into {n} bags and keeps one bag."),
    "ask": ("How many {item} does {name} have now?",
            "How many {item} does {pron} have at the end?",
            "How many {item} are left?",
            "How many {item} does {name} end up with?",
            "How many {item} does {name} have after all this?",
            "How many {item} are there at the end?"),
}
# Out-of-template frames: written apart from FRAMES (other sentence shapes, other verbs), used
# only by the out-of-template set.
OOT_FRAMES: dict[str, tuple[str, ...]] = {
    "start": ("A jar on {name}'s shelf holds {n} {item}.",
              "At the start of the week, {name} counts {n} {item}.",
              "{name} owns exactly {n} {item}."),
    "+": ("{n} more {item} arrive in a parcel for {obj}.",
          "{Poss} aunt adds {n} {item} to the collection.",
          "The collection gains another {n}."),
    "-": ("{n} of the {item} get lost on the way home.",
          "{name} hands {n} {item} to a neighbour.",
          "The collection shrinks by {n}."),
    "*": ("The amount is multiplied by {n}.",
          "The collection becomes {n} times as big.",
          "Every one of the {item} is swapped for {n} of them."),
    "/": ("The {item} are shared equally by {n} friends, and {name} keeps one share.",
          "Only one of {n} equal parts of the {item} stays with {obj}.",
          "The collection is cut into {n} equal parts and {pron} keeps one part."),
    "ask": ("What number of {item} is left with {name} in the end?",
            "Count the {item} {name} finally has.",
            "So how many {item} remain?"),
}
_MAX_VALUE = 999    # intermediate values stay below this (a `*` that would pass it is not drawn)

_STEP = re.compile(r"^(\d+) ([-+*/]) (\d+) = (\d+)$")


class ArithError(errors.UserError):
  """A bad generator setting or a solution that is not this task's (the message says which)."""


@dataclasses.dataclass(frozen=True)
class Difficulty(Section):
  """The knobs: operands of + and - and start values in [1, max_value] (start >= 2), factors
  and divisors in [2, max_factor], min_ops..max_ops operations drawn from `ops`."""
  _key: ClassVar[str] = "difficulty"
  max_value: int = key(20, "operands of + and -, and start values, in [1, max_value]")
  max_factor: int = key(4, "factors and divisors in [2, max_factor]")
  min_ops: int = key(1, "fewest operations of a problem (1..3)")
  max_ops: int = key(2, "most operations of a problem (min_ops..3)")
  ops: str = key(OPS, "the operations drawn, distinct characters of +-*/")

  def check(self) -> None:
    self.need(self.max_value >= 2, "max_value", "must be >= 2")
    self.need(self.max_factor >= 2, "max_factor", "must be >= 2")
    self.need(1 <= self.min_ops <= 3, "min_ops", "must be 1, 2 or 3")
    self.need(self.min_ops <= self.max_ops <= 3, "max_ops",
              f"must lie in [min_ops={self.min_ops}, 3]")
    self.need(bool(self.ops) and set(self.ops) <= set(OPS)
              and len(set(self.ops)) == len(self.ops), "ops",
              f"must be distinct characters of {OPS!r}")


def _apply(a: int, op: str, b: int) -> int:
  return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _operand(cur: int, op: str, d: Difficulty, rng: np.random.Generator) -> int | None:
  """A number for `cur op n` that keeps every value a non-negative integer <= 999, or None."""
  if op == "+":
    n = int(rng.integers(1, d.max_value + 1))
    return n if cur + n <= _MAX_VALUE else None
  if op == "-":
    return int(rng.integers(1, min(cur, d.max_value) + 1)) if cur >= 1 else None
  if op == "*":
    fs = [f for f in range(2, d.max_factor + 1) if cur * f <= _MAX_VALUE]
    return int(rng.choice(fs)) if fs and cur >= 1 else None
  divs = [k for k in range(2, d.max_factor + 1) if cur and cur % k == 0]
  return int(rng.choice(divs)) if divs else None


def _sentence(kind: str, frame: int, person: tuple[str, str], item: str, n: int = 0,
              table: dict[str, tuple[str, ...]] = FRAMES) -> str:
  name, sex = person
  pron, obj, poss = ("she", "her", "her") if sex == "f" else ("he", "him", "his")
  return table[kind][frame].format(name=name, n=n, item=item, pron=pron, Pron=pron.title(),
                                    obj=obj, poss=poss, Poss=poss.title())


def make_problem(rng: np.random.Generator, d: Difficulty, held_out: bool,
                 out_of_template: bool = False) -> dict[str, str]:
  """One row: {question, answer, template}. Held-out problems use only the HELD_OUT frames,
  training problems only the others; out-of-template problems only OOT_FRAMES (their
  `template` parts start with `oot-`)."""
  table = OOT_FRAMES if out_of_template else FRAMES
  if out_of_template:
    frames = list(range(len(OOT_FRAMES["ask"])))
  else:
    frames = list(HELD_OUT) if held_out else [i for i in range(len(FRAMES["ask"]))
                                              if i not in HELD_OUT]
  tag = "oot-" if out_of_template else ""
  pick = lambda: int(rng.choice(frames))  # noqa: E731
  person = NAMES[int(rng.integers(len(NAMES)))]
  item = ITEMS[int(rng.integers(len(ITEMS)))]
  cur = int(rng.integers(2, d.max_value + 1))
  f0 = pick()
  sentences, lines = [_sentence("start", f0, person, item, cur, table)], []
  template = [f"{tag}start{f0}"]
  for _ in range(int(rng.integers(d.min_ops, d.max_ops + 1))):
    choices = [op for op in d.ops]
    while True:
      op = choices.pop(int(rng.integers(len(choices))))
      n = _operand(cur, op, d, rng)
      if n is not None or not choices:
        break
    if n is None:   # no op of the mix fits this value (e.g. only "/" of a prime): stop early
      break
    f = pick()
    new = _apply(cur, op, n)
    sentences.append(_sentence(op, f, person, item, n, table))
    lines.append(f"{cur} {op} {n} = {new}")
    template.append(f"{tag}{op}{f}")
    cur = new
  fq = pick()
  sentences.append(_sentence("ask", fq, person, item, table=table))
  template.append(f"{tag}ask{fq}")
  if not lines:   # a start value no op could use: say so in one line of work
    lines.append(f"{cur} + 0 = {cur}")
  return {"question": " ".join(sentences), "answer": "\n".join(lines) + f"\n#### {cur}",
          "template": "|".join(template)}


# The difficulty buckets: (knobs, whether a * or / must occur). Every bucket's problems have
# exactly its number of operations (a draw that stops early is drawn again).
BUCKETS: dict[str, tuple[Difficulty, bool]] = {
    "easy": (Difficulty(max_value=20, max_factor=4, min_ops=1, max_ops=1, ops="+-"), False),
    "medium": (Difficulty(max_value=20, max_factor=4, min_ops=2, max_ops=2, ops=OPS), False),
    "hard": (Difficulty(max_value=20, max_factor=4, min_ops=3, max_ops=3, ops=OPS), True),
}


def parse_buckets(spec: str) -> tuple[str, ...]:
  """`"easy,medium,hard"` -> ("easy", "medium", "hard"); "" -> () (no buckets)."""
  names = tuple(x.strip() for x in spec.split(",") if x.strip())
  bad = [x for x in names if x not in BUCKETS]
  if bad or len(set(names)) != len(names):
    raise ArithError(f"config buckets={spec!r}: must be distinct names of {', '.join(BUCKETS)}")
  return names


def _fits(row: dict[str, str], bucket: str) -> bool:
  d, muldiv = BUCKETS[bucket]
  steps = parse_solution(row["answer"])[0]
  ops = {op for _, op, _, _ in steps}
  return (len(steps) == d.min_ops and "+ 0 =" not in row["answer"]
          and (not muldiv or bool(ops & {"*", "/"})))


def make_split(n: int, seed: int, d: Difficulty, held_out: bool,
               buckets: Sequence[str] = (), out_of_template: bool = False
               ) -> list[dict[str, str]]:
  """`n` distinct problems from the seed (seed, 1) for held-out sets, (seed, 0) for training,
  (seed, 2) for the out-of-template set. With `buckets`, row i is drawn from bucket
  i mod len(buckets) (its knobs replace `d`) and tagged `difficulty`."""
  d.check()
  split = "oot" if out_of_template else "test" if held_out else "train"
  rng = np.random.default_rng([seed, 2 if out_of_template else int(held_out)])
  rows, seen = [], set()
  for _ in range(50 * n):
    if len(rows) == n:
      break
    bucket = buckets[len(rows) % len(buckets)] if buckets else None
    row = make_problem(rng, BUCKETS[bucket][0] if bucket else d, held_out, out_of_template)
    if bucket and not _fits(row, bucket):
      continue
    if row["question"] not in seen:
      seen.add(row["question"])
      extra = {"difficulty": bucket} if bucket else {}
      rows.append(dict(id=f"{split}-{len(rows)}", **row, **extra))
  if len(rows) < n:
    raise ArithError(f"only {len(rows)} distinct problems for n={n} at {d}: widen difficulty.max_value")
  return rows


# --- cold-start traces -------------------------------------------------------------------

def parse_solution(answer: str) -> tuple[list[tuple[int, str, int, int]], str]:
  """([(a, op, b, c)] steps, final answer) of a solution this module wrote."""
  if "####" not in answer:
    raise ArithError(f"not an arith solution (no '####'): {answer[:80]!r}")
  work, final = answer.rsplit("####", 1)
  steps = []
  for line in work.strip().splitlines():
    m = _STEP.match(line.strip())
    if not m:
      raise ArithError(f"not an arith solution step: {line!r}")
    steps.append((int(m[1]), m[2], int(m[3]), int(m[4])))
  if not steps:
    raise ArithError(f"arith solution without steps: {answer[:80]!r}")
  return steps, final.strip()


def _digits(x: int) -> list[int]:
  return [int(ch) for ch in str(x)][::-1]   # ones first


def _no_carry(a: int, op: str, b: int) -> int | None:
  """`a op b` worked column by column with the carry (or borrow) lost: 17 + 28 -> 35,
  45 - 17 -> 32, 17 * 4 -> 48; None for "/" or when nothing carries."""
  da, db = _digits(a), _digits(b)
  width = max(len(da), len(db))
  da, db = da + [0] * (width - len(da)), db + [0] * (width - len(db))
  if op == "+":
    cols = [(x + y) % 10 for x, y in zip(da, db)]
  elif op == "-":
    cols = [abs(x - y) for x, y in zip(da, db)]
  elif op == "*" and b < 10:
    cols = [(x * b) % 10 for x in _digits(a)]
  else:
    return None
  out = int("".join(map(str, cols[::-1])))
  return out if out != _apply(a, op, b) else None


def slip(a: int, op: str, b: int, rng: np.random.Generator) -> int:
  """A realistic wrong result of `a op b`: the carry or borrow lost (when one is), else off by
  ten or by one; never negative, never the right one."""
  c = _apply(a, op, b)
  lost = _no_carry(a, op, b)
  if lost is not None and rng.random() < 0.5:
    return lost
  tens = [c + k for k in (-10, 10) if c + k >= 0]
  ones = [c + k for k in (-1, 1) if c + k >= 0]
  return int(rng.choice(tens if rng.random() < 0.6 else ones))


def check(a: int, op: str, b: int) -> str:
  """The re-check of `a op b`, computed another way than the step: a split into tens and ones
  (`17 + 28` as `17 + 20 + 8 = 37 + 8 = 45`, `17 * 4` as `10 * 4 + 7 * 4 = 40 + 28 = 68`),
  repeated addition for a one-digit product, else the inverse operation (`45 - 8 = 37, so
  37 + 8 = 45`). The text ends on the step's right result."""
  c = _apply(a, op, b)
  if op in "+-" and b >= 10 and b % 10:
    t, u = b - b % 10, b % 10
    mid = a + t if op == "+" else a - t
    return f"{a} {op} {t} {op} {u} = {mid} {op} {u} = {c}"
  if op == "+" and a >= 10 and a % 10:
    t, u = a - a % 10, a % 10
    return f"{t} + {u} + {b} = {t} + {u + b} = {c}"
  if op == "*" and a >= 10 and a % 10:
    t, u = a - a % 10, a % 10
    return f"{t} * {b} + {u} * {b} = {t * b} + {u * b} = {c}"
  if op == "*" and b <= 5:
    return " + ".join([str(a)] * b) + f" = {c}"
  inverse = {"+": f"{c} - {b} = {a}", "-": f"{c} + {b} = {a}",
             "*": f"{c} / {b} = {a}", "/": f"{c} * {b} = {a}"}[op]
  return f"{inverse}, so {a} {op} {b} = {c}"


def plain_trace(answer: str) -> str:
  """The solution without tags, for the plain prompt: its steps and `#### <final answer>`."""
  steps, final = parse_solution(answer)
  return "\n".join(f"{a} {op} {b} = {c}" for a, op, b, c in steps) + f"\n#### {final}"


def trace(answer: str, kind: str, rng: np.random.Generator) -> str:
  """The PASR-layout answer for an arith solution.

  kind "plain": the steps, no refine. "confirm": after a uniformly random step, `<refine>
  Check: <check>. Correct. </refine>`. "correct": a random step first gets a slip (`slip`),
  the refine right after it re-checks the step (`check`) and names the wrong value (`, not
  W.`), and the work goes on from the right one to the reference's final answer.
  """
  if kind not in TRACE_KINDS:
    raise ArithError(f"trace kind {kind!r} is not one of {' | '.join(TRACE_KINDS)}")
  steps, final = parse_solution(answer)
  k = int(rng.integers(len(steps)))
  out = []
  for i, (a, op, b, c) in enumerate(steps):
    if i == k and kind == "correct":
      w = slip(a, op, b, rng)
      out.append(f"{a} {op} {b} = {w}")
      out.append(f"<refine> Check: {check(a, op, b)}, not {w}. </refine>")
    else:
      out.append(f"{a} {op} {b} = {c}")
      if i == k and kind == "confirm":
        out.append(f"<refine> Check: {check(a, op, b)}. Correct. </refine>")
  text = "<think>\n" + "\n".join(out) + f"\n</think>\n<answer>\n{final}\n</answer>"
  assert answer_format.format_ok(text), text
  return text


def trace_kinds(n: int, correct_fraction: float, confirm_fraction: float, seed: int
                ) -> list[str]:
  """A seeded kind per row: `correct` with probability correct_fraction, `confirm` with
  confirm_fraction, else `plain`."""
  u = np.random.default_rng([seed, 2]).random(n)
  return ["correct" if x < correct_fraction else
          "confirm" if x < correct_fraction + confirm_fraction else "plain" for x in u]


# --- command ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ArithCfg(Section):
  """The keys of `python -m pasr_jax.tasks.arith`."""
  out: str = key("", "output dir (train.jsonl, test.jsonl, meta.json)")
  n_train: int = key(2000, "training problems")
  n_test: int = key(400, "held-out problems (the held-out frames, another seed)")
  seed: int = key(0, "the sets' seed")
  buckets: str = key("", "e.g. easy,medium,hard: rows drawn from these buckets in turn, tagged "
                     "`difficulty` (their knobs replace the difficulty keys)")
  n_out_of_template: int = key(0, "also write out_of_template.jsonl: N problems from OOT_FRAMES")
  difficulty: Difficulty = section(Difficulty, "the knobs of every problem (without buckets)")

  def check(self) -> None:
    self.need(bool(self.out), "out", "must be set: the output dir")
    self.need(self.n_train >= 1, "n_train", "must be >= 1")
    self.need(self.n_test >= 1, "n_test", "must be >= 1")
    self.need(self.n_out_of_template >= 0, "n_out_of_template", "must be >= 0")
    try:
      parse_buckets(self.buckets)
    except ArithError as e:
      raise ConfigError(str(e)) from None


def _write_jsonl(path: str, rows: Sequence[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")


def write_sets(cfg: ArithCfg) -> None:
  """Writes the sets of `cfg` to cfg.out (module doc) and says what it wrote."""
  d, buckets = cfg.difficulty, parse_buckets(cfg.buckets)
  train = make_split(cfg.n_train, cfg.seed, d, held_out=False, buckets=buckets)
  test = make_split(cfg.n_test, cfg.seed, d, held_out=True, buckets=buckets)
  oot = (make_split(cfg.n_out_of_template, cfg.seed, d, held_out=True, buckets=buckets,
                    out_of_template=True) if cfg.n_out_of_template else [])
  try:
    os.makedirs(cfg.out, exist_ok=True)
    _write_jsonl(os.path.join(cfg.out, "train.jsonl"), train)
    _write_jsonl(os.path.join(cfg.out, "test.jsonl"), test)
    if oot:
      _write_jsonl(os.path.join(cfg.out, "out_of_template.jsonl"), oot)
    with open(os.path.join(cfg.out, "meta.json"), "w", encoding="utf-8") as f:
      json.dump({"n_train": cfg.n_train, "n_test": cfg.n_test, "seed": cfg.seed,
                 **dataclasses.asdict(d), "held_out_frames": list(HELD_OUT),
                 "buckets": list(buckets), "n_out_of_template": cfg.n_out_of_template},
                f, indent=1)
  except OSError as e:
    raise ArithError(f"config out={cfg.out!r}: {e.strerror}") from None
  print(f"wrote {len(train)} training, {len(test)} held-out and {len(oot)} out-of-template "
        f"problems to {cfg.out}")


if __name__ == "__main__":
  cli.main("python -m pasr_jax.tasks.arith", write_sets, schema=ArithCfg, preset=False,
           tune_malloc=False)
