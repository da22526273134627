"""Evaluation: metrics, perplexity, bundled real models and texts."""

from lowbit.eval.glassllm import eval_text, glassllm_tokenizer, load_glassllm
from lowbit.eval.metrics import sqnr
from lowbit.eval.perplexity import perplexity

__all__ = ["sqnr", "perplexity", "load_glassllm", "glassllm_tokenizer", "eval_text"]
