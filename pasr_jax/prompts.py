"""The prompts: system prompts of PASR and baseline sampling, judge instructions per task type.

`load_prompts` picks the built-in set (ours or the paper's meaning) and replaces any of them
with a user's file (the `prompts` config). How a judge request is laid out around these
instructions is `judge/wire.py`.
"""

from __future__ import annotations

import dataclasses
import pathlib

from pasr_jax import errors
from pasr_jax.config import TASK_TYPES, PromptsCfg

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



class PromptError(errors.UserError):
  """A prompt file or a judge task type given by the user is unusable."""


@dataclasses.dataclass(frozen=True)
class Prompts:
  """System prompts for refined and baseline sampling, and the judge instruction per task."""
  pasr_system: str = PASR_SYSTEM_PROMPT
  plain_system: str = PLAIN_SYSTEM_PROMPT
  judge: dict[str, str] = dataclasses.field(default_factory=lambda: dict(JUDGE_INSTRUCTIONS))
  judge_layout: str = "sections"   # the judge's user message: sections | original


def _read_prompt(path: str, field: str) -> str:
  p = pathlib.Path(path)
  try:
    text = p.read_text(encoding="utf-8").strip()
  except OSError as e:
    raise PromptError(f"prompts.{field}={path!r}: cannot read ({e})") from e
  if not text:
    raise PromptError(f"prompts.{field}={path!r}: file is empty")
  return text


def load_prompts(cfg: PromptsCfg | None = None) -> Prompts:
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
  builtin, style = cfg.builtin, cfg.judge_style
  pasr = PAPER_PASR_SYSTEM_PROMPT if builtin == "paper" else PASR_SYSTEM_PROMPT
  plain = PAPER_PLAIN_SYSTEM_PROMPT if builtin == "paper" else PLAIN_SYSTEM_PROMPT
  judge = (dict.fromkeys(TASK_TYPES, GRADED_JUDGE_INSTRUCTION) if style == "graded"
           else dict(JUDGE_INSTRUCTIONS))
  if cfg.pasr_system_file:
    pasr = _read_prompt(cfg.pasr_system_file, "pasr_system_file")
  if cfg.plain_system_file:
    plain = _read_prompt(cfg.plain_system_file, "plain_system_file")
  judge_dir = cfg.judge_dir
  if judge_dir:
    d = pathlib.Path(judge_dir)
    found = [t for t in TASK_TYPES if (d / f"{t}.txt").is_file()]
    if not found:
      raise PromptError(f"prompts.judge_dir={judge_dir!r}: none of "
                        f"{[t + '.txt' for t in TASK_TYPES]} found")
    for t in found:
      judge[t] = _read_prompt(str(d / f"{t}.txt"), f"judge_dir ({t}.txt)")
  return Prompts(pasr_system=pasr, plain_system=plain, judge=judge, judge_layout=cfg.judge_layout)

