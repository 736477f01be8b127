"""The sharded GRPO train step on a tiny random Qwen2: exactness, sharding, direction of learning."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.base import get_base_config
from helpers import tiny_config
from pasr_jax import checks, grpo, sharding
from pasr_jax.batch import Batch
from pasr_jax.config import ConfigError, RunConfig
from pasr_jax.models.qwen import Decoder
from pasr_jax.trainer import (BATCH_KEYS, TOKEN_FIELDS, Trainer, TrainerError, make_grad_fn,
                              nll_loss)

B, L, PROMPT = 8, 20, 6

GRPO_FIXTURE = pathlib.Path(__file__).parent / "data" / "grpo_two_updates.npz"
# The recorded cases (test_grpo_updates_are_bitwise_the_recorded_ones): config overrides and
# how the two updates are taken ("update": two Trainer.update calls; "train_batch": one call
# taking grpo.num_iterations=2 updates).
GRPO_CASES = {
    "update_beta_2micro": ({"grpo.beta": 0.04, "optim.micro_batch": 4}, "update"),
    "train_batch_tis": ({"grpo.beta": 0.04, "grpo.tis_cap": 2.0, "grpo.num_iterations": 2,
                         "grpo.agg": "token_mean"}, "train_batch"),
}
# One config for the small update tests (and the reference of the TIS/band test), the first
# recorded case's: one trainer (the `trainers` fixture) serves them all.
SHARED = dict(GRPO_CASES["update_beta_2micro"][0])


def make_cfg(**over):
  c = get_base_config()
  c.mesh.shape = (1, 1, 1)
  c.optim.lr = 1e-3
  c.optim.micro_batch = 8
  c.rollout.max_tokens = L - PROMPT
  c.grpo.beta = 0.0
  for k, v in over.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def make_batch(seed=0, vocab=256):
  """Prompt of PROMPT tokens + a completion of random length, right-padded to L."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, (B, L)).astype(np.int32)
  lens = rng.integers(3, L - PROMPT + 1, B)
  lens[0] = L - PROMPT
  attn = np.zeros((B, L), np.int32)
  loss = np.zeros((B, L), np.float32)
  for b in range(B):
    attn[b, :PROMPT + lens[b]] = 1
    loss[b, PROMPT:PROMPT + lens[b]] = 1
  ids = ids * attn
  return Batch(input_ids=ids, attention_mask=attn,
               positions=np.tile(np.arange(L, dtype=np.int32), (B, 1)),
               loss_mask=loss, old_logps=np.zeros((B, L), np.float32),
               advantages=rng.normal(0, 1, B).astype(np.float32))


def make_trainer(cfg, mesh=None, seed=0, loss=None):
  model = Decoder(tiny_config("qwen2"), rngs=nnx.Rngs(seed))
  if mesh is None:
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  return Trainer(RunConfig.from_tree(cfg).trainer_cfg(), model, tiny_config("qwen2"), mesh,
                 loss=loss)


@pytest.fixture(scope="module")
def trainers():
  """`trainers(**over)`: the module's one trainer of `make_cfg(**over)` (one device, seed 0),
  put back to its initial params and optimizer state. Tests of one config reuse its compiled
  update and logprobs programs instead of tracing, lowering and compiling them again (a new
  Trainer's jitted functions are new objects). Not for tests that count compilations."""
  made = {}

  def get(**over):
    key = tuple(sorted(over.items()))
    if key not in made:
      tr = make_trainer(make_cfg(**over))
      made[key] = (tr, jax.tree.map(np.asarray, tr.state_for_checkpoint()))
    tr, initial = made[key]
    tr.restore_from_checkpoint(initial)
    return tr

  yield get
  made.clear()


def gradients(tr, batch):
  """The full-batch loss gradient (no step taken) and metrics: the pure function whose result
  `Trainer.update` applies, jitted here on the trainer's params and batch placement."""
  dev, num_micro, _ = tr._put_batch(batch, TOKEN_FIELDS + tr.loss.fields)
  grad_fn = make_grad_fn(tr.graphdef, tr._rest, tr.cfg, num_micro, tr.mesh, loss=tr.loss)
  with sharding.use_mesh(tr.mesh, tr.rules):
    grads, m = jax.jit(grad_fn)(tr.params, tr.ref_params, dev)
  return grads, {k: float(v) for k, v in m.items()}


def flat(tree):
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def with_old(trainer, batch, noise=0.0, seed=1):
  """Sets old_logps to the trainer's own logprobs (ratio 1), optionally perturbed."""
  lp = trainer.logprobs(batch)
  lp = lp + noise * np.random.default_rng(seed).normal(size=lp.shape).astype(np.float32)
  return batch.replace(old_logps=(lp * batch.loss_mask).astype(np.float32))


def np_logprobs(model, batch):
  """Reference per-token logprobs with a plain full log_softmax (no chunking, no custom vjp)."""
  logits = model(jnp.asarray(batch.input_ids), jnp.asarray(batch.positions),
                 jnp.asarray(batch.attention_mask))
  ls = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  lp = jnp.take_along_axis(ls, jnp.asarray(batch.input_ids)[:, 1:, None], -1)[..., 0]
  return jnp.pad(lp, ((0, 0), (1, 0)))


def test_nll_loss_is_the_gradient_of_grpo_at_ratio_one_in_one_pass():
  """nll_loss (SFT) reads only the tokens and loss_mask, reports the NLL before the update as
  its loss and compiles nothing but the update (no logprob pass first); its gradient is the
  one GRPO had with advantages 1, beta 0, token_mean and old_logps = the policy's."""
  cfg = make_cfg(**{"grpo.agg": "token_mean"})
  nll, ref = make_trainer(cfg, loss=nll_loss()), make_trainer(cfg)
  full = make_batch(9)
  tokens = full.only(TOKEN_FIELDS)
  mask = full.loss_mask
  lp = ref.logprobs(full, scored_only=True)
  as_grpo = full.replace(old_logps=lp, advantages=np.ones(B, np.float32))
  g_nll, m_nll = gradients(nll, tokens)
  g_grpo, _ = gradients(ref, as_grpo)
  np.testing.assert_allclose(flat(g_nll), flat(g_grpo), rtol=1e-5,
                             atol=1e-6 * np.abs(flat(g_grpo)).max())
  before = flat(nll.params)
  m = nll.update(tokens)
  assert nll.compilations == 1 and set(nll._fns) == {("update", 1, TOKEN_FIELDS)}
  assert m["loss"] == pytest.approx(-(lp * mask).sum() / mask.sum(), rel=1e-6)
  assert m["loss"] == m_nll["loss"] and m["tokens"] == mask.sum() and m["skipped"] == 0
  assert not np.array_equal(flat(nll.params), before)
  assert nll.ref_params is None


def test_ref_equals_policy_gives_zero_kl(trainers):
  tr = trainers(**SHARED)
  batch = with_old(tr, make_batch())
  np.testing.assert_array_equal(flat(tr.ref_params), flat(tr.params))  # fp32: an exact copy
  m = tr.update(batch)
  assert m["kl"] == 0.0
  assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
  m2 = tr.update(batch)  # the policy moved, the reference did not
  assert m2["kl"] > 0


@pytest.mark.parametrize("agg", ["seq_mean_token_mean"])  # token_mean: see test_grpo.py
@pytest.mark.slow
def test_ratio_one_gradient_is_policy_gradient(agg):
  """At ratio 1 and beta 0 the GRPO gradient is grad of -sum(A * logp * mask) / denominator."""
  tr = make_trainer(make_cfg(**{"grpo.agg": agg}))
  batch = with_old(tr, make_batch(1))
  grads, m = gradients(tr, batch)
  mask, adv = jnp.asarray(batch.loss_mask), jnp.asarray(batch.advantages)

  def pg(params):
    lp = np_logprobs(nnx.merge(tr.graphdef, params, tr._rest), batch)
    per_seq = (adv[:, None] * lp * mask).sum(1)
    if agg == "token_mean":
      return -per_seq.sum() / mask.sum()
    return -(per_seq / mask.sum(1)).sum() / B

  want = jax.grad(pg)(tr.params)
  g, w = flat(grads), flat(want)
  assert np.abs(w).max() > 0
  np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


@pytest.mark.parametrize("agg", ["seq_mean_token_mean"])  # its denominator is the tricky one
@pytest.mark.slow
def test_four_micro_batches_equal_one_big_batch(agg):
  batch = make_batch(2)
  out = {}
  for mb in (2, 8):
    tr = make_trainer(make_cfg(**{"optim.micro_batch": mb, "grpo.beta": 0.04, "grpo.agg": agg}))
    b = with_old(tr, batch, noise=0.3)  # ratios away from 1, clipping active on some tokens
    g, _ = gradients(tr, b)
    m = tr.update(b)
    out[mb] = (flat(g), flat(tr.params), m)
  (g2, p2, m2), (g8, p8, m8) = out[2], out[8]
  assert m8["clip_frac"] > 0
  np.testing.assert_allclose(g2, g8, rtol=1e-5, atol=1e-6 * np.abs(g8).max())
  assert np.linalg.norm(p2 - p8) / np.linalg.norm(p8) <= 1e-6
  assert m2["loss"] == pytest.approx(m8["loss"], rel=1e-5)
  assert m2["kl"] == pytest.approx(m8["kl"], rel=1e-5)


@pytest.mark.slow
def test_mesh_2x2x2_equals_one_device():
  assert jax.device_count() >= 8
  batch = make_batch(3)
  res = {}
  for name, mesh in (("one", sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])),
                     ("222", sharding.make_mesh((2, 2, 2), devices=jax.devices()[:8]))):
    # lr 1e-4: Adam's first steps are ~lr * sign(g), so a wrong gradient moves a param by
    # ~1e-4, far outside the 1e-5 bound, while elements with |g| ~ Adam's eps (whose
    # m / (sqrt(v) + eps) is ill-conditioned) stay within it whatever the summation order.
    tr = make_trainer(make_cfg(**{"optim.micro_batch": 4, "grpo.beta": 0.04,
                                  "optim.lr": 1e-4}), mesh)
    b = with_old(tr, batch, noise=0.2)
    grads = flat(gradients(tr, b)[0])
    ms = [tr.update(b) for _ in range(2)]
    res[name] = (flat(tr.params), ms, grads)
    if name == "222":  # really sharded: fsdp on embed, tensor on heads
      q = tr.params["layers"][0]["self_attn"]["q_proj"]
      assert q.sharding.spec == jax.sharding.PartitionSpec("tensor", None, "fsdp")
  (p1, m1, g1), (p8, m8, g8) = res["one"], res["222"]
  assert np.linalg.norm(g8 - g1) / np.linalg.norm(g1) < 1e-5
  for a, b in zip(m1, m8):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
  np.testing.assert_allclose(p8, p1, rtol=0, atol=1e-5)
  assert np.linalg.norm(p8 - p1) / np.linalg.norm(p1) < 1e-6


def test_fixed_advantages_move_logprobs_the_right_way(trainers):
  tr = trainers(**SHARED)
  batch = make_batch(4).replace(advantages=np.array([1, -1] * (B // 2), np.float32))
  before = (tr.logprobs(batch) * batch.loss_mask).sum(1) / batch.loss_mask.sum(1)
  for _ in range(4):
    tr.update(with_old(tr, batch))
  after = (tr.logprobs(batch) * batch.loss_mask).sum(1) / batch.loss_mask.sum(1)
  delta = after - before
  assert np.all(delta[0::2] > 0), delta
  assert np.all(delta[1::2] < 0), delta


def test_non_finite_step_is_skipped(trainers):
  tr = trainers(**SHARED)
  batch = with_old(tr, make_batch(5))
  before = flat(tr.params)
  bad = batch.replace(advantages=np.full(B, np.nan, np.float32))
  m = tr.update(bad)
  assert m["skipped"] == 1.0 and m["skipped_steps"] == 1.0
  np.testing.assert_array_equal(flat(tr.params), before)
  m = tr.update(batch)
  assert m["skipped"] == 0.0 and m["skipped_steps"] == 1.0
  assert not np.array_equal(flat(tr.params), before)


def test_tis_and_the_ratio_band_recompute_old_logps_and_weigh_or_drop_tokens(trainers):
  """One batch whose sampler disagrees with the trainer, one reference trainer (restored to
  its initial state between the two cases):
  tis_cap: old_logps become the trainer's, weighted by min(r, cap) against the sampler's;
  with the band off the update is bit-identical to the one before the band existed.
  grpo.is_mask_low/high alone (no tis_cap) recompute old_logps, and the update is the one
  on a batch whose loss_mask zeroes the out-of-band tokens by hand."""
  band = {"grpo.is_mask_low": 0.7, "grpo.is_mask_high": 1.4, **SHARED}
  ref = trainers(**SHARED)
  batch = with_old(ref, make_batch(6), noise=0.5)  # a sampler that disagrees with the trainer
  prox = ref.logprobs(batch, scored_only=True)
  mask = jnp.asarray(batch.loss_mask)

  # tis_cap, no band.
  tr = make_trainer(make_cfg(**{"grpo.tis_cap": 2.0, **SHARED}))
  m = tr.train_batch(batch)
  assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # ratio against the trainer's logps
  assert 0.2 < m["logp_mismatch_mean"] < 0.6
  assert m["tis_weight_mean"] < 2.0
  assert 0 < m["tis_ess"] < 1 and m["behaviour_kl"] > 0 and 0 < m["tis_clip_frac"] < 1
  assert m["is_masked_frac"] == 0 and m["tokens"] == batch.loss_mask.sum()
  # The weights as the trainer computed them before grpo.is_mask_low/high, written out.
  diff = (jnp.asarray(prox) - jnp.asarray(batch.old_logps)) * mask
  w = jnp.where(mask > 0, jnp.minimum(jnp.exp(diff), 2.0), 0.0)
  ref.update(batch.replace(old_logps=prox, is_weights=np.asarray(w)))
  np.testing.assert_array_equal(flat(tr.params), flat(ref.params))

  # The band, no tis_cap.
  ref = trainers(**SHARED)  # back to its initial state
  tr = make_trainer(make_cfg(**band))
  r = np.exp(prox - batch.old_logps)
  hand = (batch.loss_mask * ((r >= 0.7) & (r <= 1.4))).astype(np.float32)
  assert 0 < hand.sum() < batch.loss_mask.sum()  # some tokens out of the band, not all
  m = tr.train_batch(batch)
  want = ref.update(batch.replace(old_logps=prox, loss_mask=hand))
  np.testing.assert_array_equal(flat(tr.params), flat(ref.params))
  assert m["loss"] == want["loss"] and m["tokens"] == want["tokens"] == hand.sum()
  assert m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # against the trainer's logps
  assert m["is_masked_frac"] == pytest.approx(1 - hand.sum() / batch.loss_mask.sum())
  assert m["tis_weight_mean"] == 1.0 and m["tis_clip_frac"] == 0  # no cap: weight 1


@pytest.mark.parametrize("key, value, why", [
    ("grpo.is_mask_low", 1.0, "must be in [0, 1) (0 = off)"),
    ("grpo.is_mask_low", -0.1, "must be in [0, 1) (0 = off)"),
    ("grpo.is_mask_high", 1.0, "must be 0 (off) or > 1"),
    ("grpo.is_mask_high", 0.5, "must be 0 (off) or > 1"),
])
def test_ratio_band_bounds_are_checked(key, value, why):
  with pytest.raises(ConfigError) as err:
    RunConfig.from_tree(make_cfg(**{key: value}))
  assert str(err.value) == f"config {key}={value!r}: {why}"  # one line naming the key
  assert RunConfig.from_tree(make_cfg(**{key: 0.0})).grpo.trainer_old_logps is False
  on = {"grpo.is_mask_low": 0.5} if "low" in key else {"grpo.is_mask_high": 2.0}
  assert RunConfig.from_tree(make_cfg(**on)).trainer_cfg().grpo.trainer_old_logps


@pytest.mark.slow
def test_compilations_counted_per_batch_length():
  """train_batch reports the XLA compilations it paid for: one per new batch length."""
  tr = make_trainer(make_cfg())
  batch = make_batch()
  assert tr.train_batch(batch)["compilations"] == 1
  assert tr.train_batch(batch)["compilations"] == 0
  longer = jax.tree.map(lambda v: np.pad(v, ((0, 0), (0, 4))) if v.ndim == 2 else v, batch)
  assert tr.train_batch(longer)["compilations"] == 1
  assert tr.compilations == 2


@pytest.mark.slow
def test_logit_window_equals_full_logits():
  """Only rollout.max_tokens logit positions per row go through the LM head in the loss; the
  gradient and metrics equal computing all L positions (max_tokens >= L - 1 disables it)."""
  batch = make_batch(seed=4)
  keep = 8
  batch.loss_mask[:, PROMPT + keep:] = 0  # completions of at most `keep` scored tokens
  # Shift two rows right so the windows start at different offsets per row.
  for row, shift in ((1, 2), (2, 4)):
    for x in (batch.input_ids, batch.attention_mask, batch.loss_mask):
      x[row] = np.roll(x[row], shift)
  window, full = (make_trainer(make_cfg(**{"grpo.beta": 0.04, "rollout.max_tokens": n}))
                  for n in (keep, L))
  # The trainer's own old logprobs (recompute_old_logps / TIS) use the same window.
  scored = batch.loss_mask > 0
  lw, lf = window.logprobs(batch, scored_only=True), window.logprobs(batch)
  np.testing.assert_allclose(lw[scored], lf[scored], rtol=0, atol=1e-6)
  assert (lf[~scored] != 0).sum() > (lw[~scored] != 0).sum()  # the rest was not computed
  batch = with_old(full, batch, noise=0.3)
  window.update(batch)  # one step each: the policies leave the reference (KL > 0)
  full.update(batch)
  np.testing.assert_allclose(flat(window.params), flat(full.params), rtol=0, atol=1e-6)
  gw, mw = gradients(window, batch)
  gf, mf = gradients(full, batch)
  for k in ("loss", "kl", "clip_frac", "tokens"):
    assert mw[k] == pytest.approx(mf[k], rel=1e-6, abs=1e-9), k
  assert mf["kl"] > 0 and mf["clip_frac"] > 0
  np.testing.assert_allclose(flat(gw), flat(gf), rtol=0, atol=1e-7)
  assert np.abs(flat(gf)).max() > 1e-3


def test_loss_mask_wider_than_max_tokens_raises():
  batch = make_batch()
  tr = make_trainer(make_cfg(**{"rollout.max_tokens": 5}))
  with pytest.raises(TrainerError, match=r"batch loss_mask row 0 .*rollout.max_tokens=5"):
    tr.update(batch)


def test_bad_config_and_batch_raise():
  mesh = sharding.make_mesh((1, 2, 1), devices=jax.devices()[:2])
  with pytest.raises(ConfigError) as err:
    make_trainer(make_cfg(**{"optim.micro_batch": 3}), mesh)
  # The one micro-batch rule (pasr_jax.checks), as preflight states it too.
  axes = "*".join(sharding.batch_axes(mesh, tuple(get_base_config().mesh.rules)))
  assert str(err.value) == "config " + checks.micro_batch_vs_shards(3, 2, axes)
  assert "optim.micro_batch=3" in str(err.value) and checks.micro_batch_vs_shards(4, 2) is None
  tr = make_trainer(make_cfg(**{"optim.micro_batch": 3}))
  with pytest.raises(TrainerError, match="micro_batch=3"):
    tr.update(make_batch())
  tr = make_trainer(make_cfg())
  b = make_batch()
  with pytest.raises(TrainerError, match="advantages"):
    tr.update(b.replace(advantages=b.advantages[:3]))
  with pytest.raises(TrainerError, match="a trainer batch is a pasr_jax.batch.Batch, not a dict"):
    tr.update(b.to_dict())
  with pytest.raises(ConfigError, match="optim.schedule='linear'"):
    make_trainer(make_cfg(**{"optim.schedule": "linear"}))


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.slow
def test_rows_padded_by_pack_completions_leave_the_loss_unchanged(agg):
  """pack_completions fills the last micro-batch with mask-0 rows; 3 real rows padded to 4 give the
  loss and gradient of the 3 rows alone (Dr.GRPO once counted the padding as sequences)."""
  from pasr_jax.batch import pack_completions
  rng = np.random.default_rng(7)
  prompts = [list(rng.integers(3, 256, PROMPT)) for _ in range(3)]
  comps = [list(rng.integers(3, 256, n)) for n in (9, 4, 14)]
  lps = [list(rng.normal(-5, 0.3, len(c))) for c in comps]
  adv = [1.0, -0.5, 0.7]
  tr = make_trainer(make_cfg(**{"grpo.agg": agg, "optim.micro_batch": 1, "grpo.beta": 0.04}))
  out = {}
  for rows in (1, 4):
    b = pack_completions(prompts, comps, lps, adv, [True] * 3, 0, L, rows_multiple=rows)
    out[rows] = gradients(tr, b)
  assert out[4][1]["tokens"] == out[1][1]["tokens"] == 27
  assert abs(out[1][1]["loss"]) > 1e-3
  assert out[4][1]["loss"] == pytest.approx(out[1][1]["loss"], rel=1e-6)
  np.testing.assert_allclose(flat(out[4][0]), flat(out[1][0]), rtol=1e-5,
                             atol=1e-6 * np.abs(flat(out[1][0])).max())


@pytest.mark.parametrize("over, mesh", [
    ({"grpo.num_iterations": 2, "grpo.tis_cap": 2.0}, (1, 1, 1)),
    ({"optim.micro_batch": 4}, (2, 2, 2)),
])
@pytest.mark.slow
def test_sequences_per_update_splits_the_rollout_batch(over, mesh):
  """A rollout batch of 64 with optim.sequences_per_update=8 takes 8 optimizer updates per
  pass (x num_iterations), equal to 8 single updates on consecutive 8-row slices; the old
  logprobs and TIS weights are the trainer's from before the first update."""
  big = jax.tree.map(lambda *xs: np.concatenate(xs), *[make_batch(s) for s in range(8)])
  base = {"optim.micro_batch": 8, "grpo.beta": 0.04, "optim.lr": 1e-4, **over}
  devs = int(np.prod(mesh))
  mini = make_trainer(make_cfg(**base, **{"optim.sequences_per_update": 8}),
                      sharding.make_mesh(mesh, devices=jax.devices()[:devs]))
  ref = make_trainer(make_cfg(**base))
  big = with_old(ref, big, noise=0.3)
  iters = int(base.get("grpo.num_iterations", 1))

  m = mini.train_batch(big)
  assert m["updates"] == 8 * iters and mini.step == 8 * iters
  assert m["tokens"] == big.loss_mask.sum() * iters

  b = big
  if "grpo.tis_cap" in base:
    old = ref.logprobs(big, scored_only=True)
    w, _, _ = grpo.behaviour_weights(jnp.asarray(old), jnp.asarray(big.old_logps),
                                     jnp.asarray(big.loss_mask), 2.0)
    b = b.replace(old_logps=old, is_weights=np.asarray(w))
  for _ in range(iters):
    for i in range(0, 64, 8):
      ref.update(jax.tree.map(lambda v, i=i: v[i:i + 8], b))
  assert ref.step == mini.step
  p_mini, p_ref = flat(mini.params), flat(ref.params)
  np.testing.assert_allclose(p_mini, p_ref, rtol=0, atol=1e-7 if devs == 1 else 1e-5)

  if devs == 1:  # the default (0): one update per rollout batch, a different result
    whole = make_trainer(make_cfg(**base))
    assert whole.train_batch(big)["updates"] == iters
    assert np.linalg.norm(flat(whole.params) - p_ref) > 100 * np.linalg.norm(p_mini - p_ref)


def test_sequences_per_update_must_split_into_micro_batches():
  with pytest.raises(ConfigError, match="optim.sequences_per_update=6"):
    make_trainer(make_cfg(**{"optim.micro_batch": 4, "optim.sequences_per_update": 6}))


def test_loss_temperature_scores_raw_logits_like_the_original():
  """grpo.loss_temperature=1 with sampling at 0.9: the trainer's logprobs are those of the raw
  logits (the original run's), and it needs its own old logprobs to match them."""
  over = {"rollout.temperature": 0.9, "grpo.loss_temperature": 1.0}
  with pytest.raises(ConfigError, match="grpo.loss_temperature=1.0: .*recompute_old_logps"):
    make_trainer(make_cfg(**over))
  raw = make_trainer(make_cfg(**over, **{"grpo.recompute_old_logps": True}))
  at_09 = make_trainer(make_cfg(**{"rollout.temperature": 0.9}))
  batch = make_batch(8)
  scored = batch.loss_mask > 0
  # One compiled program: eagerly, each of the model's ops would compile on its own.
  want = np.asarray(nnx.jit(np_logprobs)(raw.model, batch))
  np.testing.assert_allclose(raw.logprobs(batch)[scored], want[scored], rtol=0, atol=2e-5)
  assert np.abs(at_09.logprobs(batch)[scored] - want[scored]).max() > 1e-2


def test_reference_is_held_in_compute_dtype_and_not_checkpointed():
  """bf16 compute: the frozen reference is the initial params cast to bf16 (half the fp32
  bytes, the same values the step would cast to), and checkpoints leave it out."""
  cfg = make_cfg(**{"grpo.beta": 0.04, "model.dtype": "bfloat16"})
  model = Decoder(tiny_config("qwen2"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tr = Trainer(RunConfig.from_tree(cfg).trainer_cfg(), model, tiny_config("qwen2"), mesh)
  assert {x.dtype for x in jax.tree.leaves(tr.ref_params)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(tr.params)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_array_equal(
      flat(tr.ref_params), flat(jax.tree.map(lambda x: x.astype(jnp.bfloat16), tr.params)))
  assert set(tr.state_for_checkpoint()) == {"params", "opt_state", "skipped_steps", "step"}


@pytest.mark.slow  # a bf16 update's compilation
def test_bf16_reference_gives_no_kl_at_step_0():
  """The bf16 reference holds the values the step casts the policy to: no KL at step 0."""
  cfg = make_cfg(**{"grpo.beta": 0.04, "model.dtype": "bfloat16"})
  model = Decoder(tiny_config("qwen2"), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
  mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
  tr = Trainer(RunConfig.from_tree(cfg).trainer_cfg(), model, tiny_config("qwen2"), mesh)
  batch = with_old(tr, make_batch())
  assert tr.update(batch)["kl"] == 0.0  # same values as the cast policy: no KL at step 0


@pytest.mark.slow
def test_batch_rule_decides_the_batch_sharding_of_the_train_step():
  """mesh.rules' ('batch', ...) entry, like the weights' rules, decides over which mesh axes
  the step's inputs (and the activations pinned to them) are split; the math is the same."""
  from pasr_jax.trainer import BATCH_KEYS  # pylint: disable=import-outside-toplevel
  mesh = sharding.make_mesh((2, 2, 1), devices=jax.devices()[:4])
  batch = make_batch(3)
  losses = {}
  for rule, shards in ((("data", "fsdp"), 4), (("data",), 2)):
    rules = tuple(r for r in get_base_config().mesh.rules if r[0] != "batch") + (
        ("batch", rule),)
    tr = make_trainer(make_cfg(**{"optim.micro_batch": 4, "mesh.rules": rules}), mesh)
    dev, k, length = tr._put_batch(batch, BATCH_KEYS)  # what the jitted update gets
    for key, x in dev.to_dict().items():
      assert x.sharding.spec == jax.P(rule, *([None] * (x.ndim - 1))), key
      assert len({s.index[0].start for s in x.addressable_shards}) == shards, key
    b = with_old(tr, batch)
    losses[rule] = tr.update(b)["loss"]
    dev, k, length = tr._put_batch(b, BATCH_KEYS)
    fn = tr._fns[("update", k, BATCH_KEYS)]
    with sharding.use_mesh(mesh, tr.rules):
      compiled = fn.lower(tr.params, tr.ref_params, tr.opt_state, dev).compile()
    in_batch = compiled.input_shardings[0][3]
    assert all(s.spec[0] == jax.P(rule)[0] for s in jax.tree.leaves(in_batch)), in_batch
  assert losses[("data",)] == pytest.approx(losses[("data", "fsdp")], rel=1e-5)


def test_batch_rule_naming_a_missing_mesh_axis_names_mesh_rules():
  rules = tuple(get_base_config().mesh.rules) + (("batch", ("data", "pipe")),)
  with pytest.raises(sharding.MeshError, match=r"mesh\.rules: 'batch' -> 'pipe'"):
    make_trainer(make_cfg(**{"mesh.rules": rules}))


def grpo_two_updates(trainers, name):
  """The params (flat, float32) after two GRPO updates of case `name` on a fixed batch."""
  over, how = GRPO_CASES[name]
  tr = trainers(**over)
  batch = make_batch(11)
  noise = np.random.default_rng(12).normal(0, 0.3, batch.loss_mask.shape)
  batch = batch.replace(
      old_logps=((tr.logprobs(batch) + noise) * batch.loss_mask).astype(np.float32))
  if how == "update":
    ms = [tr.update(batch) for _ in range(2)]
  else:
    ms = [tr.train_batch(batch)]
    assert ms[0]["updates"] == 2
  assert all(m["skipped"] == 0 for m in ms) and tr.step == 2
  return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(tr.params)])


@pytest.mark.parametrize("name", sorted(GRPO_CASES))
def test_grpo_updates_are_bitwise_the_recorded_ones(trainers, name):
  """The GRPO update gives exactly (bit for bit) the params recorded in
  tests/data/grpo_two_updates.npz, written by the trainer before its loss became pluggable:
  a refactor of the loss, the batch or the step may not change a single bit."""
  want = np.load(GRPO_FIXTURE)[name]
  got = grpo_two_updates(trainers, name)
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)
