"""Second-order statistics of a linear layer's inputs, shared by every Hessian-based method.

For a layer ``y = x Wᵀ`` and the squared output error, the Hessian w.r.t. each row of ``W`` is

    H = 2 · XᵀX / n        X: [n tokens, in_features], over all calibration tokens

``HessianAccumulator`` is a forward hook (the object ``Quantizer.observe`` returns; the calibration
driver hands the same object back to ``quantize_linear`` as ``stats``). It keeps the running average
in float32, as GPTQ does, so memory is one ``in × in`` matrix per linear whatever the token count.

``dampen`` adds ``percdamp · mean(diag H)`` to the diagonal and gives dead inputs (``diag == 0``: the
input is zero on every calibration token) a unit diagonal; ``inverse_cholesky`` returns the upper
Cholesky factor of ``H⁻¹`` that GPTQ-style solvers consume, raising the dampening automatically
(and warning once) when ``H`` is not positive definite.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from llmcomp.core.numeric import all_finite
from llmcomp.errors import UserError


def check_damp(damp, who: str) -> None:
    """A dampening fraction of the mean Hessian diagonal in [0, 10), or one UserError naming ``who``."""
    try:
        ok = not isinstance(damp, bool) and 0 <= float(damp) < 10  # (numpy and 0-d tensor scalars too)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{who} dampening must be a fraction of the mean Hessian diagonal (e.g. 0.01), got {damp!r}.")


@contextlib.contextmanager
def flush_denormal():
    """Flush float32 denormals to zero inside the block (CPU solvers slow down 5–100× on denormals)."""
    enabled = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)  # torch has no getter; False is the process default


class HessianAccumulator:
    """Forward hook accumulating ``H = 2·XᵀX/n`` of a linear layer's input (float32 running average)."""

    def __init__(self, in_features: int | None = None):
        self.in_features = in_features
        self.H: torch.Tensor | None = None
        self.n = 0  # tokens seen

    @classmethod
    def for_linear(cls, linear: nn.Linear) -> "HessianAccumulator":
        return cls(linear.in_features)

    def __call__(self, module, inputs, output=None) -> None:
        self.add(inputs[0] if isinstance(inputs, (tuple, list)) else inputs)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` [..., in_features] (every leading position counts as a token)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if m == 0:
            return
        if self.H is None:
            if self.in_features is not None and x.shape[1] != self.in_features:
                raise ValueError(f"input width {x.shape[1]} != in_features {self.in_features}")
            self.in_features = x.shape[1]
            self.H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        # H_new = H·n/(n+m) + 2/(n+m)·xᵀx
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.T, x)

    @property
    def empty(self) -> bool:
        """No calibration token reached the layer (e.g. an MoE expert its router never chose)."""
        return self.H is None

    def finalize(self, percdamp: float = 0.01) -> "DampedHessian":
        """The dampened Hessian (a new tensor; the accumulator is left untouched)."""
        if self.empty:
            raise RuntimeError("HessianAccumulator saw no inputs; was the layer run on calibration data?")
        return dampen(self.H, percdamp)

    def release(self) -> None:
        self.H = None


@dataclass
class DampedHessian:
    H: torch.Tensor  # dampened, dead diagonal set to the live inputs' mean
    dead: torch.Tensor  # bool [in]: inputs that were zero on every calibration token
    damp: float  # absolute value added to the diagonal
    percdamp: float  # relative dampening actually used (may exceed the requested one)


def dampen(H: torch.Tensor, percdamp: float = 0.01) -> DampedHessian:
    """``H + percdamp·mean(diag H)·I``, the mean over the live inputs, with dead inputs (diag 0) given that mean as
    their diagonal. (A unit diagonal, as upstream GPTQ gives them, is not scale-free: with small activations a few
    dead inputs set the dampening and GPTQ's feedback faded towards RTN; the solution must not change when H is
    multiplied by a constant.)"""
    if percdamp < 0:
        raise ValueError("percdamp must be ≥ 0")
    H = H.float().clone()
    diag = torch.diagonal(H)
    dead = diag == 0
    mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    diag[dead] = mean
    damp = percdamp * mean
    diag.add_(damp)
    return DampedHessian(H, dead, damp, percdamp)


_warned_not_pd = False


def inverse_cholesky(dh: DampedHessian, max_tries: int = 8) -> tuple[torch.Tensor, DampedHessian]:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``) for a dampened Hessian.

    If ``H`` is not positive definite, the dampening is multiplied by 10 (from at least 1 % of the
    mean diagonal) until it is; the returned ``DampedHessian`` records what was used. Warns once.
    """
    global _warned_not_pd
    H, percdamp = dh.H, dh.percdamp
    diag_mean = float(torch.diagonal(H).mean()) - dh.damp  # mean of the undampened (dead-fixed) diag
    # Memory: H plus two of L, H⁻¹, U (in×in each) live at once, plus the solver's own copy on CUDA.
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0 and all_finite(L):
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0 and all_finite(U):
                return U, dh
        new = max(percdamp * 10, 0.01)
        if not _warned_not_pd:
            warnings.warn(f"Hessian not positive definite with dampening {percdamp:g}; raising it to {new:g} "
                          "(recorded in the layer metrics).", RuntimeWarning, stacklevel=2)
            _warned_not_pd = True
        H = H + (new - percdamp) * diag_mean * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        dh = DampedHessian(H, dh.dead, new * diag_mean, new)
        percdamp = new
    raise RuntimeError(f"Hessian still not positive definite with dampening {percdamp:g}.")


def output_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr(D H Dᵀ) / tr(W H Wᵀ), D = Q − W: the layer's relative output error on calibration inputs."""
    D = (Q - W).float()
    return float(((D @ H) * D).sum() / ((W @ H) * W).sum().clamp(min=1e-30))
