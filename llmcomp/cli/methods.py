"""Turn CLI flags into a method config (validated by the config classes themselves)."""
from __future__ import annotations

from llmcomp.errors import UserError
from llmcomp.formats.uniform import Uniform
from llmcomp.quant import METHODS
from llmcomp.quant.presets import PRESETS
from llmcomp.quant.rtn import RTNConfig
from llmcomp.quant.gptq import GPTQConfig


def build_quant_config(*, method: str, bits: int, group_size: int, symmetric: bool, preset: str | None,
                       targets: tuple, ignore: tuple):
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"Unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}.")
        base = PRESETS[preset]
        return type(base)(**{**base.__dict__, "targets": targets, "ignore": ignore})
    METHODS.get(method)  # unknown method → UserError listing the known ones
    fmt = Uniform(bits=bits, group_size=group_size, symmetric=symmetric)
    builders = {"rtn": lambda: RTNConfig(format=fmt, targets=targets, ignore=ignore)}
    builders["gptq"] = lambda: GPTQConfig(format=fmt, targets=targets, ignore=ignore)
    return builders[method]()
