"""The judge: an OpenAI-compatible HTTP endpoint that scores answers, and its client.

`JudgeClient` (client.py) talks to any such endpoint; `python -m pasr_jax.judge` (server.py)
serves one locally, rule-based (`verify`) or as a vLLM child process (`vllm`).
"""

from pasr_jax.judge.client import JudgeClient, JudgeError, parse_score
from pasr_jax.judge.wire import JudgeItem

__all__ = ["JudgeClient", "JudgeError", "JudgeItem", "parse_score"]
