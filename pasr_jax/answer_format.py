"""The PASR answer format, parsed: tags, the C1-C3 layout check, refinements, the final answer.

An answer looks like
  <think> ... <refine> ... </refine> ... </think> <answer> ... </answer>
"""

from __future__ import annotations

import re

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


def count_refines(text: str) -> int:
  """Number of complete <refine>...</refine> pairs (an open tag whose next refine tag is
  its close), anywhere in the text; 0 unless the text has as many <refine> as </refine>
  tags (the original's rule for "has a refinement", `PASR/pasr_main.py` reward_refine)."""
  seq = [t for t, _, _ in _tags(text) if t in ("refine", "/refine")]
  if seq.count("refine") != seq.count("/refine"):
    return 0
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

