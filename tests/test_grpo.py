"""GRPO math against plain NumPy references written here (no shared code with pasr_jax.grpo)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasr_jax import grpo, sharding


def np_logsoftmax(x):
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_grpo(logps, old, ref, adv, mask, beta, el, eh, agg, max_tokens=None, w=None):
  """The loss value, written out loop by loop."""
  B, T = logps.shape
  per = np.zeros((B, T))
  for b in range(B):
    for t in range(T):
      r = np.exp(logps[b, t] - old[b, t])
      a = adv[b]
      v = -min(r * a, min(max(r, 1 - el), 1 + eh) * a)
      if w is not None:
        v *= w[b, t]
      if beta:
        d = ref[b, t] - logps[b, t]
        v += beta * (np.exp(d) - d - 1)
      per[b, t] = v
  if agg == "token_mean":
    return (per * mask).sum() / mask.sum()
  if agg == "seq_mean_token_mean":
    rows = [(per[b] * mask[b]).sum() / mask[b].sum() for b in range(B) if mask[b].sum() > 0]
    return np.mean(rows)
  # Rows with no scored token are not sequences of the loss (grpo.loss_denominator).
  return (per * mask).sum() / ((mask.sum(1) > 0).sum() * max_tokens)


def _inputs(seed, B=5, T=7, spread=0.5):
  rng = np.random.default_rng(seed)
  old = rng.normal(-2, 1, (B, T))
  logps = old + rng.normal(0, spread, (B, T))
  ref = old + rng.normal(0, 0.3, (B, T))
  adv = rng.normal(0, 1, B)
  mask = (rng.random((B, T)) < 0.7).astype(np.float64)
  mask[0, :] = 0  # a sequence with no completion token
  mask[1, :] = 1
  return logps, old, ref, adv, mask


@pytest.mark.parametrize("agg", grpo.AGGS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("spread", [1e-3, 0.6])  # clipping inactive / active
def test_loss_matches_numpy(agg, beta, spread):
  logps, old, ref, adv, mask = _inputs(1, spread=spread)
  f = lambda x: jnp.asarray(x, jnp.float32)
  s, d, m = grpo.grpo_loss(f(logps), f(old), f(ref), f(adv), f(mask), beta=beta, eps_low=0.2,
                           eps_high=0.28, agg=agg, max_tokens=9)
  want = np_grpo(logps, old, ref, adv, mask, beta, 0.2, 0.28, agg, max_tokens=9)
  np.testing.assert_allclose(float(s / d), want, rtol=2e-5, atol=1e-7)
  ratio = np.exp(logps - old)
  active = (((ratio < 0.8) & (adv[:, None] < 0)) | ((ratio > 1.28) & (adv[:, None] > 0)))
  want_clip = (active * mask).sum() / mask.sum()
  np.testing.assert_allclose(float(m["clip_frac"]), want_clip, atol=1e-6)
  if spread > 0.1:
    assert want_clip > 0.05  # the clipping branch really is exercised
  else:
    assert want_clip == 0
  d_kl = ref - logps
  want_kl = ((np.exp(d_kl) - d_kl - 1) * mask).sum() / mask.sum() if beta else 0.0
  np.testing.assert_allclose(float(m["kl"]), want_kl, rtol=1e-5, atol=1e-7)
  assert float(m["tokens"]) == mask.sum()


def test_tis_weights_and_loss():
  logps, old, ref, adv, mask = _inputs(2, spread=0.3)
  old_trainer = old + np.random.default_rng(3).normal(0, 0.5, old.shape)
  f = lambda x: jnp.asarray(x, jnp.float32)
  w, keep, met = grpo.behaviour_weights(f(old_trainer), f(old), f(mask), cap=2.0)
  want_w = np.minimum(np.exp(old_trainer - old), 2.0) * mask
  np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(keep), mask)  # no band: every scored token kept
  assert np.asarray(w).max() == pytest.approx(2.0)  # the cap is hit
  np.testing.assert_allclose(float(met["logp_mismatch_mean"]),
                             (np.abs(old_trainer - old) * mask).sum() / mask.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(met["tis_ratio_max"]),
                             np.exp((old_trainer - old)[mask > 0].max()), rtol=1e-5)
  assert float(met["tis_ratio_max"]) > 2.0  # before the cap
  s, d, _ = grpo.grpo_loss(f(logps), f(old_trainer), f(ref), f(adv), f(mask), beta=0.04,
                           eps_low=0.2, eps_high=0.2, agg="token_mean", is_weights=w)
  want = np_grpo(logps, old_trainer, ref, adv, mask, 0.04, 0.2, 0.2, "token_mean", w=want_w)
  np.testing.assert_allclose(float(s / d), want, rtol=2e-5)


def np_behaviour_metrics(prox, behaviour, mask, cap, low, high):
  """The off-policy metrics over the scored tokens, from their definitions."""
  r = np.exp((prox - behaviour)[mask > 0].astype(np.float64))
  out = (r < low) | ((r > high) if high else False)
  return {"tis_ratio_mean": r.mean(), "tis_ratio_max": r.max(),
          "tis_ess": r.sum() ** 2 / (r.size * (r ** 2).sum()),
          "behaviour_kl": np.mean(r - 1 - np.log(r)),
          "tis_weight_mean": np.minimum(r, cap).mean() if cap else 1.0,
          "tis_clip_frac": np.mean(r > cap) if cap else 0.0, "is_masked_frac": out.mean()}


# Ratios pi_prox / pi_behaviour of 8 scored tokens in two rows; row 1 ends in 2 padding slots.
RATIOS = np.array([[1.0, 0.5, 3.0, 1.2, 0.05], [2.5, 0.9, 1.1, 7.0, 7.0]])
RMASK = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.float32)


@pytest.mark.parametrize("cap, low, high", [(2.0, 0.0, 0.0), (2.0, 0.4, 2.8), (0.0, 0.1, 0.0),
                                            (0.0, 0.0, 1.15)])
def test_behaviour_metrics_match_numpy(cap, low, high):
  behaviour = np.random.default_rng(0).normal(-2, 1, RATIOS.shape)
  prox = behaviour + np.log(RATIOS)
  behaviour[1, 3:] = 40.0  # padding: garbage the metrics must not see (ratio e^-40 or so)
  f = lambda x: jnp.asarray(x, jnp.float32)
  w, keep, m = grpo.behaviour_weights(f(prox), f(behaviour), f(RMASK), cap, low, high)
  want = np_behaviour_metrics(prox, behaviour, RMASK, cap, low, high)
  for k, v in want.items():
    np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, err_msg=k)
  # Crafted counts, exactly: of the 8 scored ratios, 3 and 2.5 exceed cap 2; the band
  # [0.4, 2.8] drops 0.05 and 3; [0.1, off] drops 0.05; [0, 1.15] drops 3, 1.2 and 2.5.
  assert float(m["tis_clip_frac"]) == (2 / 8 if cap else 0.0)
  dropped = {(0.4, 2.8): [(0, 2), (0, 4)], (0.1, 0.0): [(0, 4)],
             (0.0, 1.15): [(0, 2), (0, 3), (1, 0)]}.get((low, high), [])
  want_keep = RMASK.copy()
  for i in dropped:
    want_keep[i] = 0
  np.testing.assert_array_equal(np.asarray(keep), want_keep)
  assert float(m["is_masked_frac"]) == len(dropped) / 8
  assert 0 < float(m["tis_ess"]) < 1 and float(m["behaviour_kl"]) > 0
  assert float(np.asarray(w)[1, 3:].sum()) == 0  # no weight on padding


def test_behaviour_metrics_ignore_padding_and_are_trivial_on_policy():
  """Equal ratios: ESS 1; prox == behaviour: k3 KL 0, ratios 1. Padding changes nothing."""
  f = lambda x: jnp.asarray(x, jnp.float32)
  behaviour = np.random.default_rng(1).normal(-2, 1, RATIOS.shape).astype(np.float32)
  for shift in (0.0, 0.3):  # on policy / every ratio e^0.3
    prox = behaviour + np.float32(shift)
    prox[1, 3:] = -80.0  # padding that would dominate every metric
    _, _, m = grpo.behaviour_weights(f(prox), f(behaviour), f(RMASK), 2.0)
    assert float(m["tis_ess"]) == pytest.approx(1.0, abs=1e-6)
    assert float(m["tis_ratio_mean"]) == pytest.approx(np.exp(shift), rel=1e-6)
    kl = float(m["behaviour_kl"])
    assert kl == 0.0 if shift == 0 else kl == pytest.approx(np.exp(shift) - 1 - shift, rel=1e-4)
  # Only the scored tokens count: the same metrics as the 8 scored tokens alone.
  prox = behaviour + np.log(RATIOS)
  prox[1, 3:] = 60.0
  _, _, m = grpo.behaviour_weights(f(prox), f(behaviour), f(RMASK), 2.0, 0.4, 2.8)
  sel = RMASK > 0
  _, _, alone = grpo.behaviour_weights(f(prox[sel][None]), f(behaviour[sel][None]),
                                       jnp.ones((1, 8)), 2.0, 0.4, 2.8)
  for k in alone:
    np.testing.assert_allclose(float(m[k]), float(alone[k]), rtol=1e-6, err_msg=k)
  # A ratio of e^100 overflows float32 squared, not the scale-free ESS; no token: zeros.
  prox[0, 0] = behaviour[0, 0] + 100.0
  _, _, m = grpo.behaviour_weights(f(prox), f(behaviour), f(RMASK), 2.0)
  assert float(m["tis_ess"]) == pytest.approx(1 / 8, rel=1e-5)
  _, _, m = grpo.behaviour_weights(f(prox), f(behaviour), jnp.zeros(RMASK.shape), 2.0)
  assert all(float(v) == 0 for v in m.values()), m


def test_band_mask_is_the_loss_of_a_hand_masked_batch():
  """The band's mask in grpo_loss is the loss of a batch whose loss_mask drops exactly the
  out-of-band tokens by hand, under every aggregation (denominators included)."""
  logps, old, ref, adv, mask = _inputs(4, spread=0.3)
  behaviour = old + np.random.default_rng(5).normal(0, 0.5, old.shape)
  f = lambda x: jnp.asarray(x, jnp.float32)
  _, keep, m = grpo.behaviour_weights(f(old), f(behaviour), f(mask), 0.0, 0.7, 1.4)
  r = np.exp(np.float32(old) - np.float32(behaviour))
  hand = mask * ((r >= 0.7) & (r <= 1.4))
  assert 0 < hand.sum() < mask.sum()  # the band drops some tokens, not all
  np.testing.assert_array_equal(np.asarray(keep), hand)
  assert float(m["is_masked_frac"]) == pytest.approx(1 - hand.sum() / mask.sum(), rel=1e-6)
  for agg in grpo.AGGS:
    kw = dict(beta=0.04, eps_low=0.2, eps_high=0.28, agg=agg, max_tokens=9)
    s, d, _ = grpo.grpo_loss(f(logps), f(old), f(ref), f(adv), keep, **kw)
    s2, d2, _ = grpo.grpo_loss(f(logps), f(old), f(ref), f(adv), f(hand), **kw)
    assert float(s) == float(s2) and float(d) == float(d2)
    np.testing.assert_allclose(float(s / d), np_grpo(logps, old, ref, adv, hand, 0.04, 0.2,
                                                     0.28, agg, max_tokens=9), rtol=2e-5)


def test_bad_agg_raises():
  z = jnp.zeros((2, 3))
  with pytest.raises(grpo.GRPOError, match="bogus"):
    grpo.grpo_loss(z, z, z, jnp.zeros(2), z, beta=0.0, eps_low=0.2, eps_high=0.2, agg="bogus")
  with pytest.raises(grpo.GRPOError, match="max_tokens"):
    grpo.grpo_loss(z, z, z, jnp.zeros(2), z, beta=0.0, eps_low=0.2, eps_high=0.2,
                   agg="seq_mean_token_sum_norm")


def test_kl_zero_and_policy_gradient_at_ratio_one():
  """logp == old == ref: KL is 0, and d loss / d logp = -A·mask/denominator (the PG form)."""
  logps, _, _, adv, mask = _inputs(4)
  f = lambda x: jnp.asarray(x, jnp.float32)

  def loss(lp):
    s, d, m = grpo.grpo_loss(lp, jax.lax.stop_gradient(lp), lp, f(adv), f(mask), beta=0.04,
                             eps_low=0.2, eps_high=0.2, agg="token_mean")
    return s / d, m

  (val, m), g = jax.value_and_grad(loss, has_aux=True)(f(logps))
  assert float(m["kl"]) == 0.0
  assert float(m["ratio_mean"]) == pytest.approx(1.0)
  want = -adv[:, None] * mask / mask.sum()
  np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk", [3, 4, 64])
def test_token_logprobs_value_and_grad(temperature, chunk):
  rng = np.random.default_rng(5)
  B, T, V = 2, 10, 37
  logits = rng.normal(0, 3, (B, T, V)).astype(np.float32)
  tg = rng.integers(0, V, (B, T))
  cot = rng.normal(0, 1, (B, T)).astype(np.float32)
  lp = grpo.token_logprobs(jnp.asarray(logits), jnp.asarray(tg), temperature, chunk)
  ls = np_logsoftmax(logits.astype(np.float64) / temperature)
  want = np.take_along_axis(ls, tg[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(lp), want, rtol=1e-5, atol=1e-5)
  g = jax.grad(lambda x: (grpo.token_logprobs(x, jnp.asarray(tg), temperature, chunk)
                          * cot).sum())(jnp.asarray(logits))
  onehot = np.eye(V)[tg]
  want_g = cot[..., None] * (onehot - np.exp(ls)) / temperature
  np.testing.assert_allclose(np.asarray(g), want_g, rtol=1e-4, atol=1e-5)


def test_token_logprobs_chunks_large_vocab_in_memory():
  """The compiled forward must not hold a full [B,T,V] float32 log-softmax buffer."""
  B, T, V = 2, 512, 16384
  logits = jax.ShapeDtypeStruct((B, T, V), jnp.float32)  # the Decoder returns fp32
  tg = jax.ShapeDtypeStruct((B, T), jnp.int32)
  c = jax.jit(lambda x, y: grpo.token_logprobs(x, y, 1.0, 64)).lower(logits, tg).compile()
  temp = c.memory_analysis().temp_size_in_bytes
  assert temp < B * T * V * 4 / 4, temp  # ~one chunk, far below a copy of the logits


def test_sequence_logprobs_alignment():
  rng = np.random.default_rng(6)
  logits = rng.normal(0, 1, (1, 4, 5)).astype(np.float32)
  ids = np.array([[1, 2, 3, 4]])
  lp = np.asarray(grpo.sequence_logprobs(jnp.asarray(logits), jnp.asarray(ids)))
  ls = np_logsoftmax(logits.astype(np.float64))
  assert lp[0, 0] == 0
  for t in range(1, 4):
    assert lp[0, t] == pytest.approx(ls[0, t - 1, ids[0, t]], abs=1e-5)


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages(ddof, scale):
  r = np.array([1, 0, 1, 1, 0.5, 0.5, 0.5, 0.5, 0, 0.2, 0.9, 0.4], np.float64)
  adv, flat = grpo.group_advantages(r, n=4, ddof=ddof, scale=scale, eps=1e-4)
  assert flat.tolist() == [False, True, False]
  assert grpo.group_advantages(r, n=4).zero_variance == 1
  want = []
  for g in r.reshape(3, 4):
    c = [x - sum(g) / 4 for x in g]
    if scale == "group":
      var = sum(x * x for x in c) / (4 - ddof)
      c = [x / (var ** 0.5 + 1e-4) for x in c]
    elif scale == "batch":
      mu = r.mean()
      var = ((r - mu) ** 2).sum() / (r.size - ddof)
      c = [x / (var ** 0.5 + 1e-4) for x in c]
    want += c
  np.testing.assert_allclose(adv, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(adv[4:8], 0.0)  # the zero-variance group has no signal


def test_group_advantages_bad_input():
  with pytest.raises(grpo.GRPOError, match="n=3"):
    grpo.group_advantages(np.zeros(8), n=3)
  with pytest.raises(grpo.GRPOError, match="adv_scale"):
    grpo.group_advantages(np.zeros(8), n=4, scale="weird")


def test_mesh_shape_and_rules():
  assert sharding.resolve_shape((1, -1, 2), 8) == (1, 4, 2)
  with pytest.raises(sharding.MeshError, match="mesh.shape"):
    sharding.resolve_shape((3, -1, 1), 8)
  mesh = sharding.make_mesh((2, 2, 2))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
  assert sharding.logical_to_spec(("embed", "mlp"), rules, mesh, (64, 128)) == \
      jax.sharding.PartitionSpec("fsdp", "tensor")
  # 9 heads don't split in 2: replicated rather than an error
  assert sharding.logical_to_spec(("embed", "heads", "head_dim"), rules, mesh, (64, 9, 8)) == \
      jax.sharding.PartitionSpec("fsdp", None, None)
  # the same mesh axis is never used twice in one array
  assert sharding.logical_to_spec(("mlp", "vocab"), rules, mesh, (8, 8)) == \
      jax.sharding.PartitionSpec("tensor", None)
  with pytest.raises(sharding.MeshError, match="bogus"):
    sharding.logical_to_spec(("embed",), (("embed", "bogus"),))
