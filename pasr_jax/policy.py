"""The policy a run trains: which HF dir it starts from, and that model loaded on its mesh.

The one owner of both questions, for `run`, `sft`, `cold_start` and `export`:
- `base_dir`: the HF dir the config names, `model.path`, or for `model.tiny_random` the random
  tiny model in the workdir (made at the first start).
- `start_dir`: the HF dir a PASR run's policy starts from: the format cold start's output when
  `cold_start.enabled` (made by `cold_start.ensure`), else `base_dir`. A run records it in its
  checkpoints (`RunState.model_dir`), where `export` reads it back.
- `build_policy`: the mesh, and the model loaded from a dir with every `model.*` option
  (dtypes, scan, remat, attention), streamed into its sharding by `mesh.rules`.
"""

from __future__ import annotations

from typing import NamedTuple

from jax.sharding import Mesh

from pasr_jax import multihost
from pasr_jax.config import MeshCfg, ModelCfg, RunConfig
from pasr_jax.models.hf import load_hf
from pasr_jax.models.qwen import Decoder, ModelConfig
from pasr_jax.sharding import make_mesh
from pasr_jax.tiny import make_tiny_model_dir
from pasr_jax.workdir import Workdir


class Policy(NamedTuple):
  """A loaded policy: the model (params sharded on `mesh`), its architecture, its source dir."""
  model: Decoder
  config: ModelConfig
  mesh: Mesh
  model_dir: str


def base_dir(cfg: RunConfig, create: bool = True) -> str:
  """`model.path`, or for model.tiny_random the workdir's tiny model, made here if missing
  and `create` (multi-host: only the writer process creates it)."""
  if not cfg.model.tiny_random:
    return cfg.model.path
  d = Workdir(cfg.workdir).tiny_model
  if create and not (d / "config.json").is_file():
    # Untied, so tiny runs cover the untied path; SmolLM2 (the demo) covers tied heads, whose
    # vLLM-side refresh after a sync is in rollout/vllm_internals.py (SyncExtension).
    make_tiny_model_dir(str(d), seed=cfg.seed, tie_word_embeddings=False)
  return str(d)


def start_dir(cfg: RunConfig) -> str:
  """The HF dir a PASR run's policy starts from: the cold start's (cold_start.enabled), else
  `base_dir`. The cold start's dir exists only after `cold_start.ensure`."""
  if cfg.cold_start.enabled:
    return str(Workdir(cfg.workdir).cold_start_hf)
  return base_dir(cfg, create=False)


def build_policy(model: ModelCfg, mesh: MeshCfg, model_dir: str) -> Policy:
  """The mesh of `mesh.shape` and the HF model in `model_dir` on it, with every `model.*`
  option; raises MultihostError when the mesh does not split the batch over the hosts."""
  m = make_mesh(tuple(mesh.shape))
  multihost.check_mesh(m, tuple(mesh.rules))
  decoder, config = load_hf(model_dir, dtype=model.compute_dtype, param_dtype=model.weight_dtype,
                            mesh=m, rules=tuple(mesh.rules), scan_layers=model.scan_layers,
                            remat=model.remat, attention=model.attention)
  return Policy(decoder, config, m, str(model_dir))
