"""Vector quantization with GPTQ error feedback (block LDLQ), shared by ``vptq`` and ``pvq``.

A vector quantizer fixes a *group* of ``dim`` input columns at once. ``gptq_solve`` runs unchanged
with a ``round_col`` that, at a group's first column, quantizes the whole group jointly and then hands
back the stored values column by column: with the values fixed, the solver's column-by-column updates
are forward substitution, i.e. exactly the block update

    E = (W_B − Q_B) · U_BB⁻¹,    W_rest −= E · U_B,rest

(U the upper Cholesky factor of H⁻¹ in solver order), and the proxy loss the group adds is
‖(w − q)·A‖² with A = U_BB⁻¹. So each group is quantized in that metric: a codebook search becomes a
Euclidean search after multiplying targets and entries by A.

Groups may be any columns (VPTQ's outlier columns are not contiguous); the solver order is the groups
by decreasing summed Hessian diagonal (activation order at group granularity, nothing to store since
dequantize writes each group's columns where they belong).
"""
from __future__ import annotations

from typing import Callable

import torch

from llmcomp.quant.gptq import gptq_solve
from llmcomp.quant.hessian import DampedHessian, dampen, flush_denormal, inverse_cholesky

# quantize_group(g, target [rows, dim], A [dim, dim]) -> quantized values [rows, dim]; the quantizer
# records its own codes for group g. A: the group's metric (identity-like when there is no feedback).
GroupFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class GroupRound:
    """``round_col`` for ``gptq_solve``: group ``order[j // dim]`` at column j (solver order)."""

    def __init__(self, order: torch.Tensor, U: torch.Tensor, dim: int, fn: GroupFn):
        self.order, self.U, self.dim, self.fn = order.tolist(), U, dim, fn
        self.q: torch.Tensor | None = None

    def __call__(self, j: int, ahead: torch.Tensor) -> torch.Tensor:
        k = j % self.dim
        if k == 0:
            Ub = self.U[j:j + self.dim, j:j + self.dim]
            eye = torch.eye(self.dim, dtype=Ub.dtype, device=Ub.device)
            A = torch.linalg.solve_triangular(Ub, eye, upper=True)
            self.q = self.fn(self.order[j // self.dim], ahead[:, :self.dim], A)
        return self.q[:, k]


@torch.no_grad()
def solve_groups(W: torch.Tensor, H: torch.Tensor, groups: torch.Tensor, fn: GroupFn, damp: float = 0.01,
                 block_size: int = 128, act_order: bool = True) -> tuple[torch.Tensor, DampedHessian]:
    """Quantize ``W`` [out, in] group by group with error feedback. ``groups`` int64 [G, dim] lists each
    group's columns (together every column once). Returns the quantized values in natural column order
    and the dampened Hessian actually used (dead inputs, raised dampening)."""
    G, dim = groups.shape
    with flush_denormal():
        dh = dampen(H.to(W.device), damp)
        W = W.float().clone()
        W[:, dh.dead] = 0  # inputs never seen in calibration
        score = torch.diagonal(dh.H)[groups].sum(1)
        order = torch.argsort(score, descending=True, stable=True) if act_order else torch.arange(G, device=W.device)
        perm = groups[order].reshape(-1)
        dh.H = dh.H[perm][:, perm]
        U, dh = inverse_cholesky(dh)
        block = max(dim, block_size // dim * dim)  # a group never straddles two solver blocks
        Q = gptq_solve(W[:, perm], U, GroupRound(order, U, dim, fn), block)
    return Q[:, torch.argsort(perm)], dh


def diagonal_metric(h: torch.Tensor) -> torch.Tensor:
    """A = diag(√h): the metric of a group without feedback (h: the group's Hessian diagonal)."""
    return torch.diag(h.clamp(min=0).sqrt())

