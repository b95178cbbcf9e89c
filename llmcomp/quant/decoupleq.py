"""decoupleQ (Guo et al., 2024) into the ``uniform`` format.

The layer's weights are decoupled into an integer part (the codes) and a float part (each group's
scale and zero), and the layer-output error

    L(Q, s, z) = tr((W − Ŵ) H (W − Ŵ)ᵀ),   Ŵ[o, i] = (q[o, i] − z[o, g(i)]) · s[o, g(i)]

(``H = 2XᵀX/n``, dampened) is minimised by alternating:
- **integer step** (floats fixed): the GPTQ solver with a fixed grid — a projected, error-compensated
  approximation of the constrained integer least-squares problem (reuses ``gptq_solve``);
- **float step** (codes fixed): the exact H-weighted least-squares optimum of every row's scales and
  offsets, all groups of a row jointly (groups are coupled through H), in closed form.
The best (Q, s, z) seen is kept, so the result is never worse than the first round, which is GPTQ with
static min/max groups. Per-layer metrics record the objective after every step.

Not implemented yet: the paper's optional block-level refinement of the float part against the whole
decoder block's output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core.config import register_config
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats.uniform import SCALE_DTYPE, Uniform
from llmcomp.quant.base import METHODS, HessianQuantizer, LayerResult, QuantConfig
from llmcomp.quant.gptq import gptq_solve, static_grid, uniform_round
from llmcomp.quant.hessian import (HessianAccumulator, check_damp, flush_denormal, inverse_cholesky,
                                   output_error)


@register_config
@dataclass(frozen=True)
class DecoupleQConfig(QuantConfig):
    format: Uniform = Uniform(bits=2, group_size=64)
    rounds: int = 4
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True

    method = "decoupleq"
    VERSION = 1

    def __post_init__(self):
        if not isinstance(self.rounds, int) or not 1 <= self.rounds <= 100:
            raise UserError(f"decoupleQ rounds must be an integer from 1 to 100, got {self.rounds}.")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise UserError(f"decoupleQ block size must be a positive integer, got {self.block_size}.")
        check_damp(self.damp, "decoupleQ")


def objective(W: torch.Tensor, What: torch.Tensor, H: torch.Tensor) -> float:
    D = (W - What).float()
    return float(((D @ H) * D).sum())


def _group_sum(x: torch.Tensor, g: int, ng: int) -> torch.Tensor:
    """Sum the last dim of ``x`` [..., n] into consecutive groups of ``g`` (the last may be shorter) → [..., ng].
    A padded reshape + sum, not ``index_add_``: on CUDA that adds with atomics in no fixed order (torch
    documents it as nondeterministic) — the likely cause of decoupleQ's run-to-run spread on an H200 (W2 g64
    ppl 75–83 in identical runs), where the alternating solve can turn last-bit differences into other codes."""
    x = torch.nn.functional.pad(x, (0, ng * g - x.shape[-1]))
    return x.reshape(*x.shape[:-1], ng, g).sum(-1)


@torch.no_grad()
def solve_floats(W: torch.Tensor, codes: torch.Tensor, H: torch.Tensor, fmt: Uniform,
                 scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H-weighted least-squares scales and zeros [out, n_groups] for fixed ``codes``.

    Row r's model is ŵ = q·s_g + c_g (asymmetric; c = −z·s) or ŵ = (q − z₀)·s_g (symmetric), linear in
    the float parameters θ; minimising (w − Aθ)ᵀ H (w − Aθ) gives the normal equations AᵀHA θ = AᵀHw,
    one small (2·groups)² system per row. Rows whose solution is not usable (non-positive or
    non-finite scale) keep ``scale``/``zero``.
    """
    out_f, n = W.shape
    ng, g = fmt.n_groups(n), fmt.group(n)
    Q = codes.float()
    if fmt.symmetric:
        Q = Q - float(1 << (fmt.bits - 1))
    HW = W.float() @ H  # (R, n)
    blocks = []  # M_qq[r, a, b] = Σ_{i∈a, j∈b} q_ri H_ij q_rj
    for b in range(ng):
        cols = slice(b * g, min((b + 1) * g, n))
        blocks.append(_group_sum(Q * (Q[:, cols] @ H[cols, :]), g, ng))  # (R, ng) over a
    M_qq = torch.stack(blocks, dim=2)  # (R, ng, ng)
    rhs_q = _group_sum(Q * HW, g, ng)  # (R, ng)
    if fmt.symmetric:
        M, rhs = M_qq, rhs_q
    else:
        Hg = _group_sum(H, g, ng)  # (n, ng): Σ_{j∈b} H_ij
        M_q1 = torch.stack([_group_sum(Q * Hg[:, b], g, ng) for b in range(ng)], dim=2)  # (R, ng, ng)
        M_11 = _group_sum(Hg.T, g, ng).expand(out_f, ng, ng)  # (ng, ng) shared by all rows
        M = torch.cat([torch.cat([M_qq, M_q1], 2), torch.cat([M_q1.transpose(1, 2), M_11], 2)], 1)
        rhs = torch.cat([rhs_q, _group_sum(HW, g, ng)], 1)
    # a row whose system is all zeros (a zero row, dead inputs) gets ridge 1: θ = 0, which ``ok`` below turns down
    # (1e-30 was flushed to zero where denormals are, and the solve failed)
    # (in float64: 1e-9 of a tiny diagonal is no float32 denormal to flush)
    diag = torch.diagonal(M, dim1=1, dim2=2).abs().mean(1).double()
    ridge = torch.where(diag > 0, 1e-9 * diag, torch.ones_like(diag))
    M = M.double() + ridge[:, None, None] * torch.eye(M.shape[1], device=M.device, dtype=torch.float64)
    theta = torch.linalg.solve(M, rhs.double().unsqueeze(-1)).squeeze(-1).float()
    s_new = theta[:, :ng]
    z_new = torch.full_like(s_new, float(1 << (fmt.bits - 1))) if fmt.symmetric else -theta[:, ng:] / s_new
    s_new = s_new.to(SCALE_DTYPE).float()
    z_new = z_new.to(SCALE_DTYPE).float()
    ok = (torch.isfinite(s_new) & torch.isfinite(z_new) & (s_new > 0)).all(1, keepdim=True)
    return torch.where(ok, s_new, scale), torch.where(ok, z_new, zero)


def dequant(codes, scale, zero, fmt: Uniform, n: int) -> torch.Tensor:
    return (codes.float() - fmt.expand(zero, n)) * fmt.expand(scale, n)


@METHODS.register("decoupleq")
class DecoupleQQuantizer(HessianQuantizer):
    config: DecoupleQConfig
    label = "decoupleQ"

    @torch.no_grad()
    def quantize_linear(self, name: str, linear: nn.Linear, stats: HessianAccumulator | None = None) -> LayerResult:
        cfg = self.config
        fmt, W0 = self.layer_weight(name, linear, stats)
        n = linear.in_features
        with flush_denormal():
            dh = stats.finalize(cfg.damp)
            H = dh.H.to(W0.device)
            W = W0.clone()
            W[:, dh.dead.to(W0.device)] = 0
            perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if cfg.act_order else None
            inv = torch.argsort(perm) if perm is not None else None
            dh.H = H if perm is None else H[perm][:, perm]
            damp0 = dh.damp
            U, dh = inverse_cholesky(dh)
            if dh.damp != damp0:  # raised to factor H: the float step and the objective use that H too
                H = H + (dh.damp - damp0) * torch.eye(n, dtype=H.dtype, device=H.device)
            Wp = W if perm is None else W[:, perm]

            scale, zero = static_grid(W, fmt)
            trace, best = [], None
            for _ in range(cfg.rounds):
                s_cols, z_cols = fmt.expand(scale, n), fmt.expand(zero, n)
                if perm is not None:
                    s_cols, z_cols = s_cols[:, perm], z_cols[:, perm]
                Qv = gptq_solve(Wp, U, uniform_round(fmt, s_cols, z_cols), cfg.block_size)
                if inv is not None:
                    Qv = Qv[:, inv]
                codes = fmt.encode(Qv, fmt.expand(scale, n), fmt.expand(zero, n))
                for step in ("int", "float"):
                    if step == "float":
                        scale, zero = solve_floats(W, codes, H, fmt, scale, zero)
                    obj = objective(W, dequant(codes, scale, zero, fmt, n), H)
                    trace.append(obj)
                    if best is None or obj < best[0]:
                        best = (obj, codes.clone(), scale.clone(), zero.clone())
            obj, codes, scale, zero = best
            ref = objective(W, torch.zeros_like(W), H)
            # (on the calibration Hessian, as GPTQ, VPTQ and PVQ report it; the dampened one the solver minimizes
            # read up to ~20 % high at damp 0.1)
            err = output_error(W0, dequant(codes, scale, zero, fmt, n), stats.H.to(W0.device))
        tensors = fmt.pack({"codes": codes.to(torch.uint8), "scale": scale, "zero": zero})
        mod = QuantLinear.from_packed(fmt, tensors, n, linear.bias.data if linear.bias is not None else None)
        metrics = {"out_err_rel": round(err, 6),
                   # the solver's own objective (dampened Hessian) after each step of each round
                   "objective_trace_rel": [round(t / max(ref, 1e-30), 6) for t in trace]}
        if dh.percdamp != cfg.damp:
            metrics["damp"] = dh.percdamp
        return LayerResult(mod, metrics)
