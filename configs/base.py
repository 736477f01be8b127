"""The one config tree: every key at its default.

Keys, types, defaults, one-line help and checks are declared once, in `pasr_jax/config.py`;
this is the tree they make. Presets import `get_base_config()` and override fields;
`python -m pasr_jax.config` lists every key with its default and help. Defaults follow the
PASR paper unless the help says otherwise.
"""

import ml_collections

from pasr_jax.config import base_tree


def get_base_config() -> ml_collections.ConfigDict:
  return base_tree()
