"""PASR prompts, the judge prompt builder and the rewards (pure functions on strings).

An answer looks like
  <think> ... <refine> ... </refine> ... </think> <answer> ... </answer>
The reward of one sampled answer is
  format_weight * format_reward + accuracy_weight * acc + refine_weight * refine_reward
where `acc` in [0, 1] comes from the judge and `refine_reward` compares `acc` with the mean
accuracy of answers sampled for the same question without the refine prompt (the baseline).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from collections.abc import Sequence
from typing import Any

TASK_TYPES = ("general", "multiple_choice", "summary")

PASR_SYSTEM_PROMPT = """\
You are a careful assistant who thinks before answering and improves your own reasoning \
while you think.
Write all of your reasoning inside <think> and </think>. Whenever you notice that \
something you wrote earlier in the thinking is wrong, incomplete or could be better, write \
the correction inside <refine> and </refine> right there in the thinking, then carry on \
reasoning from the corrected version. Use <refine> only when it helps; it must sit inside \
<think> and must not contain another <refine>.
After </think>, give the final answer inside <answer> and </answer>, and write nothing \
after </answer>.
Example layout: <think> reasoning <refine> correction </refine> more reasoning </think> \
<answer> final answer </answer>"""

PLAIN_SYSTEM_PROMPT = """\
You are a helpful assistant. Answer the question. Show your reasoning briefly if it helps, \
and state the final answer clearly at the end."""

# The original run's prompts, in our words with the same meaning (prompts.builtin="paper"):
# refine with <refine> inside <think> as often as needed until nothing is left to improve;
# the baseline is a generic helpful assistant.
PAPER_PASR_SYSTEM_PROMPT = """\
You are a helpful assistant that can refine its own work. When the user asks something, \
think it over carefully first, then answer.
Put the thinking between <think> and </think> and the answer between <answer> and \
</answer>; each of these four tags appears exactly once.
Inside the thinking:
1. Begin with a first line of thought on how to tackle the question.
2. Whenever you find that something needs clarifying, more detail or better reasoning, \
insert <refine> </refine> and state inside it what to reconsider or improve. You may do \
this several times.
3. After each refinement keep reasoning, and refine again, as often as needed until you \
see nothing left to improve.
Shape of the whole response:
<think>your thinking, with <refine>a reflection</refine> wherever one is needed, repeated \
as often as needed before the final answer</think><answer>the final answer reached by the \
thinking</answer>"""

PAPER_PLAIN_SYSTEM_PROMPT = """\
You are a helpful AI assistant. Respond to the user's request with the answer it asks for."""

PROMPT_SETS = ("ours", "paper")

JUDGE_INSTRUCTIONS = {
    "general": """\
You grade answers. You are given a question, its reference answer and a candidate answer, \
each in its own section. Decide whether the final result of the candidate answer agrees \
with the reference answer (equivalent numbers, expressions or statements count as \
agreeing; the reasoning style does not matter). Reply with a single digit: 1 if it \
agrees, 0 if it does not. Do not write anything else.""",
    "multiple_choice": """\
You grade answers to multiple-choice questions. You are given the question with its \
options, the reference option and a candidate answer, each in its own section. Reply with \
a single digit: 1 if the candidate finally chooses the same option as the reference (by \
letter or by the option's text), 0 otherwise. Do not write anything else.""",
    "summary": """\
You grade summaries. You are given a document, a reference summary and a candidate \
summary, each in its own section. Rate how closely the candidate conveys the same content \
as the reference, from 0 (unrelated or empty) to 1 (same content). Reply with one number \
between 0 and 1 and nothing else.""",
}

# The original run's training judge (prompts.judge_style="graded"): one graded instruction
# for every task type, in our words.
GRADED_JUDGE_INSTRUCTION = """\
You judge how correct an AI assistant's answer is. You are given a question, its reference \
answer and the assistant's answer, each in its own section. Rate the assistant's answer \
against the reference on a scale from 0 (wrong) to 1 (fully correct). Reply with just the \
number, between 0 and 1."""

JUDGE_STYLES = ("binary", "graded")

# Section markers of the judge's user message. They sit on lines of their own so the
# `verify` server can split the prompt back into its fields without guessing.
SECTION_TASK = "TASK TYPE"
SECTION_QUESTION = "QUESTION"
SECTION_REFERENCE = "REFERENCE ANSWER"
SECTION_CANDIDATE = "CANDIDATE ANSWER"
SECTION_END = "END"
SECTIONS = (SECTION_TASK, SECTION_QUESTION, SECTION_REFERENCE, SECTION_CANDIDATE, SECTION_END)
MARKER_RE = re.compile(
    r"^=== (" + "|".join(re.escape(s) for s in SECTIONS) + r") ===$", re.MULTILINE)


class PromptError(ValueError):
  """A prompt file or a judge task type given by the user is unusable."""


class RewardError(ValueError):
  """Rewards were asked for with inputs that have no meaning (e.g. an empty baseline)."""


def _marker(name: str) -> str:
  return f"=== {name} ==="


def _escape(text: str) -> str:
  # A field that itself contains a marker line would cut the prompt in the wrong place;
  # a leading space keeps the text readable for an LLM judge but no longer matches.
  return MARKER_RE.sub(lambda m: " " + m.group(0), text)


@dataclasses.dataclass(frozen=True)
class Prompts:
  """System prompts for refined and baseline sampling, and the judge instruction per task."""
  pasr_system: str = PASR_SYSTEM_PROMPT
  plain_system: str = PLAIN_SYSTEM_PROMPT
  judge: dict[str, str] = dataclasses.field(default_factory=lambda: dict(JUDGE_INSTRUCTIONS))

  def judge_messages(self, question: str, ground_truth: str, answer: str,
                     task_type: str) -> list[dict[str, str]]:
    return judge_messages(question, ground_truth, answer, task_type, templates=self.judge)


def _read_prompt(path: str, field: str) -> str:
  p = pathlib.Path(path)
  try:
    text = p.read_text(encoding="utf-8").strip()
  except OSError as e:
    raise PromptError(f"prompts.{field}={path!r}: cannot read ({e})") from e
  if not text:
    raise PromptError(f"prompts.{field}={path!r}: file is empty")
  return text


def load_prompts(cfg: Any = None) -> Prompts:
  """Built-in prompts, each replaced by a file when `cfg` (the `prompts` config) names one.

  `cfg.builtin` picks the built-in system prompts: "ours" (default) or "paper" (the
  original run's meaning); `cfg.judge_style` the built-in judge instructions: "binary"
  (default: 1 or 0 per task type; summaries graded) or "graded" (the original run's
  training judge: 0..1 for every task type). `cfg.judge_dir` may hold `general.txt`,
  `multiple_choice.txt`, `summary.txt`; a task type whose file is absent keeps the built-in
  instruction. See `judge_messages` for templates.
  """
  if cfg is None:
    return Prompts()
  builtin = cfg.get("builtin", "ours")
  if builtin not in PROMPT_SETS:
    raise PromptError(f"prompts.builtin={builtin!r}: expected one of {PROMPT_SETS}")
  style = cfg.get("judge_style", "binary")
  if style not in JUDGE_STYLES:
    raise PromptError(f"prompts.judge_style={style!r}: expected one of {JUDGE_STYLES}")
  pasr = PAPER_PASR_SYSTEM_PROMPT if builtin == "paper" else PASR_SYSTEM_PROMPT
  plain = PAPER_PLAIN_SYSTEM_PROMPT if builtin == "paper" else PLAIN_SYSTEM_PROMPT
  judge = (dict.fromkeys(TASK_TYPES, GRADED_JUDGE_INSTRUCTION) if style == "graded"
           else dict(JUDGE_INSTRUCTIONS))
  if cfg.get("pasr_system_file", ""):
    pasr = _read_prompt(cfg.pasr_system_file, "pasr_system_file")
  if cfg.get("plain_system_file", ""):
    plain = _read_prompt(cfg.plain_system_file, "plain_system_file")
  judge_dir = cfg.get("judge_dir", "")
  if judge_dir:
    d = pathlib.Path(judge_dir)
    if not d.is_dir():
      raise PromptError(f"prompts.judge_dir={judge_dir!r}: not a directory")
    found = [t for t in TASK_TYPES if (d / f"{t}.txt").is_file()]
    if not found:
      raise PromptError(f"prompts.judge_dir={judge_dir!r}: none of "
                        f"{[t + '.txt' for t in TASK_TYPES]} found")
    for t in found:
      judge[t] = _read_prompt(str(d / f"{t}.txt"), f"judge_dir ({t}.txt)")
  return Prompts(pasr_system=pasr, plain_system=plain, judge=judge)


def judge_messages(question: str, ground_truth: str, answer: str, task_type: str = "general",
                   templates: dict[str, str] | None = None) -> list[dict[str, str]]:
  """OpenAI chat messages asking a judge to score `answer` against `ground_truth`.

  The instruction for `task_type` is the system message; the user message carries the
  task type, question, reference and candidate in delimited sections (`=== NAME ===` on
  their own lines, closed by `=== END ===`), which the `verify` backend parses back.
  A template (from `templates`, e.g. a user's file) that contains the placeholders
  `{question}`, `{ground_truth}` and `{answer}` is used verbatim as a single user message
  instead; the `verify` backend cannot grade that form.
  """
  if task_type not in TASK_TYPES:
    raise PromptError(f"task_type={task_type!r}: expected one of {TASK_TYPES}")
  instruction = (templates or JUDGE_INSTRUCTIONS).get(task_type, JUDGE_INSTRUCTIONS[task_type])
  if "{answer}" in instruction:
    # str.replace, not str.format: LaTeX answers are full of braces.
    text = (instruction.replace("{question}", question)
            .replace("{ground_truth}", ground_truth).replace("{answer}", answer))
    return [{"role": "user", "content": text}]
  user = "\n".join([
      _marker(SECTION_TASK), task_type,
      _marker(SECTION_QUESTION), _escape(question),
      _marker(SECTION_REFERENCE), _escape(ground_truth),
      _marker(SECTION_CANDIDATE), _escape(answer),
      _marker(SECTION_END),
  ])
  return [{"role": "system", "content": instruction}, {"role": "user", "content": user}]


def parse_judge_sections(text: str) -> dict[str, str] | None:
  """Inverse of the user message of `judge_messages`: {task_type, question, ground_truth,
  answer}, or None when the text does not hold all sections in order."""
  marks = list(MARKER_RE.finditer(text))
  names = [m.group(1) for m in marks]
  if names != list(SECTIONS):
    return None
  body = []
  for m, nxt in zip(marks, marks[1:]):
    chunk = text[m.end():nxt.start()]
    # judge_messages joins with exactly one newline on each side of a marker.
    chunk = chunk[1:] if chunk.startswith("\n") else chunk
    chunk = chunk[:-1] if chunk.endswith("\n") else chunk
    body.append(re.sub(r"^ (?==== )", "", chunk, flags=re.MULTILINE))
  task_type = body[0].strip()
  if task_type not in TASK_TYPES:
    return None
  return {"task_type": task_type, "question": body[1], "ground_truth": body[2],
          "answer": body[3]}


# ---------------------------------------------------------------------------- format
_TAG_RE = re.compile(r"<(/?)(think|answer|refine)>")


def _tags(text: str) -> list[tuple[str, int, int]]:
  """[(tag, start, end)] with tag like 'think' or '/think', in order of appearance."""
  return [(m.group(1) + m.group(2), m.start(), m.end()) for m in _TAG_RE.finditer(text)]


def format_ok(text: str) -> bool:
  """True when `text` satisfies C1-C3 (see `format_reward`)."""
  tags = _tags(text)
  # The only accepted tag sequence: think, (refine, /refine)*, /think, answer, /answer.
  seq = [t for t, _, _ in tags]
  if len(seq) < 4 or seq[0] != "think" or seq[-3:] != ["/think", "answer", "/answer"]:
    return False
  inner = seq[1:-3]
  if len(inner) % 2 or any(inner[i] != ("refine" if i % 2 == 0 else "/refine")
                           for i in range(len(inner))):
    return False
  # Only whitespace before <think>, between </think> and <answer>, and after </answer>.
  think_close, answer_open, answer_close = tags[-3], tags[-2], tags[-1]
  outside = (text[:tags[0][1]], text[think_close[2]:answer_open[1]], text[answer_close[2]:])
  return all(not s.strip() for s in outside)


def format_reward(text: str) -> float:
  """+1 if the answer is well formed, else -1.

  C1: exactly one <think>...</think> followed by exactly one <answer>...</answer>, with
  only whitespace before, between and after. C2: every <refine> is closed, lies inside the
  think block and contains no other refine. C3: the order think -> answer is fixed.
  Tags are exact lowercase; `<Think>` is plain text.
  """
  return 1.0 if format_ok(text) else -1.0


def count_refines(text: str) -> int:
  """Number of complete <refine>...</refine> pairs (an open tag whose next refine tag is
  its close), anywhere in the text."""
  seq = [t for t, _, _ in _tags(text) if t in ("refine", "/refine")]
  return sum(1 for a, b in zip(seq, seq[1:]) if a == "refine" and b == "/refine")


def extract_answer(text: str) -> str:
  """Content of the last <answer>...</answer> (stripped); the whole text stripped when
  there is none. An unclosed final <answer> yields what follows it."""
  closed = re.findall(r"<answer>(.*?)</answer>", text, flags=re.DOTALL)
  if closed:
    return closed[-1].strip()
  i = text.rfind("<answer>")
  if i >= 0:
    return text[i + len("<answer>"):].strip()
  return text.strip()


JUDGE_INPUTS = ("full", "answer")


def judge_input(text: str, mode: str = "full") -> str:
  """What the judge sees of a sampled answer (`judge.input`): the whole text ("full", as the
  original does) or only the extracted <answer> content ("answer")."""
  if mode == "full":
    return text
  if mode == "answer":
    return extract_answer(text)
  raise PromptError(f"judge.input={mode!r}: expected one of {JUDGE_INPUTS}")


# ---------------------------------------------------------------------------- rewards
def refine_reward(text: str, acc: float, baseline_accs: Sequence[float] | None,
                  zeta: float = 0.0) -> float:
  """Reward for refining: 0 without a complete refine pair (or with no baseline, None);
  else +1 if acc > mean(baseline) + zeta, -1 if acc < mean - zeta, -0.5 within +-zeta."""
  if baseline_accs is None or count_refines(text) == 0:
    return 0.0
  if len(baseline_accs) == 0:
    raise RewardError("refine_reward: baseline_accs is empty (pass None when there is no "
                      "baseline)")
  if zeta < 0:
    raise RewardError(f"refine_reward: zeta={zeta} must be >= 0")
  mean = math.fsum(baseline_accs) / len(baseline_accs)
  if acc > mean + zeta:
    return 1.0
  if acc < mean - zeta:
    return -1.0
  return -0.5


def reward_terms(text: str, acc: float, baseline_accs: Sequence[float] | None,
                 zeta: float = 0.0) -> dict[str, float]:
  """The unweighted terms: {'format', 'accuracy', 'refine'}."""
  return {"format": format_reward(text), "accuracy": float(acc),
          "refine": refine_reward(text, acc, baseline_accs, zeta)}


# rewards.refine_compare: what a refining answer is compared with. "mean": the mean accuracy
# of the question's baseline answers (PASR); "single": only the baseline answer with the same
# index (paper Table 2, "w/o multi-answer"); "none": no comparison, every answer with a
# refinement gets rewards.refine_fixed (Table 2, "w/o comparison").
REFINE_COMPARE = ("mean", "single", "none")


def group_reward_terms(texts: Sequence[str], accs: Sequence[float],
                       baseline_accs: Sequence[float] | None, cfg: Any = None
                       ) -> list[dict[str, float]]:
  """`reward_terms` of one question's answers under the `rewards` config `cfg` (zeta,
  refine_compare, refine_fixed; None: the paper's defaults). `baseline_accs`: the accuracies
  of the question's baseline answers, None without a baseline."""
  get = (lambda k, d: d) if cfg is None else cfg.get
  zeta = float(get("zeta", 0.0))
  compare = get("refine_compare", "mean")
  if compare not in REFINE_COMPARE:
    raise RewardError(f"rewards.refine_compare={compare!r}: expected one of {REFINE_COMPARE}")
  if compare == "single" and baseline_accs is not None and len(baseline_accs) != len(texts):
    raise RewardError(f"rewards.refine_compare='single' pairs answer k with baseline answer k: "
                      f"{len(texts)} answers but {len(baseline_accs)} baseline answers")
  out = []
  for k, (text, acc) in enumerate(zip(texts, accs)):
    if compare == "none":
      t = reward_terms(text, acc, None, zeta)
      t["refine"] = float(get("refine_fixed", 1.0)) if count_refines(text) else 0.0
    else:
      base = baseline_accs
      if compare == "single" and base is not None:
        base = [baseline_accs[k]]
      t = reward_terms(text, acc, base, zeta)
    out.append(t)
  return out


def total_reward(text: str, acc: float, baseline_accs: Sequence[float] | None,
                 weights: Any = None) -> float:
  """format_weight*format + accuracy_weight*acc + refine_weight*refine.

  `weights` is the `rewards` config (format_weight, accuracy_weight, refine_weight, zeta);
  None means the paper's defaults 1, 1, 1 and zeta 0.
  """
  zeta = 0.0 if weights is None else float(weights.get("zeta", 0.0))
  return weighted_reward(reward_terms(text, acc, baseline_accs, zeta), weights)


def weighted_reward(terms: dict[str, float], weights: Any = None) -> float:
  """The weighted sum of `reward_terms` output; `weights` as in `total_reward`."""
  get = (lambda k, d: d) if weights is None else (lambda k, d: float(weights.get(k, d)))
  return (get("format_weight", 1.0) * terms["format"]
          + get("accuracy_weight", 1.0) * terms["accuracy"]
          + get("refine_weight", 1.0) * terms["refine"])
