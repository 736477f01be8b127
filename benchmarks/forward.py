"""Forward throughput: jitted Flax decoder vs transformers (torch) on SmolLM2, fp32, same batch.

  PYTHONPATH=. .venv/bin/python benchmarks/forward.py [--batch 8] [--seq 256] [--threads 2]

Prints tokens/s of each and the ratio (Flax / torch; > 1 means Flax is faster). One timed run
after one warm-up run (compile for JAX) each, on the same random token batch. `--backward`
adds forward+backward of the mean next-token log-likelihood (the shape of a GRPO step).
"""

import argparse
import os
import time


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--model", default="", help="HF dir (default: the prepared SmolLM2)")
  ap.add_argument("--backward", action="store_true", help="also time forward+backward")
  args = ap.parse_args()
  # torch's pool must be sized before it starts; XLA CPU uses all cores (2 here).
  os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from flax import nnx

  from pasr_jax.models.hf import load_hf
  from pasr_jax.smollm2 import prepare_smollm2

  torch.set_num_threads(args.threads)
  path = args.model or str(prepare_smollm2())
  model, cfg = load_hf(path)
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq))
  mask = np.ones_like(ids)
  tokens = args.batch * args.seq

  fwd = nnx.jit(lambda m, i, a: m(i, attention_mask=a))
  j_ids, j_mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
  t0 = time.perf_counter()
  jax.block_until_ready(fwd(model, j_ids, j_mask))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  out_jax = jax.block_until_ready(fwd(model, j_ids, j_mask))
  jax_s = time.perf_counter() - t0

  hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
  with torch.inference_mode():
    hf_model(input_ids=t_ids, attention_mask=t_mask)
    t0 = time.perf_counter()
    out_torch = hf_model(input_ids=t_ids, attention_mask=t_mask).logits
    torch_s = time.perf_counter() - t0

  diff = float(np.abs(np.asarray(out_jax) - out_torch.numpy()).max())
  del out_jax, out_torch

  if args.backward:
    def loss_jax(m, i, a):
      logp = jax.nn.log_softmax(m(i, attention_mask=a)[:, :-1])
      return -jnp.mean(jnp.take_along_axis(logp, i[:, 1:, None], axis=-1))
    step = nnx.jit(nnx.value_and_grad(loss_jax))
    jax.block_until_ready(step(model, j_ids, j_mask))
    t0 = time.perf_counter()
    jax.block_until_ready(step(model, j_ids, j_mask))
    jax_bwd_s = time.perf_counter() - t0

    def torch_step():
      hf_model.zero_grad(set_to_none=True)
      logits = hf_model(input_ids=t_ids, attention_mask=t_mask).logits[:, :-1]
      logp = torch.log_softmax(logits, -1)
      loss = -logp.gather(-1, t_ids[:, 1:, None]).mean()
      loss.backward()
    torch_step()
    t0 = time.perf_counter()
    torch_step()
    torch_bwd_s = time.perf_counter() - t0
  print(f"model {path}  batch {args.batch} x {args.seq}  fp32  threads {args.threads}")
  print(f"{'':8s}{'seconds':>10s}{'tokens/s':>12s}")
  print(f"{'flax':8s}{jax_s:10.2f}{tokens / jax_s:12.0f}   (first call incl. compile "
        f"{compile_s:.1f} s)")
  print(f"{'torch':8s}{torch_s:10.2f}{tokens / torch_s:12.0f}")
  print(f"ratio flax/torch tokens/s: {torch_s / jax_s:.2f}   max |dlogit| {diff:.1e}")
  if args.backward:
    print(f"{'fwd+bwd':8s}{'seconds':>10s}{'tokens/s':>12s}")
    print(f"{'flax':8s}{jax_bwd_s:10.2f}{tokens / jax_bwd_s:12.0f}")
    print(f"{'torch':8s}{torch_bwd_s:10.2f}{tokens / torch_bwd_s:12.0f}")
    print(f"ratio flax/torch fwd+bwd tokens/s: {torch_bwd_s / jax_bwd_s:.2f}")


if __name__ == "__main__":
  main()
