"""The Flax decoder against transformers (torch, fp32) on tiny random Qwen2/Qwen3/Llama models.

Eager calls compile each op once per input shape: the tests share one batch shape, (3, 16),
where the claim allows (the causal query blocks need 400 positions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from helpers import tiny_config
from pasr_jax.models.hf import load_hf
from pasr_jax.models import qwen
from pasr_jax.models.qwen import Decoder, ModelConfig, ModelConfigError

CASES = [("qwen2", True), ("qwen3", True), ("qwen3", False), ("llama", False)]
LOGICAL = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers", "norm"}


def make_hf_model(model_type: str, tied: bool, seed: int = 0):
  """A random transformers model for tiny_config(model_type); norms/biases made non-trivial."""
  cfg = tiny_config(model_type, tie_word_embeddings=tied)
  d = {k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(**d), dtype=torch.float32).eval()
  with torch.no_grad():  # default init makes norms 1 and biases 0: a mapping bug would hide
    for name, p in model.named_parameters():
      if "norm" in name or "bias" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model, cfg


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-{'tied' if t else 'untied'}"
                                                   for m, t in CASES])
def hf_pair(request, tmp_path_factory):
  model_type, tied = request.param
  hf_model, cfg = make_hf_model(model_type, tied)
  path = tmp_path_factory.mktemp(f"{model_type}_{tied}")
  hf_model.save_pretrained(path)
  return hf_model, cfg, path


def padded_batch(rng: np.random.RandomState, lengths, total: int, left: bool, vocab: int):
  ids = np.zeros((len(lengths), total), np.int32)
  mask = np.zeros((len(lengths), total), np.int32)
  seqs = [rng.randint(3, vocab, n) for n in lengths]
  for b, s in enumerate(seqs):
    sl = slice(total - len(s), total) if left else slice(0, len(s))
    ids[b, sl], mask[b, sl] = s, 1
  return ids, mask


def torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_logits_match_transformers(hf_pair, left):
  hf_model, cfg, path = hf_pair
  model, loaded_cfg = load_hf(path)
  assert loaded_cfg == cfg
  ids, mask = padded_batch(np.random.RandomState(0), [16, 9, 12], 16, left, cfg.vocab_size)
  ref = torch_logits(hf_model, ids, mask)
  out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert out.dtype == np.float32 and out.shape == (3, 16, cfg.vocab_size)
  real = mask > 0
  assert np.abs(out - ref)[real].max() <= 1e-4
  assert np.isfinite(out).all()  # padded query rows stay finite (no -inf softmax)


@pytest.mark.parametrize("left", [False, True], ids=["right_pad", "left_pad"])
def test_causal_query_blocks_match_transformers(hf_pair, left):
  # From 384 positions on, Attention splits queries into causal blocks that skip the keys
  # after the block; with padding, early blocks hold fully masked (padding) query rows.
  hf_model, cfg, path = hf_pair
  assert qwen._query_blocks(400) == 2 and qwen._query_blocks(2048) == 8
  assert qwen._query_blocks(16) == 1 and qwen._query_blocks(401) == 1
  model, _ = load_hf(path)
  ids, mask = padded_batch(np.random.RandomState(5), [400, 170, 333], 400, left,
                           cfg.vocab_size)
  ref = torch_logits(hf_model, ids, mask)
  out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  assert np.abs(out - ref)[mask > 0].max() <= 1e-4
  assert np.isfinite(out).all()


def test_left_and_right_padding_agree(hf_pair):
  _, cfg, path = hf_pair
  model, _ = load_hf(path)
  lengths = [11, 5, 8]
  rng_l, rng_r = np.random.RandomState(1), np.random.RandomState(1)
  ids_l, mask_l = padded_batch(rng_l, lengths, 16, True, cfg.vocab_size)
  ids_r, mask_r = padded_batch(rng_r, lengths, 16, False, cfg.vocab_size)
  out_l = np.asarray(model(jnp.asarray(ids_l), attention_mask=jnp.asarray(mask_l)))
  out_r = np.asarray(model(jnp.asarray(ids_r), attention_mask=jnp.asarray(mask_r)))
  for b in range(len(lengths)):
    np.testing.assert_allclose(out_l[b][mask_l[b] > 0], out_r[b][mask_r[b] > 0], atol=1e-5)


def test_explicit_positions_equal_derived_positions(hf_pair):
  _, cfg, path = hf_pair
  model, _ = load_hf(path)
  ids, mask = padded_batch(np.random.RandomState(2), [16, 10, 6], 16, True, cfg.vocab_size)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
  a = model(jnp.asarray(ids), positions=jnp.asarray(positions), attention_mask=jnp.asarray(mask))
  b = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # RoPE sees only relative distance: a constant shift changes nothing, a stretch does.
  shifted = model(jnp.asarray(ids), positions=jnp.asarray(positions + 5),
                  attention_mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(shifted), np.asarray(a), atol=1e-4)
  stretched = model(jnp.asarray(ids), positions=jnp.asarray(positions * 2),
                    attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(stretched) - np.asarray(a)).max() > 1e-3


def test_scan_and_remat_match_unrolled(hf_pair):
  _, cfg, path = hf_pair
  plain, _ = load_hf(path)
  scanned, _ = load_hf(path, scan_layers=True, remat=True)
  ids, mask = padded_batch(np.random.RandomState(3), [16, 8, 5], 16, False, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(scanned(jnp.asarray(ids), attention_mask=mask)),
                             np.asarray(plain(jnp.asarray(ids), attention_mask=mask)), atol=1e-5)


@pytest.mark.slow
def test_scan_and_remat_gradients_match_unrolled(tmp_path):
  hf_model, cfg = make_hf_model("qwen3", tied=False)  # the config with every optional param
  hf_model.save_pretrained(tmp_path)
  plain, _ = load_hf(tmp_path)
  scanned, _ = load_hf(tmp_path, scan_layers=True, remat=True)
  ids, mask = padded_batch(np.random.RandomState(3), [8, 5], 8, False, cfg.vocab_size)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)

  def loss(model):
    return jnp.mean(jax.nn.log_softmax(model(ids, attention_mask=mask))[..., 7])

  g_plain = nnx.grad(loss)(plain)
  g_scan = nnx.grad(loss)(scanned)
  for layer in range(cfg.num_layers):  # element [layer] of each stacked scan param
    for name in ("q_proj", "o_proj"):
      np.testing.assert_allclose(
          np.asarray(g_scan["layers"]["self_attn"][name][...][layer]),
          np.asarray(g_plain["layers"][layer]["self_attn"][name][...]), atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(g_scan["layers"]["self_attn"]["k_norm"]["weight"][...][layer]),
        np.asarray(g_plain["layers"][layer]["self_attn"]["k_norm"]["weight"][...]), atol=1e-6)
  assert np.abs(np.asarray(g_plain["embed_tokens"][...])).max() > 0


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_lm_head_gradient_equals_autodiff(dtype, tol):
  # The LM head has a hand-written backward (qwen._lm_head); check it against autodiff of
  # the plain matmul, in both compute dtypes.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 16)), dtype)
  w = jnp.asarray(rng.normal(size=(40, 16)), dtype)
  cot = jnp.asarray(rng.normal(size=(2, 5, 40)), jnp.float32)

  def loss(f):
    return lambda x, w: (f(x, w) * cot).sum()
  plain = lambda x, w: jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)
  ours = lambda x, w: qwen._lm_head(x.reshape(-1, 16), w).reshape(2, 5, 40)
  np.testing.assert_array_equal(np.asarray(ours(x, w)), np.asarray(plain(x, w)))
  got = jax.grad(loss(ours), argnums=(0, 1))(x, w)
  want = jax.grad(loss(plain), argnums=(0, 1))(x, w)
  for a, b in zip(got, want):
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() <= tol * np.abs(b).max()


def test_jit_matches_eager():
  cfg = tiny_config("qwen2")
  model = Decoder(cfg, rngs=nnx.Rngs(3))
  ids = jnp.arange(48, dtype=jnp.int32).reshape(3, 16) % cfg.vocab_size
  eager = model(ids)
  jitted = nnx.jit(lambda m, x: m(x))(model, ids)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_names(scan):
  cfg = tiny_config("qwen3", tie_word_embeddings=False)
  # Abstract params (no init computed): the names are metadata of the variables.
  model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), scan_layers=scan))
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  assert len(flat) > 0
  for path, var in flat:
    names = var.get_metadata()["out_sharding"]
    assert len(names) == var.get_value().ndim, path
    assert set(names) <= LOGICAL, (path, names)
    assert (names[0] == "layers") == (scan and path[0] == "layers"), (path, names)


def test_bf16_compute_is_close_to_fp32():
  cfg = tiny_config("llama")
  ref = Decoder(cfg, rngs=nnx.Rngs(0))
  low = Decoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  ids = jnp.arange(48, dtype=jnp.int32).reshape(3, 16)
  out = nnx.jit(lambda m, x: m(x))(low, ids)  # one compile instead of each bf16 op's
  assert out.dtype == jnp.float32
  assert np.abs(np.asarray(out) - np.asarray(ref(ids))).max() < 5e-2


def hf_dict() -> dict:
  return tiny_config("qwen3").to_hf_dict()


def test_config_round_trip_and_transformers5_rope_layout():
  for model_type, tied in CASES:
    cfg = tiny_config(model_type, tied)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
  # Llama 3 style list of eos ids: kept hashable (the config is static jit metadata).
  multi_eos = ModelConfig.from_hf_dict(hf_dict() | {"eos_token_id": [2, 7]})
  assert multi_eos.eos_token_id == (2, 7) and hash(multi_eos)
  assert multi_eos.to_hf_dict()["eos_token_id"] == [2, 7]
  d = hf_dict()
  del d["rope_theta"]  # transformers 5 keeps it only under rope_parameters
  d["rope_parameters"] = {"rope_theta": 1e6, "rope_type": "default"}
  assert ModelConfig.from_hf_dict(d).rope_theta == 1e6
  qwen2 = {k: v for k, v in tiny_config("qwen2").to_hf_dict().items() if k != "attention_bias"}
  assert ModelConfig.from_hf_dict(qwen2).attention_bias  # Qwen2 always has q/k/v biases


@pytest.mark.parametrize("change, match", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"hidden_size": None}, "'hidden_size' is missing"),
    ({"num_hidden_layers": None}, "'num_hidden_layers' is missing"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}, "rope_theta": None},
     "rope_type='yarn'"),
    ({"rope_parameters": None, "rope_theta": None}, "'rope_theta'"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
])
def test_bad_config_fields_raise(change, match):
  d = hf_dict()
  for k, v in change.items():
    if v is None:
      d.pop(k, None)
    else:
      d[k] = v
  with pytest.raises(ModelConfigError, match=match):
    ModelConfig.from_hf_dict(d)


def test_resolve_attention():
  assert qwen.resolve_attention("auto", jnp.float32) == "xla"          # CPU here
  assert qwen.resolve_attention("auto", jnp.bfloat16, platform="cuda") == "cudnn"
  assert qwen.resolve_attention("auto", jnp.float32, platform="cuda") == "xla"  # no fp32 cuDNN
  assert qwen.resolve_attention("xla", jnp.bfloat16, platform="cuda") == "xla"
  with pytest.raises(ModelConfigError, match="model.attention='cudnn' needs model.dtype"):
    qwen.resolve_attention("cudnn", jnp.float32)
  with pytest.raises(ModelConfigError, match="model.attention='flash'"):
    qwen.resolve_attention("flash", jnp.bfloat16)


def test_fused_attention_call_matches_blocked_attention():
  """`fused_attention` hands jax.nn.dot_product_attention causal masking, GQA and key padding
  by length; cuDNN cannot run here, so the same call with implementation="xla" is held to the
  blocked path (which transformers checks above) on right-padded rows of a GQA model."""
  cfg = tiny_config("qwen3")
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  attn = model.layers[0].self_attn
  b, t = 3, 400  # t >= 384: the blocked path splits causal query blocks
  lengths = np.array([400, 257, 31], np.int32)
  x = jax.random.normal(jax.random.key(1), (b, t, cfg.hidden_size), jnp.float32)
  mask2d = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  pos = jnp.asarray(np.maximum(np.cumsum(mask2d, 1) - 1, 0))
  cos, sin = qwen.rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta)
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  mask = (causal[None] & (jnp.asarray(mask2d)[:, None, :] > 0))[:, None, :, None]
  want = np.asarray(attn(x, cos, sin, mask))

  orig = qwen.fused_attention

  def fused_xla(q, k, v, lens, implementation):
    assert implementation == "cudnn"
    return orig(q, k, v, lens, "xla")
  attn.attention = "cudnn"
  qwen.fused_attention = fused_xla
  try:
    got = np.asarray(attn(x, cos, sin, jnp.asarray(lengths)))
  finally:
    qwen.fused_attention, attn.attention = orig, "xla"
  for i, n in enumerate(lengths):  # padding queries are don't-care (cuDNN writes zeros)
    np.testing.assert_allclose(got[i, :n], want[i, :n], atol=2e-5, rtol=1e-4)
