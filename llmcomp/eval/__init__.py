"""Evaluation: perplexity on the held-out text, bits per weight, size."""
from llmcomp.eval.perplexity import perplexity
from llmcomp.eval.size import size_report

__all__ = ["perplexity", "size_report"]
