"""Device mesh, logical-axis rules and helpers that place params and batches on the mesh.

Params carry logical axis names (`vocab, embed, heads, kv_heads, head_dim, mlp, layers, norm`)
in their `out_sharding` metadata; a rule table (cfg.mesh.rules) maps each name to a mesh axis
(`data`, `fsdp`, `tensor`) or None. A dimension that the chosen mesh axis does not divide is
replicated instead (e.g. SmolLM2's 9 heads on a tensor axis of 2), so any model runs on any mesh.
The same table's `batch` rule splits batch arrays and activations (`batch_sharding`;
`use_mesh` + `constrain_batch` in the model) and its `vocab` rule the logits' vocab dimension.
Works in one process or many (`jax.distributed.initialize()` first): params are built with
`jax.make_array_from_callback` from host values that every process holds identically (a
multi-host batch is built from each process's own rows, see `pasr_jax.multihost`).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pasr_jax import errors

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Any]]


class MeshError(errors.UserError):
  """A mesh shape or rule table from the config that cannot be used."""


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """Fills the one -1 entry of a (data, fsdp, tensor) shape so the product is `num_devices`."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 3:
    raise MeshError(f"mesh.shape must have 3 entries (data, fsdp, tensor), got {shape}")
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise MeshError(f"mesh.shape={shape}: entries must be positive, at most one may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise MeshError(f"mesh.shape={shape} does not divide {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise MeshError(f"mesh.shape={shape} needs {math.prod(shape)} devices, have {num_devices}")
  return shape  # type: ignore[return-value]


def make_mesh(shape: Sequence[int] = (1, -1, 1), devices: Sequence[Any] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes over `devices` (default: all, all hosts).

  Auto axes let XLA choose shardings of intermediates (JAX 0.10 defaults to Explicit axes,
  which reject matmuls whose output sharding is ambiguous).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_shape(shape, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _rule_table(rules: Rules) -> dict[str, Any]:
  table = {}
  for item in rules:
    if len(item) != 2:
      raise MeshError(f"mesh.rules entry {item!r} must be (logical_name, mesh_axis_or_None)")
    name, axis = item
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    for a in axes:
      if a not in MESH_AXES:
        raise MeshError(f"mesh.rules: {name!r} -> {a!r} is not one of {MESH_AXES}")
    table[name] = axes
  return table


def logical_to_spec(names: Iterable[str | None], rules: Rules, mesh: Mesh | None = None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
  """PartitionSpec for logical axis `names` under `rules`.

  A mesh axis is used at most once per array (first dimension wins); with `mesh` and `shape`
  given, mesh axes of size 1 are dropped and a dimension not divisible by its mesh axes is
  replicated.
  """
  table = _rule_table(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(names):
    axes = table.get(name, ()) if name is not None else ()
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*spec)


def logical_to_sharding(names: Iterable[str | None], mesh: Mesh, rules: Rules,
                        shape: Sequence[int] | None = None) -> NamedSharding:
  """NamedSharding for an array with logical axis `names` (see `logical_to_spec`)."""
  return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def logical_axes(var: nnx.Variable) -> tuple | None:
  """The logical axis names a param carries in its metadata (None: it has none)."""
  meta = var.get_metadata()
  for key in ("out_sharding", "sharding_names", "sharding"):
    if meta.get(key):
      return tuple(meta[key])
  return None


def param_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules,
                   shape: Sequence[int] | None = None) -> NamedSharding:
  """The NamedSharding of param `var` (of `shape`, default its value's) from its logical axis
  names under `rules`; replicated when it has none. The one reader of the params' sharding
  metadata (`state_shardings`, `models.hf.load_hf`)."""
  shape = tuple(var.get_value().shape if shape is None else shape)
  names = logical_axes(var)
  if names is None:
    return NamedSharding(mesh, PartitionSpec())
  if len(names) != len(shape):
    raise MeshError(f"param of shape {shape} has {len(names)} logical names {names}")
  return logical_to_sharding(names, mesh, rules, shape)


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
  """Tree of NamedSharding matching an nnx.State (or model) from the params' logical names.

  Variables without names are replicated. Works for abstract (ShapeDtypeStruct) states too.
  """
  if isinstance(state, nnx.Module):
    state = nnx.state(state)

  def one(v):
    if isinstance(v, nnx.Variable):
      return v.replace(param_sharding(v, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """Places a host value that every process holds identically as a global array (a global
  array is resharded where it lies)."""
  if isinstance(x, jax.Array) and (not x.is_fully_addressable or jax.process_count() == 1):
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def put_tree(tree: Any, shardings: Any) -> Any:
  """`put_global` over matching trees of values and shardings."""
  return jax.tree.map(put_global, tree, shardings)


def batch_axes(mesh: Any, rules: Rules) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over, of batch arrays and activations alike:
  the 'batch' logical rule of `rules` (cfg.mesh.rules; default ('data', 'fsdp')); no rule:
  not split. MeshError, naming mesh.rules, for an axis `mesh` does not have."""
  axes = _rule_table(rules).get("batch", ())
  for a in axes:
    if a not in mesh.axis_names:
      raise MeshError(f"mesh.rules: 'batch' -> {a!r} is not an axis of the mesh "
                      f"{tuple(mesh.axis_names)}")
  return axes


def batch_spec(mesh: Any, rules: Rules, ndim: int = 2, lead: int = 0) -> PartitionSpec:
  """PartitionSpec of an array whose dimension `lead` is the batch (`batch_axes`); the other
  dimensions are replicated."""
  axes = batch_axes(mesh, rules) or None
  return PartitionSpec(*([None] * lead), axes, *([None] * (ndim - lead - 1)))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a `[B, ...]` batch array: B by the 'batch' rule, the rest replicated."""
  return NamedSharding(mesh, batch_spec(mesh, rules, ndim))


def batch_shards(mesh: Any, rules: Rules) -> int:
  """How many ways the batch dimension is split (the product of `batch_axes`)."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))


def logits_spec(mesh: Mesh, rules: Rules, vocab_size: int) -> PartitionSpec:
  """PartitionSpec of `[B, T, V]` logits: B by the 'batch' rule, V by the 'vocab' rule's axes
  not used by the batch when they divide V (else replicated)."""
  batch = batch_axes(mesh, rules)
  vocab = tuple(a for a in _rule_table(rules).get("vocab", ()) if a not in batch)
  if not vocab or vocab_size % math.prod(mesh.shape[a] for a in vocab):
    vocab = ()
  return PartitionSpec(batch or None, None,
                       None if not vocab else vocab[0] if len(vocab) == 1 else vocab)


# The rules activations are sharded by, while `use_mesh` is active (read at trace time).
_ACTIVATION_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "pasr_jax_activation_rules", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """`jax.set_mesh(mesh)` with `rules` (cfg.mesh.rules, the table the weights are placed by)
  for activations: functions traced inside pin them with `constrain_batch`. A jitted function
  keeps what it was traced with, so trace it under one rule table only."""
  batch_axes(mesh, rules)  # a bad rule fails here, not inside a trace
  token = _ACTIVATION_RULES.set(tuple(rules))
  try:
    with jax.set_mesh(mesh):
      yield
  finally:
    _ACTIVATION_RULES.reset(token)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins activations `[B, ...]` batch-sharded by the 'batch' rule inside `use_mesh`. Without
  it SPMD propagation follows the fsdp-sharded `embed` dim of the weights and replicates the
  batch on every device. No-op outside `use_mesh`, or when the batch axes do not divide B."""
  rules = _ACTIVATION_RULES.get()
  mesh = jax.sharding.get_abstract_mesh()
  if rules is None or mesh.empty:
    return x
  axes = batch_axes(mesh, rules)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  return jax.lax.with_sharding_constraint(x, batch_spec(mesh, rules, x.ndim))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def to_host(x: Any, dtype: Any = None) -> np.ndarray:
  """Host numpy copy of a (possibly multi-process) global array, on every process.

  With `dtype`, the array is cast on its devices first (same sharding), so what is gathered
  and held is `dtype` bytes (bf16 for a bf16 sampler, not the fp32 master weights). Across
  processes it is resharded once onto each host's own devices (split over them, one replica
  per host) and copied out shard by shard: one copy of the whole array per host, and no
  device ever holds all of it (an all-gather would put the whole array on every device).
  """
  if not isinstance(x, jax.Array):
    return np.asarray(x, dtype)
  if dtype is not None and x.dtype != np.dtype(dtype):
    x = _astype(x, np.dtype(dtype))
  if jax.process_count() > 1 and not x.is_fully_addressable:
    x = jax.device_put(x, _per_host_sharding(x))
    out = np.empty(x.shape, x.dtype)
    for s in x.addressable_shards:
      out[s.index] = np.asarray(s.data)
    return out
  return np.asarray(x)


_astype = jax.jit(lambda x, dtype: x.astype(dtype), static_argnums=1)


def _per_host_sharding(x: jax.Array) -> NamedSharding:
  """x's devices as a (host, local) mesh: the first dimension that the local device count
  divides is split over each host's devices, and the whole is replicated across hosts."""
  devices = sorted(x.sharding.device_set, key=lambda d: (d.process_index, d.id))
  mesh = Mesh(np.array(devices).reshape(jax.process_count(), -1), ("host", "local"))
  n = mesh.shape["local"]
  spec = [None] * x.ndim
  for i, size in enumerate(x.shape):
    if size % n == 0:
      spec[i] = "local"
      break
  return NamedSharding(mesh, PartitionSpec(*spec))
