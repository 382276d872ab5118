"""Evaluation: text sources, perplexity, speed, reports."""
