"""Rule-based grading for the `verify` judge backend.

general: math-verify on the final answer (handles `\\boxed{}`, `#### 18`, plain numbers,
LaTeX); a single-letter reference is graded as multiple choice; anything math-verify cannot
parse falls back to normalised text match. multiple_choice: the option letter (or option
text) the candidate finally picks. summary: ROUGE-L F1 on lowercased word tokens, in [0, 1].
"""

from __future__ import annotations

import re
import string

from math_verify import parse as mv_parse
from math_verify import verify as mv_verify

from pasr_jax.answer_format import extract_answer

LETTERS = "ABCDEFGHIJ"
_MAX_SUMMARY_TOKENS = 1000   # ROUGE-L is O(n*m); longer texts are cut


def _final_part(text: str) -> str:
  """The candidate's final answer: <answer> content, then the part after the last ####."""
  text = extract_answer(text)
  if "####" in text:
    text = text.rsplit("####", 1)[1]
  return text.strip()


def normalize_text(text: str) -> str:
  """Lowercase, drop punctuation and the articles a/an/the, squeeze whitespace."""
  text = text.lower()
  text = "".join(" " if ch in string.punctuation else ch for ch in text)
  return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def _text_match(gold: str, pred: str) -> bool:
  g, p = normalize_text(gold), normalize_text(pred)
  if not g:
    return False
  return g == p or f" {g} " in f" {p} "


def _reference_letter(gold: str) -> str | None:
  m = re.match(r"^\s*\(?([A-J])\)?\s*(?:[.:)]|$)", gold)
  if m:
    return m.group(1)
  m = re.search(r"(?i:answer)\s*(?:is|:)?\s*\(?([A-J])\)?\b", gold)
  return m.group(1) if m else None


_LETTER_PATTERNS = (
    r"\\boxed\{\s*\(?([A-J])\)?\s*\}",
    r"(?i:answer|option|choice)\s*(?i:is)?\s*[:=]?\s*(?i:option\s*)?\(?([A-J])\)?(?![A-Za-z])",
    r"^\s*\(?([A-J])\)?\s*[.:)]?\s*$",
    r"(?m)^\s*\(?([A-J])\)?[.:)]\s",
    r"\(([A-J])\)",
    r"(?<![A-Za-z'])([B-HJ])(?![A-Za-z'])",   # bare letters; 'A' and 'I' are English words
)


def candidate_letter(answer: str) -> str | None:
  """The option letter the candidate finally chooses, by the most explicit form found."""
  text = _final_part(answer)
  for pat in _LETTER_PATTERNS:
    found = re.findall(pat, text)
    if found:
      return found[-1]
  return None


def _options(question: str) -> dict[str, str]:
  """{letter: option text} from lines like 'A: fog', 'B) rain', 'C. drought'."""
  return {m.group(1): m.group(2).strip()
          for m in re.finditer(r"(?m)^\s*\(?([A-J])[.:)]\s*(.+)$", question)}


def grade_multiple_choice(question: str, gold: str, answer: str) -> float:
  """1.0 when the candidate picks the reference option (by letter or by its text)."""
  opts = _options(question)
  ref = _reference_letter(gold)
  if ref is None:
    # The reference is option text: find its letter, else compare text.
    ref = next((k for k, v in opts.items() if normalize_text(v) == normalize_text(gold)), None)
    if ref is None:
      return float(_text_match(gold, _final_part(answer)))
  pick = candidate_letter(answer)
  if pick is None and opts:
    final = _final_part(answer)
    hits = [k for k, v in opts.items() if _text_match(v, final)]
    pick = hits[0] if len(hits) == 1 else None
  return float(pick == ref)


def _looks_like_words(text: str) -> bool:
  """A prose reference ("Paris", "the red car"): words, no digits or LaTeX."""
  return bool(re.search(r"[A-Za-z]{2,}", text)) and not re.search(r"[\\\d^=]", text)


def _mv_parse(text: str, timeout_s: int | None, reference: bool = False) -> list:
  """math-verify parse. A short bare expression ("5\\sqrt{2}", "(3, -2)") is read in
  math mode first, where the plain parser would keep only its last number; a prose
  candidate ("the answer is 18") is read as prose."""
  bare = text and len(text) <= 200 and "$" not in text and "\\boxed" not in text
  if bare and (reference or not re.search(r"(?<![\\A-Za-z])[A-Za-z]{3,}", text)):
    out = mv_parse("\\boxed{" + text + "}", parsing_timeout=timeout_s)
    if out:
      return out
  return mv_parse(text, parsing_timeout=timeout_s)


def grade_math(gold: str, answer: str, timeout_s: int | None = 5) -> float | None:
  """1.0/0.0 by math-verify, or None when the reference is not something it can parse.

  A GSM8K reference keeps only its part after `####`. `timeout_s` uses math-verify's
  SIGALRM guard, valid only on the main thread; pass None from worker threads."""
  if "####" in gold:
    gold = gold.rsplit("####", 1)[1]
  gold_parsed = _mv_parse(gold.strip(), timeout_s, reference=True)
  if not gold_parsed:
    return None
  pred = _mv_parse(_final_part(answer), timeout_s)
  return float(bool(pred) and mv_verify(gold_parsed, pred, timeout_seconds=timeout_s))


def grade_general(question: str, gold: str, answer: str, timeout_s: int | None = 5) -> float:
  """Letter references as multiple choice, prose by text match, the rest by math-verify."""
  if _reference_letter(gold) is not None and len(gold.strip()) <= 3:
    return grade_multiple_choice(question, gold, answer)
  final_gold = gold.rsplit("####", 1)[1] if "####" in gold else gold
  if _looks_like_words(final_gold):
    return float(_text_match(final_gold, _final_part(answer)))
  score = grade_math(gold, answer, timeout_s)
  return float(_text_match(final_gold, _final_part(answer))) if score is None else score


def _lcs(a: list[str], b: list[str]) -> int:
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l_f1(reference: str, candidate: str) -> float:
  """ROUGE-L F1 in [0, 1] over lowercase word tokens (each text cut to 1000 tokens)."""
  ref = re.findall(r"\w+", reference.lower())[:_MAX_SUMMARY_TOKENS]
  cand = re.findall(r"\w+", candidate.lower())[:_MAX_SUMMARY_TOKENS]
  if not ref or not cand:
    return 0.0
  lcs = _lcs(ref, cand)
  if lcs == 0:
    return 0.0
  p, r = lcs / len(cand), lcs / len(ref)
  return 2 * p * r / (p + r)


def grade(task_type: str, question: str, ground_truth: str, answer: str,
          timeout_s: int | None = 5) -> float:
  """Score in [0, 1] of `answer` against `ground_truth` for one of prompts.TASK_TYPES."""
  if task_type == "multiple_choice":
    return grade_multiple_choice(question, ground_truth, answer)
  if task_type == "summary":
    return rouge_l_f1(ground_truth, _final_part(answer))
  return grade_general(question, ground_truth, answer, timeout_s)
