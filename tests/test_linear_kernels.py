"""Linear-attention fast paths (``llmcomp.linearize.kernels``) against the float64 quadratic reference:
our Triton recurrent forward (float32, within 1e-4) and flash-linear-attention (TF32, within 2e-2, forward and
gradients) on the GPU; backend choice and its override everywhere."""
import pytest
import torch

from llmcomp.errors import UserError
from llmcomp.linearize import kernels
from llmcomp.linearize.attention import hybrid_attention, naive_hybrid_attention, naive_linear_attention

GATES = ["none", "head", "feature"]


def inputs(gate, B=2, H=3, T=37, F=16, D=9, seed=0, device="cpu", state=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = r(B, H, T, F).softmax(-1), r(B, H, T, F).softmax(-1), r(B, H, T, D)
    g = {"none": None, "head": torch.nn.functional.logsigmoid(r(B, H, T) + 2),
         "feature": torch.nn.functional.logsigmoid(r(B, H, T, F) + 1)}[gate]
    s0 = r(B, H, F, D) if state else None
    return [None if t is None else t.to(device) for t in (q, k, v, g, s0)]


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def reference(q, k, v, g, s0):
    o, s = naive_linear_attention(*(None if t is None else t.double().cpu() for t in (q, k, v, g)),
                                  initial_state=None if s0 is None else s0.double().cpu())
    return o, s


def test_cpu_always_uses_torch(monkeypatch):
    q = torch.zeros(1, 1, 4, 2)
    for want in ("auto", "triton", "fla", "torch"):
        monkeypatch.setenv("LLMCOMP_LINEAR_KERNEL", want)
        assert kernels.backend_for(q, needs_grad=False) == "torch"
    name, core = kernels.core_for(q, recurrent=False, chunk_size=16, needs_grad=True)
    assert name == "torch"


def test_auto_policy_on_a_gpu(monkeypatch):
    """auto: Triton for inference (decode steps and prefill); training stays on torch; fla only on request."""
    class OnGpu:
        is_cuda = True

    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    monkeypatch.setattr(kernels, "fla_available", lambda: True)
    monkeypatch.setenv("LLMCOMP_LINEAR_KERNEL", "auto")
    q = OnGpu()
    name = lambda recurrent, grad: kernels.core_for(q, recurrent, 16, grad)[0]  # noqa: E731
    assert name(True, False) == "triton" and name(False, False) == "triton"
    assert name(True, True) == "torch" and name(False, True) == "torch"
    monkeypatch.setenv("LLMCOMP_LINEAR_KERNEL", "triton")
    assert name(False, False) == "triton"
    assert name(True, True) == "torch"  # no backward
    monkeypatch.setenv("LLMCOMP_LINEAR_KERNEL", "fla")
    assert name(False, True) == "fla"
    assert kernels.core_for(q, False, 16, True)[1] is kernels.fla_chunk
    assert kernels.core_for(q, True, 16, False)[1] is kernels.fla_recurrent


def test_unknown_backend_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("LLMCOMP_LINEAR_KERNEL", "cuda-magic")
    with pytest.raises(UserError, match="LLMCOMP_LINEAR_KERNEL='cuda-magic'.*auto, torch, triton, fla"):
        kernels.backend_for(torch.zeros(1, 1, 1, 1), needs_grad=False)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("window", [0, 4])
def test_per_head_gate_reaches_the_kernels_as_one_gate_per_head(monkeypatch, gate, window):
    """The hybrid keeps per-head gates as [B, H, T, 1] for its window state; the kernels read a 4-D gate as
    one per feature, so the core gets [B, H, T] (a [B, H, T, 1] gate read as [B, H, T, F] ran past the
    tensor on the GPU); per-feature gates and no gate go through unchanged — prefill and decode alike."""
    seen = []

    def recording_core(q, recurrent, chunk_size, needs_grad):
        name, core = real_core_for(q, recurrent, chunk_size, needs_grad)
        return name, lambda q, k, v, g=None, initial_state=None: (seen.append(g), core(q, k, v, g, initial_state))[1]

    real_core_for = kernels.core_for
    monkeypatch.setattr(kernels, "core_for", recording_core)
    q, k, v, g, _ = inputs(gate, B=2, H=3, T=5, F=4, D=6)
    o, st = hybrid_attention(q, k, q, k, v, g, window=window)
    hybrid_attention(q[:, :, :1], k[:, :, :1], q[:, :, :1], k[:, :, :1], v[:, :, :1],
                     None if g is None else g[:, :, :1], window=window, state=st, recurrent=True)
    want = {"none": [None, None], "head": [(2, 3, 5), (2, 3, 1)], "feature": [(2, 3, 5, 4), (2, 3, 1, 4)]}[gate]
    assert [None if x is None else tuple(x.shape) for x in seen] == want
    if gate != "none":  # the gates of the keys W tokens back (zeros before the first token), values unchanged
        g4 = g if g.dim() == 4 else g[..., None]
        shifted = torch.cat([torch.zeros_like(g4[:, :, :1]).expand(-1, -1, window, -1), g4], 2)[:, :, :5]
        assert torch.equal(seen[0], shifted if gate == "feature" else shifted[..., 0])


def test_cpu_core_matches_reference():
    q, k, v, g, s0 = inputs("feature")
    _, core = kernels.core_for(q, recurrent=False, chunk_size=8, needs_grad=False)
    o, s = core(q, k, v, g, initial_state=s0)
    ro, rs = reference(q, k, v, g, s0)
    assert rel(o, ro) < 1e-5 and rel(s, rs) < 1e-5


cuda = pytest.mark.cuda


def _skip_without_triton():
    if not kernels.triton_available():
        pytest.skip("triton not installed")


@cuda
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("T,F,D,state", [(1, 16, 9, True), (37, 16, 9, True), (300, 128, 65, False),
                                         (64, 64, 65, True)])
def test_triton_recurrent_matches_reference(gate, T, F, D, state):
    _skip_without_triton()
    q, k, v, g, s0 = inputs(gate, T=T, F=F, D=D, device="cuda", state=state)
    o, s = kernels.triton_recurrent(q, k, v, g, initial_state=s0)
    ro, rs = reference(q, k, v, g, s0)
    assert o.is_cuda and o.dtype == torch.float32 and s.shape == rs.shape
    assert rel(o.cpu(), ro) < 1e-4, rel(o.cpu(), ro)
    assert rel(s.cpu(), rs) < 1e-4, rel(s.cpu(), rs)


@cuda
@pytest.mark.parametrize("gate", ["head", "feature"])
def test_hybrid_on_gpu_uses_the_fast_path_and_matches(monkeypatch, gate):
    """The whole hybrid (8-token window + gated linear part: Mamba's per-head or GLA's per-feature gates),
    prefill then decode through the state, on the picked GPU backend, against the quadratic reference."""
    _skip_without_triton()
    monkeypatch.setenv("LLMCOMP_LINEAR_KERNEL", "auto")
    B, H, T, F, D, W = 1, 2, 150, 32, 16, 8
    gen = torch.Generator().manual_seed(4)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    q, k, v = r(B, H, T, D), r(B, H, T, D), r(B, H, T, D)
    fq, fk = r(B, H, T, F).softmax(-1), r(B, H, T, F).softmax(-1)
    g = torch.nn.functional.logsigmoid(r(B, H, T, F) + 2 if gate == "feature" else r(B, H, T) + 2)
    want = naive_hybrid_attention(q, k, fq, fk, v, g, window=W, scale=0.3)
    c = lambda t: t.cuda()  # noqa: E731
    with torch.no_grad():
        o1, st = hybrid_attention(c(q[:, :, :100]), c(k[:, :, :100]), c(fq[:, :, :100]), c(fk[:, :, :100]),
                                  c(v[:, :, :100]), c(g[:, :, :100]), window=W, scale=0.3)
        outs = [o1]
        for t in range(100, T):
            sl = slice(t, t + 1)
            o, st = hybrid_attention(c(q[:, :, sl]), c(k[:, :, sl]), c(fq[:, :, sl]), c(fk[:, :, sl]),
                                     c(v[:, :, sl]), c(g[:, :, sl]), window=W, scale=0.3, state=st, recurrent=True)
            outs.append(o)
    got = torch.cat(outs, 2).cpu()
    assert kernels.backend_for(c(q), needs_grad=False) == "triton"
    assert rel(got, want) < 1e-4, rel(got, want)


def _skip_without_fla():
    if not kernels.fla_available():
        pytest.skip("flash-linear-attention not installed")


@cuda
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("recurrent", [False, True])
def test_fla_matches_reference_forward_and_backward(gate, recurrent):
    _skip_without_fla()
    T = 5 if recurrent else 200
    q, k, v, g, s0 = inputs(gate, T=T, F=64, D=65, device="cuda")
    leaves = [t.requires_grad_() for t in (q, k, v, s0)] + ([g.requires_grad_()] if g is not None else [])
    core = kernels.fla_recurrent if recurrent else kernels.fla_chunk
    o, s = core(q, k, v, g, initial_state=s0)
    ro, rs = reference(q, k, v, g, s0)
    assert rel(o.detach().cpu(), ro) < 2e-2, rel(o.detach().cpu(), ro)
    assert rel(s.detach().cpu(), rs) < 2e-2, rel(s.detach().cpu(), rs)
    if recurrent:
        return
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(o.shape, generator=gen).cuda()
    got = torch.autograd.grad((o * w).sum() + (s * s).sum(), leaves)
    dl = [t.detach().cpu().double().requires_grad_() for t in leaves]
    q2, k2, v2, s2 = dl[:4]
    g2 = dl[4] if g is not None else None
    o2, st2 = naive_linear_attention(q2, k2, v2, g2, initial_state=s2)
    want = torch.autograd.grad((o2 * w.cpu().double()).sum() + (st2 * st2).sum(), dl)
    for a, b in zip(got, want):
        assert rel(a.cpu(), b) < 2e-2, rel(a.cpu(), b)
