"""The evaluation benchmarks of the PASR paper (Table 1): where each file lives, how to read it.

Each `Benchmark` names its file relative to `data_dir` (the layout of the PASR seed data), the
question and answer fields, the judge task type (general | multiple_choice | summary) and a short
task instruction put in front of the question. Rows are read with `pasr_jax.data.load_rows`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Sequence

from pasr_jax import errors
from pasr_jax.data import DataError, load_rows


class EvalError(errors.UserError):
  """A user-facing evaluation problem: unknown dataset, missing file, bad model dir or config."""


def _gsm8k_truth(answer: str) -> str:
  """GSM8K references end with `#### <number>`; the judge only needs the number."""
  m = re.search(r"####\s*(.+?)\s*$", answer.strip(), flags=re.S)
  return m.group(1).replace(",", "").strip() if m else answer.strip()


def _strip(answer: str) -> str:
  return answer.strip()


_MATH = ("Solve the problem step by step, then give the final answer on its own line as "
         "\\boxed{...}.")
_CHOICE = ("Choose the single correct option. Explain briefly, then give only the option's "
           "letter as the final answer.")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One evaluation set: `path` is relative to the data dir; `truth` maps the raw answer field."""
  name: str
  path: str
  question_field: str
  answer_field: str
  task_type: str
  instruction: str
  truth: Callable[[str], str] = _strip


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("gsm8k", "gsm8k/test.jsonl", "question", "answer", "general", _MATH, _gsm8k_truth),
    Benchmark("math", "math/math.json", "question", "answer", "general", _MATH),
    Benchmark("aime24", "aime24/aime24.jsonl", "problem", "solution", "general",
              _MATH + " The answer is an integer from 0 to 999."),
    Benchmark("arc", "arc/ARC-c/two_keys_test.jsonl", "question", "answer", "multiple_choice",
              _CHOICE),
    Benchmark("gpqa", "gpqa/prompt_messages.jsonl", "question", "answer", "general", _CHOICE),
    Benchmark("winogrande", "winogrande/dev_two_keys.jsonl", "question", "answer", "general",
              "Decide which option fills the blank `_` so that the sentence makes sense. "
              "Give the option number (1 or 2) as the final answer."),
    Benchmark("commonsenseqa", "commonsenseqa/two_keys_version.jsonl", "question", "answer",
              "general", _CHOICE),
    Benchmark("drop", "drop/test_sampled_313.jsonl", "question", "answer", "general",
              "Read the passage, reason over it step by step, and answer the question with a "
              "short phrase or number."),
    Benchmark("mmlu", "mmlu/select_mmlu_test.json", "Question", "Ground_truth",
              "multiple_choice", _CHOICE),
    Benchmark("xsum", "xsum/test_select313.jsonl", "question", "answer", "summary",
              "Summarise the following news article in one sentence."),
    Benchmark("humaneval", "humaneval/HumanEval.json", "prompt", "canonical_solution", "general",
              "Complete the following Python function. Give the whole function in one code "
              "block.", lambda a: a),
)}

# config.instructions="paper": the task instructions of the paper's App. B.3, in our words
# with their meaning (what the set is, then "think step by step and give your final answer").
_STEP = "Think step by step and give your final answer."
PAPER_INSTRUCTIONS = {
    "gsm8k": "Here is a problem. " + _STEP,
    "math": "Here is a problem. " + _STEP,
    "aime24": "Here is a problem. " + _STEP,
    "mmlu": ("Here is a multiple-choice question from a test of knowledge in 57 fields, from "
             "elementary mathematics to history, computer science and law. " + _STEP),
    "arc": "Here is a multiple-choice question from a science exam. " + _STEP,
    "gpqa": "",
    "winogrande": ("Here is a sentence with two options. Think step by step and choose the "
                   "option that makes sense of the sentence."),
    "commonsenseqa": "Here is a multiple-choice question about common sense. " + _STEP,
    "drop": ("Here are a passage and a question that needs discrete reasoning over the "
             "passage. " + _STEP),
    "xsum": "Here is a passage. Summarise it.",
    "humaneval": ("Think step by step, complete the Python function and give the whole "
                  "function in one Python code block."),
}
INSTRUCTION_SETS = ("ours", "paper")

# The ten sets of the paper's Table 1 (HumanEval is optional and not in the default list).
PAPER_DATASETS = ("gsm8k", "math", "aime24", "arc", "gpqa", "winogrande", "commonsenseqa", "drop",
                  "mmlu", "xsum")


@dataclasses.dataclass(frozen=True)
class Item:
  """One question to answer: `id` is `<dataset>/<row id>`, stable across runs."""
  id: str
  dataset: str
  question: str
  ground_truth: str
  task_type: str
  instruction: str


def parse_datasets(spec: str | Sequence[str]) -> list[Benchmark]:
  """`"gsm8k,arc"` (or a sequence; "all" = the paper's ten) -> Benchmarks; unknown names raise."""
  names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
  names = [n for n in names if n]
  if names == ["all"]:
    names = list(PAPER_DATASETS)
  if not names:
    raise EvalError("config.datasets is empty; give e.g. --config.datasets=gsm8k,arc")
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    raise EvalError(f"config.datasets: unknown dataset(s) {unknown}; known: "
                    f"{sorted(BENCHMARKS)} (or 'all')")
  return [BENCHMARKS[n] for n in dict.fromkeys(names)]


def load_items(bench: Benchmark, data_dir: str, limit: int = 0,
               instructions: str = "ours") -> list[Item]:
  """The first `limit` (0 = all) rows of `bench` under `data_dir`, as Items, with the task
  instruction of `instructions` (config.instructions: ours | paper)."""
  if instructions not in INSTRUCTION_SETS:
    raise EvalError(f"config.instructions={instructions!r} is not one of {INSTRUCTION_SETS}")
  instruction = PAPER_INSTRUCTIONS[bench.name] if instructions == "paper" else bench.instruction
  path = os.path.join(data_dir, bench.path)
  if not os.path.isfile(path):
    raise EvalError(f"dataset {bench.name!r}: file {path} not found (config.data_dir="
                    f"{data_dir!r}; expected <data_dir>/{bench.path})")
  try:
    rows = load_rows(path, bench.question_field, bench.answer_field)
  except DataError as e:
    raise EvalError(f"dataset {bench.name!r}: {e}") from None
  if limit > 0:
    rows = rows[:limit]
  return [Item(id=f"{bench.name}/{r.id.split(':', 1)[-1]}", dataset=bench.name,
               question=r.question, ground_truth=bench.truth(r.answer),
               task_type=bench.task_type, instruction=instruction) for r in rows]
