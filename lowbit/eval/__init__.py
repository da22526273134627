"""Evaluation: metrics, perplexity, bundled real models and texts."""

from lowbit.eval.glassllm import eval_text, glassllm_tokenizer, load_glassllm
from lowbit.eval.metrics import sqnr
from lowbit.eval.perplexity import TokenizedText, perplexity, perplexity_windows, tokenize_for_perplexity
from lowbit.eval.sensitivity import SensitivityReport, layer_sqnr, sensitivity_report
from lowbit.eval.autoquant import AutoQuantResult, autoquant
from lowbit.eval.plot import plot_tradeoff
from lowbit.eval.metrics import classifier_agreement, embedding_cosine
from lowbit.eval.models import (
    SMOLLM2_GGUF,
    TEXTS,
    SentenceEncoder,
    load_glassllm_hf,
    glassllm_hf_tokenizer,
    save_glassllm_hf,
    load_minilm,
    load_mnist_cnn,
    load_smollm2,
    load_text,
    smollm2_cache_dir,
)

__all__ = ["sqnr", "perplexity", "perplexity_windows", "tokenize_for_perplexity", "TokenizedText", "load_glassllm", "glassllm_tokenizer", "eval_text"]
__all__ += ["embedding_cosine", "classifier_agreement"]
__all__ += ["load_glassllm_hf", "glassllm_hf_tokenizer", "save_glassllm_hf", "load_smollm2", "smollm2_cache_dir", "SMOLLM2_GGUF", "load_minilm", "SentenceEncoder",
            "load_mnist_cnn", "load_text", "TEXTS"]
__all__ += ["layer_sqnr", "sensitivity_report", "SensitivityReport", "autoquant", "AutoQuantResult", "plot_tradeoff"]
