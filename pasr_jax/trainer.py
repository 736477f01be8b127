"""The sharded update for a given loss: policy, frozen reference, optax AdamW, one jitted step.

The loss is a `Loss`: `grpo_loss` (the clipped GRPO objective, grpo.grpo_loss; the default)
or `nll_loss` (token NLL, for SFT). The step is a pure function of (params, ref_params,
opt_state, batch) compiled with `jax.jit` and explicit in/out shardings. A batch of B
sequences is split into B / micro_batch micro-batches that a `lax.scan` visits one at a
time; each contributes
grad(loss_sum_i / D) where D is the denominator of the WHOLE batch, so the summed gradient is
exactly the gradient of the full-batch loss. A step whose loss or gradient is not finite leaves
params and optimizer state unchanged and is counted. `train_batch` takes one such step per
optim.sequences_per_update rows of a rollout batch (the original PASR run: 8), or one for the
whole batch (0).

The batch is a `batch.Batch`: the tokens, loss_mask and the fields the loss reads
(`Loss.fields`; GRPO: old_logps, advantages and the optional is_weights).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from pasr_jax import checks, grpo, sharding
from pasr_jax.batch import INT_FIELDS, ROW_SCALARS, Batch, BatchError
from pasr_jax.config import OptimCfg, TrainerCfg
from pasr_jax.models.qwen import Decoder, ModelConfig

# The tokens every loss reads (with loss_mask), and the GRPO batch (the memory plan's).
TOKEN_FIELDS = INT_FIELDS + ("loss_mask",)
BATCH_KEYS = TOKEN_FIELDS + ("old_logps", "advantages")


class TrainerError(ValueError):
  """A batch or model the trainer cannot use: an internal invariant (run and sft build both),
  so a bug with its traceback, not a user error."""


# ----------------------------------------------------------------------------- losses


@dataclasses.dataclass(frozen=True)
class Loss:
  """A loss the trainer minimises, given to it like Tunix's `with_loss_fn`.

  micro_sum(logps, ref_logps, mb) -> (loss_sum, metrics) on one micro-batch `mb` (a Batch):
    logps `[b,L]` of the policy (differentiated), ref_logps those of the frozen reference
    (None unless `uses_ref`); the batch loss is the sum over micro-batches / `denominator`.
  denominator(batch) -> the batch loss's denominator, from the WHOLE batch.
  fields: the batch fields it reads besides TOKEN_FIELDS; optional: read when present.
  metrics: each per-micro-batch metric `micro_sum` returns (besides "tokens", the scored
    token count) and how micro-batches and updates combine it: "token_mean" (weighted by
    tokens), "max" or "min" over those with tokens.
  """
  name: str
  micro_sum: Callable[[jax.Array, jax.Array | None, Batch], tuple[jax.Array, dict]]
  denominator: Callable[[Batch], jax.Array]
  fields: tuple[str, ...] = ()
  optional: tuple[str, ...] = ()
  uses_ref: bool = False
  metrics: tuple[tuple[str, str], ...] = ()


def grpo_loss(cfg: TrainerCfg) -> Loss:
  """The clipped GRPO loss of `grpo.grpo_loss` with cfg.grpo's settings (beta > 0: a KL term
  against the frozen reference)."""
  g = cfg.grpo
  beta = float(g.beta)

  def micro_sum(lp, ref_lp, mb):
    s, _, m = grpo.grpo_loss(lp, mb.old_logps, ref_lp, mb.advantages, mb.loss_mask,
                             beta=beta, eps_low=g.eps_low, eps_high=g.eps_high, agg=g.agg,
                             max_tokens=cfg.max_tokens, is_weights=mb.is_weights)
    return s, m

  return Loss("grpo", micro_sum, lambda b: grpo.loss_denominator(b.loss_mask, g.agg),
              fields=("old_logps", "advantages"), optional=("is_weights",), uses_ref=beta > 0,
              metrics=(("kl", "token_mean"), ("clip_frac", "token_mean"),
                       ("ratio_mean", "token_mean"), ("ratio_max", "max"),
                       ("ratio_min", "min")))


def nll_loss() -> Loss:
  """Token NLL: the mean over the batch's scored tokens (loss_mask) of -logp (SFT)."""
  def micro_sum(lp, ref_lp, mb):
    del ref_lp
    mask = mb.loss_mask.astype(jnp.float32)
    return -(lp * mask).sum(), {"tokens": mask.sum()}

  return Loss("nll", micro_sum, lambda b: b.loss_mask.astype(jnp.float32).sum())


# ----------------------------------------------------------------------------- optimizer


def make_optimizer(optim: OptimCfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up then constant or cosine decay, after global-norm clipping.

  Weight decay touches matrices only (ndim >= 2), not norms or biases.
  """
  lr, warm = optim.lr, optim.warmup_steps
  if optim.schedule == "constant":
    sched = optax.warmup_constant_schedule(0.0, lr, warm) if warm > 0 else optax.constant_schedule(lr)
  else:  # cosine (the config allows no other)
    decay = max(int(total_steps), warm + 1)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warm, decay, end_value=0.0)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(sched, b1=optim.b1, b2=optim.b2, eps=1e-8,
                      weight_decay=optim.weight_decay, mask=decay_mask)
  if optim.clip_norm and optim.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw)
  return adamw


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for `tx.init(params)`: moment trees follow the params, scalars are replicated."""
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  rep = sharding.replicated(mesh)
  return optax.tree_utils.tree_map_params(
      tx, lambda _, s: s, abstract_state, param_shardings,
      transform_non_params=lambda _: rep, is_leaf=lambda x: isinstance(x, NamedSharding))


# ----------------------------------------------------------------------------- step functions


def _uses_window(keep: int | None, length: int) -> bool:
  """Whether rows of `length` tokens get a `keep`-position logit window (else all positions);
  the one bound shared by `_logprobs_fn` and `scored_window_check`."""
  return keep is not None and keep < length - 1


def _logprobs_fn(graphdef, rest, params, mb, temperature: float, chunk: int,
                 mesh: Mesh, rules: sharding.Rules, compute_dtype: Any,
                 keep: int | None = None) -> jax.Array:
  """Logprobs `[B,L]` of mb's tokens (aligned like loss_mask; see grpo.sequence_logprobs).

  With `keep` (< L-1), only a window of `keep` logit positions per row goes through the LM
  head: the one starting just before the row's first scored token (TRL's logits_to_keep,
  per row). Positions outside the window get 0; `scored_window_check` makes sure every
  scored token is inside it. On SmolLM2 (49k vocab) the head is ~20% of a forward's FLOPs.
  """
  # Cast the sharded fp32 master weights before use, so FSDP all-gathers move (and hold)
  # compute-dtype copies; gradients flow back through the cast to the fp32 params.
  params = jax.tree.map(lambda x: x.astype(compute_dtype), params)
  model = nnx.merge(graphdef, params, rest)
  ids = mb.input_ids
  hidden = model.hidden_states(ids, mb.positions, mb.attention_mask)
  b, length = ids.shape
  windowed = _uses_window(keep, length)
  if windowed:
    first = jnp.argmax(mb.loss_mask > 0, axis=1)  # 0 for a row with nothing scored
    start = jnp.clip(first - 1, 0, length - 1 - keep)
    idx = start[:, None] + jnp.arange(keep)  # [B, keep] logit positions
    hidden = jnp.take_along_axis(hidden, idx[..., None], axis=1)
  logits = model.logits(hidden)
  # Pin the logits to batch-sharded: left to itself, propagation may contract the
  # fsdp-sharded lm_head by replicating the batch instead ([mb, T, V] on every device).
  logits = jax.lax.with_sharding_constraint(
      logits, NamedSharding(mesh, sharding.logits_spec(mesh, rules, logits.shape[-1])))
  if not windowed:
    return grpo.sequence_logprobs(logits, ids, temperature, chunk)
  # The logits at position t score token t+1.
  lp = grpo.token_logprobs(logits, jnp.take_along_axis(ids, idx + 1, axis=1), temperature,
                           chunk)
  return jnp.zeros((b, length), lp.dtype).at[jnp.arange(b)[:, None], idx + 1].set(lp)


def scored_window_check(loss_mask: np.ndarray, keep: int) -> None:
  """Raises TrainerError if a row's scored tokens (loss_mask > 0) span more than `keep`
  positions, the logit window `_logprobs_fn` computes per row (rollout.max_tokens)."""
  m = np.asarray(loss_mask) > 0
  rows = np.flatnonzero(m.any(axis=1))
  if not rows.size or not _uses_window(keep, m.shape[1]):
    return
  first = m[rows].argmax(axis=1)
  last = m.shape[1] - 1 - m[rows, ::-1].argmax(axis=1)
  span = last - first + 1
  bad = np.flatnonzero(span > keep)
  if bad.size:
    i = bad[0]
    raise TrainerError(
        f"batch loss_mask row {rows[i]} scores positions {first[i]}..{last[i]} "
        f"({span[i]} tokens) but rollout.max_tokens={keep}: the trainer computes logits "
        f"only for a window of rollout.max_tokens completion positions per row")


def _split_micro(batch: Batch, num_micro: int, mesh: Mesh, rules: sharding.Rules) -> Batch:
  """[B, ...] -> [K, B/K, ...]; row b goes to micro-batch b % K so each device keeps its rows."""
  def one(x):
    y = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]).swapaxes(0, 1)
    spec = sharding.batch_spec(mesh, rules, y.ndim, lead=1)
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
  return jax.tree.map(one, batch)


def _merge_micro(x: jax.Array) -> jax.Array:
  """Inverse of `_split_micro` for one [K, B/K, ...] array."""
  return x.swapaxes(0, 1).reshape(-1, *x.shape[2:])


def _lp_fns(graphdef, rest, cfg: TrainerCfg, mesh: Mesh, chunk: int
            ) -> tuple[Callable, Callable]:
  """(logprobs of all positions, logprobs of the loss's rollout.max_tokens window) of a
  micro-batch: `_logprobs_fn` for this trainer."""
  lp_fn = functools.partial(_logprobs_fn, graphdef, rest, temperature=cfg.temperature,
                            chunk=chunk, mesh=mesh, rules=cfg.rules,
                            compute_dtype=cfg.model.compute_dtype)
  # The loss only reads scored (completion) positions: at most rollout.max_tokens per row.
  return lp_fn, functools.partial(lp_fn, keep=cfg.max_tokens)


def make_grad_fn(graphdef, rest, cfg: TrainerCfg, num_micro: int, mesh: Mesh,
                 chunk: int = 256, loss: Loss | None = None) -> Callable:
  """The pure gradient function of `loss` (default `grpo_loss(cfg)`) that `update` applies:

  gradients(params, ref_params, batch) -> (grads, metrics): the full-batch loss gradient
    (accumulated over `num_micro` micro-batches) and the loss, "tokens" and `Loss.metrics`.
  """
  objective = loss or grpo_loss(cfg)
  _, loss_lp_fn = _lp_fns(graphdef, rest, cfg, mesh, chunk)

  def gradients(params, ref_params, batch):
    denom = jnp.maximum(objective.denominator(batch), 1.0)
    micro = _split_micro(batch, num_micro, mesh, cfg.rules)

    def loss_fn(p, mb, ref_lp):
      s, m = objective.micro_sum(loss_lp_fn(p, mb), ref_lp, mb)
      return s / denom, m

    def body(carry, mb):
      acc, p, ref = carry  # params in the carry: see make_step_fns' logprobs
      ref_lp = jax.lax.stop_gradient(loss_lp_fn(ref, mb)) if objective.uses_ref else None
      (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, mb, ref_lp)
      return (jax.tree.map(jnp.add, acc, grads), p, ref), (loss, m)

    if num_micro == 1:  # no loop: saves the accumulator and the loop-carried param copies
      (grads, _, _), (loss, m) = body(
          (jax.tree.map(jnp.zeros_like, params), params, ref_params),
          jax.tree.map(lambda x: x[0], micro))
      losses, ms = loss[None], jax.tree.map(lambda x: x[None], m)
    else:
      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, _, _), (losses, ms) = jax.lax.scan(body, (zeros, params, ref_params), micro)
    tok = ms["tokens"]
    reduce = {"token_mean": lambda v: (v * tok).sum() / jnp.maximum(tok.sum(), 1.0),
              "max": lambda v: jnp.where(tok > 0, v, -jnp.inf).max(),
              "min": lambda v: jnp.where(tok > 0, v, jnp.inf).min()}
    metrics = {"loss": losses.sum(), "tokens": tok.sum(),
               **{k: reduce[how](ms[k]) for k, how in objective.metrics}}
    return grads, metrics

  return gradients


def make_step_fns(graphdef, rest, tx: optax.GradientTransformation,
                  cfg: TrainerCfg, num_micro: int, mesh: Mesh, chunk: int = 256,
                  loss: Loss | None = None) -> tuple[Callable, Callable]:
  """The pure (un-jitted) update and logprob functions for `loss` (default:
  `grpo_loss(cfg)`); batches are `Batch`es.

  update(params, ref_params, opt_state, batch) -> (params, opt_state, metrics): one
    optimizer step with `make_grad_fn`'s gradient; a non-finite loss or gradient leaves
    params and optimizer state as they were (metrics["skipped"] 1)
  logprobs(params, batch) -> [B,L] float32 (batch: INT_FIELDS, optionally loss_mask: then
    only the scored window, see _logprobs_fn)
  """
  lp_fn, loss_lp_fn = _lp_fns(graphdef, rest, cfg, mesh, chunk)
  gradients = make_grad_fn(graphdef, rest, cfg, num_micro, mesh, chunk, loss)

  def logprobs(params, batch):
    # With a loss_mask in the batch, only its rollout.max_tokens window goes through the LM
    # head, as in the loss (positions outside it are 0).
    fn = loss_lp_fn if batch.loss_mask is not None else lp_fn
    micro = _split_micro(batch, num_micro, mesh, cfg.rules)
    # Params ride in the carry, not the closure: nnx.scan (scan_layers) refuses Variables whose
    # values are tracers of an outer trace level.
    _, out = jax.lax.scan(lambda p, mb: (p, fn(p, mb)), params, micro)
    return _merge_micro(out)

  def update(params, ref_params, opt_state, batch):
    grads, metrics = gradients(params, ref_params, batch)
    gnorm = optax.tree.norm(grads)
    ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(gnorm)
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    params, opt_state = keep(new_params, params), keep(new_opt, opt_state)
    metrics = dict(metrics, grad_norm=gnorm, skipped=(~ok).astype(jnp.float32))
    return params, opt_state, metrics

  return update, logprobs


def batch_shardings(mesh: Mesh, rules: sharding.Rules, keys: tuple[str, ...]
                    ) -> dict[str, NamedSharding]:
  """Batch-dim shardings (the 'batch' rule) of the trainer batch fields named by `keys`."""
  return {k: sharding.batch_sharding(mesh, rules, 1 if k in ROW_SCALARS else 2) for k in keys}


def jit_update(update: Callable, mesh: Mesh, rules: sharding.Rules, param_shardings: Any,
               opt_shardings: Any, keys: tuple[str, ...], with_ref: bool) -> Callable:
  """`update` from make_step_fns under jax.jit with the trainer's shardings; params and
  optimizer state are donated. Shared by Trainer and the memory plan, so the plan compiles
  exactly the step that runs."""
  return jax.jit(
      update,
      in_shardings=(param_shardings, param_shardings if with_ref else None, opt_shardings,
                    Batch(**batch_shardings(mesh, rules, keys))),
      out_shardings=(param_shardings, opt_shardings, sharding.replicated(mesh)),
      donate_argnums=(0, 2))


def _local_rows(x: Any) -> np.ndarray:
  """The rows of a batch array this process holds (all of a host array)."""
  if not isinstance(x, jax.Array):
    return x
  return np.concatenate([np.asarray(s.data) for s in x.addressable_shards if s.replica_id == 0])


def _combine(steps: list[dict[str, float]], loss: Loss) -> dict[str, float]:
  """One rollout batch's metrics from its updates' metrics: the loss's metrics combined as it
  declares (`Loss.metrics`), mean loss and grad norm, sums of tokens and skipped updates, the
  latest skipped_steps, and `updates`."""
  tok = np.array([m["tokens"] for m in steps], np.float64)
  w = tok / max(tok.sum(), 1.0)
  out = dict(steps[-1])
  for k, how in loss.metrics:
    vals = [m[k] for m in steps]
    out[k] = (float(sum(wi * v for wi, v in zip(w, vals))) if how == "token_mean"
              else max(vals) if how == "max" else min(vals))
  for k in ("loss", "grad_norm"):
    out[k] = float(np.mean([m[k] for m in steps]))
  out["tokens"] = float(tok.sum())
  out["skipped"] = float(sum(m["skipped"] for m in steps))
  out["updates"] = float(len(steps))
  return out


# ----------------------------------------------------------------------------- Trainer


def _require_batch(batch: Any) -> None:
  """Raises TrainerError unless `batch` is a `Batch` (its fields decide the jitted step)."""
  if not isinstance(batch, Batch):
    raise TrainerError(f"a trainer batch is a pasr_jax.batch.Batch, not a "
                       f"{type(batch).__name__}")


def ref_copy(params: Any, dtype: Any) -> Any:
  """The frozen reference: the initial params in the compute dtype (it is only ever used cast
  to it), so a bf16 run holds it at half the fp32 size. Always a copy: the policy's buffers
  are donated to each update."""
  return jax.tree.map(lambda x: jnp.copy(x.astype(dtype)), params)


class Trainer:
  """Holds the mesh, the live policy, the frozen reference and the optimizer state.

  `Trainer(cfg, model, model_cfg, mesh, loss)`: `cfg` its slice (`RunConfig.trainer_cfg()`);
  `loss` what it minimises (default `grpo_loss(cfg)`); `model` is a Decoder built with
  compute dtype cfg.model.dtype and fp32 params; it is placed on `mesh` by mesh.rules (params
  already sharded stay put). The reference is a copy of the initial params in the compute
  dtype, kept only when the loss uses it (GRPO with beta > 0); it is not checkpointed (a
  resumed run rebuilds it from model.path).
  """

  def __init__(self, cfg: TrainerCfg, model: Decoder, model_cfg: ModelConfig, mesh: Mesh,
               loss: Loss | None = None):
    self.cfg, self.model_cfg, self.mesh = cfg, model_cfg, mesh
    self.loss = loss or grpo_loss(cfg)
    self.rules = tuple(cfg.rules)  # params and batch/activations alike
    checks.require(checks.micro_batch_vs_shards(
        cfg.optim.micro_batch, sharding.batch_shards(mesh, self.rules),
        "*".join(sharding.batch_axes(mesh, self.rules)) or "(none)"))
    compute_dtype, param_dtype = cfg.model.compute_dtype, cfg.model.weight_dtype
    self.graphdef, params, self._rest = nnx.split(model, nnx.Param, ...)
    for leaf in jax.tree.leaves(params):
      if leaf.dtype != param_dtype:
        raise TrainerError(f"model param dtype {leaf.dtype} != model.param_dtype="
                           f"{cfg.model.param_dtype!r}")
    self.param_shardings = sharding.state_shardings(params, mesh, self.rules)
    self.params = sharding.put_tree(params, self.param_shardings)
    self.ref_params = (jax.jit(functools.partial(ref_copy, dtype=compute_dtype),
                               out_shardings=self.param_shardings)(self.params)
                       if self.loss.uses_ref else None)
    self.tx = make_optimizer(cfg.optim, cfg.steps * cfg.updates_per_step)
    self.opt_shardings = opt_state_shardings(self.tx, self.params, self.param_shardings, mesh)
    self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(self.params)
    self.step = 0
    self.skipped_steps = 0
    self._fns: dict[tuple, Callable] = {}
    self._shapes: set[tuple] = set()  # (kind, micro-batches, keys, length) compiled so far

  @property
  def compilations(self) -> int:
    """XLA compilations so far: jit compiles once per (function, batch length), and a new
    length (train.seq_multiple) costs a compile that a step's time should not hide."""
    return len(self._shapes)

  # -- compiled functions, one per (number of micro-batches, batch keys)

  def _compiled(self, kind: str, num_micro: int, keys: tuple[str, ...], length: int
                ) -> Callable:
    self._shapes.add((kind, num_micro, keys, length))
    key = (kind, num_micro, keys)
    if key not in self._fns:
      update, logprobs = make_step_fns(self.graphdef, self._rest, self.tx, self.cfg,
                                       num_micro, self.mesh, loss=self.loss)
      bs = Batch(**batch_shardings(self.mesh, self.rules, keys))
      if kind == "update":
        self._fns[key] = jit_update(update, self.mesh, self.rules, self.param_shardings,
                                    self.opt_shardings, keys, self.ref_params is not None)
      else:
        self._fns[key] = jax.jit(logprobs, in_shardings=(self.param_shardings, bs),
                                 out_shardings=sharding.batch_sharding(self.mesh, self.rules))
    fn = self._fns[key]

    def call(*args):
      with sharding.use_mesh(self.mesh, self.rules):  # the model pins activations by 'batch'
        return fn(*args)
    return call

  def _put_batch(self, batch: Batch, keys: tuple[str, ...]) -> tuple[Batch, int, int]:
    """`batch`'s fields `keys` on the mesh (the others None), its micro-batch count and length."""
    _require_batch(batch)
    try:
      batch = batch.only(keys)
    except BatchError as e:
      raise TrainerError(str(e)) from None
    ids_shape = np.shape(batch.input_ids)
    b = ids_shape[0]
    mb = int(self.cfg.optim.micro_batch)
    if b % mb:
      raise TrainerError(f"batch of {b} sequences is not a multiple of optim.micro_batch={mb}")
    out = {}
    for k in batch.fields():
      x = getattr(batch, k)
      # A jax.Array is already a global batch array (multi-host: each process's own rows,
      # see pasr_jax.multihost) and is used as it is; host arrays must be the same on every
      # process.
      if not isinstance(x, jax.Array):
        x = np.asarray(x).astype(np.int32 if k in INT_FIELDS else np.float32)
      want = (b,) if k in ROW_SCALARS else (b, ids_shape[1])
      if x.shape != want:
        raise TrainerError(f"batch {k} has shape {x.shape}, expected {want}")
      if k == "loss_mask":
        scored_window_check(_local_rows(x), self.cfg.max_tokens)
      # Host arrays are placed; global ones (or slices of them) moved to the batch sharding.
      out[k] = sharding.put_global(x, sharding.batch_sharding(self.mesh, self.rules, x.ndim))
    return Batch(**out), b // mb, ids_shape[1]

  # -- public API

  def update(self, batch: Batch) -> dict[str, float]:
    """One optimizer step on `batch` (all its micro-batches); returns float metrics: the
    loss (before the step), its metrics, tokens, grad_norm, skipped, skipped_steps."""
    _require_batch(batch)
    keys = TOKEN_FIELDS + self.loss.fields + tuple(
        k for k in self.loss.optional if getattr(batch, k) is not None)
    dev, k, length = self._put_batch(batch, keys)
    fn = self._compiled("update", k, keys, length)
    self.params, self.opt_state, m = fn(self.params, self.ref_params, self.opt_state, dev)
    metrics = {name: float(v) for name, v in m.items()}
    self.skipped_steps += int(metrics["skipped"])
    self.step += 1
    metrics["skipped_steps"] = float(self.skipped_steps)
    return metrics

  def logprobs(self, batch: Batch, scored_only: bool = False) -> np.ndarray:
    """Per-token logprobs `[B,L]` of the policy (aligned like loss_mask; column 0 is 0).

    With `scored_only`, the LM head runs only on the window of rollout.max_tokens positions
    per row that the loss uses (the row's scored tokens, from batch.loss_mask); positions
    outside it are 0. Cheaper, and all the loss ever reads.
    """
    keys = INT_FIELDS + (("loss_mask",) if scored_only else ())
    dev, k, length = self._put_batch(batch, keys)
    return sharding.to_host(self._compiled("logprobs", k, keys, length)(self.params, dev))

  def train_batch(self, batch: Batch) -> dict[str, float]:
    """The per-rollout-batch routine: optional trainer-side old logprobs, then the updates.

    With grpo.recompute_old_logps, grpo.tis_cap > 0 or a ratio band (grpo.is_mask_low/high)
    the trainer's own logprobs of the current policy become old_logps, once, before any
    update; against the sampler's (the behaviour policy) they give the capped weights
    (tis_cap) and the band's loss mask (`grpo.behaviour_weights`), whose metrics are
    reported in that case.
    Then grpo.num_iterations passes over the batch, each one optimizer update per
    optim.sequences_per_update consecutive rows (0: the whole batch); a slice without scored
    tokens is passed over (Adam's moments would still move the params). Returns the updates'
    metrics combined (see `_combine`), `updates` (how many were taken) and `compilations`
    (how many XLA compilations this call paid for).
    """
    g = self.cfg.grpo
    _require_batch(batch)
    compiled_before = self.compilations
    extra: dict[str, float] = {}
    if g.trainer_old_logps and "old_logps" in self.loss.fields:
      old_tr = self.logprobs(batch, scored_only=True)
      w, keep, mm = grpo.behaviour_weights(
          jnp.asarray(old_tr), jnp.asarray(sharding.to_host(batch.old_logps)),
          jnp.asarray(sharding.to_host(batch.loss_mask)), float(g.tis_cap),
          float(g.is_mask_low), float(g.is_mask_high))
      extra = {k: float(v) for k, v in mm.items()}
      batch = batch.replace(old_logps=old_tr)
      if g.tis_cap > 0:
        batch = batch.replace(is_weights=np.asarray(w))
      if g.ratio_band:
        batch = batch.replace(loss_mask=np.asarray(keep))
    b = batch.shape[0]
    per = int(self.cfg.optim.sequences_per_update) or b
    mask = sharding.to_host(batch.loss_mask)  # multi-host: a global array (a collective)
    slices = [slice(i, min(i + per, b)) for i in range(0, b, per)]
    slices = [s for s in slices if mask[s].any()] or slices[:1]
    steps = [self.update(jax.tree.map(lambda v, s=s: v[s], batch) if per < b else batch)
             for _ in range(max(1, int(g.num_iterations))) for s in slices]
    metrics = _combine(steps, self.loss)
    metrics.update(extra)
    metrics["compilations"] = float(self.compilations - compiled_before)
    return metrics

  @property
  def model(self) -> Decoder:
    """The live policy as a Decoder (shares the trainer's arrays; no copy)."""
    return nnx.merge(self.graphdef, self.params, self._rest)

  def state_for_checkpoint(self) -> dict[str, Any]:
    """Pytrees to save: params, opt_state. Not the reference: it is the initial params, which
    a resumed run loads again from model.path (train checks it is the same model)."""
    return {"params": self.params, "opt_state": self.opt_state,
            "skipped_steps": np.asarray(self.skipped_steps, np.int64),
            "step": np.asarray(self.step, np.int64)}

  def restore_from_checkpoint(self, state: dict[str, Any]) -> None:
    """Puts restored pytrees back on the mesh with the trainer's shardings."""
    self.params = sharding.put_tree(state["params"], self.param_shardings)
    self.opt_state = sharding.put_tree(state["opt_state"], self.opt_shardings)
    self.skipped_steps = int(state.get("skipped_steps", 0))
    self.step = int(state.get("step", 0))
