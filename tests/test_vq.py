"""Vector quantization: wide bit packing, the ``codebook`` format, VPTQ-style quantization, artifacts."""
import pytest
import torch
from torch import nn

import llmcomp
from llmcomp import api
from llmcomp.core.artifact import write_artifact
from llmcomp.core.config import from_json, to_dict, to_json
from llmcomp.errors import UserError
from llmcomp.formats import FORMATS
from llmcomp.formats.bitpack import n_limbs, pack_bits, pack_wide, tight_len, unpack_wide
from llmcomp.formats.codebook import Codebook
from llmcomp.quant import quantize_model
from llmcomp.quant.hessian import HessianAccumulator
from llmcomp.quant.kmeans import assign, kmeans
from llmcomp.quant.pvq import PVQConfig, pyramid_for_bits
from llmcomp.quant.vptq import VPTQConfig, VPTQQuantizer, codebook_for_bits
from tests.test_gptq import correlated_inputs


def hessian(X):
    acc = HessianAccumulator(X.shape[1])
    acc.add(X)
    return acc


def vptq(W, X, **kw):
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False).requires_grad_(False)
    lin.weight.data = W.clone()
    return VPTQQuantizer(VPTQConfig(**kw)).quantize_linear("layer", lin, hessian(X))


# -- packing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 3, 4, 8, 9, 12, 16, 31, 62, 63, 123, 184])
@pytest.mark.parametrize("tight", [False, True], ids=["canonical", "tight"])
def test_pack_wide_round_trip(bits, tight):
    g = torch.Generator().manual_seed(bits)
    n = 13
    if bits <= 62:
        codes = torch.randint(0, 2**bits, (3, n), generator=g, dtype=torch.int64) if bits < 62 else \
            torch.randint(0, 2**62, (3, n), generator=g)
    else:
        codes = torch.randint(0, 2**62, (3, n, n_limbs(bits)), generator=g)
        codes[..., -1] &= (1 << (bits - 62 * (n_limbs(bits) - 1))) - 1
    packed = pack_wide(codes, bits, tight=tight)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == (tight_len(n, bits) if tight else (n + 7) // 8 * bits)
    assert torch.equal(unpack_wide(packed, bits, n, tight=tight), codes)
    if bits <= 8:  # the same canonical layout as the scalar formats' packing
        assert torch.equal(pack_wide(codes, bits), pack_bits(codes.to(torch.uint8), bits))


@pytest.mark.parametrize("bits", [5, 8, 13, 40, 56])
def test_pack_wide_shifted_path_writes_the_bit_plane_bytes(bits):
    """Codes up to 56 bits are shifted into their ≤ 8 bytes; wider ones go through one int64 a bit: both give the
    same stream (the plane path is the definition of the layout)."""
    from llmcomp.formats import bitpack

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**62, (4, 21), generator=g) & ((1 << bits) - 1)
    nbytes = tight_len(21, bits)
    shifted = bitpack._pack_shifted(codes, bits, nbytes)
    assert torch.equal(shifted, bitpack._pack_planes(codes.unsqueeze(-1), bits, nbytes))
    assert torch.equal(bitpack._unpack_shifted(shifted, bits, 21), bitpack._unpack_planes(shifted, bits, 21)[..., 0])


def test_pack_wide_keeps_the_low_bits_of_codes_out_of_range():
    """A code wider than ``bits`` (or negative) keeps its low bits, as the bit-plane path did; its high bits
    must not spill into the next code."""
    codes = torch.tensor([[35, 1, -1, 7, 100]])
    for bits in (5, 8, 13):
        assert torch.equal(unpack_wide(pack_wide(codes, bits, tight=True), bits, 5, tight=True),
                           codes & ((1 << bits) - 1))
    packed = pack_wide(torch.tensor([[1000, 3, 2047]]), 11)  # bytes >= 128 as int8: unpacking reads them unsigned
    assert torch.equal(unpack_wide(packed.view(torch.int8), 11, 3), torch.tensor([[1000, 3, 2047]]))


@pytest.mark.parametrize("bits", [8, 13, 123])
def test_pack_wide_in_row_chunks_is_one_pass(bits, monkeypatch):
    """Large tensors are packed a chunk of rows at a time (an 8B model's 14336 x 4096 VQ layer took ~7 GB of
    temporaries in one pass): with a tiny budget every row is its own chunk, and the bytes do not change."""
    from llmcomp.formats import bitpack

    g = torch.Generator().manual_seed(bits)
    if bits <= 62:
        codes = torch.randint(0, 2**bits, (3, 5, 9), generator=g)
    else:
        codes = torch.randint(0, 2**62, (3, 5, 9, 2), generator=g)
        codes[..., -1] &= (1 << (bits - 62)) - 1
    whole = pack_wide(codes, bits, tight=True)
    monkeypatch.setattr(bitpack, "_BUDGET", 1)
    assert torch.equal(pack_wide(codes, bits, tight=True), whole)
    assert torch.equal(unpack_wide(whole, bits, 9, tight=True), codes)
    assert pack_wide(codes[:0], bits).shape[0] == 0 and unpack_wide(whole[:, :0], bits, 9, tight=True).shape[1] == 0


# -- the codebook format ------------------------------------------------------------------------------

def random_fields(fmt: Codebook, out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    nv, ng, n_oc = fmt.n_main(in_f) // fmt.dim, fmt.n_groups(in_f), fmt.n_outlier_cols(in_f)
    f = {"scale": (torch.rand(out_f, generator=g) + 0.5).half().float()} if fmt.scale else {}
    for t, b in enumerate(fmt.bits):
        f[f"index{t}"] = torch.randint(0, 2**b, (out_f, nv), generator=g)
        f[f"codebook{t}"] = torch.randn(ng, 2**b, fmt.dim, generator=g).half().float()
    if n_oc:
        f["outlier_cols"] = torch.sort(torch.randperm(in_f, generator=g)[:n_oc]).values
        f["outlier_index"] = torch.randint(0, 2**fmt.outlier_bits, (out_f, n_oc // fmt.dim), generator=g)
        f["outlier_codebook"] = torch.randn(2**fmt.outlier_bits, fmt.dim, generator=g).half().float()
    return f


@pytest.mark.parametrize("fmt", [Codebook(), Codebook(dim=2, bits=(6,), scale=False),
                                 Codebook(dim=4, bits=(9, 3), group=24),
                                 Codebook(dim=4, bits=(5, 4), group=16, outliers=0.125, outlier_bits=6)],
                         ids=["v4-8b", "v2-6b-noscale", "v4-9+3b-g24", "v4-5+4b-g16-outliers"])
def test_codebook_round_trip_and_reference(fmt):
    out_f, in_f = 10, 72
    f = random_fields(fmt, out_f, in_f)
    t = fmt.pack(f)
    specs = fmt.param_specs(out_f, in_f)
    assert set(t) == set(specs)
    assert all(t[k].shape == specs[k].shape and t[k].dtype == specs[k].dtype for k in t)
    back = fmt.unpack(t, in_f)
    for k in f:
        assert torch.equal(back[k].to(f[k].dtype), f[k]), k
    # reference: written out element by element (independent of the gather in dequantize)
    main = fmt.main_cols(f.get("outlier_cols"), in_f).tolist()
    ref = torch.zeros(out_f, in_f)
    for o in range(out_f):
        for j in range(len(main) // fmt.dim):
            grp = 0 if not fmt.group else j * fmt.dim // fmt.group
            vec = sum(f[f"codebook{t}"][grp, f[f"index{t}"][o, j]] for t in range(len(fmt.bits)))
            for d in range(fmt.dim):
                ref[o, main[j * fmt.dim + d]] = vec[d]
        for j in range(fmt.n_outlier_cols(in_f) // fmt.dim):
            vec = f["outlier_codebook"][f["outlier_index"][o, j]]
            for d in range(fmt.dim):
                ref[o, int(f["outlier_cols"][j * fmt.dim + d])] = vec[d]
    if fmt.scale:
        ref = ref * f["scale"][:, None]
    assert torch.allclose(fmt.dequantize(t, in_f), ref, atol=1e-6)
    assert from_json(to_json(fmt)) == fmt and FORMATS.get("codebook") is Codebook


def test_codebook_bits_per_weight_counts_codebooks_exactly():
    fmt = Codebook(dim=4, bits=(8, 4))
    out_f, in_f = 576, 576
    idx_bits = out_f * (in_f // 4) * 12
    book_bits = (256 + 16) * 4 * 16
    scale_bits = out_f * 16
    assert fmt.bits_per_weight(out_f, in_f) == pytest.approx((idx_bits + book_bits + scale_bits) / (out_f * in_f))
    assert fmt.code_bits == 3.0


# -- quantization -------------------------------------------------------------------------------------

def test_kmeans_weighted_and_vectorized():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = centers[torch.randint(0, 3, (3000,), generator=g)] + 0.1 * torch.randn(3000, 2, generator=g)
    c = kmeans(x, None, 3, iters=10, sample=1000)
    assert torch.cdist(torch.sort(c, 0).values, torch.sort(centers, 0).values).diagonal().max() < 0.1
    # a heavily weighted coordinate pulls its entry: weights 0 on coordinate 1 ignore it entirely
    h = torch.tensor([[1.0, 0.0]]).expand(4, 2)
    pts = torch.tensor([[1.0, 100.0], [1.0, -100.0], [3.0, 7.0], [3.0, -7.0]])
    assert torch.equal(assign(pts, h, torch.tensor([[1.0, 0.0], [3.0, 0.0]])), torch.tensor([0, 0, 1, 1]))


def test_codebook_equal_to_all_vectors_is_lossless():
    g = torch.Generator().manual_seed(0)
    vectors = torch.randint(-8, 8, (16, 4), generator=g).float() / 8  # exact in float16
    vectors = torch.unique(vectors, dim=0)
    W = vectors[torch.randint(0, len(vectors), (32, 12), generator=g)].reshape(32, 48)
    X = correlated_inputs(256, 48)
    fmt = Codebook(dim=4, bits=(4,), scale=False)
    assert len(vectors) == 16
    res = vptq(W, X, format=fmt)
    assert torch.equal(res.module.dequantize(), W)
    assert res.metrics["out_err_rel"] == 0


def test_error_feedback_lowers_output_error():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    X = correlated_inputs(512, 128)
    fmt = codebook_for_bits(2)
    fb = vptq(W, X, format=fmt).metrics["out_err_rel"]
    plain = vptq(W, X, format=fmt, feedback=False).metrics["out_err_rel"]
    assert fb < 0.8 * plain, (fb, plain)
    # a residual stage lowers it further
    assert vptq(W, X, format=codebook_for_bits(3)).metrics["out_err_rel"] < 0.6 * fb


def test_outlier_columns_get_their_own_codebook():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    X = correlated_inputs(512, 128)
    X[:, 7] *= 30  # a salient input
    res = vptq(W, X, format=codebook_for_bits(2, outliers=0.125, outlier_bits=8))  # 256 entries, 256 vectors
    t = res.module.packed_tensors()
    assert 7 in t["outlier_cols"].tolist() and t["outlier_codebook"].shape == (256, 4)
    plain = vptq(W, X, format=codebook_for_bits(2))
    assert res.metrics["out_err_rel"] < plain.metrics["out_err_rel"]


def test_a_narrow_layer_gets_an_outlier_codebook_it_can_fill():
    """1 % of 576 columns on a 192-row layer (SmolLM2's k/v) is 192 outlier vectors: the 2⁸-entry outlier codebook
    was refused there, so the README's ``--outliers 1%`` failed on the bundled model. The layer's format now takes
    2⁷ entries (each layer's format is stored with it)."""
    fmt = codebook_for_bits(2, outliers=0.01)
    assert fmt.fitted(192, 576).outlier_bits == 7 and fmt.fitted(576, 576) == fmt
    W, X = torch.randn(192, 576) * 0.02, correlated_inputs(256, 576)
    res = vptq(W, X, format=fmt)
    assert res.module.fmt.outlier_bits == 7 and res.module.packed_tensors()["outlier_codebook"].shape == (128, 4)


def test_shapes_are_checked_before_calibration(tiny_model, monkeypatch):
    """A layer the format cannot take is one error line before any calibration, not one layers into it."""
    from llmcomp.quant import base

    monkeypatch.setattr(base, "calibrate_layerwise", lambda *a, **k: pytest.fail("calibrated first"))
    with pytest.raises(UserError, match="does not divide the input dimension"):
        quantize_model(tiny_model, VPTQConfig(format=Codebook(dim=5, bits=(4,))), torch.zeros(1, 8, dtype=torch.long))


def test_rows_beyond_float16_saturate_rather_than_poison_the_layer():
    """A row of RMS above 65504 stored an inf VPTQ row scale (the shared codebook, and every row, turned NaN); a
    PVQ gain above it an inf level."""
    from llmcomp.quant.pvq import PVQQuantizer

    torch.manual_seed(0)
    W = torch.randn(64, 96)
    W[0] *= 1e5
    for quantizer in (VPTQQuantizer(VPTQConfig(format=codebook_for_bits(2, 4))),
                      PVQQuantizer(PVQConfig(format=pyramid_for_bits(2, 8)))):
        lin = nn.Linear(96, 64, bias=False).requires_grad_(False)
        lin.weight.data = W.clone()
        res = quantizer.quantize_linear("layer", lin, hessian(correlated_inputs(256, 96)))
        assert torch.isfinite(res.module.dequantize()).all() and res.metrics["out_err_rel"] < 1


def test_codebook_for_bits():
    assert codebook_for_bits(2) == Codebook(dim=4, bits=(8,))
    assert codebook_for_bits(2.25).bits == (9,)
    assert codebook_for_bits(3).bits == (8, 4) and codebook_for_bits(3.25).bits == (8, 5)
    assert codebook_for_bits(3, dim=2).bits == (6,)
    assert codebook_for_bits(4, dim=8).bits == (8, 8, 8, 8)
    cfg = VPTQConfig(format=codebook_for_bits(3))
    assert from_json(to_json(cfg)) == cfg


# -- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,message", [
    (lambda: codebook_for_bits(2.1), "nearest reachable: 2, 2.25"),
    (lambda: codebook_for_bits(0), "not reachable"),
    (lambda: codebook_for_bits(2.3, dim=5), "nearest reachable: 2.2, 2.4"),
    (lambda: codebook_for_bits(16), "nearest reachable: 11.75, 12"),  # (past 48 index bits: an empty list)
    (lambda: codebook_for_bits(2, dim=65), "from 1 to 64, got 65"),
    (lambda: Codebook(dim=4, bits=(17,)), "stage index bits"),
    (lambda: Codebook(dim=4, group=6), "multiple of the vector length"),
    (lambda: VPTQConfig(format=pyramid_for_bits(2)), "VPTQConfig.format must be Codebook, got Pyramid"),
], ids=["bits-between", "bits-zero", "bits-v5", "bits-past-48", "dim-65", "stage-bits", "group", "wrong-format"])
def test_bad_vq_settings(call, message):
    with pytest.raises(UserError, match=message):
        call()


def test_bad_vq_shapes():
    W, X = torch.randn(16, 48), correlated_inputs(64, 48)
    with pytest.raises(UserError, match="does not divide the input dimension 48"):
        vptq(W, X, format=Codebook(dim=5, bits=(4,)))
    with pytest.raises(UserError, match="larger than the 192 vectors"):
        vptq(W, X, format=Codebook(dim=4, bits=(8,)))
    # a ragged last group (80 = 64 + 16 columns) is the one fitted on the fewest vectors (it crashed in k-means)
    W, X = torch.randn(16, 80), correlated_inputs(64, 80)
    with pytest.raises(UserError, match="larger than the 64 vectors"):
        vptq(W, X, format=Codebook(dim=4, bits=(8,), group=64))


def test_cli_vector_flags(tiny_model_dir, tmp_path):
    from llmcomp.cli.methods import build_quant_config

    kw = dict(group_size=128, symmetric=False, preset=None, targets=("Linear",), ignore=("lm_head",))
    cfg, alloc = build_quant_config(method="vptq", bits=2.25, **kw)
    assert alloc is None and cfg.format.bits == (9,)  # fractional bits: a format, not a bit-allocation budget
    cfg, _ = build_quant_config(method="vptq", bits=2, vector_len=2, outliers="1%", **kw)
    assert cfg.format == Codebook(dim=2, bits=(4,), outliers=0.01)
    cfg, _ = build_quant_config(method="pvq", bits=3, hadamard=True, **kw)
    assert cfg.format.rotate and abs(cfg.format.code_bits - 3) < 0.05
    from tests.test_cli import invoke, one_error_line

    for args, message in [(["--method", "vptq", "--bits", "2.1"], "nearest reachable: 2, 2.25"),
                          (["--method", "pvq", "--bits", "0.05"], "not reachable by PVQ"),
                          (["--method", "rtn", "--vector-len", "4"], "--vector-len applies to"),
                          (["--method", "vptq", "--hadamard"], "--hadamard"),
                          (["--method", "pvq", "--outliers", "1%"], "not pvq")]:
        assert message in one_error_line(invoke("quantize", tiny_model_dir, "-o", tmp_path / "o", *args))
    assert not (tmp_path / "o").exists()


# -- artifacts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    VPTQConfig(format=codebook_for_bits(2, outliers=0.125, outlier_bits=4)),
    VPTQConfig(format=codebook_for_bits(3, dim=2)),
    PVQConfig(format=pyramid_for_bits(2, dim=8, rotate=True)),
    PVQConfig(format=pyramid_for_bits(3, dim=32), hessian=False),
], ids=["vptq-2-outliers", "vptq-3-v2", "pvq-2-hadamard", "pvq-3-no-hessian"])
def test_artifact_save_load_same_logits(tiny_model_dir, tmp_path, cfg):
    model, _, base, _ = api.open_model(str(tiny_model_dir))
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    report = quantize_model(model, cfg, calib, batch_size=4)
    layers = {k: v for k, v in report.items() if not k.startswith("_")}
    assert len(layers) == 14 and all(v["bits_per_weight"] > cfg.format.code_bits for v in layers.values())
    stage = {"method": cfg.method, "config": to_dict(cfg), "wall_time_s": 0, "metrics": {}, "calibration": None}
    out = write_artifact(tmp_path / "a", model, None, base_model=base, stages=[stage])
    loaded = llmcomp.load(out)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.model.layers[1].mlp.down_proj.fmt == cfg.format


@pytest.mark.slow
def test_bundled_model_first_layer_both_formats(bundled_dir):
    """Real shapes (576 → 9 PVQ groups of 64 a row: tight rows; 1536-wide down_proj) and real Hessians:
    decoder layer 0 with VPTQ and with PVQ + Hadamard at 3 bits, in memory; ppl moves but stays sane."""
    from llmcomp.core.data import calib_windows, eval_windows
    from llmcomp.eval.perplexity import perplexity

    targets = (r"re:model\.layers\.0\..*",)
    base = None
    for cfg in (VPTQConfig(format=codebook_for_bits(3), targets=targets),
                PVQConfig(format=pyramid_for_bits(3, rotate=True), targets=targets)):
        model, tok, _, _ = api.open_model(str(bundled_dir))
        windows = eval_windows(tok, 256, 2)
        base = base or perplexity(model, tok, windows=windows)["ppl"]
        report = quantize_model(model, cfg, calib_windows(tok, 128, 8), device="cpu")
        layers = [v for k, v in report.items() if not k.startswith("_")]
        assert len(layers) == 7 and all(v["out_err_rel"] < 0.05 for v in layers), report
        ppl = perplexity(model, tok, windows=windows)["ppl"]
        assert base < ppl < 1.15 * base, (cfg.method, ppl, base)
