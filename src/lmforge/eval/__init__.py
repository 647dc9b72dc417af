"""Evaluation: perplexity and bits per byte, generation metrics, multiple choice, results."""
