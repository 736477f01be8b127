"""pasr_jax: ProActive Self-Refinement (PASR) GRPO training in JAX/Flax with vLLM rollouts."""
