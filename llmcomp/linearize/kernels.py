"""Fast paths for the linear-attention core op of ``attention.py`` (same contract: q, k [B, H, T, F],
v [B, H, T, D], log gates None | [B, H, T] | [B, H, T, F], state [B, H, F, D] → (o, final state)).

Backends, picked per call by :func:`core_for`:

* ``triton`` — our fused recurrent forward kernel (``kernels_triton.py``): one program per (sequence·head,
  block of value columns) walks the tokens with the state in registers. Inference only (no backward);
  float32 like the reference (tested on an H200 within 1e-4, alone and inside the hybrid, prefill + decode).
* ``fla`` — an adapter to flash-linear-attention's Triton kernels (``chunk_gla`` / ``chunk_simple_gla``:
  prefill and training, forward and backward; ``fused_recurrent_gla``: decode), written against fla 0.6.0.
  Opt-in: its GPU tests (``tests/test_linear_kernels.py``) have not yet completed a run (fla's first-call
  autotuning outlasted the device time left), so ``auto`` does not pick it.
* ``torch`` — ``chunk_linear_attention`` / ``recurrent_linear_attention``: CPU, training, and the
  reference everything is tested against.

``LLMCOMP_LINEAR_KERNEL=auto|torch|triton|fla`` picks one (``auto`` and ``triton``: triton on a GPU when no
gradient is needed — decode steps and prefill — else torch); a backend that cannot run a call (no GPU, not
installed, gradients for ``triton``) falls back to torch.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch

from llmcomp.errors import UserError
from llmcomp.linearize.attention import chunk_linear_attention, recurrent_linear_attention

Tensor = torch.Tensor
BACKENDS = ("auto", "torch", "triton", "fla")
Core = Callable[..., tuple[Tensor, Tensor]]


def requested() -> str:
    name = os.environ.get("LLMCOMP_LINEAR_KERNEL", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise UserError(f"LLMCOMP_LINEAR_KERNEL={name!r} is not a linear-attention backend; "
                        f"choose one of {', '.join(BACKENDS)}.")
    return name


@functools.lru_cache(maxsize=None)
def fla_available() -> bool:
    try:
        import fla.ops.gla  # noqa: F401
        import fla.ops.simple_gla  # noqa: F401
    except Exception:  # noqa: BLE001 — any import failure (missing, wrong triton) means "not available"
        return False
    return True


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def backend_for(q: Tensor, needs_grad: bool) -> str:
    """The backend a call on ``q`` would use (decode steps and prefill alike)."""
    want = requested()
    if not q.is_cuda or want == "torch":
        return "torch"
    if want == "fla" and fla_available():
        return "fla"
    # auto: Triton for inference, decode and prefill (H200: a decode step 0.035 vs 0.141 ms, a 2048-token
    # prefill 2.97 vs 10.64 ms for the chunked torch form, bench/results/linear_kernels_h200_b.json)
    if triton_available() and not needs_grad:
        return "triton"
    return "torch"


def core_for(q: Tensor, recurrent: bool, chunk_size: int, needs_grad: bool) -> tuple[str, Core]:
    """(backend name, core op) for one call; ``recurrent`` = decode (a few tokens with a state)."""
    name = backend_for(q, needs_grad)
    if name == "fla":
        return name, fla_recurrent if recurrent else fla_chunk
    if name == "triton":
        return name, triton_recurrent
    if recurrent:
        return name, recurrent_linear_attention
    return name, functools.partial(chunk_linear_attention, chunk_size=chunk_size)


# -- flash-linear-attention adapter ----------------------------------------------------------------

def _bthk(x: Tensor) -> Tensor:
    return x.transpose(1, 2).contiguous()  # ours [B, H, T, *] ↔ fla's [B, T, H, *]


def fla_chunk(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
              initial_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    from fla.ops.gla import chunk_gla
    from fla.ops.simple_gla import chunk_simple_gla

    s0 = None if initial_state is None else initial_state.contiguous()
    if g is not None and g.dim() == 4:
        o, S = chunk_gla(_bthk(q), _bthk(k), _bthk(v), _bthk(g), scale=1.0, initial_state=s0,
                         output_final_state=True)
    else:
        gg = None if g is None else g.transpose(1, 2).contiguous()
        o, S = chunk_simple_gla(_bthk(q), _bthk(k), _bthk(v), g=gg, scale=1.0, initial_state=s0,
                                output_final_state=True)
    return o.transpose(1, 2), S


def fla_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                  initial_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    from fla.ops.gla import fused_recurrent_gla

    gk = None if g is None else _bthk(g if g.dim() == 4 else g[..., None].expand_as(q))
    s0 = None if initial_state is None else initial_state.contiguous()
    o, S = fused_recurrent_gla(_bthk(q), _bthk(k), _bthk(v), gk=gk, scale=1.0, initial_state=s0,
                               output_final_state=True)
    return o.transpose(1, 2), S


# -- our Triton fused recurrent forward ------------------------------------------------------------

def triton_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor] = None,
                     initial_state: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Forward only, float32 state. Same contract as ``recurrent_linear_attention``."""
    from llmcomp.linearize.kernels_triton import recurrent_fwd

    return recurrent_fwd(q, k, v, g, initial_state)
