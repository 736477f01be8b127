"""The refine analytics (pasr_jax/eval/refine.py) on hand-written answers: each block classed
confirm / correct / rewrite, fixes and breaks against the reference chain (never a
confirmation), the refine rate by bucket and its gap, error selectivity and fake slips."""

import math

import numpy as np
import pytest

from pasr_jax.eval import refine
from pasr_jax.tasks import arith

REF = "17 + 28 = 45\n45 * 2 = 90\n#### 90"


def _answer(think: str, final: str) -> str:
  return f"<think>\n{think}\n</think>\n<answer>\n{final}\n</answer>"


FIX = _answer("17 + 28 = 35\n<refine> Check: 17 + 20 + 8 = 37 + 8 = 45, not 35. </refine>\n"
              "45 * 2 = 90", "90")
BREAK = _answer("17 + 28 = 45\n<refine> Check: 17 + 20 + 8 = 37 + 8 = 55, not 45. </refine>\n"
                "55 * 2 = 110", "110")
CONFIRM = _answer("17 + 28 = 45\n<refine> Check: 17 + 20 + 8 = 37 + 8 = 45. Correct. "
                  "</refine>\n45 * 2 = 90", "90")
CONFIRM_WRONG = _answer("17 + 28 = 35\n<refine> Check: 35 - 28 = 7. Correct. </refine>\n"
                        "35 * 2 = 70", "70")
REWRITE = _answer("17 + 28 = 45\n45 * 2 = 80\n<refine> Let me start again. </refine>\n"
                  "17 + 28 = 45\n45 * 2 = 90", "90")
REDO = _answer("17 + 28 = 35\n<refine> The carry was lost. </refine>\n17 + 28 = 45\n"
               "45 * 2 = 90", "90")
LAST = _answer("17 + 28 = 45\n45 * 2 = 80\n<refine> Check: 45 + 45 = 90, not 80. </refine>",
               "90")
PLAIN = _answer("17 + 28 = 45\n45 * 2 = 90", "90")


@pytest.mark.parametrize("text,kind,before,after,outcome", [
    (FIX, "correct", 35, 45, "fix"),
    (BREAK, "correct", 45, 55, "break"),
    (CONFIRM, "confirm", 45, 45, "neutral"),
    # Confirming a wrong value is no fix, and carrying it on is no break.
    (CONFIRM_WRONG, "confirm", 35, 35, "neutral"),
    (REWRITE, "rewrite", 80, 17, "neutral"),
    (REDO, "correct", 35, 45, "fix"),
    (LAST, "correct", 80, 90, "fix"),   # after the last step: the final answer
])
def test_blocks_are_classed_with_their_values(text, kind, before, after, outcome):
  (b,) = refine.blocks_of(text, REF)
  assert (b.kind, b.before, b.after, b.outcome) == (kind, before, after, outcome)


def test_the_reference_chain_decides_right_not_the_steps_own_arithmetic():
  # 17 + 28 went wrong first; the refine then fixes 44 * 2 by its own arithmetic (98 -> 88),
  # but 88 is not the reference chain's 90: neutral against the chain, a fix without one.
  text = _answer("17 + 28 = 44\n44 * 2 = 98\n<refine> Check: 88, not 98. </refine>", "88")
  (b,) = refine.blocks_of(text, REF)
  assert (b.kind, b.outcome) == ("correct", "neutral")
  (b,) = refine.blocks_of(text, "90")
  assert (b.kind, b.outcome) == ("correct", "fix")


def test_blocks_without_a_step_are_classed_by_their_words():
  text = "<think>\nThe answer is 5. <refine> That is wrong, it should be 6. </refine>\n</think>"
  assert [b.kind for b in refine.blocks_of(text + "\n<answer>6</answer>")] == ["correct"]
  text = "<think>\nThe answer is 5. <refine> Yes, that holds. </refine>\n</think>"
  assert [b.kind for b in refine.blocks_of(text + "\n<answer>5</answer>")] == ["confirm"]
  text = "<think>\n<refine> Think about apples. </refine>\nSo 5.\n</think>"
  assert [b.kind for b in refine.blocks_of(text + "\n<answer>5</answer>")] == ["rewrite"]
  # Unpaired tags: no block, as count_refines.
  assert refine.blocks_of("<think> 1 + 1 = 3 <refine> x </think><answer>2</answer>") == []


def _rec(text, bucket, score, reference=REF):
  return dict(text=text, reference=reference, score=score, bucket=bucket)


def test_metrics_by_bucket_gap_fixes_and_breaks():
  answers = ([_rec(PLAIN, "easy", 1.0)] * 3 + [_rec(CONFIRM, "easy", 1.0)]     # easy: 1/4
             + [_rec(FIX, "medium", 1.0), _rec(FIX, "medium", 1.0), _rec(PLAIN, "medium", 1.0),
                _rec(BREAK, "hard", 0.0), _rec(REWRITE, "hard", 1.0), _rec(PLAIN, "hard", 0.0)])
  m = refine.refine_metrics(answers)
  assert m["n"] == 10 and m["n/easy"] == 4 and m["n/hard"] == 3
  assert m["refine_rate/easy"] == 0.25 and m["refine_rate/medium"] == pytest.approx(2 / 3)
  assert m["gap"] == pytest.approx(4 / 6 - 1 / 4)
  assert m["accuracy/hard"] == pytest.approx(1 / 3)
  assert m["accuracy/refining"] == pytest.approx(4 / 5)
  assert m["accuracy/not_refining"] == pytest.approx(4 / 5)
  assert (m["blocks"], m["blocks/confirm"], m["blocks/correct"], m["blocks/rewrite"]) == (
      5, 1, 3, 1)
  assert (m["fixes"], m["breaks"]) == (2, 1)
  assert m["net_fixes_per_100_harder"] == pytest.approx(100 * (2 - 1) / 6)
  assert m["fix_break_p"] == 1.0
  # First-pass steps (outside refine blocks): FIX's 17 + 28 = 35 and BREAK's 55 * 2 = 110 are
  # right/wrong by their own arithmetic; REWRITE's 45 * 2 = 80 is wrong.
  # Right: 3 x PLAIN 2 + CONFIRM 2 + 2 x FIX 1 + PLAIN 2 + BREAK 2 + REWRITE 3 + PLAIN 2.
  assert (m["steps/wrong"], m["steps/right"]) == (3, 19)   # 2 x FIX's 35, REWRITE's 80
  assert m["p_refine_step_wrong"] == 1.0
  assert m["p_refine_step_right"] == pytest.approx(2 / 19)   # CONFIRM's and BREAK's 45
  assert m["selectivity"] == pytest.approx(19 / 2)


def test_fake_slips_are_wrong_values_on_steps_the_model_nearly_always_gets_right():
  # 12 unrefined two-digit additions, all right: that class is "nearly always right", so the
  # slip FIX makes (17 + 28 = 35) before refining it is a fake one; a wrong one-digit product
  # whose class is often wrong unrefined is not.
  plain = [_rec(_answer(f"{10 + i} + 20 = {30 + i}", str(30 + i)), "easy", 1.0, "")
           for i in range(12)]
  often_wrong = [_rec(_answer(f"{i} * 3 = {3 * i + 1}", "0"), "easy", 0.0, "")
                 for i in range(2, 9)]
  real = _rec(_answer("6 * 3 = 19\n<refine> Check: 6 + 6 + 6 = 18, not 19. </refine>", "18"),
              "medium", 1.0, "18")
  m = refine.refine_metrics(plain + often_wrong + [_rec(FIX, "medium", 1.0), real])
  assert m["fake_slip_rate"] == 0.5
  assert m["check/before_right"] == 0.0 and m["check/after_right"] == 1.0
  assert math.isnan(refine.refine_metrics(plain)["fake_slip_rate"])


def test_empty_and_bucketless_answers_give_nans_not_errors():
  m = refine.refine_metrics([])
  assert m["n"] == 0 and math.isnan(m["refine_rate"]) and math.isnan(m["gap"])
  m = refine.refine_metrics([_rec(PLAIN, None, 1.0)])
  assert m["refine_rate"] == 0 and "refine_rate/easy" not in m and math.isnan(m["gap"])


def test_cold_start_traces_are_read_as_they_were_written():
  rows = arith.make_split(150, 4, arith.Difficulty(max_ops=3), held_out=False)
  for i, r in enumerate(rows):
    for kind, want in (("correct", ("correct", "fix")), ("confirm", ("confirm", "neutral"))):
      text = arith.trace(r["answer"], kind, np.random.default_rng(i))
      (b,) = refine.blocks_of(text, r["answer"])
      assert (b.kind, b.outcome) == want, text
    assert refine.blocks_of(arith.trace(r["answer"], "plain", np.random.default_rng(i))) == []


# --- the seed-stratified paired test (pasr_jax/eval/stats.py cmh_paired) ---------------------

def _cmh_general(tables):
  """Textbook CMH over 2x2 tables [[a, b], [c, d]] (rows: arm, columns: right / wrong)."""
  num = var = 0.0
  for (a, b), (c, d) in tables:
    n = a + b + c + d
    num += a - (a + b) * (a + c) / n
    var += (a + b) * (c + d) * (a + c) * (b + d) / (n * n * (n - 1))
  return num * num / var


def test_cmh_paired_by_hand_and_as_textbook_cmh_over_per_item_tables():
  from pasr_jax.eval.stats import cmh_paired, mcnemar_exact
  # Three seeds, discordant counts (b: first arm right only, c: second arm right only).
  strata = [(3, 9), (2, 7), (4, 6)]
  r = cmh_paired(strata)
  # By hand: b = 9, c = 22, chi2 = 13^2 / 31 = 5.4516..., p = erfc(sqrt(chi2 / 2)).
  assert (r["b"], r["c"]) == (9, 22)
  assert r["chi2"] == pytest.approx(169 / 31, abs=1e-12)
  assert r["p"] == pytest.approx(0.019551, abs=2e-6)
  assert r["p_exact"] == mcnemar_exact(9, 22) and r["odds_ratio"] == pytest.approx(22 / 9)
  assert cmh_paired(strata, correction=True)["chi2"] == pytest.approx(144 / 31, abs=1e-12)
  # The same as the textbook CMH with one table per item (each item answered by both arms;
  # concordant items of each seed included: they change nothing).
  tables = []
  for (b, c), (both, neither) in zip(strata, [(20, 5), (11, 30), (0, 2)]):
    tables += [[(1, 0), (0, 1)]] * b + [[(0, 1), (1, 0)]] * c
    tables += [[(1, 0), (1, 0)]] * both + [[(0, 1), (0, 1)]] * neither
  usable = [t for t in tables if t[0][0] + t[1][0] not in (0, 2)]   # others have no variance
  assert _cmh_general(usable) == pytest.approx(r["chi2"], rel=1e-12)
  # Edges: no discordant items; bad counts.
  assert cmh_paired([(0, 0), (0, 0)])["p"] == 1.0
  with pytest.raises(ValueError, match="b=-1"):
    cmh_paired([(-1, 2)])


def test_cmh_paired_p_values_match_scipy():
  stats = pytest.importorskip("scipy.stats")
  from pasr_jax.eval.stats import cmh_paired
  for strata in ([(3, 9), (2, 7), (4, 6)], [(40, 61), (35, 52)], [(10, 10)], [(0, 12)]):
    r = cmh_paired(strata)
    assert r["p"] == pytest.approx(stats.chi2.sf(r["chi2"], 1), rel=1e-9)
    n = int(r["b"] + r["c"])
    assert r["p_exact"] == pytest.approx(stats.binomtest(int(r["b"]), n, 0.5).pvalue, rel=1e-9)


# --- the probe (pasr_jax/eval/probe.py) with the scripted sampler ----------------------------

def test_probe_per_bucket_by_hand(tmp_path, smollm2_dir):
  """4 PASR answers per item: a correcting trace (right), a confirming one (right), a plain one
  (right), a wrong plain one; 4 baseline answers: 3 right. So per bucket: refine 50 %, accuracy
  refining 100 %, not refining 50 %, b = 0.75; a refining answer's refine reward is +1 at
  ζ = 0 and 0.125 (1 > 0.75 + ζ) and −0.5 at ζ = 0.25 (within ±ζ); the check: right before
  on 1 of 2 blocks (the slip), right after on 2 of 2."""
  from transformers import AutoTokenizer
  from helpers import ScriptedSampler, load_preset, write_jsonl
  from pasr_jax.config import RunConfig
  from pasr_jax.data import load_rows
  from pasr_jax.eval import probe
  rows = arith.make_split(9, 0, arith.Difficulty(), False, buckets=("easy", "medium", "hard"))
  path = write_jsonl(tmp_path / "train.jsonl", rows)
  by_q = {r["question"]: r for r in rows}
  c = load_preset("arith_135m")
  c.data.files = (path,)
  c.rollout.n = 4
  cfg = RunConfig.from_tree(c)
  items = probe.pick_items(load_rows(path), probe.buckets_of(cfg.data.files), 4, 0)
  assert [b for _, b in items] == ["easy", "medium", "hard", "easy"]
  K = len(items)

  def answer(i, question, k):
    row = next(r for q, r in by_q.items() if q in question)
    if i < K:   # PASR prompts come first
      if k < 2:
        return arith.trace(row["answer"], ("correct", "confirm")[k], np.random.default_rng(i))
      if k == 2:
        return arith.trace(row["answer"], "plain", np.random.default_rng(i))
      return "<think>\n1 + 1 = 2\n</think>\n<answer>\n100000\n</answer>"
    return arith.plain_trace(row["answer"]) if k < 3 else "1 + 1 = 2\n#### 100000"

  tok = AutoTokenizer.from_pretrained(smollm2_dir)
  sampler = ScriptedSampler(tok, answer)
  res = probe.probe(cfg, sampler, tok, items)
  assert list(res) == ["easy", "medium", "hard", "all"]
  # The PASR prompts carry the PASR system prompt, the baseline's the plain one.
  assert "<refine>" in tok.decode(sampler.calls[0][0]) and "<refine>" not in tok.decode(
      sampler.calls[0][K])
  w = cfg.rewards
  for name, r in res.items():
    assert r["answers"] == 4 * r["items"]
    assert (r["refine_rate"], r["acc_refining"], r["acc_not_refining"]) == (0.5, 1.0, 0.5)
    assert r["b"] == 0.75 and r["baseline_cut"] == 0.0
    assert (r["refine_reward@0"], r["refine_reward@0.125"], r["refine_reward@0.25"]) == (
        1.0, 1.0, -0.5)
    # E[reward | refine] − E[reward | not]: (f + a + w_r R) − (f + a / 2).
    assert r["advantage@0"] == pytest.approx(w.accuracy_weight / 2 + w.refine_weight)
    assert r["advantage@0.25"] == pytest.approx(w.accuracy_weight / 2 - 0.5 * w.refine_weight)
    assert (r["check_before_right"], r["check_after_right"]) == (0.5, 1.0)
    assert r["fixes"] == r["confirms"] == r["items"] and r["breaks"] == 0
  text = probe.table(res)
  assert "| easy | 8 | 50.0 | 100.0 | 50.0 | 75.0 | 0.0 | 0.0 | +1.00 | +1.00 | -0.50 |" in text


@pytest.mark.engine
def test_probe_with_the_real_engine(tmp_path, smollm2_dir, vllm_sampler):
  """The probe end to end on the real vLLM engine (SmolLM2 without a cold start, 3 items x 2
  answers per prompt): every bucket and the pooled row come out, with the counts asked for,
  the rates in range and the baseline's answers sampled under the plain prompt."""
  from transformers import AutoTokenizer
  from helpers import load_preset, write_jsonl
  from pasr_jax.config import RunConfig
  from pasr_jax.data import load_rows
  from pasr_jax.eval import probe
  rows = arith.make_split(6, 1, arith.Difficulty(), False, buckets=("easy", "medium", "hard"))
  path = write_jsonl(tmp_path / "train.jsonl", rows)
  c = load_preset("arith_135m")
  c.data.files = (path,)
  c.model.path = str(smollm2_dir)
  c.cold_start.enabled = False
  c.rollout.n = 2
  c.rollout.max_tokens = 48
  cfg = RunConfig.from_tree(c)
  items = probe.pick_items(load_rows(path), probe.buckets_of(cfg.data.files), 3, 0)
  res = probe.probe(cfg, vllm_sampler, AutoTokenizer.from_pretrained(smollm2_dir), items)
  assert list(res) == ["easy", "medium", "hard", "all"]
  assert res["all"]["answers"] == 6 and res["all"]["items"] == 3
  for r in res.values():
    assert 0 <= r["b"] <= 1 and 0 <= r["refine_rate"] <= 1 and 0 <= r["baseline_cut"] <= 1
  assert "| all | 6 |" in probe.table(res)
