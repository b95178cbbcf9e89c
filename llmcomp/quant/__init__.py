"""Quantization methods. Importing this package registers every method."""
from llmcomp.quant import rtn  # noqa: F401  (registers "rtn")
from llmcomp.quant.base import METHODS, QuantConfig, quantize_model
from llmcomp.quant.rtn import RTNConfig

__all__ = ["METHODS", "QuantConfig", "RTNConfig", "quantize_model"]
