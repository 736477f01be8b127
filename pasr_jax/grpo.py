"""GRPO math as pure functions: per-token logprobs, group advantages, the clipped loss.

Shapes: B sequences, T tokens, V vocabulary. Losses are returned as (sum, denominator) so that
gradient accumulation over micro-batches is exact: the trainer computes the denominator of the
whole batch first and divides every micro-batch's sum by it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pasr_jax.config import ADV_SCALES, AGGS

class GRPOError(ValueError):
  """A GRPO setting (config value) or input that cannot be used."""


# ----------------------------------------------------------------------------- logprobs


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _chunked_logprobs(logits, targets, temperature, chunk):
  out, _ = _chunked_logprobs_fwd(logits, targets, temperature, chunk)
  return out


def _lse_and_target(logits, targets, temperature, chunk):
  """logsumexp(logits/t) and logits[target]/t per token, over T-chunks: `[B,T]` each.

  Chunks are dynamic slices of the original array (no padded or transposed copy of the
  logits); a remainder shorter than `chunk` is done directly.
  """
  t = logits.shape[1]
  n = t // chunk

  def one(x, y):
    x = x.astype(jnp.float32) / temperature
    lse = jax.nn.logsumexp(x, axis=-1)
    picked = jnp.take_along_axis(x, y[..., None], axis=-1)[..., 0]
    return lse, picked

  def body(i):
    s = i * chunk
    return one(jax.lax.dynamic_slice_in_dim(logits, s, chunk, axis=1),
               jax.lax.dynamic_slice_in_dim(targets, s, chunk, axis=1))

  parts = []
  if n == 1:
    parts.append(one(logits[:, :chunk], targets[:, :chunk]))
  elif n > 1:
    lse, picked = jax.lax.map(body, jnp.arange(n))          # [n, B, c]
    b = logits.shape[0]
    parts.append((lse.swapaxes(0, 1).reshape(b, n * chunk),
                  picked.swapaxes(0, 1).reshape(b, n * chunk)))
  if n * chunk < t:
    parts.append(one(logits[:, n * chunk:], targets[:, n * chunk:]))
  lse = jnp.concatenate([p[0] for p in parts], axis=1)
  picked = jnp.concatenate([p[1] for p in parts], axis=1)
  return lse, picked


def _chunked_logprobs_fwd(logits, targets, temperature, chunk):
  lse, picked = _lse_and_target(logits, targets, temperature, chunk)
  return picked - lse, (logits, targets, lse)


def _chunked_logprobs_bwd(temperature, chunk, res, g):
  # d logp / d logits = (onehot(target) - softmax(logits/t)) / t: one fused elementwise pass
  # over [B,T,V] (no saved softmax, no scan in the backward).
  logits, targets, lse = res
  gt = (g / temperature)[..., None]
  probs = jnp.exp(logits.astype(jnp.float32) / temperature - lse[..., None])
  onehot = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
  grad = gt * (onehot.astype(jnp.float32) - probs)
  return grad.astype(logits.dtype), None


_chunked_logprobs.defvjp(_chunked_logprobs_fwd, _chunked_logprobs_bwd)


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0,
                   chunk: int = 256) -> jax.Array:
  """log softmax(logits / temperature)[target] per position: logits `[B,T,V]`, targets `[B,T]`.

  Returns float32 `[B,T]`. The log-softmax is never materialised: the forward maps over
  T-chunks of `chunk` positions (logsumexp + gather), and the custom backward recomputes the
  softmax in one fused pass. Targets must already be aligned with logits (position t scores
  targets[t]).
  """
  if temperature <= 0:
    raise GRPOError(f"temperature must be > 0, got {temperature}")
  chunk = max(1, min(int(chunk), logits.shape[1]))
  return _chunked_logprobs(logits, targets.astype(jnp.int32), float(temperature), chunk)


def sequence_logprobs(logits: jax.Array, input_ids: jax.Array, temperature: float = 1.0,
                      chunk: int = 256) -> jax.Array:
  """Logprob of `input_ids[:, t]` given the prefix, aligned to t: `[B,T]`, column 0 is 0.

  logits `[B,T,V]` from the model over `input_ids [B,T]`; the logits at t-1 score token t.
  """
  # Score all T positions against the next token (last one wraps and is dropped) rather than
  # slicing logits[:, :-1], which would copy the whole [B,T-1,V] array.
  lp = token_logprobs(logits, jnp.roll(input_ids, -1, axis=1), temperature, chunk)
  return jnp.pad(lp[:, :-1], ((0, 0), (1, 0)))


# ----------------------------------------------------------------------------- advantages


class GroupAdvantages(NamedTuple):
  """Advantages of G groups of n answers, and which groups are "zero-variance".

  values: float32 `[G*n]`, group after group. flat: bool `[G]`, groups whose reward range is
  within grpo.skip_range (`flat_groups`): the one place this mask is computed; a step counts
  them and drops them from the batch (grpo.skip_zero_variance) from here.
  """
  values: np.ndarray
  flat: np.ndarray

  @property
  def zero_variance(self) -> int:
    return int(np.sum(self.flat))

  def kept(self, skip_zero_variance: bool) -> np.ndarray:
    """`[G]` bool: the groups a batch trains on: all, or all but the flat ones."""
    return ~self.flat | (not skip_zero_variance)


def group_advantages(rewards, n: int, ddof: int = 0, scale: str = "group",
                     eps: float = 1e-4, tol: float = 0.0) -> GroupAdvantages:
  """Group-normalised advantages for rewards `[G*n]` (n answers per prompt, grouped contiguously).

  adv = (r - mean_group) / (std + eps) with std the group's (scale="group"), the whole batch's
  (scale="batch", as Dr.GRPO-style batch normalisation) or 1 with eps=0 (scale="none": mean
  centring only). `ddof` is the std flavour (0 population, 1 sample as torch.std). Returns
  the advantages and the mask of "zero-variance" groups (reward max - min <= tol).
  """
  r = np.asarray(rewards, dtype=np.float64).reshape(-1)
  if n < 1 or r.size % n:
    raise GRPOError(f"{r.size} rewards do not split into groups of n={n}")
  if ddof not in (0, 1) or (ddof == 1 and n < 2):
    raise GRPOError(f"adv_std_ddof={ddof} is not usable with n={n} (0, or 1 when n >= 2)")
  g = r.reshape(-1, n)
  centred = g - g.mean(axis=1, keepdims=True)
  flat = flat_groups(r, n, tol)
  if scale == "group":
    adv = centred / (g.std(axis=1, ddof=ddof, keepdims=True) + eps)
  elif scale == "batch":
    adv = centred / (r.std(ddof=ddof) + eps) if r.size > ddof else centred
  elif scale == "none":
    adv = centred
  else:
    raise GRPOError(f"grpo.adv_scale={scale!r} must be one of {ADV_SCALES}")
  return GroupAdvantages(adv.reshape(-1).astype(np.float32), flat)


def flat_groups(rewards, n: int, tol: float = 0.0) -> np.ndarray:
  """`[G]` bool: groups of n rewards whose range max - min is <= tol (grpo.skip_range; 0 =
  all equal; the original skips ranges < 1e-4). They carry no (or only noise) signal."""
  g = np.asarray(rewards, dtype=np.float64).reshape(-1, n)
  return (g.max(axis=1) - g.min(axis=1)) <= tol


# ----------------------------------------------------------------------------- loss


def behaviour_weights(prox: jax.Array, behaviour: jax.Array, mask: jax.Array, cap: float,
                      mask_low: float = 0.0, mask_high: float = 0.0
                      ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """Per-token behaviour weights, the band-masked loss mask and their metrics, `[B,T]`.

  prox: the trainer's logprobs of the policy about to be updated (the "proximal" policy of
  decoupled PPO, AReaL); behaviour: the sampler's (vLLM's, possibly `rollout.max_staleness`
  updates old). With ratio r = exp(prox - behaviour), the weight is min(r, cap) (cap 0: 1),
  and the returned mask drops scored tokens with r < mask_low or (mask_high > 0) r >
  mask_high (grpo.is_mask_low / is_mask_high; icepop-style masked importance sampling).
  Multiplying the PPO term clipped around prox by this weight is the decoupled-PPO
  objective with a truncated behaviour weight; `grpo_loss` takes it as `is_weights`.

  Metrics over the scored tokens (mask > 0; 0 when there are none): logp_mismatch_mean/max
  (|prox - behaviour|), tis_weight_mean (min(r, cap)), tis_ratio_mean / tis_ratio_max (raw
  r), tis_ess (effective sample size of r, (sum r)^2 / (N sum r^2), in (0, 1]),
  behaviour_kl (k3 estimate of KL(behaviour || prox) from the behaviour samples: mean of
  r - 1 - log r), tis_clip_frac (r > cap) and is_masked_frac (outside the band).
  """
  scored = mask > 0
  diff = jnp.where(scored, prox - behaviour, 0.0).astype(jnp.float32)
  r = jnp.exp(diff)
  w = jnp.where(scored, jnp.minimum(r, cap) if cap > 0 else 1.0, 0.0)
  out_band = (r < mask_low) | ((r > mask_high) if mask_high > 0 else False)
  keep = jnp.where(out_band, 0.0, mask.astype(jnp.float32))
  n = jnp.maximum(scored.sum(), 1).astype(jnp.float32)
  mean = lambda x: jnp.where(scored, x, 0.0).sum() / n
  # ESS is scale-free: ratios over their max keep sum r^2 finite for any logprob gap.
  top = jnp.where(scored, diff, -jnp.inf).max()
  u = jnp.where(scored, jnp.exp(diff - jnp.where(scored.any(), top, 0.0)), 0.0)
  return w, keep, {
      "logp_mismatch_mean": mean(jnp.abs(diff)),
      "logp_mismatch_max": jnp.abs(diff).max(),
      "tis_weight_mean": mean(w),
      "tis_ratio_mean": mean(r),
      "tis_ratio_max": jnp.exp(top),
      "tis_ess": u.sum() ** 2 / (n * jnp.maximum((u * u).sum(), 1e-30)),
      "behaviour_kl": mean(r - 1.0 - diff),
      "tis_clip_frac": mean(r > cap) if cap > 0 else jnp.zeros(()),
      "is_masked_frac": mean(out_band),
  }


def loss_denominator(mask: jax.Array, agg: str) -> jax.Array:
  """The denominator of the batch loss for `agg` (the loss is sum / denominator).

  token_mean: number of scored tokens; seq_mean_token_mean and seq_mean_token_sum_norm:
  number of sequences with at least one scored token.

  A row with no scored token is not a sequence of the loss, whatever the aggregation: the
  rows `batch.pad` adds to fill the last micro-batch, answers masked out by
  grpo.mask_truncated, and answers whose every token the ratio band (grpo.is_mask_low/high)
  dropped. (TRL divides by all rows, `completion_mask.size(0)`, for "grpo" and
  "dr_grpo", so there an all-masked row scales the batch's loss down; here it changes
  nothing, and a batch padded with such rows has exactly the loss of the unpadded one.)
  """
  mask = mask.astype(jnp.float32)
  if agg == "token_mean":
    return mask.sum()
  if agg in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
    return (mask.sum(axis=1) > 0).astype(jnp.float32).sum()
  raise GRPOError(f"grpo.agg={agg!r} must be one of {AGGS}")


def grpo_loss(logps: jax.Array, old_logps: jax.Array, ref_logps: jax.Array | None,
              advantages: jax.Array, mask: jax.Array, *, beta: float, eps_low: float,
              eps_high: float, agg: str, max_tokens: int | None = None,
              is_weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array, dict]:
  """Clipped GRPO loss as (loss_sum, denominator, metrics); the loss is sum / denominator.

  logps, old_logps, ref_logps, mask, is_weights: `[B,T]`; advantages `[B]`. Per token:
  `-min(r·A, clip(r, 1-eps_low, 1+eps_high)·A) · w + beta·k3`, r = exp(logp - old),
  k3 = exp(ref - logp) - (ref - logp) - 1, w the optional truncated IS weight. With old_logps
  the trainer's recompute (the proximal policy) and w = `behaviour_weights` (min(pi_prox /
  pi_behaviour, cap)) this is the decoupled-PPO objective (AReaL) with a truncated behaviour
  weight: the one loss for on- and off-policy batches. `agg`:
  seq_mean_token_mean (per-sequence token mean, then mean over sequences: PASR/TRL),
  token_mean (DAPO), seq_mean_token_sum_norm (Dr.GRPO: token sum / max_tokens, mean over
  sequences); rows with no scored token do not count as sequences (see loss_denominator). Metrics are means over this batch's masked tokens plus "tokens" (their count)
  so the caller can combine micro-batches with token weights.
  """
  if agg not in AGGS:
    raise GRPOError(f"grpo.agg={agg!r} must be one of {AGGS}")
  if agg == "seq_mean_token_sum_norm" and not max_tokens:
    raise GRPOError("grpo.agg=seq_mean_token_sum_norm needs max_tokens (rollout.max_tokens)")
  mask = mask.astype(jnp.float32)
  adv = advantages.astype(jnp.float32)[:, None]
  ratio = jnp.exp(logps - old_logps)
  clipped = jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = -jnp.minimum(ratio * adv, clipped * adv)
  if is_weights is not None:
    pg = pg * jax.lax.stop_gradient(is_weights)
  per_tok = pg
  if beta and ref_logps is not None:
    d = ref_logps - logps
    kl = jnp.exp(d) - d - 1.0
    per_tok = per_tok + beta * kl
  else:
    kl = jnp.zeros_like(logps)

  tok_sum = (per_tok * mask).sum(axis=1)
  tok_cnt = mask.sum(axis=1)
  if agg == "token_mean":
    loss_sum = tok_sum.sum()
  elif agg == "seq_mean_token_mean":
    loss_sum = (tok_sum / jnp.maximum(tok_cnt, 1.0)).sum()
  else:
    loss_sum = tok_sum.sum() / float(max_tokens)
  denom = loss_denominator(mask, agg)

  n = jnp.maximum(mask.sum(), 1.0)
  is_clipped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
  big = jnp.finfo(jnp.float32).max
  metrics = {
      "tokens": mask.sum(),
      "kl": (kl * mask).sum() / n,
      "clip_frac": (is_clipped * mask).sum() / n,
      "ratio_mean": (ratio * mask).sum() / n,
      "ratio_max": jnp.where(mask > 0, ratio, -big).max(),
      "ratio_min": jnp.where(mask > 0, ratio, big).min(),
  }
  return loss_sum, denom, metrics
