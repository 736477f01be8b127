"""The judge's wire format: what one judge request holds and the chat messages it becomes.

`judge_request` builds the request for one sampled answer (training and evaluation both call
it); `judge_messages` turns it into OpenAI chat messages, with the question, reference and
candidate in delimited sections that the `verify` backend parses back (`parse_judge_sections`).
"""

from __future__ import annotations

import dataclasses
import re

from pasr_jax.answer_format import extract_answer
from pasr_jax.config import JUDGE_INPUTS, TASK_TYPES
from pasr_jax.prompts import JUDGE_INSTRUCTIONS, PromptError

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


# The original's judge request (PASR/pasr_main.py llm_eval): three headed blocks, answer last.
ORIGINAL_LAYOUT = "### Question:\n{question}\n\n### Ground Truth:\n{ground_truth}\n\n### Answer:\n{answer}"
_ORIGINAL_RE = re.compile(r"\A### Question:\n(.*?)\n\n### Ground Truth:\n(.*?)\n\n### Answer:\n(.*)\Z",
                          re.DOTALL)


def _marker(name: str) -> str:
  return f"=== {name} ==="


def _escape(text: str) -> str:
  # A field that itself contains a marker line would cut the prompt in the wrong place;
  # a leading space keeps the text readable for an LLM judge but no longer matches.
  return MARKER_RE.sub(lambda m: " " + m.group(0), text)


@dataclasses.dataclass(frozen=True)
class JudgeItem:
  """One answer to grade. `answer` is what the judge sees (full text or extracted)."""
  question: str
  ground_truth: str
  answer: str
  task_type: str = "general"




def judge_input(text: str, mode: str = "full") -> str:
  """What the judge sees of a sampled answer (`judge.input`): the whole text ("full", as the
  original does) or only the extracted <answer> content ("answer")."""
  if mode == "full":
    return text
  if mode == "answer":
    return extract_answer(text)
  raise PromptError(f"judge.input={mode!r}: expected one of {JUDGE_INPUTS}")


def judge_request(question: str, ground_truth: str, text: str, task_type: str,
                  mode: str = "full") -> dict[str, str]:
  """The judge request for the sampled answer `text` to `question`: a `JudgeItem`'s fields
  as a dict (JSON-able, so evaluation keys its score cache on it); the judge sees `text`
  as `judge.input` `mode` says (`judge_input`)."""
  return dataclasses.asdict(JudgeItem(question=question, ground_truth=ground_truth,
                                      answer=judge_input(text, mode), task_type=task_type))


def judge_messages(question: str, ground_truth: str, answer: str, task_type: str = "general",
                   templates: dict[str, str] | None = None, layout: str = "sections"
                   ) -> list[dict[str, str]]:
  """OpenAI chat messages asking a judge to score `answer` against `ground_truth`.

  The instruction for `task_type` is the system message; the user message carries the
  task type, question, reference and candidate in delimited sections (`=== NAME ===` on
  their own lines, closed by `=== END ===`), which the `verify` backend parses back.
  `layout="original"` (prompts.judge_layout) sends the original run's user message instead:
  `### Question:` / `### Ground Truth:` / `### Answer:` blocks, no task type (the `verify`
  backend reads it as a general task).
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
  if layout == "original":  # prompts.judge_layout: the original run's user message
    return [{"role": "system", "content": instruction},
            {"role": "user", "content": ORIGINAL_LAYOUT.format(
                question=question, ground_truth=ground_truth, answer=answer)}]
  user = "\n".join([
      _marker(SECTION_TASK), task_type,
      _marker(SECTION_QUESTION), _escape(question),
      _marker(SECTION_REFERENCE), _escape(ground_truth),
      _marker(SECTION_CANDIDATE), _escape(answer),
      _marker(SECTION_END),
  ])
  return [{"role": "system", "content": instruction}, {"role": "user", "content": user}]


def parse_judge_sections(text: str) -> dict[str, str] | None:
  """Inverse of the user message of `judge_messages` (either layout): {task_type, question,
  ground_truth, answer}, or None when the text does not hold all sections in order."""
  marks = list(MARKER_RE.finditer(text))
  names = [m.group(1) for m in marks]
  if names != list(SECTIONS):
    m = _ORIGINAL_RE.match(text)
    return None if m is None else {"task_type": "general", "question": m.group(1),
                                   "ground_truth": m.group(2), "answer": m.group(3)}
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

