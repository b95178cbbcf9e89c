"""Turn CLI flags into a method config (validated by the config classes themselves)."""
from __future__ import annotations

from llmcomp.errors import UserError
from llmcomp.formats.uniform import Uniform
from llmcomp.quant import METHODS
from llmcomp.quant.allocate import AllocationConfig
from llmcomp.quant.decoupleq import DecoupleQConfig
from llmcomp.quant.gptq import GPTQConfig
from llmcomp.quant.presets import PRESETS
from llmcomp.quant.rtn import RTNConfig


def parse_candidates(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise UserError(f"--candidates must be comma-separated integers such as 2,3,4,8, got {text!r}.") from None


def build_quant_config(*, method: str, bits: float, group_size: int, symmetric: bool, preset: str | None,
                       targets: tuple, ignore: tuple, act_order: bool = True, damp: float = 0.01,
                       rounds: int = 4, candidates: str = "2,3,4,8"):
    """Returns ``(config, allocation or None)``. A fractional ``bits`` is an average budget: each
    layer's width is then chosen from ``candidates`` (bit allocation)."""
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"Unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}.")
        base = PRESETS[preset]
        return type(base)(**{**base.__dict__, "targets": targets, "ignore": ignore}), None
    METHODS.get(method)  # unknown method → UserError listing the known ones
    allocation = None
    if bits != int(bits):
        allocation = AllocationConfig(budget=bits, candidates=parse_candidates(candidates), group_size=group_size,
                                      symmetric=symmetric, damp=damp)
        bits = max(allocation.candidates)
    fmt = Uniform(bits=int(bits), group_size=group_size, symmetric=symmetric)
    common = {"format": fmt, "targets": targets, "ignore": ignore}
    builders = {
        "rtn": lambda: RTNConfig(**common),
        "gptq": lambda: GPTQConfig(**common, act_order=act_order, damp=damp),
        "decoupleq": lambda: DecoupleQConfig(**common, act_order=act_order, damp=damp, rounds=rounds),
    }
    if method not in builders:
        raise UserError(f"Method {method!r} cannot be configured from these flags.")
    return builders[method](), allocation
