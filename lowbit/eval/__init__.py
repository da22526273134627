"""Evaluation: metrics, perplexity, reports."""

from lowbit.eval.metrics import sqnr

__all__ = ["sqnr"]
