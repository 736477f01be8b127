"""The answer format parser (pasr_jax.answer_format) and the format reward on hand-written cases."""

import re

import pytest

from pasr_jax import answer_format, rewards

# (name, text, expected format reward). Duplicated-tag rows are the class of bug that an
# operator-precedence regex like `^<think>.*</think>|<answer>.*</answer>$` or a greedy `.*`
# between anchors lets through.
FORMAT_CASES = [
    ("plain", "<think>x</think><answer>4</answer>", 1),
    ("whitespace between and around", "  <think>\nx\n</think>\n\n<answer> 4 </answer>\n", 1),
    ("one refine", "<think>a<refine>fix</refine>b</think><answer>4</answer>", 1),
    ("three refines",
     "<think><refine>1</refine>a<refine>2</refine>b<refine>3</refine></think><answer>4</answer>",
     1),
    ("empty blocks", "<think></think><answer></answer>", 1),
    ("multiline with maths", "<think>\n2+2 = 5?\n<refine>no, 2+2 = 4</refine>\n</think>\n"
     "<answer>\\boxed{4}</answer>", 1),
    ("no tags", "the answer is 4", -1),
    ("missing answer", "<think>x</think>", -1),
    ("missing think", "<answer>4</answer>", -1),
    ("unclosed think", "<think>x<answer>4</answer>", -1),
    ("unclosed answer", "<think>x</think><answer>4", -1),
    ("duplicate think", "<think>a</think><think>b</think><answer>4</answer>", -1),
    ("duplicate answer", "<think>a</think><answer>4</answer><answer>5</answer>", -1),
    ("duplicate pair", "<think>a</think><answer>4</answer><think>b</think><answer>5</answer>", -1),
    ("nested think", "<think>a<think>b</think></think><answer>4</answer>", -1),
    ("answer before think", "<answer>4</answer><think>x</think>", -1),
    ("answer inside think", "<think>x<answer>4</answer></think>", -1),
    ("text before think", "Sure! <think>x</think><answer>4</answer>", -1),
    ("text between", "<think>x</think> so <answer>4</answer>", -1),
    ("text after answer", "<think>x</think><answer>4</answer> done", -1),
    ("refine outside think, before", "<refine>r</refine><think>x</think><answer>4</answer>", -1),
    ("refine in answer", "<think>x</think><answer><refine>r</refine>4</answer>", -1),
    ("refine after answer", "<think>x</think><answer>4</answer><refine>r</refine>", -1),
    ("refine between", "<think>x</think><refine>r</refine><answer>4</answer>", -1),
    ("nested refines", "<think><refine>a<refine>b</refine></refine></think><answer>4</answer>",
     -1),
    ("unclosed refine", "<think>a<refine>b</think><answer>4</answer>", -1),
    ("stray refine close", "<think>a</refine>b</think><answer>4</answer>", -1),
    ("refine crossing think", "<think>a<refine>b</think><answer>4</refine></answer>", -1),
    ("close before open", "</think><think>x<answer>4</answer>", -1),
    ("stray answer close", "<think>x</answer></think><answer>4</answer>", -1),
    ("capitalised tags are text", "<Think>x</Think><answer>4</answer>", -1),
]


def test_format_table_is_big_enough():
  assert len(FORMAT_CASES) >= 25
  assert {e for _, _, e in FORMAT_CASES} == {1, -1}


def _regex_check(pattern):
  return lambda t: re.search(pattern, t, re.DOTALL) is not None


def _counting_check(t):
  # Regex plus tag counts joined as `a != 2 and b != 2` where `or` was meant: the counts
  # only reject when BOTH are wrong, so a duplicated think (or answer) block passes.
  m = re.match(r"^<think>.*?</think>\s*<answer>.*?</answer>$", t, re.DOTALL)
  n_think = t.count("<think>") + t.count("</think>")
  n_answer = t.count("<answer>") + t.count("</answer>")
  return not (not m or n_think != 2 and n_answer != 2)


@pytest.mark.parametrize("naive", [
    # Anchored, but `.*` may swallow further tags: duplicates pass.
    _regex_check(r"^<think>.*</think>\s*<answer>.*</answer>$"),
    # Regex precedence: `^A|B$` is `(^A)|(B$)`, so either half alone passes.
    _regex_check(r"^<think>.*</think>|<answer>.*</answer>$"),
    _counting_check,
], ids=["greedy", "alternation", "and-or"])
def test_table_catches_one_regex_checks(naive):
  """The table holds cases that these plausible but wrong checks get wrong."""
  wrong = [name for name, text, expected in FORMAT_CASES
           if (1 if naive(text) else -1) != expected]
  assert wrong, "no case in the table separates the scanner from this check"
  assert _counting_check("<think>a</think><think>b</think><answer>4</answer>")


@pytest.mark.parametrize("name,text,expected", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_format_reward(name, text, expected):
  assert rewards.format_reward(text) == expected, name
  assert answer_format.format_ok(text) == (expected == 1), name


@pytest.mark.parametrize("text,n", [
    ("<think>a</think><answer>4</answer>", 0),
    ("<think><refine>a</refine></think><answer>4</answer>", 1),
    ("<think><refine>a</refine><refine>b</refine></think><answer>4</answer>", 2),
    ("<think><refine>a</think><answer>4</answer>", 0),          # unclosed
    ("<think></refine>a<refine></think><answer>4</answer>", 0),   # reversed
    ("<refine>a<refine>b</refine></refine>", 1),                  # only the inner pair
    # Unequal counts: no refinement (the original's rule), whatever pairs there are.
    ("<think><refine>a</refine><refine>b</think><answer>4</answer>", 0),
    ("<think><refine>a</refine></refine></think><answer>4</answer>", 0),
])
def test_count_refines(text, n):
  assert answer_format.count_refines(text) == n


@pytest.mark.parametrize("text,expected", [
    ("<think>x</think><answer> 42 </answer>", "42"),
    ("<think>x</think><answer>1</answer><answer>2</answer>", "2"),
    ("<think>x</think><answer>multi\nline</answer>", "multi\nline"),
    ("<think>x</think><answer>cut off", "cut off"),
    ("  no tags at all ", "no tags at all"),
])
def test_extract_answer(text, expected):
  assert answer_format.extract_answer(text) == expected
