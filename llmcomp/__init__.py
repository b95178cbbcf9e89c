"""llmcomp: compress and convert large language models into one verified artifact format."""
__version__ = "0.1.0"

from llmcomp.api import evaluate, inspect, load, quantize  # noqa: E402
from llmcomp.errors import UserError  # noqa: E402
from llmcomp.formats import Uniform  # noqa: E402
from llmcomp.quant import RTNConfig  # noqa: E402
from llmcomp.quant.presets import PRESETS  # noqa: E402

__all__ = ["load", "quantize", "evaluate", "inspect", "UserError", "Uniform", "RTNConfig", "PRESETS", "__version__"]
