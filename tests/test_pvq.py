"""Pyramid vector quantization: exact index enumeration, greedy projection, the ``pyramid`` format, PVQ."""
import itertools

import pytest
import torch
from torch import nn

from llmcomp.core.config import from_json, to_json
from llmcomp.errors import UserError
from llmcomp.formats import FORMATS, hadamard
from llmcomp.formats.pvq_index import decode, encode, index_bits, pyramid_size, pyramid_sizes, to_int
from llmcomp.formats.pyramid import Pyramid, project
from llmcomp.quant.pvq import PVQConfig, PVQQuantizer, pyramid_for_bits, reachable_bits
from tests.test_gptq import correlated_inputs
from tests.test_vq import hessian


def all_points(n, k):
    return torch.tensor([y for y in itertools.product(range(-k, k + 1), repeat=n) if sum(map(abs, y)) == k])


# -- enumeration --------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(1, 1), (1, 4), (2, 1), (2, 5), (3, 4), (4, 3), (5, 2), (6, 3)])
def test_index_is_a_bijection_onto_range(n, k):
    pts = all_points(n, k)
    assert len(pts) == pyramid_size(n, k) == pyramid_sizes(n, k)[k]
    idx = encode(pts, k)
    assert sorted(to_int(idx)) == list(range(len(pts)))  # every index once: a bijection onto [0, V)
    assert torch.equal(decode(idx, n, k).long(), pts)
    assert index_bits(n, k) == (len(pts) - 1).bit_length()


@pytest.mark.parametrize("n,k", [(32, 41), (64, 39), (64, 87), (128, 60), (256, 770), (256, 1024)],
                         ids=lambda v: str(v))
def test_index_beyond_64_bits(n, k):
    """Up to the widest indices the format takes (256 × 1024: 1132 bits, past float64's range of ~2¹⁰²⁴)."""
    g = torch.Generator().manual_seed(n + k)
    y = torch.zeros(500, n, dtype=torch.long)
    y.scatter_add_(1, torch.randint(0, n, (500, k), generator=g), torch.ones(500, k, dtype=torch.long))
    y = y * torch.where(torch.randn(500, n, generator=g) < 0, -1, 1)
    y[0] = 0
    y[0, 0] = -k  # the last point of the order (first coordinate 0, +1, −1, …, −k)
    y[1] = 0
    y[1, -1] = k  # the first point: zeros, then +k
    idx = encode(y, k)
    values = to_int(idx)
    assert values[0] == pyramid_size(n, k) - 1 and values[1] == 0
    assert all(0 <= v < pyramid_size(n, k) for v in values)
    assert torch.equal(decode(idx, n, k).long(), y)


def test_greedy_projection_lands_on_the_pyramid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g) * torch.rand(400, 1, generator=g) ** 3
    x[0] = 0  # zero row
    x[1, 1:] = 0  # one non-zero entry
    x[2] = torch.tensor([1e-30] * 16)
    x[3] = x[3] * 1e20
    for k in (1, 2, 7, 16, 50, 200):
        y = project(x, k)
        assert y.dtype == torch.int16 and bool((y.abs().sum(1) == k).all()), k
        nz = x != 0
        assert bool((torch.sign(y[nz].float()) * torch.sign(x[nz]) >= 0).all())  # signs follow x


@pytest.mark.parametrize("n,k", [(3, 4), (4, 6), (6, 3)])
def test_greedy_projection_near_brute_force(n, k):
    """Against every point of small pyramids: the greedy search (not an exact search) finds the best
    cosine for nearly every input and is never far off."""
    pts = all_points(n, k).float()
    x = torch.randn(300, n, generator=torch.Generator().manual_seed(1))
    best = ((x @ pts.T) / pts.norm(dim=1)).max(1).values / x.norm(dim=1)
    y = project(x, k).float()
    got = (x * y).sum(1) / y.norm(dim=1) / x.norm(dim=1)
    assert bool((got <= best + 1e-6).all())
    assert float((got > best - 1e-6).float().mean()) > 0.9 and float((best - got).max()) < 0.05


# -- the format ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [Pyramid(dim=8, pulses=4, norm_bits=4), Pyramid(dim=64, pulses=87),
                                 Pyramid(dim=16, pulses=9, norm_bits=6, rotate=True, seed=3)],
                         ids=["N8K4", "N64K87-3limbs", "N16K9-hadamard"])
def test_pyramid_round_trip(fmt):
    out_f, in_f = 128, 12
    B = out_f // fmt.dim
    g = torch.Generator().manual_seed(0)
    groups = project(torch.randn(B * in_f, fmt.dim, generator=g), fmt.pulses)  # (b, j) order
    y = groups.reshape(B, in_f, fmt.dim).transpose(1, 2).reshape(out_f, in_f)  # group (b, j): rows bN.., column j
    f = {"pulses": y, "norm_code": torch.randint(0, 2**fmt.norm_bits, (B, in_f), generator=g),
         "norm_levels": torch.rand(2**fmt.norm_bits, generator=g).half().float()}
    t = fmt.pack(f)
    specs = fmt.param_specs(out_f, in_f)
    assert set(t) == set(specs) and all(t[k].shape == specs[k].shape and t[k].dtype == specs[k].dtype for k in t)
    back = fmt.unpack(t, in_f)
    for k in f:
        assert torch.equal(back[k].to(f[k].dtype), f[k]), k
    # reference written per group, independent of the format's reshapes
    ref = torch.zeros(out_f, in_f)
    for b in range(B):
        for j in range(in_f):
            v = y[b * fmt.dim:(b + 1) * fmt.dim, j].float()
            ref[b * fmt.dim:(b + 1) * fmt.dim, j] = f["norm_levels"][f["norm_code"][b, j]] * v / v.norm()
    ref = hadamard.unrotate(ref, fmt.seed) if fmt.rotate else ref
    assert torch.allclose(fmt.dequantize(t, in_f), ref, atol=1e-6)
    exact = (B * -(-in_f * (fmt.index_bits + fmt.norm_bits) // 8) * 8 + 16 * 2**fmt.norm_bits) / (out_f * in_f)
    assert fmt.bits_per_weight(out_f, in_f) >= fmt.code_bits
    assert abs(fmt.bits_per_weight(out_f, in_f) - exact) <= 16 / (fmt.dim * in_f)  # ≤ a byte a block a field
    assert from_json(to_json(fmt)) == fmt and FORMATS.get("pyramid") is Pyramid


def test_hadamard_rotation_is_orthogonal_and_undone():
    g = torch.Generator().manual_seed(0)
    for n in (576, 1536, 24, 7):
        w = torch.randn(5, n, generator=g)
        r = hadamard.rotate(w, 11)
        assert torch.allclose(r.norm(dim=1), w.norm(dim=1), rtol=1e-5)
        assert torch.allclose(hadamard.unrotate(r, 11), w, atol=1e-5)
        assert not torch.allclose(hadamard.rotate(w, 12), r)  # the seed matters


# -- bits per weight ----------------------------------------------------------------------------------

def test_pyramid_for_bits_picks_nearest():
    for bits in (2, 2.25, 3, 3.25):
        fmt = pyramid_for_bits(bits)
        assert abs(fmt.code_bits - bits) <= 0.05 and fmt.dim == 64
        assert fmt.code_bits == min((b for b, _ in reachable_bits(64)), key=lambda b: abs(b - bits))
    assert pyramid_for_bits(2, dim=8) == Pyramid(dim=8, pulses=4, norm_bits=4)


@pytest.mark.parametrize("bits,dim,message", [(0.05, None, "nearest reachable: 0.234"),
                                              (2.5, 8, "nearest reachable: 2.375, 2.625"),
                                              (9, None, "nearest reachable: 6.453"),
                                              (2, 300, "from 2 to 256")])
def test_unreachable_bits_name_the_nearest(bits, dim, message):
    with pytest.raises(UserError, match=message):
        pyramid_for_bits(bits, dim)


def test_bad_pyramid_shapes():
    W, X = torch.randn(48, 8), correlated_inputs(64, 8)
    lin = nn.Linear(8, 48, bias=False)
    lin.weight.data = W
    with pytest.raises(UserError, match="vector length 32 does not divide the output dimension 48"):
        PVQQuantizer(PVQConfig(format=pyramid_for_bits(2, 32))).quantize_linear("l", lin, hessian(X))
    with pytest.raises(UserError, match="pulses"):
        Pyramid(dim=8, pulses=0)


# -- quantization -------------------------------------------------------------------------------------

def pvq(W, X, **kw):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False).requires_grad_(False)
    lin.weight.data = W.clone()
    return PVQQuantizer(PVQConfig(**kw)).quantize_linear("layer", lin, hessian(X))


def test_hessian_feedback_lowers_output_error():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    X = correlated_inputs(512, 128)
    fmt = pyramid_for_bits(2.0625, dim=16)
    with_h = pvq(W, X, format=fmt).metrics["out_err_rel"]
    plain = PVQQuantizer(PVQConfig(format=fmt, hessian=False))
    assert not plain.needs_calibration
    lin = nn.Linear(128, 64, bias=False).requires_grad_(False)
    lin.weight.data = W.clone()
    Q = plain.quantize_linear("layer", lin).module.dequantize()
    D, H = Q - W, hessian(X).H
    plain_err = float(((D @ H) * D).sum() / ((W @ H) * W).sum())
    assert with_h < 0.8 * plain_err, (with_h, plain_err)


def test_more_pulses_lower_error_and_rotation_round_trips():
    torch.manual_seed(0)
    W = torch.randn(32, 64) * torch.rand(1, 64) * 3
    X = correlated_inputs(256, 64)
    errs = [pvq(W, X, format=pyramid_for_bits(b, dim=8, rotate=True)).metrics["out_err_rel"] for b in (2, 3, 4)]
    assert errs[0] > errs[1] > errs[2]
    res = pvq(W, X, format=Pyramid(dim=16, pulses=200, norm_bits=8, rotate=True))
    assert torch.allclose(res.module.dequantize(), W, atol=0.05 * float(W.abs().max()))
