"""Runs one evaluation mode: prompts -> greedy vLLM answers -> judge scores, with an answer cache.

The cache is two append-only JSONL files under `cache_dir` (default `<out_dir>/cache/`): generations keyed by
(model fingerprint, prompt token ids, max_tokens) and judge scores keyed by (judge, question,
reference, answer, task type). A rerun — after a crash, with a larger `limit`, or with more
datasets — generates and judges only what is missing; the engine is not even started when
everything is cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from pasr_jax.answer_format import count_refines, extract_answer, format_ok
from pasr_jax.eval import prompts as P
from pasr_jax.eval.benchmarks import Item
from pasr_jax.eval.schema import EvalRunConfig
from pasr_jax.judge.wire import judge_request


@dataclasses.dataclass(frozen=True)
class Generation:
  """A greedy answer: generated ids (stop token included), decoded text, finish reason."""
  token_ids: list[int]
  text: str
  finish_reason: str


def needs_revision(score: float, cfg: EvalRunConfig) -> bool:
  """Whether the oracle asks to revise a first answer with judge `score`: config
  oracle_revises "wrong" (score < correct_threshold) or "zero" (score == 0, the paper's
  Self-Refine+)."""
  return score == 0.0 if cfg.oracle_revises == "zero" else score < cfg.correct_threshold


def _key(*parts: Any) -> str:
  return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def model_fingerprint(model_dir: str) -> str:
  """Identifies the weights: config.json content plus name/size/mtime of each weight file."""
  files = sorted(f for f in os.listdir(model_dir) if f.endswith((".safetensors", ".bin", ".json")))
  stats = [(f, os.path.getsize(os.path.join(model_dir, f)),
            int(os.path.getmtime(os.path.join(model_dir, f)))) for f in files]
  with open(os.path.join(model_dir, "config.json"), "rb") as fh:
    return _key(hashlib.sha256(fh.read()).hexdigest(), stats)


class JsonlCache:
  """key -> JSON value, loaded from and appended to one JSONL file (last write wins)."""

  def __init__(self, path: str):
    self.path = path
    self.data: dict[str, Any] = {}
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        for line in f:
          try:
            rec = json.loads(line)
          except json.JSONDecodeError:
            continue   # a line cut by a crash mid-write; its item is simply redone
          self.data[rec["k"]] = rec["v"]

  def __contains__(self, key: str) -> bool:
    return key in self.data

  def get(self, key: str) -> Any:
    return self.data[key]

  def put_many(self, pairs: Sequence[tuple[str, Any]]) -> None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      for k, v in pairs:
        self.data[k] = v
        f.write(json.dumps({"k": k, "v": v}, ensure_ascii=False) + "\n")


class Runner:
  """Evaluates Items in one mode; the sampler and judge are built lazily, only when needed.

  make_sampler() -> object with the `Sampler.generate` signature.
  make_judge() -> object with `score_batch(items) -> (scores, stats)` (see judge.client), or
  the function of `cfg.rewards.accuracy_rule` (its scores are cached under its name).
  """

  def __init__(self, cfg: EvalRunConfig, encoder: P.ChatEncoder,
               make_sampler: Callable[[], Any], make_judge: Callable[[], Any]):
    self.cfg = cfg
    self.mode = cfg.mode
    self.encoder = encoder
    self._make_sampler, self._make_judge = make_sampler, make_judge
    self.sampler = self.judge = None
    cache_dir = cfg.cache_dir or os.path.join(cfg.out_dir, "cache")
    self.gen_cache = JsonlCache(os.path.join(cache_dir, "generations.jsonl"))
    self.score_cache = JsonlCache(os.path.join(cache_dir, "judgments.jsonl"))
    self.model_id = model_fingerprint(cfg.model)
    # Scores of a rewards.accuracy_rule function are cached apart from any judge's.
    rule = cfg.rewards.accuracy_rule
    self.judge_id = ((cfg.judge.base_url, cfg.judge.model, cfg.judge.input) if not rule
                     else ("rewards.accuracy_rule", rule, cfg.judge.input))
    self.stats = dict(generated=0, generated_cached=0, judged=0, judged_cached=0,
                      prompts_truncated=0, engine_started=False, generate_s=0.0, judge_s=0.0)

  # --- generation -------------------------------------------------------------------------
  def generate(self, prompts: Sequence[list[int]], temperature: float = 0.0
               ) -> list[Generation]:
    """Answers for token-id prompts (greedy by default; else sampled with config.seed), from
    the cache where possible."""
    # A greedy answer depends on model, prompt and max_tokens only: no seed in its key, so one
    # cached greedy answer serves every seed.
    extra = (float(temperature), self.cfg.seed) if temperature > 0 else ()
    keys = [_key(self.model_id, p, self.cfg.max_tokens, *extra) for p in prompts]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in self.gen_cache}.values())
    self.stats["generated_cached"] += len(keys) - len(todo)
    bs = self.cfg.batch_size
    for s in range(0, len(todo), bs):
      chunk = todo[s:s + bs]
      if self.sampler is None:
        self.sampler = self._make_sampler()
        self.stats["engine_started"] = True
      t0 = time.perf_counter()
      groups = self.sampler.generate([prompts[i] for i in chunk], n=1,
                                     temperature=float(temperature), top_p=1.0,
                                     max_tokens=self.cfg.max_tokens, seed=self.cfg.seed)
      self.stats["generate_s"] += time.perf_counter() - t0
      pairs = []
      for i, g in zip(chunk, groups):
        c = g.completions[0]
        pairs.append((keys[i], dict(token_ids=list(c.token_ids), text=c.text,
                                    finish_reason=c.finish_reason)))
      self.gen_cache.put_many(pairs)
      self.stats["generated"] += len(chunk)
    return [Generation(**self.gen_cache.get(k)) for k in keys]

  # --- judging ----------------------------------------------------------------------------
  def score(self, items: Sequence[Item], answers: Sequence[str]) -> list[float]:
    """Judge scores in [0, 1] for (item, answer) pairs, from the cache where possible."""
    reqs = [judge_request(it.question, it.ground_truth, a, it.task_type, self.cfg.judge.input)
            for it, a in zip(items, answers)]
    keys = [_key(self.judge_id, r) for r in reqs]
    todo = sorted({k: i for i, k in enumerate(keys) if k not in self.score_cache}.values())
    self.stats["judged_cached"] += len(keys) - len(todo)
    if todo:
      if self.judge is None:
        self.judge = self._make_judge()
      t0 = time.perf_counter()
      scores, _ = self.judge.score_batch([reqs[i] for i in todo])
      self.stats["judge_s"] += time.perf_counter() - t0
      self.score_cache.put_many([(keys[i], float(s)) for i, s in zip(todo, scores)])
      self.stats["judged"] += len(todo)
    return [float(self.score_cache.get(k)) for k in keys]

  # --- the modes --------------------------------------------------------------------------
  def run(self, items: Sequence[Item]) -> list[dict[str, Any]]:
    """One result record per item (see `evaluate.results.json` in the README)."""
    cfg, enc = self.cfg, self.encoder
    system = P.system_prompt(self.mode, cfg.prompts)
    two_turn = cfg.two_turn
    # Room for the answer(s): the second turn re-reads the first answer and a review request.
    budget = cfg.prompt_budget   # >= MIN_PROMPT_TOKENS: the config's check
    chats, truncated = [], []
    for it in items:
      q, cut = enc.fit_question(it, system, budget)
      chats.append(P.first_turn(it, q, system))
      truncated.append(cut)
    self.stats["prompts_truncated"] += sum(truncated)
    first = self.generate([enc.encode(c) for c in chats], cfg.temperature)
    first_scores = self.score(items, [g.text for g in first])
    final, final_scores = list(first), list(first_scores)
    second_asked = [False] * len(items)
    second_tokens = [0] * len(items)
    if two_turn:
      oracle = self.mode == "self_refine_oracle"
      idx = [i for i, s in enumerate(first_scores) if not oracle or needs_revision(s, cfg)]
      second = self.generate([enc.encode(P.second_turn(chats[i], first[i].text, oracle))
                              for i in idx], cfg.second_turn_temperature)
      second_scores = self.score([items[i] for i in idx], [g.text for g in second])
      for i, g, s in zip(idx, second, second_scores):
        second_asked[i], second_tokens[i] = True, len(g.token_ids)
        if oracle or not P.keeps_first(g.text):  # "the above solution is correct": it stands
          final[i], final_scores[i] = g, s
    out = []
    for i, it in enumerate(items):
      g = final[i]
      turns = [len(first[i].token_ids)] + ([second_tokens[i]] if second_asked[i] else [])
      rec = dict(id=it.id, dataset=it.dataset, task_type=it.task_type, mode=self.mode,
                 ground_truth=it.ground_truth, answer=g.text, extracted=extract_answer(g.text),
                 tokens=sum(turns), tokens_per_turn=turns, score=final_scores[i],
                 correct=final_scores[i] >= cfg.correct_threshold,
                 refine_count=count_refines(g.text), format_ok=format_ok(g.text),
                 finish_reason=g.finish_reason, prompt_truncated=truncated[i])
      if two_turn:
        rec.update(first_answer=first[i].text, first_score=first_scores[i],
                   second_turn=second_asked[i])
      out.append(rec)
    return out

  def close(self) -> None:
    for obj in (self.sampler, self.judge):
      close = getattr(obj, "close", None)
      if close is not None:
        close()
    self.sampler = self.judge = None
