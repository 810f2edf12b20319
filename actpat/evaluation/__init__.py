"""Evaluation: perplexity over token windows and zero-shot tasks through lm-eval."""
