"""Running one training run as several JAX processes (one per host): who does what.

Each process samples and judges its own share of a step's questions on its own sampler
(`share`); the data cursor stays global, every process walks the same stream. Everything that
decides which program runs next is agreed by a small collective, so every process takes the
same branch at the same step: the global batch shape (`agree`: row counts and lengths, whether
any process has a batch at all), and whether to stop (SIGTERM on any host). The global batch
is then built from each process's rows, padded to the agreed shape
(`jax.make_array_from_process_local_data`). Process 0 is the one writer of the workdir's
logs (`is_writer`); what the others produced reaches it through `allgather_json`. Orbax
saves and restores involve every process (the workdir is on a filesystem all hosts share).

In a one-process run every helper here is a local no-op (no collective is issued).
"""

from __future__ import annotations

import json
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from pasr_jax import errors, sharding
from pasr_jax.batch import Batch


class MultihostError(errors.UserError):
  """A mesh or config that cannot split the run across processes."""


def initialize(mesh_cfg, local_device_ids: list[int] | None) -> None:
  """`jax.distributed.initialize` from cfg.mesh (coordinator_address, num_processes,
  process_id; empty / 0 / -1 let JAX detect them, e.g. under SLURM or Open MPI;
  heartbeat_timeout_s) and this process's GPUs (`devices.local_device_ids`: always explicit
  on GPUs). On CPU the collectives between processes go through gloo."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kw: dict[str, Any] = {}
  if mesh_cfg.coordinator_address:
    kw["coordinator_address"] = mesh_cfg.coordinator_address
  if mesh_cfg.num_processes > 0:
    kw["num_processes"] = int(mesh_cfg.num_processes)
  if mesh_cfg.process_id >= 0:
    kw["process_id"] = int(mesh_cfg.process_id)
  # Explicit GPUs: JAX's SLURM / Open MPI detection runs whenever they are None and would
  # give each process one GPU ([local process id]); with nothing left to detect, it is off.
  if local_device_ids:
    kw["local_device_ids"] = local_device_ids
  if {"coordinator_address", "num_processes", "process_id"} <= kw.keys():
    kw["cluster_detection_method"] = "deactivate"
  jax.distributed.initialize(**kw, heartbeat_timeout_seconds=int(
      mesh_cfg.heartbeat_timeout_s))


def is_writer() -> bool:
  """Whether this process writes the run's logs, config and reward curve (process 0)."""
  return jax.process_index() == 0


def share(n: int, index: int | None = None, count: int | None = None) -> slice:
  """The contiguous slice of `n` items (a step's questions) that process `index` of `count`
  handles; sizes differ by at most one, earlier processes take the larger shares."""
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  base, extra = divmod(n, count)
  lo = index * base + min(index, extra)
  return slice(lo, lo + base + (1 if index < extra else 0))


def agree(values: Sequence[int]) -> np.ndarray:
  """`[process_count, len(values)]` int32: every process's `values`, on every process."""
  local = np.asarray(values, np.int32).reshape(1, -1)
  if jax.process_count() == 1:
    return local
  return np.asarray(multihost_utils.process_allgather(local[0])).reshape(jax.process_count(), -1)


def barrier(name: str) -> None:
  """Waits until every process got here (processes must pass the same `name`)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def allgather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = agree([data.size])[:, 0]
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:data.size] = data
  every = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(every[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def check_mesh(mesh: Mesh, rules: sharding.Rules) -> None:
  """Raises MultihostError unless each process holds its own equal share of the batch
  dimension (the 'batch' rule's shards spread over the processes, none held by two)."""
  count = jax.process_count()
  if count == 1:
    return
  shards = sharding.batch_shards(mesh, rules)
  spec = sharding.batch_sharding(mesh, rules, 1)
  local = {idx[0].start for idx in spec.addressable_devices_indices_map((shards,)).values()}
  if shards % count or len(local) * count != shards:
    axes = " x ".join(sharding.batch_axes(mesh, rules)) or "(no axis)"
    raise MultihostError(
        f"config mesh.shape={tuple(mesh.shape.values())}: the batch is split {shards} ways "
        f"({axes}) and this process holds {len(local)} of them; with {count} processes "
        f"each must hold {shards}/{count}, so {axes} must span the hosts")


def rows_per_process(rows: int, micro_batch: int) -> int:
  """Rows each process contributes so that the global batch (count x that) splits into
  micro-batches: the smallest r >= rows with count * r a multiple of `micro_batch`."""
  step = micro_batch // math.gcd(micro_batch, jax.process_count())
  return max(step, -(-rows // step) * step)


def global_batch(local: Batch, mesh: Mesh, rules: sharding.Rules) -> Batch:
  """The global Batch (`[count * r, ...]` arrays sharded over the batch axes) from this
  process's `r` rows (every process passes the same r, length and fields)."""
  count = jax.process_count()

  def one(x: Any) -> jax.Array:
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
        sharding.batch_sharding(mesh, rules, x.ndim), x, (x.shape[0] * count,) + x.shape[1:])
  return jax.tree.map(one, local)
