"""Linear attention math: naive == chunked == recurrent (outputs and gradients, float64), and the hybrid
with a sliding softmax window in one pass, in pieces (prefill + decode through the state) and token by
token, against its quadratic reference."""
import pytest
import torch

from llmcomp.linearize.attention import (chunk_linear_attention, hybrid_attention, naive_hybrid_attention,
                                         naive_linear_attention, recurrent_linear_attention)

B, H, T, F, D = 2, 3, 37, 5, 4


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors run fastest on one thread (no oversubscription on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
GATES = ["none", "head", "feature"]


def inputs(gate: str, seed=0, state=True):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, H, T, F).softmax(-1), r(B, H, T, F).softmax(-1), r(B, H, T, D)
    g = {"none": None, "head": torch.nn.functional.logsigmoid(r(B, H, T) + 2),
         "feature": torch.nn.functional.logsigmoid(r(B, H, T, F) + 1)}[gate]
    s0 = r(B, H, F, D) if state else None
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, g, s0)]


def grads(out_and_state, leaves, seed=1):
    o, s = out_and_state
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (s * s).sum()
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


def grad_all(loss, leaves):
    out = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(t) if d is None else d for d, t in zip(out, leaves)]


def rel(a, b):
    """Relative error; gradients that cancel to rounding noise (e.g. an unused weight) compare absolutely."""
    return ((a - b).norm() / b.norm().clamp_min(1e-3)).item()


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_chunked_equals_recurrent_equals_naive(gate, chunk):
    q, k, v, g, s0 = leaves = inputs(gate)
    ref = naive_linear_attention(q, k, v, g, s0)
    ref_grads = grads(ref, leaves)
    for form in (lambda: chunk_linear_attention(q, k, v, g, s0, chunk_size=chunk),
                 lambda: recurrent_linear_attention(q, k, v, g, s0)):
        out = form()
        assert rel(out[0], ref[0]) < 1e-12 and rel(out[1], ref[1]) < 1e-12
        for a, b in zip(grads(out, leaves), ref_grads):
            assert rel(a, b) < 1e-12


def test_gate_decays_the_state():
    """A gate of log(0.5) halves an old token's weight every step; a strong gate forgets it."""
    q = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    k = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).view(1, 1, 3, 1)
    v = torch.ones(1, 1, 3, 1, dtype=torch.float64)
    g = torch.full((1, 1, 3), torch.log(torch.tensor(0.5)).item(), dtype=torch.float64)
    o, _ = chunk_linear_attention(q, k, v, g)
    assert torch.allclose(o.flatten(), torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))


def hybrid_inputs(gate, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k = r(B, H, T, D), r(B, H, T, D)
    fq, fk = r(B, H, T, F).softmax(-1), r(B, H, T, F).softmax(-1)
    v = r(B, H, T, D)
    g = {"none": None, "head": torch.nn.functional.logsigmoid(r(B, H, T) + 2),
         "feature": torch.nn.functional.logsigmoid(r(B, H, T, F) + 1)}[gate]
    a, b = torch.rand(H, generator=gen, dtype=torch.float64), torch.rand(H, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() if t is not None else None for t in (q, k, fq, fk, v, g, a, b)]


def run_pieces(leaves, pieces, **kw):
    """Feed the sequence in pieces through the state; pieces of one token use the recurrent core."""
    q, k, fq, fk, v, g, a, b = leaves
    state, outs, start = None, [], 0
    for n in pieces:
        sl = slice(start, start + n)
        o, state = hybrid_attention(q[:, :, sl], k[:, :, sl], fq[:, :, sl], fk[:, :, sl], v[:, :, sl],
                                    None if g is None else g[:, :, sl], window_weight=a, linear_weight=b,
                                    state=state, recurrent=n == 1, **kw)
        outs.append(o)
        start += n
    assert start == T
    return torch.cat(outs, 2), state


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("window", [0, 1, 6])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "mixed"])
def test_hybrid_one_pass_pieces_and_decode_match_the_reference(gate, window, normalize):
    leaves = hybrid_inputs(gate)
    q, k, fq, fk, v, g, a, b = leaves
    kw = dict(window=window, scale=0.7, normalize=normalize)
    ref = naive_hybrid_attention(q, k, fq, fk, v, g, window_weight=a, linear_weight=b, **kw)
    live = [t for t in leaves if t is not None]
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    ref_grads = grad_all((ref * w).sum(), live)
    for pieces in ([T], [5, 13, 19], [26] + [1] * 11, [2, 3, 4, 28]):  # pieces shorter than the window too
        out, state = run_pieces(leaves, pieces, chunk_size=8, **kw)
        assert rel(out, ref) < 1e-10, pieces
        assert state.seen == T and state.k.shape[2] == window
        for x, y in zip(grad_all((out * w).sum(), live), ref_grads):
            assert rel(x, y) < 1e-10, pieces


def test_window_covering_the_sequence_is_softmax_attention():
    q, k, fq, fk, v, g, a, b = hybrid_inputs("none")
    out, _ = hybrid_attention(q, k, fq, fk, v, window=T, scale=0.5)
    ref = torch.softmax((q @ k.transpose(-1, -2) * 0.5).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1) @ v
    assert rel(out, ref) < 1e-12


def test_decode_state_does_not_grow_with_the_context():
    q, k, fq, fk, v, g, a, b = hybrid_inputs("feature")
    _, s1 = run_pieces([t.detach() if t is not None else None for t in (q, k, fq, fk, v, g, a, b)], [10] + [1] * 27,
                       window=4)
    _, s0 = hybrid_attention(q[:, :, :10], k[:, :, :10], fq[:, :, :10], fk[:, :, :10], v[:, :, :10],
                             g[:, :, :10], window=4)
    assert s1.nbytes() == s0.nbytes()
