"""Turn CLI flags into a method config (validated by the config classes themselves)."""
from __future__ import annotations

import math

from llmcomp.cli.lists import int_list
from llmcomp.errors import UserError
from llmcomp.formats import FORMATS
from llmcomp.formats.fp4 import FP4, FP4_FORMATS
from llmcomp.formats.uniform import Uniform
from llmcomp.quant import METHODS
from llmcomp.quant.allocate import AllocationConfig
from llmcomp.quant.decoupleq import DecoupleQConfig
from llmcomp.quant.fp4 import FP4Config
from llmcomp.quant.gptq import GPTQConfig
from llmcomp.quant.presets import PRESETS
from llmcomp.quant.pvq import PVQConfig, pyramid_for_bits
from llmcomp.quant.rtn import RTNConfig
from llmcomp.quant.vptq import VPTQConfig, codebook_for_bits

VECTOR_METHODS = ("vptq", "pvq")  # --bits is the format's index bits per weight, not a bit-allocation budget


def parse_candidates(text: str) -> tuple[int, ...]:
    return int_list(text, "--candidates", "2,3,4,8")


def fp4_weight_format(name: str | None, group_size: int, bits: float, group_given: bool = True):
    """The ``--format`` of ``--method fp4``. mxfp4/nvfp4 blocks are fixed by their specs, so
    ``--group-size`` only applies to ``fp4`` (unless ``group_given``, 128, the flag's default, is taken for the
    default; given, only the spec's own block is)."""
    name = name or "mxfp4"
    if name not in FP4_FORMATS:
        raise UserError(f"Unknown FP4 format {name!r}; choose one of: {', '.join(FP4_FORMATS)}.")
    if bits != 4:
        raise UserError(f"{name} stores 4-bit floats; --bits {bits:g} does not apply.")
    if name == "fp4":
        return FP4(group_size=group_size)
    fmt = FORMATS.get(name)()
    if group_size != fmt.SPEC_BLOCK and (group_given or group_size != 128):
        raise UserError(f"{name} uses blocks of {fmt.SPEC_BLOCK} inputs (fixed by its spec); "
                        f"--group-size {group_size} does not apply (use --format fp4 for other groups).")
    return fmt


def parse_fraction(text: str | None, flag: str) -> float:
    """``0.5%`` or ``0.005`` → 0.005."""
    if text is None:
        return 0.0
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise UserError(f"{flag} must be a fraction such as 0.005 or a percentage such as 0.5%, got {text!r}.") from None
    if not 0 <= value < 0.5:
        raise UserError(f"{flag} must be between 0 and 50 %, got {text!r}.")
    return value


def unused_options(method: str, bits: float, fp4_format: str | None, sensitivity: str | None) -> dict[str, str]:
    """quantize's options that ``method`` (with this ``--bits``) does not read → why; the command line refuses
    them when given, instead of ignoring them."""
    vector, fp4, allocation = method in VECTOR_METHODS, method == "fp4" or fp4_format is not None, bits != int(bits)
    solver = method in ("gptq", "decoupleq") or vector  # (the Hessian solvers: --damp, --act-order)
    out = {}
    if vector:
        out["group_size"] = f"--method {method} groups weights by --vector-len"
        out["symmetric"] = f"--method {method} has no zero point"
    elif fp4:
        out["symmetric"] = "FP4 grids are symmetric"
    if method != "decoupleq":
        out["rounds"] = "--rounds is decoupleQ's (integer/float alternation)"
    if not solver:
        out["act_order"] = f"--act-order orders a calibrated solver's columns; --method {method} has none"
        if not (allocation and sensitivity == "output"):  # (the output-error allocation dampens its Hessians)
            out["damp"] = (f"--damp is the Hessian dampening of calibrated solvers (and of --sensitivity output); "
                           f"--method {method} has none")
    if vector or not allocation:
        why = "a fractional --bits with a scalar method" if not vector else f"scalar methods, not {method}"
        out["candidates"] = f"--candidates are bit allocation's widths ({why})"
        out["sensitivity"] = f"--sensitivity scores layers for bit allocation ({why})"
    return out


def build_quant_config(*, method: str, bits: float, group_size: int, symmetric: bool, preset: str | None,
                       targets: tuple, ignore: tuple, act_order: bool = True, damp: float = 0.01,
                       rounds: int = 4, candidates: str = "2,3,4,8", sensitivity: str | None = None,
                       fp4_format: str | None = None,
                       outliers: str | None = None, search: bool = False, act_bits: int = 16,
                       act_format: str | None = None,
                       vector_len: int | None = None, hadamard: bool = False, group_given: bool = False):
    """Returns ``(config, allocation or None)``. A fractional ``bits`` is an average budget: each
    layer's width is then chosen from ``candidates`` (bit allocation). ``group_given``: the command line set
    ``group_size`` (an mxfp4/nvfp4 format then refuses any but its spec's block)."""
    if not math.isfinite(bits):
        raise UserError(f"--bits must be a number such as 4 or 3.5, got {bits}.")
    if preset is not None:
        if preset not in PRESETS:
            raise UserError(f"Unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}.")
        base = PRESETS[preset]
        return type(base)(**{**base.__dict__, "targets": targets, "ignore": ignore}), None
    METHODS.get(method)  # unknown method → UserError listing the known ones
    if fp4_format is not None and method not in ("fp4", "gptq"):
        raise UserError(f"--format applies to --method fp4 and gptq (GPTQ on an FP4 grid); {method} takes "
                        "--bits/--group-size/--sym.")
    if search and method != "fp4":
        raise UserError("--search is the LLM-FP4 format search of --method fp4.")
    if act_bits != 16 and method not in ("fp4", "rtn"):
        raise UserError(f"--act-bits (activation quantization) is implemented for --method fp4 and rtn, not {method}.")
    if act_bits != 16 and bits != int(bits):
        raise UserError("--act-bits does not combine with a fractional --bits (bit allocation); give whole bits.")
    if act_format is not None and act_bits == 16:
        raise UserError("--act-format chooses the activation element of --act-bits 4.")
    if vector_len is not None and method not in VECTOR_METHODS:
        raise UserError(f"--vector-len applies to --method vptq and pvq, not {method}.")
    if hadamard and method != "pvq":
        raise UserError(f"--hadamard (random rotation before PVQ) applies to --method pvq, not {method}.")
    outlier_fraction = parse_fraction(outliers, "--outliers")
    if method in VECTOR_METHODS:
        common = {"targets": targets, "ignore": ignore, "damp": damp, "act_order": act_order}
        if method == "vptq":  # --outliers: share of input columns given a codebook of their own
            return VPTQConfig(format=codebook_for_bits(bits, vector_len, outliers=outlier_fraction), **common), None
        if outlier_fraction:
            raise UserError("--outliers applies to --method gptq (weights) and vptq (columns), not pvq.")
        return PVQConfig(format=pyramid_for_bits(bits, vector_len, rotate=hadamard), **common), None
    use_fp4 = method == "fp4" or fp4_format is not None
    fp4 = fp4_weight_format(fp4_format, group_size, bits, group_given) if use_fp4 else None  # before bits changes
    if outlier_fraction and method != "gptq":
        raise UserError(f"--outliers is a GPTQ option (the solver chooses and keeps them); --method {method} does not take it.")
    allocation = None
    if sensitivity is not None and bits == int(bits):
        raise UserError("--sensitivity scores layers for bit allocation; give a fractional --bits budget such as 3.5.")
    if bits != int(bits):
        allocation = AllocationConfig(budget=bits, candidates=parse_candidates(candidates), group_size=group_size,
                                      symmetric=symmetric, damp=damp, sensitivity=sensitivity or "fisher")
        bits = max(allocation.candidates)
    # (the FP4 formats judge their own group: Uniform's rule refused --format fp4 --group-size 20)
    fmt = fp4 or Uniform(bits=int(bits), group_size=group_size, symmetric=symmetric)
    common = {"format": fmt, "targets": targets, "ignore": ignore}
    act = {"act_bits": act_bits, **({"act_format": act_format} if act_format else {})}
    builders = {
        "rtn": lambda: RTNConfig(**common, **act),
        "gptq": lambda: GPTQConfig(**common, act_order=act_order, damp=damp,
                                   outliers=outlier_fraction),
        "decoupleq": lambda: DecoupleQConfig(**common, act_order=act_order, damp=damp, rounds=rounds),
        "fp4": lambda: FP4Config(format=fp4, targets=targets, ignore=ignore, search=search, **act),
    }
    if method not in builders:
        raise UserError(f"Method {method!r} cannot be configured from these flags.")
    return builders[method](), allocation
