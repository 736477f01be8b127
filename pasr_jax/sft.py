"""Supervised fine-tuning: `python -m pasr_jax.sft --config=configs/<preset>.py --config.sft.x=y`.

PASR+IFT (paper App. A.1): fine-tune on "good refinement paths" harvested from a PASR run's
`rollouts.jsonl` (`sft.rollouts`: well-formed, at least one complete refine, accuracy not below
that question's baseline mean) or on any JSONL of chat transcripts (`sft.data`, one
`{"messages": [{"role", "content"}, ...]}` per line). Loss on assistant tokens only; lr 1e-5,
cosine with 10% linear warm-up, 2 epochs by default. The format cold start (cold_start.py, not
part of the paper) runs through the same `run_sft`.

No second model path: the `Trainer` (same load_hf, mesh, shardings, optax and logprob
function) takes every step, with its token NLL loss (`trainer.nll_loss`): one forward and
backward per update, whose loss before the update is the NLL we report.

Workdir (`sft.workdir`, default <workdir>/sft): config.json, data.jsonl (the transcripts used),
checkpoints/ (Orbax, resumable), metrics.jsonl, hf/ (with sft.export; vLLM loads it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import defaultdict
from typing import Any

import jax
import numpy as np
from transformers import AutoTokenizer

from pasr_jax import answer_format, cli, errors, policy, prompts
from pasr_jax import batch as batch_lib
from pasr_jax import data as data_lib
from pasr_jax import metrics as metrics_lib
from pasr_jax.batch import Batch
from pasr_jax.checkpoint import Checkpointer
from pasr_jax.config import DataCfg, RunConfig, SftCfg, TrainerCfg
from pasr_jax.models.hf import save_hf
from pasr_jax.trainer import Trainer, nll_loss


ROLES = ("system", "user", "assistant")


class SFTError(errors.UserError):
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
  path = cfg.sft.rollouts
  if not os.path.isfile(path):
    raise SFTError(f"sft.rollouts={path!r}: no such file")
  try:
    records = metrics_lib.read_jsonl(path)
  except (OSError, json.JSONDecodeError) as e:
    raise SFTError(f"sft.rollouts={path!r}: unreadable ({e})") from None
  data_cfg = cfg.data
  run_cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  if os.path.isfile(run_cfg):
    with open(run_cfg, encoding="utf-8") as f:
      data_cfg = json.load(f)["data"]
  questions = {r.id: r.question for r in data_lib.load_dataset(DataCfg.of(data_cfg))}
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
         rows_multiple: int) -> Batch:
  """The Batch of transcripts (token ids, assistant mask): loss_mask is each row's assistant
  mask; rows padded to `rows_multiple`, length to a multiple of `multiple`."""
  return batch_lib.pack([ids for ids, _ in encoded], [mask for _, mask in encoded], pad_id,
                        multiple, rows_multiple)


def sft_step(trainer: Trainer, batch: Batch) -> dict[str, float]:
  """One SFT update on `batch` by a trainer with `nll_loss`; returns the batch's mean NLL per
  assistant token before the update, the grad norm and the token count."""
  m = trainer.update(batch)
  return {"nll": m["loss"], "grad_norm": m["grad_norm"], "tokens": m["tokens"],
          "skipped": m["skipped"]}


def trainer_config(cfg: RunConfig, s: SftCfg, total_steps: int, scored_span: int) -> TrainerCfg:
  """The trainer's slice for SFT section `s`: its optimiser (cosine, warm-up); the loss is
  `nll_loss`."""
  return dataclasses.replace(
      cfg.trainer_cfg(),
      # One optimizer update per SFT batch: the schedule spans exactly total_steps updates.
      optim=cfg.optim.replace(lr=s.lr, schedule="cosine", clip_norm=float(s.clip_norm),
                              warmup_steps=int(round(float(s.warmup_frac) * total_steps)),
                              sequences_per_update=0),
      rows_per_step=s.batch_size, steps=total_steps,
      # No reference model and no trainer-side old logprobs: NLL needs neither.
      grpo=cfg.grpo.replace(loss_temperature=0.0, beta=0.0, agg="token_mean", num_iterations=1,
                            recompute_old_logps=False, tis_cap=0.0),
      temperature=1.0,  # the logprobs of the model itself
      # The trainer's logit window: only the scored span (assistant tokens) goes through the
      # LM head, as in PASR training; for SmolLM2 (49k vocab) that is most of the activation
      # memory.
      max_tokens=int(scored_span))


# ----------------------------------------------------------------------------- the run
@dataclasses.dataclass
class Prepared:
  """The encoded SFT set and the numbers its loop needs (`prepare`)."""
  encoded: list[tuple[list[int], list[int]]]  # (token ids, assistant mask) per transcript
  dropped: int         # transcripts longer than sft.max_len, left out
  pad_id: int
  length: int          # every batch is padded to it: one XLA compile for the run
  per_epoch: int       # updates per pass over `encoded`
  total: int           # updates of the run
  trainer_cfg: TrainerCfg
  run_cfg: dict[str, Any]  # the config as saved beside the checkpoints


def prepare(cfg: RunConfig, s: SftCfg, transcripts: list[list[dict[str, str]]], workdir: str,
            model_dir: str) -> Prepared:
  """Encodes `transcripts` with `model_dir`'s tokenizer, dropping (and counting) those over
  sft.max_len tokens (cut, one would train on an answer without its closing tags and EOS);
  sizes the batches and the schedule; writes config.json and data.jsonl to `workdir`."""
  if not transcripts:
    raise SFTError("no SFT transcripts")
  tok = AutoTokenizer.from_pretrained(model_dir)
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
  encoded = [e for e in (encode_transcript(tok, m) for m in transcripts) if sum(e[1])]
  kept = [e for e in encoded if len(e[0]) <= s.max_len]
  if not kept:
    raise SFTError(f"config sft.max_len={s.max_len}: every transcript with an assistant "
                   f"token is longer (shortest: {min(len(i) for i, _ in encoded)} tokens)"
                   if encoded else "no transcript has an assistant token")
  # Every batch padded to one length: one XLA compile for the run (a new length costs a
  # compile, minutes for SmolLM2 on CPU, more than the padding).
  mult = int(cfg.train.seq_multiple)
  length = -(-max(len(ids) for ids, _ in kept) // mult) * mult
  span = max(len(m) - m.index(1) - m[::-1].index(1) for _, m in kept)
  span = min(-(-span // mult) * mult, length)
  per_epoch = -(-len(kept) // s.batch_size)
  total = s.epochs * per_epoch if s.max_steps <= 0 else min(s.max_steps, s.epochs * per_epoch)
  tcfg = trainer_config(cfg, s, total, span)
  run_cfg = cfg.replace(model=cfg.model.replace(path=os.path.abspath(model_dir)), sft=s,
                        optim=tcfg.optim, grpo=tcfg.grpo).to_dict()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(run_cfg, f, indent=2)
  with open(os.path.join(workdir, "data.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in transcripts)
  return Prepared(kept, len(encoded) - len(kept), pad_id, length, per_epoch, total, tcfg,
                  run_cfg)


def train_loop(trainer: Trainer, prep: Prepared, s: SftCfg, seed: int, workdir: str,
               model_dir: str) -> tuple[float | None, float | None]:
  """The SFT updates from the newest checkpoint in `workdir` (or the start) to `prep.total`;
  returns the first batch's NLL and the mean NLL of the last epoch's batches (None when the
  run had no update left)."""
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
    first = last_epoch = None
    epoch_nll: list[float] = []
    t0 = time.perf_counter()
    for step in range(start, prep.total):
      epoch, k = divmod(step, prep.per_epoch)
      order = np.random.default_rng([seed, epoch]).permutation(len(prep.encoded))
      rows = [prep.encoded[i] for i in order[k * s.batch_size:(k + 1) * s.batch_size]]
      m = sft_step(trainer, pack(rows, prep.pad_id, prep.length,
                                 prep.trainer_cfg.optim.micro_batch))
      first = m["nll"] if first is None else first
      epoch_nll = (epoch_nll if k else []) + [m["nll"]]
      last_epoch = float(np.mean(epoch_nll))
      writer.write(step + 1, {"sft/nll": m["nll"], "sft/grad_norm": m["grad_norm"],
                              "sft/tokens": m["tokens"], "sft/epoch": float(epoch),
                              "time/elapsed": time.perf_counter() - t0})
      print(f"[sft] step {step + 1}/{prep.total} epoch {epoch} nll {m['nll']:.4f} grad_norm "
            f"{m['grad_norm']:.3g}", flush=True)
      if (step + 1) % s.checkpoint_every == 0 or step + 1 == prep.total:
        ckpt.save(step + 1, trainer.state_for_checkpoint(),
                  {"step": step + 1, "log_bytes": writer.log.tell(), "config": prep.run_cfg,
                   "model_dir": os.path.abspath(model_dir)})
    return first, last_epoch
  finally:
    ckpt.close()
    if writer is not None:
      writer.close()


def run_sft(cfg: RunConfig, s: SftCfg, transcripts: list[list[dict[str, str]]], workdir: str,
            model_dir: str) -> dict[str, Any]:
  """Fine-tunes the HF model in `model_dir` on `transcripts` per the SFT section `s`; resumes
  from `workdir`'s checkpoints. Returns a summary: steps, first/last NLL (first batch before
  any update, mean of the last epoch's batches), the HF dir when exported (s.export), how
  many transcripts were dropped for being longer than s.max_len."""
  workdir = os.path.abspath(workdir)
  prep = prepare(cfg, s, transcripts, workdir, model_dir)
  pol = policy.build_policy(cfg.model, cfg.mesh, model_dir)
  trainer = Trainer(prep.trainer_cfg, pol.model, pol.config, pol.mesh, loss=nll_loss())
  del pol
  print(f"[sft] {len(prep.encoded)} transcripts ({prep.dropped} over sft.max_len={s.max_len} "
        f"dropped; batch length {prep.length}), {prep.total} updates of {s.batch_size}, lr "
        f"{s.lr:g} cosine, warm-up {prep.trainer_cfg.optim.warmup_steps}", flush=True)
  first, last_epoch = train_loop(trainer, prep, s, int(cfg.seed), workdir, model_dir)
  summary: dict[str, Any] = {"steps": prep.total, "workdir": workdir,
                             "transcripts": len(prep.encoded), "dropped": prep.dropped,
                             "first_nll": first, "last_epoch_nll": last_epoch}
  if s.export:
    summary["hf"] = str(save_hf(trainer.model, trainer.model_cfg, os.path.join(workdir, "hf"),
                                tokenizer_from=model_dir))
  jax.block_until_ready(trainer.params)
  return summary


def run(cfg: RunConfig) -> dict[str, Any]:
  """`python -m pasr_jax.sft`: transcripts from sft.data or sft.rollouts, then `run_sft` on
  sft.model_path (default: the run's `policy.base_dir`)."""
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
  model_dir = s.model_path or policy.base_dir(cfg)
  if not os.path.isfile(os.path.join(model_dir, "config.json")):
    raise SFTError(f"config sft.model_path / model.path={model_dir!r}: no HF model dir there")
  summary = run_sft(cfg, s, transcripts, s.workdir or os.path.join(cfg.workdir, "sft"),
                    model_dir)
  print(f"[sft] done: {summary}", flush=True)
  return summary


if __name__ == "__main__":
  cli.main("pasr_jax.sft", run)
