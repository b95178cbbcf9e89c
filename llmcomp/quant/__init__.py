"""Quantization methods. Importing this package registers every method."""
from llmcomp.quant import decoupleq, gptq, rtn  # noqa: F401  (register "decoupleq", "gptq", "rtn")
from llmcomp.quant import fp4  # noqa: F401  (registers "fp4"; FP4Config lives in llmcomp.quant.fp4)
from llmcomp.quant import pvq, vptq  # noqa: F401  (register "pvq", "vptq"; configs live in those modules)
from llmcomp.quant.base import METHODS, QuantConfig, quantize_model
from llmcomp.quant.decoupleq import DecoupleQConfig
from llmcomp.quant.gptq import GPTQConfig
from llmcomp.quant.rtn import RTNConfig

__all__ = ["METHODS", "QuantConfig", "RTNConfig", "GPTQConfig", "DecoupleQConfig", "quantize_model"]
