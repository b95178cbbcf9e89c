"""Dequant-GEMM benchmark on a CUDA GPU: llmcomp's fast paths vs peers, all in one run.

For each layer shape (N out × K in), bit width and batch M, times (CUDA graphs via
``triton.testing.do_bench_cudagraph``):
- ``llmcomp`` — ``QuantLinear`` as users get it (the CUDA mma kernel where it applies),
- ``llmcomp_triton`` — the Triton path alone (for comparison with the previous kernel),
- ``bf16`` — cuBLAS on the dense bf16 weight,
- ``tinygemm`` — torch's int4 kernel (``torch._weight_int4pack_mm``, group 128; 4-bit rows only),
- ``bnb_nf4`` — bitsandbytes NF4 (``bnb.matmul_4bit``, block 64), when bitsandbytes imports,
- with ``fp16``: ``llmcomp_fp16`` and ``fp16`` (cuBLAS) — the same with float16 activations (the fp16 decode
  needs one integer op less per code pair than the bf16 one; whether that shows says if the kernel is bound by
  its instructions),
and reports each one's % of its own byte roofline: the bytes it must move (its weights with scales and
zeros + activations + output) over the device-to-device copy bandwidth measured in the same run.
Above the mma kernel's 64 rows (prefill: dequantize, then cuBLAS) a ``dequant`` column times the dequantize
alone against the packed bytes read plus the 16-bit weight written.
``float_formats`` adds rows for the E2M1 formats (mxfp4, nvfp4) and VQ (vq2, vq3: the mma kernel with
codebook lookups, ``codebook_cuda``) through ``QuantLinear``, against their own
stored bytes (the kernel reads their block scales as one byte a block and 4 bytes a row, about what is stored;
with ``LLMCOMP_E2M1_BYTE_SCALES=0`` as 16-bit values, a little more: NVFP4 5.0 bits a weight against the 4.5
counted, MXFP4 4.5 against 4.25).

The L2 cache (50 MB on an H100) would hold a 4096×4096 int4 weight; each timing therefore cycles
through enough copies of the layer (≥ 256 MB together) that every call reads its weight from HBM,
back to back in one graph, as consecutive layers run in decode.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from llmcomp.core.memory import state_bytes
from llmcomp.core.paths import write_json
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats import Uniform
from llmcomp.quant.rtn import rtn_fields

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192)]  # (N out, K in)
MS = [1, 4, 16, 64, 256]
ROTATE_BYTES = 256 << 20


def copy_bandwidth() -> float:
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)  # bytes read + written per second


def per_call_seconds(fns: list[Callable]) -> float:
    """Median time of one call, cycling through ``fns`` (one per copy of the layer) in one graph."""
    import triton.testing

    def all_of():
        for f in fns:
            f()

    all_of()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(all_of, rep=200, return_mode="median") * 1e-3 / len(fns)


def launch_floor_seconds(calls: int = 32) -> float:
    """Time a call takes that moves nothing (one kernel on a 1-element tensor), timed as the layers are: the
    fixed cost every row carries, which bounds the % of roofline that small layers can reach."""
    t = torch.zeros(1, device="cuda")
    return per_call_seconds([lambda: t.add_(1)] * calls)


def _copies(nbytes: int) -> int:
    return max(2, math.ceil(ROTATE_BYTES / max(nbytes, 1)))


def _layer_copies(fmt, base: dict, k: int, n: Optional[int] = None) -> list:
    """Enough ``QuantLinear`` copies of one packed weight that cycling through them always reads HBM (``n``: the
    output features, for formats whose tensors are not row-major)."""
    nbytes = state_bytes(base)
    return [QuantLinear.from_packed(fmt, {kk: v.clone() for kk, v in base.items()}, k, out_features=n)
            for _ in range(_copies(nbytes))]


def roofline_pct(nbytes: int, m: int, n: int, k: int, bw: float, seconds: float) -> float:
    """% of the byte roofline: ``nbytes`` of weights plus the bf16/fp16 activations in and out, moved at the
    measured copy bandwidth ``bw``, against the time taken."""
    return 100 * (nbytes + (m * k + m * n) * 2) / bw / seconds


def _time_into(row: dict, name: str, fns: list[Callable], nbytes: int, bw: float, gemm: bool = True) -> float:
    """Time ``fns`` (``per_call_seconds``) into ``row`` (which has N, K, M) as ``{name}_us`` and
    ``{name}_roofline_pct`` against ``nbytes`` (plus the activations in and out when ``gemm``); returns the
    seconds."""
    t = per_call_seconds(fns)
    row[f"{name}_us"] = round(t * 1e6, 3)
    m = row["M"] if gemm else 0
    row[f"{name}_roofline_pct"] = round(roofline_pct(nbytes, m, row["N"], row["K"], bw, t), 2)
    return t


def _tinygemm(codes: torch.Tensor, n: int, k: int, group: int) -> tuple[Optional[Callable], Optional[str]]:
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(
            ((codes[:, 1::2] << 4) | codes[:, ::2]).to(torch.uint8).contiguous(), 8)
        sz = torch.randn(k // group, n, 2, device="cuda", dtype=torch.bfloat16)
        return (lambda x: torch._weight_int4pack_mm(x, packed, group, sz)), None
    except Exception as exc:  # peer API differs across torch versions: record, don't fail the run
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _bnb_version() -> Optional[str]:
    try:
        import bitsandbytes

        return bitsandbytes.__version__
    except Exception:  # absent or broken: the NF4 column then says why, row by row
        return None


def _bnb_nf4(w: torch.Tensor) -> tuple[Optional[Callable], Optional[str], int]:
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        q, state = bf.quantize_4bit(w.to(torch.bfloat16), blocksize=64, quant_type="nf4")
        nbytes = q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
        return (lambda x: bnb.matmul_4bit(x, q.t(), quant_state=state)), None, nbytes
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", 0


def random_codebook(fmt, n: int, k: int, seed: int = 0, device="cpu") -> dict:
    """Packed ``codebook`` tensors with random indices and codebooks (timing and layout tests need no
    quantizer)."""
    g = torch.Generator().manual_seed(seed)
    nv, ng = fmt.n_main(k) // fmt.dim, fmt.n_groups(k)
    f = {}
    for t, b in enumerate(fmt.bits):
        f[f"index{t}"] = torch.randint(0, 1 << b, (n, nv), generator=g)
        f[f"codebook{t}"] = torch.randn(ng, 1 << b, fmt.dim, generator=g) * (0.05 if t == 0 else 0.01)
    if fmt.scale:
        f["scale"] = torch.rand(n, generator=g) + 0.5
    n_oc = fmt.n_outlier_cols(k)
    if n_oc:
        f["outlier_cols"] = torch.randperm(k, generator=g)[:n_oc].sort().values
        f["outlier_index"] = torch.randint(0, 1 << fmt.outlier_bits, (n, n_oc // fmt.dim), generator=g)
        f["outlier_codebook"] = torch.randn(1 << fmt.outlier_bits, fmt.dim, generator=g) * 0.1
    return {name: t.to(device) for name, t in fmt.pack(f).items()}


def random_pyramid(fmt, n: int, k: int, seed: int = 0, device="cpu", tail: float = 0.0) -> dict:
    """Packed ``pyramid`` tensors for random groups (timing and layout tests need no quantizer): each group's point
    is ⌊K·|x|/‖x‖₁⌋ with the missing pulses on its largest remainders — on the pyramid, not the greedy search's
    point. ``tail`` > 0 draws heavy-tailed groups (x · exp(tail · z)), whose large pulses the CUDA path keeps as
    escapes; random gains."""
    g = torch.Generator().manual_seed(seed)
    b, nb = n // fmt.dim, fmt.norm_bits
    x = torch.randn(b * k, fmt.dim, generator=g)
    if tail:
        x = x * (tail * torch.randn(b * k, fmt.dim, generator=g)).exp()
    x = x.to(device)
    a = fmt.pulses * x.abs() / x.abs().sum(1, keepdim=True)
    y = a.floor()
    rem = fmt.pulses - y.sum(1, keepdim=True)
    rank = (a - y).argsort(1, descending=True).argsort(1)
    y = (y + (rank < rem).float()) * torch.where(x < 0, -1.0, 1.0)
    f = {"pulses": y.to(torch.int16).reshape(b, k, fmt.dim).transpose(1, 2).reshape(n, k),
         "norm_code": torch.randint(0, 1 << nb, (b, k), generator=g).to(device),
         "norm_levels": (torch.rand(1 << nb, generator=g) * 0.1).half().to(device)}
    return {name: t.to(device) for name, t in fmt.pack(f).items()}


CODEBOOK_FORMATS = ("vq2", "vq3")  # VPTQ's rows: 4-vectors, one 8-bit stage (2 b/w) or 8 + 4 bits (3 b/w)


def codebook_format(name: str):
    """The ``Codebook`` format of a VQ row name (``vq2`` / ``vq3``)."""
    from llmcomp.formats.codebook import Codebook

    return Codebook(dim=4, bits=(8,) if name == "vq2" else (8, 4))


PYRAMID_FORMATS = {"pvq2": 38, "pvq3": 87}  # PVQ's rows: N = 64, 8-bit gains, K pulses for ~2 and 3 b/w
PYRAMID_TAIL = 0.5  # heavy-tailed random groups: escapes 1e-5 (pvq2) and 4e-3 (pvq3) of the pulses, as real weights


def bench_format(name: str, group: int = 128):
    """The format a bench row times: uniform ``w<bits>`` (at ``group``), E2M1 (``mxfp4``, ``nvfp4``, ``fp4``), VQ
    (``vq2`` / ``vq3``) or PVQ (``pvq2`` / ``pvq3``)."""
    from llmcomp.formats import FORMATS
    from llmcomp.formats.pyramid import Pyramid

    if name in CODEBOOK_FORMATS:
        return codebook_format(name)
    if name in PYRAMID_FORMATS:
        return Pyramid(dim=64, pulses=PYRAMID_FORMATS[name], norm_bits=8)
    if name.startswith("w"):
        return Uniform(bits=int(name[1:]), group_size=group)
    return FORMATS.get(name)()


def check_shapes(shapes, names, group: int = 128) -> None:
    """A UserError naming the first shape (N, K) a row's format (``bench_format`` names) cannot store — before the
    run, not as a traceback after the rows before it."""
    for name in names:
        fmt = bench_format(name, group)
        for n, k in shapes:
            try:
                fmt.validate_shape(n, k, f"a {n} x {k} layer")
            except UserError as exc:
                raise UserError(f"--shapes {n}x{k} cannot be timed as {name}: {exc}") from None


def _packed_for(name: str, n: int, k: int):
    """(format, packed tensors on the GPU) for a bench row: uniform ``w2`` / ``w3`` / ``w4`` (g128) and E2M1 by RTN of
    a random weight, VQ and PVQ random."""
    from llmcomp.quant.fp4 import fp4_fields

    fmt = bench_format(name)
    if name in CODEBOOK_FORMATS:
        return fmt, random_codebook(fmt, n, k, n + k, "cuda")
    if name in PYRAMID_FORMATS:
        return fmt, random_pyramid(fmt, n, k, n + k, "cuda", PYRAMID_TAIL)
    w = torch.randn(n, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(n + k)) * 0.02
    if isinstance(fmt, Uniform):
        return fmt, fmt.pack(rtn_fields(w, fmt))
    return fmt, fmt.pack(fp4_fields(w, fmt))


def _float_rows(result: dict, shapes, ms, formats, bw: float, out: Optional[Path], log) -> None:
    """Other formats through ``QuantLinear`` — E2M1, VQ ``vq2`` / ``vq3`` (the mma kernel with codebook lookups)
    and PVQ ``pvq2`` / ``pvq3`` — each against its own stored bytes; speed-up against the bf16 row of the same shape
    and M measured earlier in this run. PVQ rows also give the kernel's own reads (``layout_bytes``: its 4-bit codes,
    scales and escapes, decoded from the stored index at the first call) and their roofline, and the escapes'
    share of the pulses."""
    bf16 = {(r["N"], r["K"], r["M"]): r["bf16_us"] for r in result["rows"] if "bf16_us" in r}
    for name in formats:
        for n, k in shapes:
            fmt, base = _packed_for(name, n, k)
            nbytes = state_bytes(base)
            layers = _layer_copies(fmt, base, k, n)
            extra = {}
            if name in PYRAMID_FORMATS:  # the layout built in the first copy's cache, where its first call finds it
                from llmcomp.kernels import pyramid_cuda

                lay = layers[0]
                prep = pyramid_cuda.prepared(fmt, lay.packed_tensors(), k, lay.__dict__.setdefault("_wcache", {}))
                extra = {"escapes": round(pyramid_cuda.escape_fraction(prep), 7),
                         "layout_bytes": pyramid_cuda.layout_bytes(prep)}
                del prep, lay
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"format": name, "N": n, "K": k, "M": m, **extra}
                with torch.inference_mode():
                    t = _time_into(row, "llmcomp", [lambda lay=lay: lay(x) for lay in layers], nbytes, bw)
                if "layout_bytes" in row:
                    row["layout_roofline_pct"] = round(roofline_pct(row["layout_bytes"], m, n, k, bw, t), 2)
                if (n, k, m) in bf16:
                    row["speedup_vs_bf16"] = round(bf16[(n, k, m)] / row["llmcomp_us"], 3)
                result["rows"].append(row)
                own = f" (its layout {row['layout_roofline_pct']:5.1f}%)" if "layout_roofline_pct" in row else ""
                log(f"{name:6s} {n:6d}x{k:<6d} M={m:<4d} llmcomp {row['llmcomp_us']:8.2f}us "
                    f"{row['llmcomp_roofline_pct']:5.1f}%{own}  vs bf16 {row.get('speedup_vs_bf16', '-')}")
                if out is not None:  # (after every row: a run cut short still leaves its numbers)
                    write_json(out, result, partial=True)
            del layers
            torch.cuda.empty_cache()


def run(shapes=SHAPES, ms=MS, bits_list=(4,), group: int = 128, out: Optional[Path] = None,
        log=print, float_formats=(), fp16: bool = False) -> dict:
    from llmcomp.kernels import uniform_cuda, uniform_triton

    bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth_Bps": bw,
              "group_size": group, "rotate_bytes": ROTATE_BYTES, "fp16": fp16, "bitsandbytes": _bnb_version(),
              "rows": []}
    result["launch_floor_us"] = round(launch_floor_seconds() * 1e6, 3)
    result["dependent_launch"] = uniform_cuda.dependent_launch()
    log(f"{result['device']}  copy bandwidth {bw / 1e12:.2f} TB/s  launch floor {result['launch_floor_us']:.2f} us")
    for bits in bits_list:
        fmt = Uniform(bits=bits, group_size=group)
        for n, k in shapes:
            g = torch.Generator(device="cuda").manual_seed(n * 31 + k)
            w = torch.randn(n, k, device="cuda", generator=g) * 0.02
            fields = rtn_fields(w, fmt)
            base = fmt.pack(fields)
            packed_bytes = state_bytes(base)
            layers = _layer_copies(fmt, base, k)
            tri_prep = ([uniform_triton.prepare(fmt, lay.packed_tensors(), k) for lay in layers]
                        if bits in (2, 4, 8) else [])  # the Triton GEMV has no 3-bit layout
            w_bf16 = [w.to(torch.bfloat16) for _ in range(_copies(n * k * 2))]
            w_fp16 = [wb.half() for wb in w_bf16] if fp16 else []
            tg = ([_tinygemm(fields["codes"].int(), n, k, 128) for _ in range(_copies(packed_bytes))]
                  if bits == 4 else [])
            bnb = [_bnb_nf4(w) for _ in range(_copies(n * k // 2))] if bits == 4 else []
            dq = []  # kernel preparations for the dequantize column (M > MAX_M), built at the first such M
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"bits": bits, "N": n, "K": k, "M": m}

                def add(name, fns, nbytes, gemm=True):
                    _time_into(row, name, fns, nbytes, bw, gemm)

                with torch.inference_mode():
                    add("llmcomp", [lambda lay=lay: lay(x) for lay in layers], packed_bytes)
                    if m > uniform_cuda.MAX_M and uniform_cuda.extension() is not None:  # prefill: its dequantize alone
                        dq = dq or [uniform_cuda.prepare(fmt, lay.packed_tensors(), k) for lay in layers]
                        add("dequant", [lambda p=p: uniform_cuda.dequantize(p, k, x.dtype) for p in dq],
                            packed_bytes + n * k * 2, gemm=False)  # reads the packed weight, writes W
                    if tri_prep and m <= uniform_triton.GEMV_MAX_M:
                        add("llmcomp_triton", [lambda p=p: uniform_triton.gemv(x, p, bits, k) for p in tri_prep],
                            packed_bytes)
                    add("bf16", [lambda wb=wb: F.linear(x, wb) for wb in w_bf16], n * k * 2)
                    if fp16:  # the same kernel with fp16 activations (one integer op less per code pair) and its peer
                        x16 = x.half()
                        add("llmcomp_fp16", [lambda lay=lay: lay(x16) for lay in layers], packed_bytes)
                        add("fp16", [lambda wh=wh: F.linear(x16, wh) for wh in w_fp16], n * k * 2)
                    if tg and tg[0][0] is not None:
                        add("tinygemm", [lambda f=f: f(x) for f, _ in tg], n * k // 2 + n * (k // 128) * 4)
                    elif tg:
                        row["tinygemm_error"] = tg[0][1]
                    if bnb and bnb[0][0] is not None:
                        add("bnb_nf4", [lambda f=f: f(x) for f, _, _ in bnb], bnb[0][2])
                    elif bnb:
                        row["bnb_nf4_error"] = bnb[0][1]
                for peer in ("bf16", "tinygemm", "bnb_nf4", "llmcomp_triton"):
                    if f"{peer}_us" in row:
                        row[f"speedup_vs_{peer}"] = round(row[f"{peer}_us"] / row["llmcomp_us"], 3)
                if "fp16_us" in row:
                    row["fp16_speedup_vs_fp16"] = round(row["fp16_us"] / row["llmcomp_fp16_us"], 3)
                result["rows"].append(row)
                log(_line(row))
                if out is not None:  # (after every row: a run cut short still leaves its numbers)
                    write_json(out, result, partial=True)
            del layers, tri_prep, w_bf16, w_fp16, tg, bnb, dq
            torch.cuda.empty_cache()
    _float_rows(result, shapes, ms, float_formats, bw, out, log)
    if out is not None:
        write_json(out, result)
    return result


def _line(row: dict) -> str:
    parts = [f"W{row['bits']} {row['N']:6d}x{row['K']:<6d} M={row['M']:<4d}"]  # uniform rows
    for name in ("llmcomp", "dequant", "llmcomp_triton", "bf16", "tinygemm", "bnb_nf4", "llmcomp_fp16", "fp16"):
        if f"{name}_us" in row:
            parts.append(f"{name} {row[f'{name}_us']:8.2f}us {row[f'{name}_roofline_pct']:5.1f}%")
    return "  ".join(parts)


# (warps splitting K, row groups a block): up to 16 warps a block at M <= 16, 8 above.
_WIDE_SPLITS = ((4, 1), (8, 1), (16, 1), (4, 2), (8, 2), (4, 4), (2, 8))
_SPLITS = ((4, 1), (8, 1), (4, 2), (2, 4), (1, 8), (1, 4), (2, 2))  # warps 1: x staged (LLMCOMP_MMA_XSTAGE)


def _sweep_subject(name: str, n: int, k: int, bits: int, group: int):
    """(packed bytes, kernel preparations, call(x, prep, (rt, warps, wr)), launch_config(m, dtype)) for one swept
    kernel: the uniform mma kernel (``W{bits}``, or E2M1 weights: ``mxfp4`` / ``nvfp4``) or the codebook one
    (``vq2``/``vq3``, one row tile a warp)."""
    from llmcomp.kernels import codebook_cuda, uniform_cuda

    if name in CODEBOOK_FORMATS:
        fmt, base = _packed_for(name, n, k)
        preps = [codebook_cuda.prepare(fmt, {kk: v.clone() for kk, v in base.items()}, k)
                 for _ in range(_copies(state_bytes(base)))]
        return (state_bytes(base), preps, lambda x, p, c: codebook_cuda.gemm(x, p, c[1:]),
                lambda m, dtype: (1, *codebook_cuda.launch_config(n, k, m, codebook_cuda.copies(preps[0]))))
    if name in ("mxfp4", "nvfp4"):
        fmt, base = _packed_for(name, n, k)
    else:
        fmt = Uniform(bits=bits, group_size=group)
        base = fmt.pack(rtn_fields(torch.randn(n, k, device="cuda") * 0.02, fmt))
    preps = [uniform_cuda.prepare(fmt, {kk: v.clone() for kk, v in base.items()}, k)
             for _ in range(_copies(state_bytes(base)))]
    return (state_bytes(base), preps, lambda x, p, c: uniform_cuda.gemm(x, p, c),
            lambda m, dtype: uniform_cuda.launch_config(  # the element kind gemm_tensors passes (E2M1: 1 or 9)
                n, k, preps[0]["bits"], m, elem=uniform_cuda.kernel_elem(preps[0], dtype), fp16=dtype == torch.float16))


def sweep(shapes=SHAPES, ms=(1, 16), bits: int = 4, group: int = 128, log=print, fmt: str = "",
          out: Optional[Path] = None, configs: Optional[list[tuple[int, int, int]]] = None,
          fp16: bool = False) -> list[dict]:
    """Time a CUDA mma kernel alone over its launch parameters (row tiles per warp × warps splitting K ×
    row groups a block), to set ``uniform_cuda.launch_config`` (``fmt`` empty: uniform ``bits``; ``mxfp4`` /
    ``nvfp4``) or ``codebook_cuda.launch_config`` (``fmt`` vq2 / vq3) from measurements. ``out``: a JSON file of the
    rows so far, rewritten after every shape and M (a sweep cut short by a time limit keeps what it timed).
    ``configs``: only these (rt, warps, wr) and the rule's pick — a check of the rule against its neighbours
    where the whole grid would take too long. ``fp16``: float16 activations (the kernels' other build) instead of
    bfloat16; the rows' format label gets " fp16"."""
    label = fmt or f"W{bits}"
    dtype, tag = (torch.float16, label + " fp16") if fp16 else (torch.bfloat16, label)
    bw = copy_bandwidth()
    rows = []
    for n, k in shapes:
        nbytes, preps, call, auto = _sweep_subject(label, n, k, bits, group)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            pick = tuple(auto(m, dtype))
            for p in preps:  # builds the per-dtype tables / scale pairs outside the timing
                call(x, p, pick)
            best, picked = None, None
            vq = fmt in CODEBOOK_FORMATS
            rts = (1,) if vq else (1, 2)
            splits = _WIDE_SPLITS if m <= 16 else _SPLITS if not vq else tuple(s for s in _SPLITS if s[0] > 1)
            grid = ([(rt, warps, wr) for rt in rts for warps, wr in splits] if configs is None
                    else list(dict.fromkeys([*configs, pick])))
            for c in [c for c in grid if n % (16 * c[0]) == 0]:
                t = per_call_seconds([lambda p=p: call(x, p, c) for p in preps])
                pct = roofline_pct(nbytes, m, n, k, bw, t)
                rows.append({"format": tag, "N": n, "K": k, "M": m, "rt": c[0], "warps": c[1], "wr": c[2],
                             "us": round(t * 1e6, 3), "roofline_pct": round(pct, 2)})
                if best is None or t < best[0]:
                    best = (t, c, pct)
                if c == pick:
                    picked = t
            log(f"sweep {tag} {n}x{k} M={m}: best (rt, warps, wr)={best[1]} {best[0] * 1e6:.2f}us {best[2]:.1f}%"
                f"  (launch_config: {pick}" + (f" {picked * 1e6:.2f}us)" if picked else ")"))
            if out is not None:
                write_json(out, rows, partial=True)
        del preps
    if out is not None:
        write_json(out, rows)
    return rows
