"""pasr_jax: ProActive Self-Refinement (PASR) GRPO training in JAX/Flax with vLLM rollouts."""

from pasr_jax import host_malloc as _host_malloc

# Before any JAX computation starts XLA's thread pools (see host_malloc's docstring).
_host_malloc.keep_freed_memory()
