"""Flax NNX decoder for the Qwen2/Qwen2.5, Qwen3 and Llama (SmolLM2) family.

One class covers all three, switched by `ModelConfig` fields read from an HF config.json:
Qwen2 has q/k/v biases (`attention_bias`), Qwen3 has per-head q/k RMSNorm (`qk_norm`) and an
explicit `head_dim`, Llama has neither. RoPE uses the HF rotate-half convention and is computed
from explicit positions, so left- and right-padded batches give the same logits for real tokens.

Every `nnx.Param` carries its logical axis names in the `out_sharding` metadata (flax 0.12's
name for what older releases called `sharding_names`/`sharding`); logical names come from
{vocab, embed, heads, kv_heads, head_dim, mlp, layers, norm}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pasr_jax import errors
from pasr_jax.config import ATTENTIONS
from pasr_jax.sharding import constrain_batch

MODEL_TYPES = ("qwen2", "qwen3", "llama")
ARCHITECTURES = {
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "llama": "LlamaForCausalLM",
}
# Large negative instead of -inf: a fully masked row (a left-pad query) stays finite.
_MASK_VALUE = -1e30


class ModelConfigError(errors.UserError):
  """An HF config dict that this decoder cannot represent (field named in the message)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters, one-to-one with HF config.json fields."""
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  qk_norm: bool = False
  max_position_embeddings: int = 32768
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None  # a tuple keeps the config hashable
  pad_token_id: int | None = None

  def __post_init__(self):
    if self.model_type not in MODEL_TYPES:
      raise ModelConfigError(
          f"model_type={self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
    if self.num_heads % self.num_kv_heads:
      raise ModelConfigError(
          f"num_attention_heads={self.num_heads} is not a multiple of "
          f"num_key_value_heads={self.num_kv_heads}")

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """Builds the config from an HF config.json dict; raises ModelConfigError naming the field."""
    model_type = d.get("model_type")
    if model_type is None:
      raise ModelConfigError("config field 'model_type' is missing")
    if model_type not in MODEL_TYPES:
      raise ModelConfigError(
          f"config field model_type={model_type!r} is not supported; expected one of "
          f"{MODEL_TYPES}")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads"):
      if d.get(field) is None:
        raise ModelConfigError(f"config field {field!r} is missing (model_type={model_type})")
    if d.get("hidden_act", "silu") != "silu":
      raise ModelConfigError(f"config field hidden_act={d['hidden_act']!r}: only 'silu'")
    if d.get("mlp_bias", False):
      raise ModelConfigError("config field mlp_bias=True is not supported")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
      raise ModelConfigError(f"config field rope_type={rope_type!r}: only 'default' RoPE")
    rope_theta = d.get("rope_theta", rope.get("rope_theta"))
    if rope_theta is None:
      raise ModelConfigError("config field 'rope_theta' (or rope_parameters.rope_theta) is missing")
    heads = int(d["num_attention_heads"])
    head_dim = d.get("head_dim") or int(d["hidden_size"]) // heads
    # Qwen2 configs have no attention_bias field: q/k/v always carry a bias there.
    attention_bias = bool(d.get("attention_bias", model_type == "qwen2"))
    return cls(
        model_type=model_type,
        vocab_size=int(d["vocab_size"]),
        hidden_size=int(d["hidden_size"]),
        intermediate_size=int(d["intermediate_size"]),
        num_layers=int(d["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=float(rope_theta),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=(tuple(d["eos_token_id"]) if isinstance(d.get("eos_token_id"), list)
                      else d.get("eos_token_id")),
        pad_token_id=d.get("pad_token_id"),
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """The HF config.json dict (transformers 5 layout, with `rope_theta` also at top level)."""
    d = {
        "architectures": [ARCHITECTURES[self.model_type]],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "hidden_act": "silu",
        "rope_theta": self.rope_theta,
        "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
        "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_word_embeddings,
        "max_position_embeddings": self.max_position_embeddings,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                         else self.eos_token_id),
        "pad_token_id": self.pad_token_id,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    if self.model_type != "qwen2":
      d["attention_bias"] = self.attention_bias
    elif not self.attention_bias:
      raise ModelConfigError("qwen2 checkpoints always have q/k/v biases (attention_bias=False)")
    if self.model_type == "llama":
      d["mlp_bias"] = False
    return d


def resolve_attention(name: str, dtype, platform: str | None = None) -> str:
  """The attention implementation `model.attention=name` means on `platform` (default: JAX's
  default backend): "auto" is cuDNN fused attention on NVIDIA GPUs in bf16/fp16 (it has no
  fp32 kernel), else the blocked XLA path; "xla" / "cudnn" are taken as given."""
  if name not in ATTENTIONS:
    raise ModelConfigError(f"model.attention={name!r}: expected one of {ATTENTIONS}")
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if name == "cudnn" and not half:
    raise ModelConfigError(f"model.attention='cudnn' needs model.dtype bfloat16 or float16, "
                           f"not {jnp.dtype(dtype).name}")
  if name != "auto":
    return name
  platform = platform or jax.default_backend()
  return "cudnn" if platform in ("cuda", "gpu") and half else "xla"


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...],
           init: str, param_dtype) -> nnx.Param:
  if init == "normal":
    value = 0.02 * jax.random.normal(rngs.params(), shape, param_dtype)
  elif init == "ones":
    value = jnp.ones(shape, param_dtype)
  else:
    value = jnp.zeros(shape, param_dtype)
  # Logical names only; placement is done by load_hf under a mesh.
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _matmul(x2: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
  """x2 [N, in] times a kernel [out..., in...] (torch Linear's [out, in] layout, so HF
  weights load and sync without a transpose) as one 2-D matmul -> [N, prod(out)].

  Batch dims are flattened by the caller: XLA:CPU lowers a 3-D activation times a matrix (and
  its backward) with extra transposes of the activation; x @ W.T is as fast as x @ W
  (docs/performance.md)."""
  return jnp.einsum("ni,oi->no", x2, kernel.astype(dtype).reshape(-1, x2.shape[-1]))


class RMSNorm(nnx.Module):
  """y = x / rms(x) * weight, computed in float32 (as HF does) and cast back."""

  def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
    self.weight = _param(rngs, (dim,), ("norm",), "ones", param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (self.weight[...].astype(jnp.float32) * x).astype(dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """positions [B,T] int -> cos, sin [B,T,1,head_dim] float32 (HF rotate-half layout)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [B,T,H,hd]; rotation in float32, result in x.dtype."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(dtype)


def _query_blocks(t: int) -> int:
  """How many causal query blocks `Attention` splits t positions into: blocks of >= 192
  positions (on CPU, what smaller blocks skip is lost to their smaller, slower matmuls;
  docs/performance.md), at most 8, and dividing t."""
  n = min(8, t // 192)
  while n > 1 and t % n:
    n -= 1
  return max(n, 1)


class Attention(nnx.Module):
  """GQA self-attention; q/k/v/o kernels keep heads as their own axis for sharding.

  Kernels are [out..., in...] like HF's: q/k/v [heads, head_dim, embed], o [embed, heads,
  head_dim]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention: str = "xla"):
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.cfg, self.dtype, self.attention = cfg, dtype, attention
    self.q_proj = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), "normal", param_dtype)
    self.k_proj = _param(rngs, (kv, hd, d), ("kv_heads", "head_dim", "embed"), "normal",
                         param_dtype)
    self.v_proj = _param(rngs, (kv, hd, d), ("kv_heads", "head_dim", "embed"), "normal",
                         param_dtype)
    self.o_proj = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), "normal", param_dtype)
    if cfg.attention_bias:
      self.q_bias = _param(rngs, (h, hd), ("heads", "head_dim"), "zeros", param_dtype)
      self.k_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), "zeros", param_dtype)
      self.v_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), "zeros", param_dtype)
    if cfg.qk_norm:
      self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
      self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               mask: jax.Array) -> jax.Array:
    """x [B,T,D] -> [B,T,D]. mask: [B,1,T,1,T] bool (True = may attend) for "xla"; for
    "cudnn" the [B] int32 count of real tokens per row (right padding, as the trainer's
    batches are: the key/query padding mask cuDNN takes is a length)."""
    cfg, dt = self.cfg, self.dtype
    b, t, d = x.shape
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = h // kv
    x2 = x.reshape(b * t, d)
    q = _matmul(x2, self.q_proj[...], dt).reshape(b, t, h, hd)
    k = _matmul(x2, self.k_proj[...], dt).reshape(b, t, kv, hd)
    v = _matmul(x2, self.v_proj[...], dt).reshape(b, t, kv, hd)
    if cfg.attention_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    if cfg.qk_norm:  # Qwen3 normalises each head before RoPE.
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if self.attention == "cudnn":
      out = fused_attention(q, k, v, mask, "cudnn")
      return _matmul(out.reshape(b * t, h * hd), self.o_proj[...], dt).reshape(b, t, d)
    # Layout [B, kv, T*g, hd]: the g query heads sharing a kv head become extra rows of one
    # batched matmul per kv head (head h = kv * g + g', as HF repeats kv heads). XLA:CPU
    # inserts transposes around every dot in the [B, T, heads, hd] layout
    # (docs/performance.md). Rows are position-major, so a
    # block of query positions is a contiguous slice.
    q = q.reshape(b, t, kv, g, hd).transpose(0, 2, 1, 3, 4).reshape(b, kv, t * g, hd)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv, S, hd]
    n = _query_blocks(t)
    blk = t // n
    outs = []
    # Causal: query block i only needs keys [0, (i+1)*blk); skipping the rest saves
    # (n-1)/(2n) of the attention matmuls and of the [.., T, T] elementwise passes.
    for i in range(n):
      e = (i + 1) * blk
      scores = jnp.einsum("bkqh,bksh->bkqs", q[:, :, i * blk * g:e * g], k[:, :, :e],
                          preferred_element_type=jnp.float32)
      scores = (scores * (hd ** -0.5)).reshape(b, kv, blk, g, e)
      scores = jnp.where(mask[:, :, i * blk:e, :, :e], scores, _MASK_VALUE)
      probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(b, kv, blk * g, e)
      outs.append(jnp.einsum("bkqs,bksh->bkqh", probs, v[:, :, :e]))
    out = outs[0] if n == 1 else jnp.concatenate(outs, axis=2)
    out = out.reshape(b, kv, t, g, hd).transpose(0, 2, 1, 3, 4).reshape(b * t, h * hd)
    return _matmul(out, self.o_proj[...], dt).reshape(b, t, d)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                    implementation: str) -> jax.Array:
  """Causal GQA attention by `jax.nn.dot_product_attention`: q [B,T,H,hd], k/v [B,T,kv,hd],
  lengths [B] real tokens per (right-padded) row -> [B,T,H,hd]. With "cudnn" this is one
  cuDNN flash-attention call forward and one backward, which never materialise the [T, T]
  scores; rows past a row's length (padding queries) come out as zeros."""
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                      key_value_seq_lengths=lengths,
                                      implementation=implementation)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    d, m = cfg.hidden_size, cfg.intermediate_size
    self.dtype = dtype
    self.gate_proj = _param(rngs, (m, d), ("mlp", "embed"), "normal", param_dtype)
    self.up_proj = _param(rngs, (m, d), ("mlp", "embed"), "normal", param_dtype)
    self.down_proj = _param(rngs, (d, m), ("embed", "mlp"), "normal", param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = self.dtype
    x2 = x.reshape(-1, x.shape[-1])
    gate = _matmul(x2, self.gate_proj[...], dt)
    up = _matmul(x2, self.up_proj[...], dt)
    return _matmul(jax.nn.silu(gate) * up, self.down_proj[...], dt).reshape(x.shape)


class Block(nnx.Module):
  """Pre-norm transformer layer."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, attention: str = "xla"):
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.self_attn = Attention(cfg, dtype=dtype, attention=attention, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.mlp = MLP(cfg, dtype=dtype, **kw)

  def __call__(self, x, cos, sin, mask):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nnx.Module):
  """Causal LM. `model(input_ids [B,T], positions [B,T]|None, attention_mask [B,T]|None)`
  -> float32 logits [B,T,V].

  With `scan_layers=True` the layers are one `Block` whose params are stacked on a leading
  `layers` axis and run with `nnx.scan` (faster compiles at depth); `remat=True` recomputes each
  layer's activations in the backward pass. `attention` is "auto", "xla" or "cudnn" (see
  `resolve_attention`; "auto" is resolved here, against JAX's default backend).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
               param_dtype=jnp.float32, scan_layers: bool = False, remat: bool = False,
               attention: str = "auto"):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.cfg, self.dtype = cfg, dtype
    self.attention = attention = resolve_attention(attention, dtype)
    self.scan_layers, self.remat = scan_layers, remat
    self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                               "normal", param_dtype)
    if scan_layers:
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_layers(r: nnx.Rngs) -> Block:
        return Block(cfg, rngs=r, dtype=dtype, param_dtype=param_dtype, attention=attention)
      self.layers = make_layers(rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                                    attention=attention) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, param_dtype=param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                            "normal", param_dtype)

  def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
               attention_mask: jax.Array | None = None) -> jax.Array:
    return self.logits(self.hidden_states(input_ids, positions, attention_mask))

  def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None,
                    attention_mask: jax.Array | None = None) -> jax.Array:
    """The final-norm hidden states [B,T,D] (compute dtype) that `logits` projects."""
    cfg = self.cfg
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    if positions is None:
      # Count real tokens so left padding does not shift positions.
      positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
    if self.attention == "cudnn":
      mask = (attention_mask > 0).sum(axis=-1).astype(jnp.int32)  # [B] real tokens
    else:
      causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
      mask = (causal[None] & (attention_mask[:, None, :] > 0))[:, None, :, None]  # [B,1,T,1,T]

    x = constrain_batch(jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype))

    def layer(block: Block, h: jax.Array) -> jax.Array:
      return constrain_batch(block(constrain_batch(h), cos, sin, mask))
    if self.remat:
      layer = nnx.remat(layer)

    if self.scan_layers:
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def run(h, block):
        return layer(block, h)
      x = run(x, self.layers)
    else:
      for block in self.layers:
        x = layer(block, x)
    return self.norm(x)

  def logits(self, x: jax.Array) -> jax.Array:
    """Hidden states [..., D] -> float32 logits [..., V] (the tied or separate LM head)."""
    cfg = self.cfg
    head = self.embed_tokens[...] if cfg.tie_word_embeddings else self.lm_head[...]
    logits = _lm_head(x.reshape(-1, x.shape[-1]), head.astype(self.dtype))
    return logits.reshape(*x.shape[:-1], logits.shape[-1])


@jax.custom_vjp
def _lm_head(x2: jax.Array, head: jax.Array) -> jax.Array:
  """float32 logits [N, V] of hidden states x2 [N, D] and head [V, D].

  The custom backward computes the head's gradient as (x2^T g)^T: left to autodiff, XLA:CPU
  writes the [N, V] logit gradient out transposed for that matmul (strided writes of the
  largest tensor of the step; docs/performance.md), where this transposes only x2 and the
  [D, V] result.
  """
  return jnp.einsum("nd,vd->nv", x2, head, preferred_element_type=jnp.float32)


def _lm_head_fwd(x2, head):
  return _lm_head(x2, head), (x2, head)


def _lm_head_bwd(res, g):
  x2, head = res
  g = g.astype(head.dtype)
  dx = jnp.einsum("nv,vd->nd", g, head, preferred_element_type=jnp.float32)
  dhead_t = jnp.einsum("dn,nv->dv", x2.T, g, preferred_element_type=jnp.float32)
  return dx.astype(x2.dtype), dhead_t.T.astype(head.dtype)


_lm_head.defvjp(_lm_head_fwd, _lm_head_bwd)
