"""Supervised fine-tuning: `python -m pasr_jax.sft --config=configs/<preset>.py --config.sft.x=y`.

PASR+IFT (paper App. A.1): fine-tune on "good refinement paths" harvested from a PASR run's
`rollouts.jsonl` (`sft.rollouts`: well-formed, at least one complete refine, accuracy not below
that question's baseline mean) or on any JSONL of chat transcripts (`sft.data`, one
`{"messages": [{"role", "content"}, ...]}` per line). Loss on assistant tokens only; lr 1e-5,
cosine with 10% linear warm-up, 2 epochs by default. The format cold start (cold_start.py, not
part of the paper) runs through the same `run_sft`.

No second model path: the `Trainer` (same load_hf, mesh, shardings, optax, logprob function and
GRPO loss) takes every step. With advantages 1, beta 0, token_mean and old_logps equal to the
current policy's logprobs (computed first, which also gives the NLL we report), the GRPO
per-token loss is -exp(lp - sg(lp)) whose gradient is exactly -grad(lp): the SFT gradient.

Workdir (`sft.workdir`, default <workdir>/sft): config.json, data.jsonl (the transcripts used),
checkpoints/ (Orbax, resumable), metrics.jsonl, hf/ (with sft.export; vLLM loads it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import defaultdict
from typing import Any

import numpy as np

from pasr_jax.config import RunConfig, TrainerCfg

log = logging.getLogger("pasr_jax.sft")

ROLES = ("system", "user", "assistant")


class SFTError(ValueError):
  """An SFT input (file, line, field) or `sft.*` config value is unusable."""


# ----------------------------------------------------------------------------- inputs
def load_transcripts(path: str) -> list[list[dict[str, str]]]:
  """The `messages` lists of a JSONL of chat transcripts, validated (file and line in errors)."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise SFTError(f"sft.data={path!r}: cannot read ({e})") from None
  out = []
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"sft.data={path!r} line {n}"
    try:
      rec = json.loads(line)
    except json.JSONDecodeError as e:
      raise SFTError(f"{where}: invalid JSON ({e.msg})") from None
    msgs = rec.get("messages") if isinstance(rec, dict) else None
    if not isinstance(msgs, list) or not msgs:
      raise SFTError(f"{where}: expected an object with a non-empty 'messages' list")
    for i, m in enumerate(msgs):
      if (not isinstance(m, dict) or m.get("role") not in ROLES
          or not isinstance(m.get("content"), str)):
        raise SFTError(f"{where}: messages[{i}] must be {{'role': one of {ROLES}, "
                       f"'content': str}}, got {m!r:.120}")
    if not any(m["role"] == "assistant" for m in msgs):
      raise SFTError(f"{where}: no assistant message (nothing to train on)")
    out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
  if not out:
    raise SFTError(f"sft.data={path!r}: no transcripts")
  return out


def harvest_refinement_paths(records: list[dict[str, Any]], questions: dict[str, str],
                             system: str) -> tuple[list[list[dict[str, str]]], dict[str, int]]:
  """PASR+IFT training transcripts from rollout records (rollouts.jsonl of `pasr_jax.train`).

  A PASR answer is kept when it is well-formed, holds at least one complete refine pair, is
  not wrong (accuracy > 0: a wrong answer tying a zero baseline mean is no good path) and its
  accuracy is not below the mean accuracy of the baseline answers sampled for the same
  question at the same step. Identical texts for the same question are kept once. Returns
  ([system, user, assistant] transcripts, counts of why answers were dropped).
  """
  from pasr_jax import answer_format  # pylint: disable=import-outside-toplevel
  base = defaultdict(list)
  for r in records:
    if r.get("kind") == "baseline":
      base[(r["step"], r["id"])].append(float(r["accuracy"]))
  stats = {"pasr": 0, "kept": 0, "malformed": 0, "no_refine": 0, "wrong": 0, "below_baseline": 0,
           "no_baseline": 0, "unknown_question": 0, "duplicate": 0}
  seen, out = set(), []
  for r in records:
    if r.get("kind") != "pasr":
      continue
    stats["pasr"] += 1
    text = r["text"]
    accs = base.get((r["step"], r["id"]))
    if not answer_format.format_ok(text):
      stats["malformed"] += 1
    elif answer_format.count_refines(text) == 0:
      stats["no_refine"] += 1
    elif float(r["accuracy"]) <= 0:
      stats["wrong"] += 1
    elif not accs:
      stats["no_baseline"] += 1
    elif float(r["accuracy"]) < math.fsum(accs) / len(accs):
      stats["below_baseline"] += 1
    elif r["id"] not in questions:
      stats["unknown_question"] += 1
    elif (r["id"], text) in seen:
      stats["duplicate"] += 1
    else:
      seen.add((r["id"], text))
      stats["kept"] += 1
      out.append([{"role": "system", "content": system},
                  {"role": "user", "content": questions[r["id"]]},
                  {"role": "assistant", "content": text.strip()}])
  return out, stats


def _harvest_from_run(cfg) -> tuple[list[list[dict[str, str]]], dict[str, int]]:
  """`harvest_refinement_paths` on `sft.rollouts`; questions come from the data section of the
  run's config.json beside it (else this config's `data`), the system prompt from `prompts`."""
  from pasr_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from pasr_jax import metrics, prompts  # pylint: disable=import-outside-toplevel
  path = cfg.sft.rollouts
  if not os.path.isfile(path):
    raise SFTError(f"sft.rollouts={path!r}: no such file")
  try:
    records = metrics.read_jsonl(path)
  except (OSError, json.JSONDecodeError) as e:
    raise SFTError(f"sft.rollouts={path!r}: unreadable ({e})") from None
  data_cfg = cfg.data
  run_cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  if os.path.isfile(run_cfg):
    with open(run_cfg, encoding="utf-8") as f:
      data_cfg = json.load(f)["data"]
  questions = {r.id: r.question for r in data_lib.load_dataset(data_cfg)}
  system = prompts.load_prompts(cfg.prompts).pasr_system
  out, stats = harvest_refinement_paths(records, questions, system)
  if not out:
    raise SFTError(f"sft.rollouts={path!r}: no good refinement path among {stats['pasr']} "
                   f"PASR answers (dropped: {stats})")
  return out, stats


# ----------------------------------------------------------------------------- encoding
def _template_ids(tokenizer, messages, generation_prompt: bool) -> list[int]:
  return list(tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                            tokenize=True, return_dict=False))


def encode_transcript(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
  """(token ids of the chat-templated transcript, 1 on assistant tokens else 0).

  An assistant turn's tokens are those between the template with a generation prompt for the
  messages before it and the template through it: its content and end-of-turn token(s), as
  the sampler produces them after the same prompt (pasr_jax.chat.encode).
  """
  ids = _template_ids(tokenizer, messages, False)
  mask = [0] * len(ids)
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    start = len(_template_ids(tokenizer, messages[:i], True)) if i else 0
    upto = _template_ids(tokenizer, messages[:i + 1], False)
    if ids[:len(upto)] != upto or start > len(upto):
      raise SFTError("the tokenizer's chat template does not render a transcript as the "
                     "concatenation of its turns; cannot locate assistant tokens")
    mask[start:len(upto)] = [1] * (len(upto) - start)
  return ids, mask


def pack(encoded: list[tuple[list[int], list[int]]], pad_id: int, multiple: int,
         rows_multiple: int) -> dict[str, np.ndarray]:
  """A trainer batch (step.pack_batch layout) whose loss_mask is each row's assistant mask;
  advantages 1 (old_logps are filled in by `sft_step`)."""
  from pasr_jax.step import pack_batch  # pylint: disable=import-outside-toplevel
  n = len(encoded)
  batch = pack_batch([[]] * n, [ids for ids, _ in encoded], [[0.0] * len(ids) for ids, _ in encoded],
                     [1.0] * n, [True] * n, pad_id, multiple, rows_multiple)
  for i, (ids, mask) in enumerate(encoded):
    batch["loss_mask"][i, :len(ids)] *= np.asarray(mask, np.float32)
  return batch


def sft_step(trainer, batch: dict[str, np.ndarray]) -> dict[str, float]:
  """One SFT update on `batch` through the GRPO trainer (see module doc); returns the batch's
  mean NLL per assistant token before the update, the grad norm and the token count."""
  lp = trainer.logprobs(batch, scored_only=True)
  mask = batch["loss_mask"]
  tokens = float(mask.sum())
  nll = float(-(lp * mask).sum() / max(tokens, 1.0))
  m = trainer.update(dict(batch, old_logps=lp))
  return {"nll": nll, "grad_norm": m["grad_norm"], "tokens": tokens, "skipped": m["skipped"]}


def trainer_config(cfg: RunConfig, total_steps: int, lr: float, scored_span: int) -> TrainerCfg:
  """The trainer's slice for SFT: the SFT optimiser (cosine, warm-up) and a loss that is the NLL."""
  s = cfg.sft
  return dataclasses.replace(
      cfg.trainer_cfg(),
      # One optimizer update per SFT batch: the schedule spans exactly total_steps updates.
      optim=cfg.optim.replace(lr=float(lr), schedule="cosine", clip_norm=float(s.clip_norm),
                              warmup_steps=int(round(float(s.warmup_frac) * total_steps)),
                              sequences_per_update=0),
      rows_per_step=int(s.batch_size), steps=int(total_steps),
      # No reference model (no KL); the mean over all assistant tokens of the batch.
      grpo=cfg.grpo.replace(loss_temperature=0.0, beta=0.0, agg="token_mean", num_iterations=1,
                            recompute_old_logps=False, tis_cap=0.0),
      temperature=1.0,  # the logprobs of the model itself
      # The trainer's logit window: only the scored span (assistant tokens) goes through the
      # LM head, as in PASR training; for SmolLM2 (49k vocab) that is most of the activation
      # memory.
      max_tokens=int(scored_span))


# ----------------------------------------------------------------------------- the run
def run_sft(cfg, transcripts: list[list[dict[str, str]]], workdir: str, model_dir: str,
            lr: float | None = None, epochs: int | None = None, max_steps: int | None = None,
            export: bool | None = None) -> dict[str, Any]:
  """Fine-tune the HF model in `model_dir` on `transcripts`; resumes from `workdir`'s checkpoints.

  `lr`, `epochs`, `max_steps`, `export` default to `cfg.sft`'s. Returns a summary: steps,
  first/last NLL (first batch before any update, mean of the last epoch's batches), the
  HF dir when exported, how many transcripts were cut at sft.max_len.
  """
  cfg = RunConfig.from_tree(cfg)
  s = cfg.sft
  lr = float(s.lr if lr is None else lr)
  epochs = int(s.epochs if epochs is None else epochs)
  max_steps = int(s.max_steps if max_steps is None else max_steps)
  export = bool(s.export if export is None else export)
  if not transcripts:
    raise SFTError("no SFT transcripts")
  import jax  # pylint: disable=import-outside-toplevel
  from transformers import AutoTokenizer  # pylint: disable=import-outside-toplevel

  from pasr_jax import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  from pasr_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from pasr_jax.models.hf import load_hf, save_hf  # pylint: disable=import-outside-toplevel
  from pasr_jax.sharding import make_mesh  # pylint: disable=import-outside-toplevel
  from pasr_jax.trainer import Trainer  # pylint: disable=import-outside-toplevel

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  tok = AutoTokenizer.from_pretrained(model_dir)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  encoded, cut = [], 0
  for msgs in transcripts:
    ids, mask = encode_transcript(tok, msgs)
    if len(ids) > s.max_len:
      ids, mask, cut = ids[:s.max_len], mask[:s.max_len], cut + 1
    if sum(mask):
      encoded.append((ids, mask))
  if not encoded:
    raise SFTError(f"no transcript has an assistant token within sft.max_len={s.max_len}")
  # Every batch padded to one length: one XLA compile for the run (a new length costs a
  # compile, minutes for SmolLM2 on CPU, more than the padding).
  mult = int(cfg.train.seq_multiple)
  length = -(-max(len(ids) for ids, _ in encoded) // mult) * mult
  span = max(len(m) - m.index(1) - m[::-1].index(1) for _, m in encoded)
  span = min(-(-span // mult) * mult, length)
  per_epoch = -(-len(encoded) // int(s.batch_size))
  total = epochs * per_epoch if max_steps <= 0 else min(max_steps, epochs * per_epoch)
  tcfg = trainer_config(cfg, total, lr, span)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    # model.path is what `python -m pasr_jax.export --workdir=<sft workdir>` reads back.
    run_cfg = cfg.replace(model=cfg.model.replace(path=os.path.abspath(model_dir)),
                          optim=tcfg.optim, grpo=tcfg.grpo).to_dict()
    json.dump(run_cfg, f, indent=2)
  with open(os.path.join(workdir, "data.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in transcripts)

  mesh = make_mesh(tuple(cfg.mesh.shape))
  # Not pasr_jax.train's helpers: under `python -m pasr_jax.train` that module is __main__
  # and a second import would define its flags twice.
  model, model_cfg = load_hf(model_dir, dtype=cfg.model.compute_dtype,
                             param_dtype=cfg.model.weight_dtype,
                             mesh=mesh, rules=tuple(cfg.mesh.rules),
                             scan_layers=cfg.model.scan_layers,
                             remat=cfg.model.remat)
  trainer = Trainer(tcfg, model, model_cfg, mesh)
  del model
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=2, async_save=False)
  writer = None
  try:
    start, log_bytes = 0, 0
    restored = ckpt.restore(trainer.state_for_checkpoint())
    if restored is not None:
      start, state, meta = restored
      trainer.restore_from_checkpoint(state)
      log_bytes = int(meta["log_bytes"])
      print(f"[sft] resumed from step {start}", flush=True)
    writer = metrics_lib.MetricsWriter(os.path.join(workdir, "metrics.jsonl"), None, log_bytes)
    print(f"[sft] {len(encoded)} transcripts ({cut} cut at sft.max_len={s.max_len}; batch "
          f"length {length}), "
          f"{total} updates of {s.batch_size}, lr {lr:g} cosine, warm-up "
          f"{tcfg.optim.warmup_steps}", flush=True)
    first = last_epoch = None
    epoch_nll: list[float] = []
    t0 = time.perf_counter()
    for step in range(start, total):
      epoch, k = divmod(step, per_epoch)
      order = np.random.default_rng([int(cfg.seed), epoch]).permutation(len(encoded))
      rows = [encoded[i] for i in order[k * s.batch_size:(k + 1) * s.batch_size]]
      m = sft_step(trainer, pack(rows, pad_id, length, cfg.optim.micro_batch))
      first = m["nll"] if first is None else first
      epoch_nll = (epoch_nll if k else []) + [m["nll"]]
      last_epoch = float(np.mean(epoch_nll))
      writer.write(step + 1, {"sft/nll": m["nll"], "sft/grad_norm": m["grad_norm"],
                              "sft/tokens": m["tokens"], "sft/epoch": float(epoch),
                              "time/elapsed": time.perf_counter() - t0})
      print(f"[sft] step {step + 1}/{total} epoch {epoch} nll {m['nll']:.4f} grad_norm "
            f"{m['grad_norm']:.3g}", flush=True)
      if (step + 1) % s.checkpoint_every == 0 or step + 1 == total:
        ckpt.save(step + 1, trainer.state_for_checkpoint(),
                  {"step": step + 1, "log_bytes": writer.log.tell(), "config": run_cfg})
    summary: dict[str, Any] = {"steps": total, "workdir": workdir, "transcripts": len(encoded),
                               "cut": cut, "first_nll": first, "last_epoch_nll": last_epoch}
    if export:
      summary["hf"] = str(save_hf(trainer.model, model_cfg, os.path.join(workdir, "hf"),
                                  tokenizer_from=model_dir))
    jax.block_until_ready(trainer.params)
    return summary
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


def run(cfg) -> dict[str, Any]:
  """`python -m pasr_jax.sft`: transcripts from sft.data or sft.rollouts, then `run_sft`."""
  cfg = RunConfig.from_tree(cfg)
  s = cfg.sft
  if bool(s.data) == bool(s.rollouts):
    raise SFTError(f"config sft.data={s.data!r}, sft.rollouts={s.rollouts!r}: set exactly one")
  if s.data:
    transcripts = load_transcripts(s.data)
    print(f"[sft] {len(transcripts)} transcripts from {s.data}", flush=True)
  else:
    transcripts, stats = _harvest_from_run(cfg)
    print(f"[sft] harvested {stats['kept']} good refinement paths from {s.rollouts}: {stats}",
          flush=True)
  from pasr_jax.run import model_dir as run_model_dir  # pylint: disable=import-outside-toplevel
  from pasr_jax.workdir import Workdir  # pylint: disable=import-outside-toplevel
  model_dir = s.model_path or run_model_dir(cfg, Workdir(cfg.workdir))
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    raise SFTError(f"config sft.model_path / model.path={model_dir!r}: no HF model dir there")
  workdir = s.workdir or os.path.join(cfg.workdir, "sft")
  summary = run_sft(cfg, transcripts, workdir, model_dir)
  print(f"[sft] done: {summary}", flush=True)
  return summary


def main(argv: list[str]) -> int:
  del argv
  from pasr_jax.train import config_main  # pylint: disable=import-outside-toplevel
  return config_main("pasr_jax.sft", run)


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel

  from pasr_jax import sft  # pylint: disable=import-outside-toplevel,import-self
  from pasr_jax.train import _parse_flags  # pylint: disable=import-outside-toplevel
  # The imported module's main, so errors are pasr_jax.sft.SFTError, not __main__.SFTError.
  app.run(sft.main, flags_parser=_parse_flags)
