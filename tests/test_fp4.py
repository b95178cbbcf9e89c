"""FP4 formats: minifloat tables, E8M0/E4M3 scale rounding, pack/unpack, RTN, artifacts, CLI flags."""
import math

import pytest
import torch
from typer.testing import CliRunner

import llmcomp
from llmcomp import api
from llmcomp.cli.app import app
from llmcomp.cli.methods import build_quant_config
from llmcomp.core.config import from_json, to_json
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats import FORMATS
from llmcomp.formats.fp4 import FP4, MXFP4, NVFP4
from llmcomp.formats.minifloat import (E2M1, Minifloat, e4m3_encode, e8m0_decode, e8m0_encode,
                                       floor_log2)
from llmcomp.quant.base import sqnr_db
from llmcomp.quant.fp4 import FP4Config, FP4Quantizer, fp4_fields

FMTS = [MXFP4(), NVFP4(), FP4(), FP4(group_size=32), FP4(group_size=0), FP4(group_size=64, element=Minifloat(1, 2)),
        FP4(group_size=64, element=Minifloat(3, 0))]
IDS = ["mxfp4", "nvfp4", "fp4-g128", "fp4-g32", "fp4-perchan", "fp4-e1m2", "fp4-e3m0"]


def raw(t):
    """float8 tensors compared by their bits (torch.equal has no float8 kernel)."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def rand(out, inp, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))


# -- the element codec -------------------------------------------------------------------------
# OCP MX spec v1.0, table "FP4 (E2M1)": code S.EE.M → value
E2M1_TABLE = {0b0000: 0.0, 0b0001: 0.5, 0b0010: 1.0, 0b0011: 1.5, 0b0100: 2.0, 0b0101: 3.0, 0b0110: 4.0, 0b0111: 6.0}
E2M1_TABLE.update({c | 0b1000: -v for c, v in E2M1_TABLE.items()})


@pytest.mark.parametrize("code", range(16), ids=lambda c: f"{c:04b}")
def test_e2m1_every_code(code):
    value = E2M1_TABLE[code]
    assert E2M1.decode(torch.tensor([code], dtype=torch.uint8)).item() == value
    back = E2M1.encode(torch.tensor([value])).item()
    assert back == (0 if value == 0 else code)  # zero is always written with the sign bit clear


def test_e2m1_constants():
    assert E2M1.bits == 4 and E2M1.bias == 1 and E2M1.max_value == 6.0 and E2M1.emax == 2


def test_e2m1_round_half_to_even_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 5.01, 6.9, 1e9, -0.25, -5.0, -7.0, -1e-30])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.5, 6.0, 6.0, 6.0, 0.0, -4.0, -6.0, 0.0]
    assert E2M1.decode(E2M1.encode(x)).tolist() == want


@pytest.mark.parametrize("spec,bias,mags", [
    ((1, 2), 0, [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]),
    ((1, 2), 1, [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75]),
    ((3, 0), 3, [0, 0.25, 0.5, 1, 2, 4, 8, 16]),
    ((2, 1), 2, [0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3]),
], ids=["e1m2", "e1m2-b1", "e3m0", "e2m1-b2"])
def test_other_4bit_tables(spec, bias, mags):
    mf = Minifloat(*spec, bias=bias)
    assert mf.magnitudes().tolist() == mags
    v = mf.values()
    assert torch.equal(mf.decode(mf.encode(v)), v)  # -0.0 == 0.0


def test_default_bias_is_ieee_like():
    assert [Minifloat(e, m).bias for e, m in [(2, 1), (1, 2), (3, 0), (4, 3), (5, 2)]] == [1, 0, 3, 7, 15]


@pytest.mark.parametrize("spec,dtype,lim", [((4, 3, 7), torch.float8_e4m3fn, 448.0),
                                             ((5, 2, 15), torch.float8_e5m2, 57344.0)], ids=["e4m3", "e5m2"])
def test_codec_rounds_like_torch_float8(spec, dtype, lim):
    # the generic codec agrees bit-for-bit with torch's RNE casts inside the finite range (ties included)
    mf = Minifloat(*spec)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, generator=g) * torch.exp2(torch.randint(-24, 16, (50_000,), generator=g).float())
    grid = mf.values()
    ties = (grid[1:8] + grid[:7]) / 2  # exact midpoints among subnormals and normals
    x = torch.cat([x, ties, -ties, (grid[64:72] + grid[65:73]) / 2]).clamp(-lim, lim)
    assert torch.equal(mf.decode(mf.encode(x)), x.to(dtype).float())


@pytest.mark.parametrize("kwargs", [dict(exp_bits=0, man_bits=0), dict(exp_bits=4, man_bits=4),
                                    dict(exp_bits=2, man_bits=1, bias=200), dict(exp_bits=-1, man_bits=3)])
def test_minifloat_rejects_bad_spec(kwargs):
    with pytest.raises(UserError):
        Minifloat(**kwargs)


# -- scales -------------------------------------------------------------------------------------
def test_floor_log2_exact_at_edges():
    x = torch.tensor([1.0, 0.99999994, 2.0**20 - 1, 2.0**20, 6.0, 8.0, 2.0**-126, 2.0**-149, 3 * 2.0**-140,
                      torch.finfo(torch.float32).max])
    assert floor_log2(x).tolist() == [0, -1, 19, 20, 2, 3, -126, -149, -139, 127]


def test_e8m0_encode_decode():
    assert e8m0_encode(torch.tensor([0, -127, 127, -300, 300, 5])).tolist() == [127, 0, 254, 0, 254, 132]
    d = e8m0_decode(torch.tensor([127, 0, 254, 132, 255], dtype=torch.uint8))
    assert d[:4].tolist() == [1.0, 2.0**-127, 2.0**127, 32.0] and math.isnan(d[4])


def mx_block(values):
    w = torch.zeros(1, 32)
    w[0, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return w


@pytest.mark.parametrize("values,scale_bits,decoded", [
    ([0.0], 0, [0.0]),                                        # zero block: smallest scale, all codes 0
    ([6.0, -1.5, 0.25], 127, [6.0, -1.5, 0.0]),               # amax 6 → 2^(2-2) = 1; 0.25 ties to 0
    ([4.0, 1.0], 127, [4.0, 1.0]),                            # amax 4 → same exponent as 6
    ([7.0, 0.75], 127, [6.0, 1.0]),                           # (6, 8) saturates to 6, as the spec says
    ([7.99, 3.3], 127, [6.0, 3.0]),
    ([8.0, 1.0], 128, [8.0, 1.0]),                            # amax 8 → scale 2
    ([0.75, 0.1], 124, [0.75, 0.125]),                        # floor(log2 .75) = -1 → 2^-3
    ([1e-40], 0, [0.0]),                                      # subnormal amax: exponent clamps to -127
    ([3e38, 1e38], 252, [2.0**127 * 1.5, 2.0**126]),          # near float32 max: 2^(127-2)
], ids=["zero", "amax6", "amax4", "sat7", "sat8minus", "amax8", "small", "subnormal", "huge"])
def test_mxfp4_scale_rounding(values, scale_bits, decoded):
    fmt = MXFP4()
    w = mx_block(values)
    f = fp4_fields(w, fmt)
    assert f["scale"].dtype == torch.uint8 and f["scale"].tolist() == [[scale_bits]]
    deq = fmt.dequantize(fmt.pack(f), 32)
    assert deq[0, : len(values)].tolist() == pytest.approx(decoded, rel=1e-6)
    assert (deq[0, len(values):] == 0).all()


def test_e4m3_encode_edges():
    x = torch.tensor([0.0, 448.0, 464.0, 500.0, 1e30, -1e30, 2.0**-6, 2.0**-9, 2.0**-10, 1.5 * 2.0**-10, 2.0**-11,
                      0.3, 17.0, 1.0 + 1 / 16])
    want = [0.0, 448.0, 448.0, 448.0, 448.0, -448.0, 2.0**-6, 2.0**-9, 0.0, 2.0**-9, 0.0, 0.3125, 16.0, 1.0]
    y = e4m3_encode(x)
    assert y.dtype == torch.float8_e4m3fn and y.float().tolist() == want


def test_nvfp4_scales():
    fmt = NVFP4()
    w = torch.zeros(2, 32)
    w[0, 0] = 3.0  # tensor amax → block scale lands on E4M3's max
    w[0, 16] = 3.0 * 2.0**-3  # a block 8x smaller → scale 56
    w[1, 0] = 3.0 * 2.0**-20  # far below the smallest E4M3 subnormal relative to amax → scale 0
    f = fp4_fields(w, fmt)
    g = f["global_scale"]
    assert g.dtype == torch.float32 and g.shape == (1,) and g.item() == pytest.approx(3.0 / (6 * 448), rel=1e-7)
    s = f["scale"].float()
    assert s[0, 0].item() == 448.0 and s[0, 1].item() == 56.0 and s[1, 0].item() == 0.0 and s[1, 1].item() == 0.0
    deq = fmt.dequantize(fmt.pack(f), 32)
    assert deq[0, 0].item() == pytest.approx(3.0, rel=1e-6) and deq[0, 16].item() == pytest.approx(0.375, rel=1e-6)
    assert deq[1].abs().sum() == 0  # the underflowed block and the zero block dequantize to 0


def test_nvfp4_zero_tensor():
    fmt = NVFP4()
    f = fp4_fields(torch.zeros(3, 16), fmt)
    assert f["global_scale"].item() == 1.0 and (f["scale"].float() == 0).all() and (f["codes"] == 0).all()
    assert (fmt.dequantize(fmt.pack(f), 16) == 0).all()


def test_fp4_ragged_last_group_has_its_own_scale():
    fmt = FP4(group_size=128)
    w = rand(4, 576)
    w[:, 512:] *= 100
    t = fmt.pack(fp4_fields(w, fmt))
    assert t["weight_scale"].shape == (4, 5)
    assert (t["weight_scale"][:, 4].float() > 20 * t["weight_scale"][:, 3].float()).all()


# -- storage ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
@pytest.mark.parametrize("shape", [(8, 64), (24, 576), (5, 1536)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_pack_unpack_exact(fmt, shape):
    w = rand(*shape, seed=shape[1])
    fields = fp4_fields(w, fmt)
    tensors = fmt.pack(fields)
    specs = fmt.param_specs(*shape)
    assert set(tensors) == set(specs)
    for name, t in tensors.items():
        assert tuple(t.shape) == specs[name].shape and t.dtype == specs[name].dtype, name
    assert tensors["weight_packed"].shape == (shape[0], shape[1] // 2)  # two codes a byte
    back = fmt.unpack(tensors, shape[1])
    assert torch.equal(back["codes"], fields["codes"])
    for k in fields:
        if k != "codes":
            assert torch.equal(raw(back[k]), raw(fields[k].to(back[k].dtype))), k
    # and the format's own pack of the unpacked fields reproduces the bytes
    again = fmt.pack(back)
    assert all(torch.equal(again[k].view(torch.uint8), tensors[k].view(torch.uint8)) for k in tensors)


def test_low_nibble_first():
    fmt = MXFP4()
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1] = 0.5, -6.0  # codes 0b0001, 0b1111 with scale 2^0
    w[0, 2] = 6.0
    t = fmt.pack(fp4_fields(w, fmt))
    assert t["weight_packed"][0, :2].tolist() == [0xF1, 0x07]


@pytest.mark.parametrize("fmt", FMTS, ids=IDS)
def test_dequantize_error_bound(fmt):
    w = rand(32, 576, seed=3) * 0.02
    f = fp4_fields(w, fmt)
    deq = fmt.dequantize(fmt.pack(f), 576)
    S = fmt.expand(fmt.block_scale(f), 576)
    mags = fmt.element.magnitudes()
    gap = (mags[1:] - mags[:-1]).max().item()
    q = w / S
    inside = q.abs() <= fmt.element.max_value
    err = (deq - w).abs()
    # inside the grid: at most half the widest gap; beyond it (saturation): the distance to the max
    assert (err[inside] <= (gap / 2) * S[inside] * (1 + 1e-6)).all()
    assert torch.allclose(err[~inside], (q.abs()[~inside] - fmt.element.max_value) * S[~inside], rtol=1e-5)
    # SQNR floor (dB) on Gaussian weights: E3M0's power-of-two grid is coarse at the top
    assert sqnr_db(w, deq) > {"e3m0": 12}.get(fmt.element.describe(), 17)


def test_nvfp4_beats_mxfp4_on_gaussian():
    w = rand(64, 1536, seed=4)
    err = {type(f).__name__: sqnr_db(w, f.dequantize(f.pack(fp4_fields(w, f)), 1536)) for f in (MXFP4(), NVFP4())}
    assert err["NVFP4"] > err["MXFP4"]


@pytest.mark.parametrize("fmt", FMTS[:3], ids=IDS[:3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_quantlinear_equals_dequantize_then_matmul(fmt, dtype, bias):
    lin = torch.nn.Linear(128, 40, bias=bias)
    t = fmt.pack(fp4_fields(lin.weight.data, fmt))
    q = QuantLinear.from_packed(fmt, t, 128, lin.bias.data if bias else None).to(dtype)
    x = torch.randn(3, 5, 128, dtype=dtype)
    ref = torch.nn.functional.linear(x, fmt.dequantize(t, 128, dtype=dtype), lin.bias.data.to(dtype) if bias else None)
    assert torch.equal(q(x), ref)
    assert {n: b.dtype for n, b in q.packed_tensors().items()} == {n: s.dtype for n, s in fmt.param_specs(40, 128).items()}


@pytest.mark.parametrize("fmt", FMTS[:3], ids=IDS[:3])
def test_quantlinear_on_meta(fmt):
    q = QuantLinear(576, 192, fmt, device="meta")
    assert q.weight_packed.shape == (192, 288)
    assert q.weight_scale.shape == (192, fmt.n_blocks(576))


def test_bits_per_weight():
    assert MXFP4().bits_per_weight(1536, 576) == 4.25
    assert NVFP4().bits_per_weight(1536, 576) == pytest.approx(4.5 + 32 / (1536 * 576))
    assert FP4(group_size=32).bits_per_weight(576, 576) == 4.5


def test_registry_and_config_round_trip():
    assert FORMATS.get("mxfp4") is MXFP4 and FORMATS.get("nvfp4") is NVFP4 and FORMATS.get("fp4") is FP4
    for fmt in FMTS:
        cfg = FP4Config(format=fmt, ignore=("lm_head", "re:.*down_proj"))
        back = from_json(to_json(cfg))
        assert back == cfg and type(back.format) is type(fmt)


@pytest.mark.parametrize("make", [lambda: MXFP4(block_size=0), lambda: NVFP4(block_size=15), lambda: FP4(group_size=-1)],
                         ids=["mx0", "nv15", "fp4-neg"])
def test_rejects_bad_block(make):
    with pytest.raises(UserError, match="block size|group size"):
        make()


def test_non_spec_block_is_described():
    assert MXFP4().describe() == "mxfp4 (e2m1, e8m0 scale per 32)"
    assert "spec: 16" in NVFP4(block_size=32).describe()
    fmt = MXFP4(block_size=16)
    w = rand(4, 64)
    assert fmt.pack(fp4_fields(w, fmt))["weight_scale"].shape == (4, 4)


def test_fp4_rejects_non_4bit_element():
    with pytest.raises(UserError, match="4-bit element"):
        FP4(element=Minifloat(4, 3))


@pytest.mark.parametrize("fmt,block", [(MXFP4(), 32), (NVFP4(), 16)], ids=["mxfp4", "nvfp4"])
def test_block_must_divide_input_dim(fmt, block):
    with pytest.raises(UserError, match=f"model.layers.0.mlp.up_proj: .*multiple of its block size {block}, got 40"):
        FP4Quantizer(FP4Config(format=fmt)).quantize_linear("model.layers.0.mlp.up_proj", torch.nn.Linear(40, 8))


# -- artifact and CLI -----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [MXFP4(), NVFP4(), FP4(group_size=32)], ids=["mxfp4", "nvfp4", "fp4"])
def test_artifact_round_trip(fmt, tiny_model_dir, tmp_path):
    cfg = FP4Config(format=fmt)
    out = api.quantize(cfg, tmp_path / "a", str(tiny_model_dir))
    model, _, _, _ = api.open_model(str(tiny_model_dir))
    from llmcomp.quant import quantize_model

    quantize_model(model, cfg)
    loaded = llmcomp.load(out)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(raw(a[k]), raw(b[k])), k
    down = loaded.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and down.fmt == fmt
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_build_quant_config_formats():
    common = dict(method="fp4", bits=4, group_size=128, symmetric=False, preset=None, targets=("Linear",),
                  ignore=("lm_head",))
    assert build_quant_config(**common)[0] == FP4Config(format=MXFP4())
    assert build_quant_config(**common, fp4_format="nvfp4")[0].format == NVFP4()
    assert build_quant_config(**{**common, "group_size": 32}, fp4_format="fp4")[0].format == FP4(group_size=32)
    with pytest.raises(UserError, match="Unknown FP4 format 'nvfp8'; choose one of: mxfp4, nvfp4, fp4"):
        build_quant_config(**common, fp4_format="nvfp8")
    with pytest.raises(UserError, match="--format applies to --method fp4"):
        build_quant_config(**{**common, "method": "rtn"}, fp4_format="mxfp4")
    with pytest.raises(UserError, match="blocks of 16"):
        build_quant_config(**{**common, "group_size": 64}, fp4_format="nvfp4")
    with pytest.raises(UserError, match="4-bit floats"):
        build_quant_config(**{**common, "bits": 3.5}, fp4_format="mxfp4")


def test_cli_quantize_fp4(tiny_model_dir, tmp_path):
    r = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "q"), "--method", "fp4",
                                 "--format", "nvfp4"])
    assert r.exit_code == 0, r.output
    assert api.inspect(str(tmp_path / "q"))["modules"]["model.layers.0.mlp.down_proj"]["_type"] == "NVFP4"
    r = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "-o", str(tmp_path / "r"), "--method", "fp4",
                                 "--format", "int4"])
    assert r.exit_code == 2 and "choose one of: mxfp4, nvfp4, fp4" in r.output and not (tmp_path / "r").exists()
