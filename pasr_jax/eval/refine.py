"""What the refinements inside answers do: pure functions on answer texts.

Each complete `<refine> ... </refine>` block of an answer is classed by what the work does
around it:
  confirm  the value the work carries on with is the value written before the block;
  correct  the work carries on with another value for the step just before the block;
  rewrite  the work after the block restarts at an earlier step, or the block follows no step.
For answers whose work is written as `a op b = c` lines (the arithmetic task), the step
before a block is the last such line outside refine blocks; the value before the block is its
result; the value after is the result of the next line if that line re-does the same step,
else the first operand of the next line, else the final answer. Answers without such lines
are classed by the block's words (a negation or "wrong" -> correct, "correct"/"holds" ->
confirm, else rewrite), and get no values.

A correcting block is a *fix* when the value before it is wrong and the value after it right,
a *break* the other way round, else neutral; "right" is the reference chain's value at that
step (the reference's k-th `a op b = c` line, its final answer past the last line) when the
reference is a worked solution, else the step's own arithmetic. Confirmations and rewrites
are never fixes or breaks: a fix is a wrong value turned right inside one answer, not a
comparison between two models' answers.

`refine_metrics` turns a set of answers into flat numbers for logs and reports.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from pasr_jax.answer_format import count_refines, extract_answer
from pasr_jax.eval.stats import mcnemar_exact

KINDS = ("confirm", "correct", "rewrite")
BUCKETS = ("easy", "medium", "hard")
HARDER = ("medium", "hard")   # the buckets of the adaptivity gap's first term
NEARLY_ALWAYS = 0.95          # step classes answered right at least this often unrefined...
MIN_CLASS_STEPS = 10          # ...over at least this many steps count as "nearly always right"

_STEP = re.compile(r"(\d+)\s*([-+*/×÷])\s*(\d+)\s*=\s*(\d+)")
_BLOCK = re.compile(r"<refine>(.*?)</refine>", re.DOTALL)
_REF_STEP = re.compile(r"^\s*(\d+) ([-+*/]) (\d+) = (\d+)\s*$", re.MULTILINE)
_NEGATION = re.compile(r"\b(not|wrong|mistake|incorrect|instead|should be|actually)\b", re.I)
_AFFIRM = re.compile(r"\b(correct|holds|right|verified|yes|confirmed?)\b", re.I)


@dataclasses.dataclass(frozen=True)
class Step:
  """One `a op b = c` line of an answer's work (outside refine blocks)."""
  a: int
  op: str
  b: int
  c: int
  start: int
  end: int

  @property
  def right(self) -> bool:
    """The line's own arithmetic holds (`/` only when it divides exactly)."""
    return true_value(self.a, self.op, self.b) == self.c


@dataclasses.dataclass(frozen=True)
class Block:
  """One refine block: kind, the index of the step before it (None: none), the value before
  and after it (None where there is none), and fix | break | neutral."""
  kind: str
  step: int | None
  before: int | None
  after: int | None
  outcome: str


def true_value(a: int, op: str, b: int) -> int | None:
  """`a op b` (None for a division that is not exact or by zero)."""
  op = {"×": "*", "÷": "/"}.get(op, op)
  if op == "+":
    return a + b
  if op == "-":
    return a - b
  if op == "*":
    return a * b
  return a // b if b and a % b == 0 else None


def _int(text: str) -> int | None:
  nums = re.findall(r"-?\d+", text.replace(",", ""))
  return int(nums[-1]) if nums else None


def reference_chain(reference: str) -> tuple[list[int], int | None] | None:
  """(each step's value, final answer) of a worked `a op b = c` / `#### N` reference; None when
  the reference has no such lines (a bare final answer)."""
  work = reference.rsplit("####", 1)[0] if "####" in reference else reference
  values = [int(m[3]) for m in _REF_STEP.findall(work)]
  if not values:
    return None
  final = _int(reference.rsplit("####", 1)[1]) if "####" in reference else values[-1]
  return values, final


def steps_of(text: str) -> list[Step]:
  """The answer's first-pass steps: `a op b = c` outside refine blocks and before <answer>."""
  end = text.find("<answer>")
  work = text if end < 0 else text[:end]
  masked = _BLOCK.sub(lambda m: " " * len(m.group(0)), work)
  return [Step(int(m[1]), m[2], int(m[3]), int(m[4]), m.start(), m.end())
          for m in _STEP.finditer(masked)]


def _by_words(body: str) -> str:
  if _NEGATION.search(body):
    return "correct"
  return "confirm" if _AFFIRM.search(body) else "rewrite"


def blocks_of(text: str, reference: str = "") -> list[Block]:
  """The refine blocks of `text` classed as the module doc says (none unless the answer's
  refine tags pair up, as `count_refines` requires)."""
  if count_refines(text) == 0:
    return []
  steps = steps_of(text)
  chain = reference_chain(reference) if reference else None
  final = _int(extract_answer(text))
  out = []
  for m in _BLOCK.finditer(text):
    prev = [i for i, s in enumerate(steps) if s.end <= m.start()]
    if not prev:
      out.append(Block(_by_words(m.group(1)), None, None, None, "neutral"))
      continue
    k = prev[-1]
    s = steps[k]
    nxt = next((t for t in steps if t.start >= m.end()), None)
    if nxt is None:
      after = final
    elif (nxt.a, nxt.op, nxt.b) == (s.a, s.op, s.b):
      after = nxt.c
    else:
      after = nxt.a
    restarts = nxt is not None and any((nxt.a, nxt.op, nxt.b) == (t.a, t.op, t.b)
                                       for t in steps[:k])
    if after is None or restarts:
      kind = "rewrite"
    else:
      kind = "confirm" if after == s.c else "correct"
    outcome = "neutral"
    if kind == "correct":
      if chain is not None:
        values, ref_final = chain
        right = values[k] if k < len(values) else ref_final
      else:
        right = true_value(s.a, s.op, s.b)
      if s.c != right and after == right:
        outcome = "fix"
      elif s.c == right and after != right:
        outcome = "break"
    out.append(Block(kind, k, s.c, after, outcome))
  return out


def _rate(k: float, n: float) -> float:
  return k / n if n else math.nan


def refine_metrics(answers: Sequence[dict]) -> dict[str, float]:
  """Flat refine analytics of `answers`, each a dict with `text` (the whole answer),
  `reference` (the reference solution or final answer), `score` (0..1) and `bucket` (str or
  None). Rates are fractions in [0, 1]; NaN where their denominator is empty. Keys:
    n, accuracy, refine_rate; per bucket b: n/b, accuracy/b, refine_rate/b;
    gap: refine_rate over the medium and hard answers − refine_rate over the easy ones (G);
    accuracy/refining, accuracy/not_refining;
    blocks, blocks/confirm, blocks/correct, blocks/rewrite (counts);
    fixes, breaks (counts of correcting blocks), fix_break_p (exact sign test of fixes vs
    breaks), net_fixes_per_100_harder (fixes − breaks per 100 medium/hard answers);
    steps/right, steps/wrong (first-pass steps by their own arithmetic),
    p_refine_step_wrong, p_refine_step_right, selectivity (their ratio);
    check/before_right, check/after_right: of the blocks after a step, the share whose value
    before / after the block is the step's right value (the first pass against the check);
    fake_slip_rate: of the blocks after a wrong step, the share on a step class (operation,
    digits of its larger operand) that the answers get right at least NEARLY_ALWAYS of the
    time where they do not refine it (over >= MIN_CLASS_STEPS steps): slips made to be fixed.
  """
  refining = [count_refines(a["text"]) > 0 for a in answers]
  buckets = [a.get("bucket") for a in answers]
  per_answer = [blocks_of(a["text"], str(a.get("reference") or "")) for a in answers]
  harder = [i for i, x in enumerate(buckets) if x in HARDER]
  return {**_rates(answers, refining, buckets, harder), **_blocks(per_answer, harder),
          **_steps(answers, per_answer)}


def _rates(answers: Sequence[dict], refining: list[bool], buckets: list, harder: list[int]
           ) -> dict[str, float]:
  """Accuracy and refine rate, overall and per bucket; the gap G; accuracy of refining and
  non-refining answers."""
  out: dict[str, float] = {"n": float(len(answers))}
  scores = [float(a["score"]) for a in answers]
  out["accuracy"] = _rate(sum(scores), len(answers))
  out["refine_rate"] = _rate(sum(refining), len(answers))
  named = {x for x in buckets if x}
  for b in [x for x in BUCKETS if x in named] + sorted(named - set(BUCKETS)):
    idx = [i for i, x in enumerate(buckets) if x == b]
    out[f"n/{b}"] = float(len(idx))
    out[f"accuracy/{b}"] = _rate(sum(scores[i] for i in idx), len(idx))
    out[f"refine_rate/{b}"] = _rate(sum(refining[i] for i in idx), len(idx))
  easy = [i for i, x in enumerate(buckets) if x == "easy"]
  out["gap"] = (_rate(sum(refining[i] for i in harder), len(harder))
                - _rate(sum(refining[i] for i in easy), len(easy)))
  r = [i for i, x in enumerate(refining) if x]
  nr = [i for i, x in enumerate(refining) if not x]
  out["accuracy/refining"] = _rate(sum(scores[i] for i in r), len(r))
  out["accuracy/not_refining"] = _rate(sum(scores[i] for i in nr), len(nr))
  return out


def _blocks(per_answer: list[list[Block]], harder: list[int]) -> dict[str, float]:
  """Blocks by kind; fixes and breaks with their sign test and net fixes per 100 harder
  answers."""
  all_blocks = [b for bs in per_answer for b in bs]
  out = {"blocks": float(len(all_blocks))}
  for kind in KINDS:
    out[f"blocks/{kind}"] = float(sum(b.kind == kind for b in all_blocks))
  fixes = sum(b.outcome == "fix" for b in all_blocks)
  breaks = sum(b.outcome == "break" for b in all_blocks)
  out["fixes"], out["breaks"] = float(fixes), float(breaks)
  out["fix_break_p"] = mcnemar_exact(breaks, fixes)
  net_harder = sum((b.outcome == "fix") - (b.outcome == "break")
                   for i in harder for b in per_answer[i])
  out["net_fixes_per_100_harder"] = 100.0 * _rate(net_harder, len(harder))
  return out


def _steps(answers: Sequence[dict], per_answer: list[list[Block]]) -> dict[str, float]:
  """First-pass steps, refined or not, right or wrong by their own arithmetic: selectivity,
  the check against the first pass, fake slips."""
  refined_right = refined_wrong = right = wrong = 0
  before_right = after_right = checked = 0
  cls_total: dict[tuple[str, int], int] = {}
  cls_right: dict[tuple[str, int], int] = {}
  checked_steps = []
  for a, bs in zip(answers, per_answer):
    steps = steps_of(a["text"])
    refined = {b.step for b in bs if b.step is not None}
    for i, s in enumerate(steps):
      cls = (s.op, len(str(max(s.a, s.b))))
      if s.right:
        right += 1
        refined_right += i in refined
      else:
        wrong += 1
        refined_wrong += i in refined
      if i not in refined:
        cls_total[cls] = cls_total.get(cls, 0) + 1
        cls_right[cls] = cls_right.get(cls, 0) + s.right
    for b in bs:
      if b.step is None:
        continue
      s = steps[b.step]
      truth = true_value(s.a, s.op, s.b)
      checked += 1
      before_right += s.c == truth
      after_right += b.after == truth
      if not s.right:
        checked_steps.append((s.op, len(str(max(s.a, s.b)))))
  out = {"steps/right": float(right), "steps/wrong": float(wrong),
         "p_refine_step_wrong": _rate(refined_wrong, wrong),
         "p_refine_step_right": _rate(refined_right, right)}
  out["selectivity"] = _rate(out["p_refine_step_wrong"], out["p_refine_step_right"])
  out["check/before_right"] = _rate(before_right, checked)
  out["check/after_right"] = _rate(after_right, checked)
  easy_classes = {c for c, n in cls_total.items()
                  if n >= MIN_CLASS_STEPS and cls_right[c] / n >= NEARLY_ALWAYS}
  fake = sum(c in easy_classes for c in checked_steps)
  out["fake_slip_rate"] = _rate(fake, len(checked_steps))
  return out
