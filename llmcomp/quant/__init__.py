"""Quantization methods. Importing this package registers every method."""
from llmcomp.quant import rtn  # noqa: F401  (registers "rtn")
from llmcomp.quant import gptq  # noqa: F401  (registers "gptq")
from llmcomp.quant.base import METHODS, QuantConfig, quantize_model
from llmcomp.quant.rtn import RTNConfig
from llmcomp.quant.gptq import GPTQConfig

__all__ = ["METHODS", "QuantConfig", "RTNConfig", "GPTQConfig", "quantize_model"]
