"""Weight formats: spec, param_specs, pack/unpack and the reference dequantize."""
from llmcomp.formats.base import FORMATS, TensorSpec, WeightFormat
from llmcomp.formats.uniform import Uniform

__all__ = ["FORMATS", "TensorSpec", "WeightFormat", "Uniform"]
