"""Weight formats: spec, param_specs, pack/unpack and the reference dequantize."""
from llmcomp.formats.base import FORMATS, TensorSpec, WeightFormat
from llmcomp.formats.uniform import Uniform
from llmcomp.formats import fp4  # noqa: F401  (registers "mxfp4", "nvfp4", "fp4")
from llmcomp.formats import outliers  # noqa: F401  (registers "outliers")
from llmcomp.formats import actquant  # noqa: F401  (registers "actquant")
from llmcomp.formats import codebook, pyramid  # noqa: F401  (register "codebook", "pyramid")

__all__ = ["FORMATS", "TensorSpec", "WeightFormat", "Uniform"]
