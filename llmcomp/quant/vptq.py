"""VPTQ-style second-order vector quantization (Liu et al., 2024) into the ``codebook`` format.

Per layer (``H = 2XᵀX/n`` from hessian.py):
1. Per-output-channel scale s (row RMS, float16) so one codebook serves every row; the optional
   outlier columns (largest ``diag(H)·‖W_col‖²``) are set apart with a codebook of their own.
2. Codebook initialization by k-means weighted by the Hessian diagonal (each weight counts as much as
   its input's ``H_ii``, times s² of its row), on the device the layer is on; every residual stage is
   fitted on what the stages before it leave.
3. Column-block quantization with GPTQ error feedback through the inverse Hessian (vecsolve.py: block
   LDLQ, each vector chosen in its group's metric, residual stages greedily); rows are independent
   ("channel-independent second-order optimization").
Differences from the paper, on purpose: vectors run along the *input* dimension (the format's layout,
kernel friendly: a row's dot product reads consecutive inputs) where VPTQ cuts columns; a vector
group is fixed jointly in the exact block metric instead of column by column. No codebook fine-tuning.

``codebook_for_bits`` turns ``--bits`` into a format: index bits = bits · vector length (an integer),
one stage up to 9 bits (512 entries), else an 8-bit stage plus residual stages of ≤ 8 bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core.config import register_config
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats.codebook import Codebook
from llmcomp.quant.base import METHODS, HessianQuantizer, LayerResult, QuantConfig
from llmcomp.quant.hessian import HessianAccumulator, check_damp
from llmcomp.quant.kmeans import assign, kmeans
from llmcomp.quant.hessian import output_error
from llmcomp.quant.vecsolve import diagonal_metric, solve_groups

DEFAULT_DIM = 4
MAX_SINGLE_STAGE_BITS = 9
STAGE_BITS = 8


def codebook_for_bits(bits: float, dim: int | None = None, **kw) -> Codebook:
    """The ``codebook`` format whose indices cost ``bits`` a weight with vectors of ``dim``."""
    dim = DEFAULT_DIM if dim is None else dim
    if not isinstance(dim, int) or not 1 <= dim <= 64:
        raise UserError(f"--vector-len must be an integer from 1 to 64, got {dim}.")
    total = bits * dim
    if bits <= 0 or abs(total - round(total)) > 1e-9 or round(total) > 3 * 16:
        lo = min(max(1, int(total)), 47)
        near = ", ".join(f"{b / dim:g}" for b in (lo, lo + 1))
        raise UserError(f"--bits {bits:g} is not reachable with vectors of {dim} (index bits = bits × {dim} must "
                        f"be a whole number up to 48); nearest reachable: {near}.")
    total = int(round(total))
    if total <= MAX_SINGLE_STAGE_BITS:
        stages = (total,)
    else:
        rest = total - STAGE_BITS
        stages = (STAGE_BITS,) * (1 + rest // STAGE_BITS) + ((rest % STAGE_BITS,) if rest % STAGE_BITS else ())
    return Codebook(dim=dim, bits=stages, **kw)


@register_config
@dataclass(frozen=True)
class VPTQConfig(QuantConfig):
    format: Codebook = Codebook()
    damp: float = 0.01
    block_size: int = 128
    kmeans_iters: int = 15
    kmeans_sample: int = 1 << 15  # vectors each codebook is fitted on (kmeans: heavy + seeded draw)
    feedback: bool = True  # GPTQ-style error feedback; False: nearest entry in the Hessian-diagonal metric
    act_order: bool = True
    seed: int = 0

    method = "vptq"
    VERSION = 1

    def __post_init__(self):
        if not isinstance(self.format, Codebook):
            raise UserError(f"--method vptq writes the codebook format, not {type(self.format).__name__}.")
        if not isinstance(self.kmeans_iters, int) or not 0 <= self.kmeans_iters <= 1000:
            raise UserError(f"k-means iterations must be an integer from 0 to 1000, got {self.kmeans_iters}.")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise UserError(f"VPTQ block size must be a positive integer, got {self.block_size}.")
        check_damp(self.damp, "VPTQ")


def row_scale(W: torch.Tensor) -> torch.Tensor:
    """Per-row RMS rounded to its float16 storage (never zero; at most float16's largest, where a row of RMS above
    65504 would have stored inf and turned the layer's shared codebook to NaN)."""
    f16 = torch.finfo(torch.float16)
    s = W.float().pow(2).mean(1).sqrt()
    return s.clamp(min=1e-8, max=f16.max).half().float().clamp(min=f16.tiny)


class _Stages:
    """Codebooks of one vector set (the main vectors of a column group, or the outlier vectors)."""

    def __init__(self, books: list[torch.Tensor]):
        self.books = books

    @classmethod
    def fit(cls, x: torch.Tensor, h: torch.Tensor, bits: tuple, cfg: VPTQConfig, seed: int) -> "_Stages":
        books, rest = [], x
        for t, b in enumerate(bits):
            c = kmeans(rest, h, 1 << b, iters=cfg.kmeans_iters, sample=cfg.kmeans_sample, seed=seed + t)
            c = c.half().float()  # fit later stages to what is stored
            books.append(c)
            rest = rest - c[assign(rest, h, c)]
        return cls(books)

    def quantize(self, t: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Greedy residual search of ``t`` [rows, dim] in metric A → (values, indices per stage)."""
        ta = t @ A
        q = torch.zeros_like(t)
        qa = torch.zeros_like(t)
        idx = []
        for c in self.books:
            ca = c @ A
            i = assign(ta - qa, None, ca)
            q, qa = q + c[i], qa + ca[i]
            idx.append(i)
        return q, idx


@METHODS.register("vptq")
class VPTQQuantizer(HessianQuantizer):
    config: VPTQConfig
    label = "VPTQ"

    def layer_format(self, name: str, linear: nn.Linear):
        return self.format_for(name).fitted(linear.out_features, linear.in_features)

    @torch.no_grad()
    def quantize_linear(self, name: str, linear: nn.Linear, stats: HessianAccumulator | None = None) -> LayerResult:
        cfg = self.config
        fmt, W0 = self.layer_weight(name, linear, stats)
        out_f, in_f = linear.out_features, linear.in_features
        dev, v = W0.device, fmt.dim
        H = stats.H.to(dev)
        hd = torch.diagonal(H).clamp(min=0)
        s = row_scale(W0) if fmt.scale else torch.ones(out_f, device=dev)
        Wn = W0 / s[:, None]

        n_oc = fmt.n_outlier_cols(in_f)
        ocols = None
        if n_oc:
            salience = hd * W0.pow(2).sum(0)
            ocols = torch.sort(torch.topk(salience, n_oc).indices).values
        mcols = fmt.main_cols(ocols, in_f, dev)
        nv = mcols.numel() // v
        vgroup = fmt.vector_group(in_f, dev)  # (nv,)

        def vectors(cols: torch.Tensor):  # points [rows·n, v] and their weights (H_ii · s²)
            x = Wn[:, cols].reshape(-1, v)
            h = (hd[cols][None, :] * (s * s)[:, None]).reshape(-1, v)
            return x, h

        seed = cfg.seed
        books = []
        for g in range(fmt.n_groups(in_f)):
            cols = mcols.reshape(nv, v)[vgroup == g].reshape(-1)
            books.append(_Stages.fit(*vectors(cols), fmt.bits, cfg, seed + 100 * g))
        obook = _Stages.fit(*vectors(ocols), (fmt.outlier_bits,), cfg, seed + 99991) if n_oc else None

        groups = torch.cat([mcols.reshape(nv, v)] + ([ocols.reshape(-1, v)] if n_oc else []))
        index = [torch.zeros(out_f, nv, dtype=torch.int64, device=dev) for _ in fmt.bits]
        oindex = torch.zeros(out_f, n_oc // v, dtype=torch.int64, device=dev)

        def quantize_group(gid: int, t: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
            if gid < nv:
                q, idx = books[int(vgroup[gid])].quantize(t, A)
                for st, i in zip(index, idx):
                    st[:, gid] = i
            else:
                q, idx = obook.quantize(t, A)
                oindex[:, gid - nv] = idx[0]
            return q

        if cfg.feedback:
            Qn, dh = solve_groups(Wn, H, groups, quantize_group, cfg.damp, cfg.block_size, cfg.act_order)
        else:
            Qn, dh = torch.empty_like(Wn), None
            for gid, cols in enumerate(groups):
                Qn[:, cols] = quantize_group(gid, Wn[:, cols], diagonal_metric(hd[cols]))
        fields = {"scale": s}
        for t, b in enumerate(fmt.bits):
            fields[f"index{t}"] = index[t]
            fields[f"codebook{t}"] = torch.stack([bk.books[t] for bk in books])
        if n_oc:
            fields.update(outlier_cols=ocols, outlier_index=oindex, outlier_codebook=obook.books[0])
        tensors = fmt.pack(fields)
        mod = QuantLinear.from_packed(fmt, tensors, in_f, linear.bias.data if linear.bias is not None else None)
        metrics = {"out_err_rel": round(output_error(W0, Qn * s[:, None], H), 6),
                   "bits_per_weight": round(fmt.bits_per_weight(out_f, in_f), 4)}
        if dh is not None and dh.percdamp != cfg.damp:
            metrics["damp"] = dh.percdamp
        return LayerResult(mod, metrics)
