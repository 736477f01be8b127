"""Evaluation stages: benchmark registry, prompts, runner (generate + judge + cache), reports."""
