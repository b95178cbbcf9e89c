import itertools

import pytest
import torch

from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats import FORMATS, Uniform
from llmcomp.formats.bitpack import pack_bits, packed_len, unpack_bits
from llmcomp.quant.rtn import rtn_fields

BITS = [2, 3, 4, 8]
GROUPS = [0, 32, 64, 128]


@pytest.mark.parametrize("bits", range(1, 9), ids=lambda b: f"b{b}")
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 576], ids=lambda n: f"n{n}")
def test_bitpack_round_trip_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (5, n), generator=g, dtype=torch.int64).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_len(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_bitpack_layout_is_little_endian_stream():
    # 4-bit: two codes a byte, low nibble first; 8-bit: the codes themselves.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.uint8)
    assert pack_bits(codes, 4).tolist() == [[0x21, 0x43, 0x65, 0xF7]]
    assert torch.equal(pack_bits(codes, 8), codes)
    # 3-bit: code i at bits [3i, 3i+3)
    c3 = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    assert pack_bits(c3, 3).tolist() == [[7, 0, 0]]
    c3 = torch.tensor([[0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.uint8)  # bit 6
    assert pack_bits(c3, 3).tolist() == [[64, 0, 0]]


@pytest.mark.parametrize("bits,group,sym", list(itertools.product(BITS, GROUPS, [True, False])),
                         ids=lambda v: str(v))
def test_uniform_pack_unpack_exact(bits, group, sym):
    fmt = Uniform(bits=bits, group_size=group, symmetric=sym)
    w = torch.randn(24, 576, generator=torch.Generator().manual_seed(bits + group))
    fields = rtn_fields(w, fmt)
    tensors = fmt.pack(fields)
    specs = fmt.param_specs(24, 576)
    assert set(tensors) == set(specs)
    for name, t in tensors.items():
        assert tuple(t.shape) == specs[name].shape and t.dtype == specs[name].dtype, name
    back = fmt.unpack(tensors, 576)
    assert torch.equal(back["codes"], fields["codes"])
    assert torch.equal(back["scale"], fields["scale"].to(torch.float16))
    assert torch.equal(back["zero"].float(), fields["zero"].float())


@pytest.mark.parametrize("bits", BITS)
def test_rtn_error_bounded_by_step(bits):
    # Inside the range the error is at most half a step; the rounded integer zero can push the
    # extreme weight half a step past the grid, so the bound at the edges is one step.
    fmt = Uniform(bits=bits, group_size=64)
    w = torch.randn(16, 200)  # 200 = 3 full groups of 64 + a ragged group of 8
    t = fmt.pack(rtn_fields(w, fmt))
    deq = fmt.dequantize(t, 200)
    step = fmt.expand(t["weight_scale"].float(), 200)
    err = (deq - w).abs()
    assert (err <= step + 1e-5).all()
    assert (err <= step / 2 + 1e-5).float().mean() > 0.98


def test_more_bits_less_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    errs = []
    for bits in (2, 3, 4, 8):
        fmt = Uniform(bits=bits, group_size=64)
        errs.append(float((fmt.dequantize(fmt.pack(rtn_fields(w, fmt)), 256) - w).pow(2).mean()))
    assert errs == sorted(errs, reverse=True)


def test_ragged_last_group_has_its_own_scale():
    fmt = Uniform(bits=4, group_size=128)
    assert fmt.n_groups(576) == 5
    w = torch.randn(4, 576)
    w[:, 512:] *= 100  # the ragged last group (64 columns) is much larger
    t = fmt.pack(rtn_fields(w, fmt))
    assert (t["weight_scale"][:, 4].float() > 20 * t["weight_scale"][:, 3].float()).all()


def test_bits_per_weight_counts_scales():
    assert Uniform(bits=4, group_size=128, symmetric=True).bits_per_weight(1024, 1024) == pytest.approx(4 + 16 / 128)
    assert Uniform(bits=4, group_size=128).bits_per_weight(1024, 1024) == pytest.approx(4 + 32 / 128)


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=9), dict(group_size=-1), dict(group_size=12)])
def test_uniform_rejects_bad_spec(kwargs):
    with pytest.raises(UserError):
        Uniform(**kwargs)


def test_registry_knows_uniform():
    assert FORMATS.get("uniform") is Uniform
    with pytest.raises(UserError, match="Unknown weight format"):
        FORMATS.get("nope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_quantlinear_equals_dequantize_then_matmul(dtype, bias):
    fmt = Uniform(bits=3, group_size=32)
    lin = torch.nn.Linear(96, 40, bias=bias)
    t = fmt.pack(rtn_fields(lin.weight.data, fmt))
    q = QuantLinear.from_packed(fmt, t, 96, lin.bias.data if bias else None).to(dtype)
    x = torch.randn(3, 5, 96, dtype=dtype)
    ref = torch.nn.functional.linear(x, fmt.dequantize(t, 96, dtype=dtype), lin.bias.data.to(dtype) if bias else None)
    assert torch.equal(q(x), ref)
    # packed buffers keep their storage dtypes when the module is cast
    assert q.weight_packed.dtype == torch.uint8


def test_quantlinear_on_meta_has_format_shapes():
    fmt = Uniform(bits=4, group_size=128)
    q = QuantLinear(576, 192, fmt, device="meta")
    assert q.weight_packed.shape == (192, 288) and q.weight_scale.shape == (192, 5)


def test_dequant_cache_follows_packed_tensors():
    fmt = Uniform(bits=4, group_size=32)
    w = torch.randn(8, 64)
    q = QuantLinear.from_packed(fmt, fmt.pack(rtn_fields(w, fmt)), 64)
    x = torch.randn(2, 64)
    with torch.no_grad():
        y1 = q(x)
        q.weight_packed.zero_()  # in-place edit must not be hidden by the cache
        y2 = q(x)
    ref = torch.nn.functional.linear(x, q.dequantize())
    assert not torch.equal(y1, y2) and torch.equal(y2, ref)


def test_dequant_cache_dropped_by_a_state_dict_loaded_in_inference_mode():
    fmt = Uniform(bits=4, group_size=32)
    w = torch.randn(8, 64)
    x = torch.randn(2, 64)
    with torch.inference_mode():  # inference tensors: no version counter for the cache to see the load by
        q = QuantLinear.from_packed(fmt, fmt.pack(rtn_fields(w, fmt)), 64)
        y1 = q(x)
        q.load_state_dict(QuantLinear.from_packed(fmt, fmt.pack(rtn_fields(-w, fmt)), 64).state_dict())
        y2 = q(x)
        ref = torch.nn.functional.linear(x, q.dequantize())
    assert not torch.equal(y1, y2) and torch.equal(y2, ref)
