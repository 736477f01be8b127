"""Format cold start (NOT part of the PASR paper): SFT on reference solutions in the PASR layout.

A model too small to follow the PASR format (SmolLM2-135M: 0 of 64 sampled answers
well-formed) gives PASR's RL no signal: every reward -1, zero variance, zero gradient. With
`cold_start.enabled`, training first rewrites the training file's own reference solutions as

  <think> reasoning [<refine> re-check of the last calculation </refine>] </think>
  <answer> final answer </answer>

fine-tunes on them with `pasr_jax.sft` (under the PASR system prompt, as sampled later) and
starts PASR from that checkpoint. Solutions need a recognisable final answer: GSM8K's
`#### X` or a `\\boxed{X}`; other rows are skipped and counted. The re-check (for a share
`cold_start.refine_fraction` of examples with a GSM8K `<<a*b=c>>` annotation) restates the
last calculation: it teaches where the refine tag goes, not when refining pays off.
With `cold_start.traces="arith"` the traces come from the arithmetic task instead
(`pasr_jax/tasks/arith.py`): a share `cold_start.correct_fraction` get one step wrong and fix it
inside `<refine>`, a share `refine_fraction` re-check a step and confirm it, the rest do not refine;
each check computes the step another way than the step itself (`arith.check`). A share
`cold_start.plain_fraction` of rows is also written as the plain solution (`arith.plain_trace`,
no tags) under the plain system prompt, so that the baseline (the same policy under the plain
prompt) is this model not refining rather than untrained prose.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Sequence

import jax
import numpy as np

from pasr_jax import answer_format, errors, policy, prompts, sft
from pasr_jax import data as data_lib
from pasr_jax.config import RunConfig
from pasr_jax.data import Row
from pasr_jax.tasks import arith

_CALC = re.compile(r"<<([^<>]*?)=([^<>]*?)>>")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


class ColdStartError(errors.UserError):
  """No training row can be written in the PASR layout (the message says why)."""


def reference_to_pasr(solution: str, refine: bool = False) -> str | None:
  """The PASR-layout answer for a reference solution, or None when it has no final answer
  (`#### X` or `\\boxed{X}`) or would not be well-formed."""
  if "####" in solution:
    reasoning, final = solution.rsplit("####", 1)
  else:
    boxed = _BOXED.findall(solution)
    if not boxed:
      return None
    reasoning, final = solution, boxed[-1]
  calcs = _CALC.findall(reasoning)
  reasoning = _CALC.sub("", reasoning).strip()  # GSM8K calculator annotations
  final = final.strip()
  if not reasoning or not final:
    return None
  think = reasoning
  if refine and calcs:
    lhs, rhs = calcs[-1]
    think += f"\n<refine> Let me re-check the last step: {lhs} = {rhs}. It holds. </refine>"
  text = f"<think>\n{think}\n</think>\n<answer>\n{final}\n</answer>"
  return text if answer_format.format_ok(text) else None


def build_set(rows: Sequence[Row], system: str, refine_fraction: float = 0.5,
              max_examples: int = 0, seed: int = 0, traces: str = "reference",
              correct_fraction: float = 0.0, plain_fraction: float = 0.0,
              plain_system: str = ""
              ) -> tuple[list[list[dict[str, str]]], dict[str, int]]:
  """([system, user, assistant] transcripts, counts) from training rows; the first
  `max_examples` transcripts (0 = all) of a seeded order. `traces`: "reference" rewrites the
  rows' solutions, "arith" writes the arithmetic task's traces (see the module doc), and for
  a share `plain_fraction` of rows also a plain transcript under `plain_system` right after
  the row's PASR one (counted as `plain_prompt`)."""
  order = np.random.default_rng(seed).permutation(len(rows))
  refine_draw = np.random.default_rng([seed, 1]).random(len(rows))
  kinds = arith.trace_kinds(len(rows), correct_fraction, refine_fraction, seed)
  plain_draw = np.random.default_rng([seed, 4]).random(len(rows))
  out, stats = [], {"rows": len(rows), "kept": 0, "with_refine": 0, "no_final_answer": 0,
                    "plain_prompt": 0}
  for i in order:
    if max_examples and len(out) >= max_examples:
      break
    if traces == "arith":
      try:
        text = arith.trace(rows[i].answer, kinds[i], np.random.default_rng([seed, 3, int(i)]))
      except arith.ArithError as e:
        raise ColdStartError(f"config cold_start.traces='arith': row {rows[i].id}: {e}") from None
      stats[kinds[i]] = stats.get(kinds[i], 0) + 1
    else:
      text = reference_to_pasr(rows[i].answer, refine=bool(refine_draw[i] < refine_fraction))
    if text is None:
      stats["no_final_answer"] += 1
      continue
    stats["kept"] += 1
    stats["with_refine"] += int(answer_format.count_refines(text) > 0)
    out.append([{"role": "system", "content": system},
                {"role": "user", "content": rows[i].question},
                {"role": "assistant", "content": text}])
    if traces == "arith" and plain_draw[i] < plain_fraction and not (
        max_examples and len(out) >= max_examples):
      stats["plain_prompt"] += 1
      out.append([{"role": "system", "content": plain_system},
                  {"role": "user", "content": rows[i].question},
                  {"role": "assistant", "content": arith.plain_trace(rows[i].answer)}])
  return out, stats


def ensure(cfg: RunConfig) -> str:
  """The HF dir PASR starts from (`policy.start_dir`): with cold_start.enabled, made here by
  SFT of `policy.base_dir` on the cold-start set unless it exists already."""
  c, hf = cfg.cold_start, policy.start_dir(cfg)
  if not c.enabled or os.path.isfile(os.path.join(hf, "config.json")):
    return hf
  if jax.process_count() > 1:
    raise ColdStartError("config cold_start.enabled=True runs on one host only: run the cold "
                         "start once (python -m pasr_jax.sft) and point model.path at its hf/")
  workdir = os.path.dirname(hf)
  ps = prompts.load_prompts(cfg.prompts)
  transcripts, stats = build_set(data_lib.load_dataset(cfg.data), ps.pasr_system,
                                 c.refine_fraction, c.max_examples, cfg.seed, c.traces,
                                 c.correct_fraction, c.plain_fraction, ps.plain_system)
  if not transcripts:
    raise ColdStartError(f"config cold_start.enabled=True but no row of data.files="
                         f"{tuple(cfg.data.files)} has a final answer (GSM8K '#### X' or "
                         f"\\boxed{{X}}): {stats}")
  print(f"[cold start] NOT part of the PASR paper: SFT on {stats['kept']} {c.traces} traces "
        f"in the PASR layout ({stats}) into {workdir}", flush=True)
  section = cfg.sft.replace(lr=c.lr, epochs=c.epochs, max_steps=c.max_steps, export=True)
  summary = sft.run_sft(cfg, section, transcripts, workdir, policy.base_dir(cfg))
  a, b = summary["first_nll"], summary["last_epoch_nll"]
  nll = f"nll {a:.3f} -> {b:.3f}" if a is not None else "resumed after its last update"
  print(f"[cold start] done ({nll}, {summary['steps']} updates); PASR starts from {hf}",
        flush=True)
  gc.collect()  # the SFT trainer's arrays, before the PASR trainer loads its own
  return hf
