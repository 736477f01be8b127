"""Rewards and prompts of pasr_jax.pasr on hand-written cases."""

import re

import ml_collections
import pytest

from pasr_jax import pasr

T, A = "<think>", "<answer>"

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
  assert pasr.format_reward(text) == expected, name


@pytest.mark.parametrize("text,n", [
    ("<think>a</think><answer>4</answer>", 0),
    ("<think><refine>a</refine></think><answer>4</answer>", 1),
    ("<think><refine>a</refine><refine>b</refine></think><answer>4</answer>", 2),
    ("<think><refine>a</think><answer>4</answer>", 0),          # unclosed
    ("<think></refine>a<refine></think><answer>4</answer>", 0),   # reversed
    ("<refine>a<refine>b</refine></refine>", 1),                  # only the inner pair
])
def test_count_refines(text, n):
  assert pasr.count_refines(text) == n


@pytest.mark.parametrize("text,expected", [
    ("<think>x</think><answer> 42 </answer>", "42"),
    ("<think>x</think><answer>1</answer><answer>2</answer>", "2"),
    ("<think>x</think><answer>multi\nline</answer>", "multi\nline"),
    ("<think>x</think><answer>cut off", "cut off"),
    ("  no tags at all ", "no tags at all"),
])
def test_extract_answer(text, expected):
  assert pasr.extract_answer(text) == expected


REFINED = "<think>a<refine>b</refine></think><answer>4</answer>"
UNREFINED = "<think>a</think><answer>4</answer>"


@pytest.mark.parametrize("acc,baseline,zeta,expected", [
    (1.0, [0.0, 1.0], 0.0, 1.0),     # 1 > 0.5
    (0.0, [0.0, 1.0], 0.0, -1.0),    # 0 < 0.5
    (0.5, [0.0, 1.0], 0.0, -0.5),    # equal: strict comparisons both fail
    (0.7, [0.5], 0.2, -0.5),         # exactly mean + zeta: not above
    (0.71, [0.5], 0.2, 1.0),         # just above mean + zeta
    (0.3, [0.5], 0.2, -0.5),         # exactly mean - zeta: not below
    (0.29, [0.5], 0.2, -1.0),        # just below mean - zeta
    (1.0, [1.0] * 8, 0.0, -0.5),     # baseline already perfect: refining cannot win
])
def test_refine_reward_at_zeta_boundaries(acc, baseline, zeta, expected):
  assert pasr.refine_reward(REFINED, acc, baseline, zeta) == expected


def test_refine_reward_zero_without_refine_or_baseline():
  assert pasr.refine_reward(UNREFINED, 1.0, [0.0], 0.0) == 0.0
  assert pasr.refine_reward("<think><refine>open</think><answer>1</answer>", 1.0, [0.0]) == 0.0
  assert pasr.refine_reward(REFINED, 1.0, None, 0.0) == 0.0
  with pytest.raises(pasr.RewardError, match="empty"):
    pasr.refine_reward(REFINED, 1.0, [], 0.0)
  with pytest.raises(pasr.RewardError, match="zeta"):
    pasr.refine_reward(REFINED, 1.0, [0.0], -0.1)


def test_total_reward_weights():
  # Paper defaults: 1*format + 1*acc + 1*refine.
  assert pasr.total_reward(REFINED, 1.0, [0.0]) == 1 + 1 + 1
  assert pasr.total_reward(REFINED, 0.0, [1.0]) == 1 + 0 - 1
  assert pasr.total_reward("4", 1.0, [0.0]) == -1 + 1 + 0
  w = ml_collections.ConfigDict(dict(format_weight=0.5, accuracy_weight=2.0,
                                     refine_weight=0.25, zeta=0.3))
  # acc 0.7 vs mean 0.5 is within zeta 0.3 -> refine -0.5.
  assert pasr.total_reward(REFINED, 0.7, [0.5], w) == pytest.approx(0.5 + 1.4 - 0.125)
  assert pasr.reward_terms(REFINED, 0.9, [0.5], 0.3) == {
      "format": 1.0, "accuracy": 0.9, "refine": 1.0}


@pytest.mark.parametrize("task_type", pasr.TASK_TYPES)
def test_judge_messages_round_trip(task_type):
  q = "What is 2+2?\n=== END ===\ntricky line"
  gt = "4\n#### 4"
  ans = "<think>=== CANDIDATE ANSWER ===</think><answer>4</answer>\n"
  msgs = pasr.judge_messages(q, gt, ans, task_type)
  assert [m["role"] for m in msgs] == ["system", "user"]
  assert msgs[0]["content"] == pasr.JUDGE_INSTRUCTIONS[task_type]
  assert pasr.parse_judge_sections(msgs[1]["content"]) == {
      "task_type": task_type, "question": q, "ground_truth": gt, "answer": ans}


def test_judge_messages_rejects_unknown_task():
  with pytest.raises(pasr.PromptError, match="task_type='essay'"):
    pasr.judge_messages("q", "a", "b", "essay")
  assert pasr.parse_judge_sections("no sections here") is None


def test_load_prompts_from_files(tmp_path):
  (tmp_path / "pasr.txt").write_text("Refine a lot.\n")
  jd = tmp_path / "judge"
  jd.mkdir()
  (jd / "general.txt").write_text("Q: {question}\nRef: {ground_truth}\nAns: {answer}\nScore:")
  cfg = ml_collections.ConfigDict(dict(pasr_system_file=str(tmp_path / "pasr.txt"),
                                       plain_system_file="", judge_dir=str(jd)))
  p = pasr.load_prompts(cfg)
  assert p.pasr_system == "Refine a lot."
  assert p.plain_system == pasr.PLAIN_SYSTEM_PROMPT
  assert p.judge["summary"] == pasr.JUDGE_INSTRUCTIONS["summary"]
  msgs = p.judge_messages("1+1 {x}", "2", "\\frac{4}{2}", "general")
  assert msgs == [{"role": "user", "content": "Q: 1+1 {x}\nRef: 2\nAns: \\frac{4}{2}\nScore:"}]
  assert pasr.load_prompts(None) == pasr.Prompts()


def test_load_prompts_errors_name_the_field(tmp_path):
  missing = ml_collections.ConfigDict(dict(pasr_system_file=str(tmp_path / "nope.txt")))
  with pytest.raises(pasr.PromptError, match="pasr_system_file=.*nope.txt"):
    pasr.load_prompts(missing)
  (tmp_path / "empty.txt").write_text("  \n")
  empty = ml_collections.ConfigDict(dict(plain_system_file=str(tmp_path / "empty.txt")))
  with pytest.raises(pasr.PromptError, match="plain_system_file=.*empty"):
    pasr.load_prompts(empty)
  nodir = ml_collections.ConfigDict(dict(judge_dir=str(tmp_path)))
  with pytest.raises(pasr.PromptError, match="judge_dir=.*none of"):
    pasr.load_prompts(nodir)


def test_judge_input_modes():
  text = "<think>x</think><answer> 7 </answer>"
  assert pasr.judge_input(text, "full") == text
  assert pasr.judge_input(text, "answer") == "7"
  with pytest.raises(pasr.PromptError, match="judge.input='both'"):
    pasr.judge_input(text, "both")


# The paper's Table 2 ablations of the refine reward, on hand-written groups.
REF = "<think> a <refine> b </refine> c </think> <answer> 4 </answer>"
NOREF = "<think> a </think> <answer> 4 </answer>"


def _refine_terms(compare, texts, accs, base, **extra):
  cfg = ml_collections.ConfigDict(dict(zeta=0.0, refine_compare=compare, refine_fixed=1.0,
                                       **extra))
  return [t["refine"] for t in pasr.group_reward_terms(texts, accs, base, cfg)]


def test_refine_against_the_mean_of_the_baseline_answers():
  # baseline mean 0.25: 1 and 0.5 beat it, 0 does not, the unrefined answer gets 0
  assert _refine_terms("mean", [REF, REF, REF, NOREF], [1, .5, 0, 1], [1, 0, 0, 0]) == [
      1.0, 1.0, -1.0, 0.0]
  assert _refine_terms("mean", [REF], [1], None) == [0.0]  # no baseline: no refine reward


def test_refine_without_multi_answer_compares_with_one_baseline_answer():
  # answer k against baseline answer k only: 1 vs 1 tie, 0.5 vs 0 better, 0 vs 0 tie
  assert _refine_terms("single", [REF, REF, REF, NOREF], [1, .5, 0, 1], [1, 0, 0, 0]) == [
      -0.5, 1.0, -0.5, 0.0]
  assert _refine_terms("single", [REF, REF], [0, 1], [1, 0]) == [-1.0, 1.0]
  with pytest.raises(pasr.RewardError, match="refine_compare='single'.*2 answers but 3"):
    _refine_terms("single", [REF, REF], [0, 1], [1, 0, 0])


def test_refine_without_comparison_is_a_fixed_reward_for_refining():
  # whatever the accuracies, a refinement earns the fixed reward and its absence 0
  assert _refine_terms("none", [REF, REF, NOREF], [0, 1, 1], [1, 1, 1]) == [1.0, 1.0, 0.0]
  assert _refine_terms("none", [REF, NOREF], [0, 0], None) == [1.0, 0.0]  # no baseline needed
  cfg = ml_collections.ConfigDict(dict(refine_compare="none", refine_fixed=0.5))
  assert [t["refine"] for t in pasr.group_reward_terms([REF], [0.0], None, cfg)] == [0.5]
  with pytest.raises(pasr.RewardError, match="rewards.refine_compare='best'"):
    _refine_terms("best", [REF], [0], [0])
