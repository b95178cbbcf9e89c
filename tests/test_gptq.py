"""GPTQ and the shared Hessian statistics (CPU, tiny random layers and models)."""
import re

import pytest
import torch
from torch import nn

import llmcomp
from llmcomp import api
from llmcomp.core.artifact import read_manifest, write_artifact
from llmcomp.core.config import from_json, to_dict, to_json
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats import Uniform
from llmcomp.quant import METHODS, GPTQConfig, RTNConfig, quantize_model
from llmcomp.quant.gptq import GPTQQuantizer, gptq_solve, static_grid, uniform_round
from llmcomp.quant.hessian import HessianAccumulator, dampen, inverse_cholesky
from llmcomp.quant.rtn import RTNQuantizer, rtn_fields


def correlated_inputs(n, d, seed=0):
    """Inputs with strongly correlated features and uneven scales (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    scale = torch.exp(torch.randn(d, generator=g))
    return (torch.randn(n, d, generator=g) @ mix + 0.2 * torch.randn(n, d, generator=g)) * scale


def layer(in_f, out_f, seed=1, bias=False):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias).requires_grad_(False)


def hessian_of(X, lin=None):
    acc = HessianAccumulator(X.shape[-1])
    for xb in X.split(97):  # uneven batches exercise the running average
        acc(lin, (xb,), None)
    return acc


def gptq(lin, X, **kw):
    cfg = GPTQConfig(**kw)
    return GPTQQuantizer(cfg).quantize_linear("layer", lin, hessian_of(X, lin))


# -- Hessian ------------------------------------------------------------------------------------------

def test_hessian_equals_direct_formula():
    X = correlated_inputs(1000, 48)
    acc = HessianAccumulator(48)
    for xb in X.reshape(10, 100, 48).split(3):  # [batch, seq, in] like a decoder layer's input
        acc(None, (xb,), None)
    direct = 2 * X.double().T @ X.double() / X.shape[0]
    assert acc.n == 1000 and acc.H.dtype == torch.float32
    assert torch.allclose(acc.H.double(), direct, rtol=1e-5, atol=1e-5 * float(direct.abs().max()))


def test_dampen_and_dead_inputs():
    X = correlated_inputs(200, 16)
    X[:, 3] = 0
    acc = hessian_of(X)
    dh = acc.finalize(0.05)
    assert dh.dead.tolist() == [i == 3 for i in range(16)]
    diag = torch.diagonal(acc.H).clone()
    diag[3] = diag[torch.arange(16) != 3].mean()  # the live inputs' mean (not 1: see below)
    assert dh.damp == pytest.approx(0.05 * float(diag.mean()), rel=1e-6)
    assert torch.allclose(torch.diagonal(dh.H), diag + dh.damp)
    U, _ = inverse_cholesky(dh)
    assert torch.allclose(U.T @ U, torch.linalg.inv(dh.H.double()).float(), rtol=1e-3, atol=1e-4)


def test_dead_inputs_leave_the_solution_scale_free():
    """Dead inputs took a unit diagonal and entered the dampening's mean: with small activations they set the
    dampening and GPTQ's feedback faded towards RTN. Scaling the activations must not change the weights."""
    X = correlated_inputs(400, 64)
    X[:, ::4] = 0
    lin = layer(64, 16)
    fmt = Uniform(bits=2, group_size=32)
    packed = [gptq(lin, X * s, format=fmt).module.packed_tensors() for s in (1.0, 1e-3)]
    assert all(torch.equal(packed[0][k], packed[1][k]) for k in packed[0] if k != "weight_scale")


def test_not_positive_definite_raises_dampening():
    H = torch.zeros(8, 8)
    H[0, 0], H[0, 1], H[1, 0], H[1, 1] = 1.0, 2.0, 2.0, 1.0  # indefinite; other inputs dead
    import llmcomp.quant.hessian as hmod

    hmod._warned_not_pd = False
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        U, dh = inverse_cholesky(dampen(H, 0.01))
    assert dh.percdamp > 0.01 and torch.isfinite(U).all()


# -- solver -------------------------------------------------------------------------------------------

def test_identity_hessian_equals_rtn():
    lin = layer(96, 24)
    fmt = Uniform(bits=3, group_size=32)
    W = lin.weight.data
    scale, zero = static_grid(W, fmt)
    Q = gptq_solve(W, torch.eye(96), uniform_round(fmt, fmt.expand(scale, 96), fmt.expand(zero, 96)), 32)
    r = rtn_fields(W, fmt)
    ref = (r["codes"].float() - fmt.expand(r["zero"], 96)) * fmt.expand(r["scale"], 96)
    assert torch.equal(Q, ref)


@pytest.mark.parametrize("act_order,static", [(True, True), (False, True), (False, False)])
def test_gptq_beats_rtn_on_output_error_at_3_bits(act_order, static):
    X = correlated_inputs(2048, 192)
    lin = layer(192, 64)
    fmt = Uniform(bits=3, group_size=64)
    ref = X @ lin.weight.T
    rtn = RTNQuantizer(RTNConfig(format=fmt)).quantize_linear("layer", lin).module
    res = gptq(lin, X, format=fmt, act_order=act_order, static_groups=static)
    e_rtn = float((ref - rtn(X)).norm())
    e_gptq = float((ref - res.module(X)).norm())
    assert e_gptq < 0.85 * e_rtn, (e_gptq, e_rtn)
    assert res.metrics["out_err_rel"] == pytest.approx((e_gptq / float(ref.norm())) ** 2, rel=0.05)


@pytest.mark.parametrize("bits,group,in_f", [(3, 128, 576), (4, 0, 200), (2, 64, 96), (4, 32, 64)])
def test_codes_in_range_pack_round_trip_ragged(bits, group, in_f):
    """576 at group 128 → groups 128,128,128,128,64; per-channel; 96 at 64 → 64,32."""
    X = correlated_inputs(600, in_f)
    lin = layer(in_f, 40, bias=True)
    fmt = Uniform(bits=bits, group_size=group)
    mod = gptq(lin, X, format=fmt).module
    assert isinstance(mod, QuantLinear) and mod.weight_scale.shape == (40, fmt.n_groups(in_f))
    fields = fmt.unpack(mod.packed_tensors(), in_f)
    assert fields["codes"].min() >= 0 and fields["codes"].max() <= fmt.maxq
    assert torch.equal(fmt.pack(fields)["weight_packed"], mod.weight_packed)  # bit-exact round trip
    W = mod.dequantize()
    assert torch.isfinite(W).all() and W.shape == (40, in_f)
    # Every dequantized weight lies on its group's grid.
    s, z = fmt.expand(fields["scale"].float(), in_f), fmt.expand(fields["zero"].float(), in_f)
    assert torch.allclose(W / s + z, torch.round(W / s + z), atol=1e-3)


def test_act_order_artifact_needs_no_permutation():
    X = correlated_inputs(800, 128)
    lin = layer(128, 48, bias=True)
    res = gptq(lin, X, format=Uniform(bits=3, group_size=32), act_order=True)
    mod = res.module
    assert set(mod.packed_tensors()) == {"weight_packed", "weight_scale", "weight_zero"}  # no g_idx / perm
    expected = X @ mod.dequantize().T + lin.bias
    assert torch.allclose(mod(X), expected, atol=1e-5)


def test_symmetric_and_dead_inputs():
    X = correlated_inputs(500, 64)
    X[:, [5, 40]] = 0
    lin = layer(64, 16)
    res = gptq(lin, X, format=Uniform(bits=4, group_size=32, symmetric=True))
    assert res.metrics["dead_inputs"] == 2
    assert "weight_zero" not in res.module.packed_tensors()
    assert torch.isfinite(res.module.dequantize()).all()


def test_config_validation_and_json():
    with pytest.raises(UserError):
        GPTQConfig(act_order=True, static_groups=False)
    with pytest.raises(UserError):
        GPTQConfig(block_size=0)
    cfg = GPTQConfig(format=Uniform(bits=3, group_size=64), damp=0.05)
    assert from_json(to_json(cfg)) == cfg
    assert METHODS.get("gptq").needs_calibration


def test_cli_builder_and_presets():
    from llmcomp.cli.methods import build_quant_config

    cfg, alloc = build_quant_config(method="gptq", bits=3, group_size=128, symmetric=False, preset=None,
                                    targets=("Linear",), ignore=("lm_head",))
    assert alloc is None and isinstance(cfg, GPTQConfig) and cfg.format == Uniform(bits=3, group_size=128)
    cfg, _ = build_quant_config(method="rtn", bits=3, group_size=128, symmetric=False, preset="gptq-w4g128",
                                targets=("Linear",), ignore=("lm_head",))
    assert isinstance(cfg, GPTQConfig) and cfg.format.bits == 4


# -- end to end ---------------------------------------------------------------------------------------

def test_quantize_model_end_to_end(tiny_model_dir, tmp_path):
    model, _, base, _ = api.open_model(str(tiny_model_dir))
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    # intermediate 96 → ragged 64 + 32 on down_proj; one layer overridden (as bit allocation does)
    cfg = GPTQConfig(format=Uniform(bits=4, group_size=64),
                     formats={"model.layers.0.self_attn.v_proj": Uniform(bits=8, group_size=0)})
    report = quantize_model(model, cfg, calib, batch_size=4)
    layers = {k: v for k, v in report.items() if not k.startswith("_")}
    assert len(layers) == 14 and all("out_err_rel" in v and "sqnr_db" in v for v in layers.values())
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert model.model.layers[0].self_attn.v_proj.fmt.bits == 8 and model.model.layers[0].mlp.up_proj.fmt.bits == 4
    stage = {"method": cfg.method, "config": to_dict(cfg), "wall_time_s": report["_wall_time_s"],
             "metrics": {"layers": report}, "calibration": None}
    out = write_artifact(tmp_path / "gptq", model, None, base_model=base, stages=[stage])
    loaded = llmcomp.load(out)
    with torch.no_grad():
        after = model(input_ids=ids).logits
        again = loaded(input_ids=ids).logits
    assert torch.equal(after, again)
    assert not torch.equal(before, after) and torch.isfinite(after).all()
    assert read_manifest(out)["stages"][0]["config"]["_type"] == "GPTQConfig"
    assert loaded.model.layers[0].self_attn.v_proj.fmt == Uniform(bits=8, group_size=0)


def test_calibration_stops_after_the_last_selected_layer():
    """GPTQ of layer 0 alone ran every later decoder layer over the calibration windows, for nothing."""
    from tests.conftest import tiny_llama

    model = tiny_llama(layers=3)
    ran = []
    model.model.layers[2].mlp.register_forward_hook(lambda *a: ran.append(2))  # (the capture skips submodules)
    model.model.layers[1].mlp.register_forward_hook(lambda *a: ran.append(1))
    calib = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cfg = GPTQConfig(format=Uniform(bits=4, group_size=32), targets=("re:.*layers\\.1\\.self_attn.*",))
    report = quantize_model(model, cfg, calib, batch_size=4)
    assert sorted(k for k in report if not k.startswith("_"))[0] == "model.layers.1.self_attn.k_proj"
    assert 1 in ran and 2 not in ran and isinstance(model.model.layers[1].self_attn.q_proj, QuantLinear)


@pytest.mark.parametrize("method,label", [("gptq", "GPTQ"), ("vptq", "VPTQ"), ("decoupleq", "decoupleQ")])
def test_hessian_methods_share_observe_and_name_themselves_without_statistics(method, label):
    """The Hessian-based quantizers take their hook and their checks from one base (HessianQuantizer): each observes a
    layer with a Hessian accumulator and, handed no statistics, says which method needs calibration data."""
    from llmcomp.quant.base import HessianQuantizer

    quantizer = METHODS.get(method)(_config(method))
    assert isinstance(quantizer, HessianQuantizer) and quantizer.needs_calibration
    linear = nn.Linear(256, 64, bias=False)
    assert isinstance(quantizer.observe(linear), HessianAccumulator)
    with pytest.raises(UserError, match=f"{label} got no calibration statistics for layer.0"):
        quantizer.quantize_linear("layer.0", linear, None)


def _config(method):
    from llmcomp.quant.decoupleq import DecoupleQConfig
    from llmcomp.quant.vptq import VPTQConfig

    return {"gptq": GPTQConfig, "vptq": VPTQConfig, "decoupleq": DecoupleQConfig}[method]()


@pytest.mark.parametrize("in_f", [17, 18, 24])
def test_outlier_pick_finds_a_planted_outlier_with_a_one_column_group(in_f):
    """A last group of one column had no sample std: its NaN z-scores were ranked first and took the outlier
    slots (in_features % group_size == 1)."""
    from llmcomp.quant.gptq import pick_outliers

    w = torch.randn(64, in_f, generator=torch.Generator().manual_seed(0)) * 0.02
    w[5, 3] = 40.0
    mask = pick_outliers(w, Uniform(4, 16), torch.ones(in_f), 5)
    assert mask[5, 3]


def test_outliers_with_bit_allocation_refused(tmp_path):
    """The allocation costs layers as plain uniform widths; GPTQ's outliers then went over the budget."""
    from llmcomp.quant.allocate import AllocationConfig
    from llmcomp.quant.gptq import GPTQConfig

    with pytest.raises(UserError, match="does not combine with bit allocation"):
        api.quantize(GPTQConfig(format=Uniform(4, 32), outliers=0.02), tmp_path / "o", str(tmp_path / "none"),
                     allocation=AllocationConfig(budget=3.5, group_size=32))


@pytest.mark.parametrize("config", [GPTQConfig(format=Uniform(bits=4, group_size=32)),
                                    RTNConfig(format=Uniform(bits=4, group_size=32), act_bits=4)],
                         ids=["gptq", "rtn-w4a4"])
def test_non_finite_calibration_inputs_are_one_error_line(tiny_model, config):
    """GPTQ raised "Hessian still not positive definite" (a traceback); RTN W4A4 wrote NaN input scales."""
    with torch.no_grad():
        tiny_model.model.layers[0].input_layernorm.weight[0] = float("inf")
    with pytest.raises(UserError, match="calibration inputs of model.layers.0.self_attn.q_proj are not finite"):
        quantize_model(tiny_model, config, torch.randint(0, 128, (2, 16)), device="cpu")


def test_outliers_with_fp4_are_refused_by_the_config():
    """It was refused only inside the first layer's solve, after loading and calibrating."""
    from llmcomp.formats.fp4 import NVFP4

    with pytest.raises(UserError, match="uniform format only, not FP4"):
        GPTQConfig(format=NVFP4(), outliers=0.01)


def test_weights_past_the_float16_scales_are_one_error_line(tiny_model):
    """A weight of 1e7 gave an inf float16 scale: the layer was written as NaN/inf and its error NaN, silently."""
    with torch.no_grad():
        tiny_model.model.layers[1].mlp.down_proj.weight[3, 7] = 1e7
    with pytest.raises(UserError, match="model.layers.1.mlp.down_proj: its quantized weights are not finite"):
        quantize_model(tiny_model, RTNConfig(format=Uniform(bits=4, group_size=32)))


def test_layer_patterns_that_match_nothing_and_container_targets(tiny_model):
    """A misspelt --target or --ignore was dropped silently (k_prj: only q_proj quantized); a target naming a
    container (mlp) selected nothing; the defaults (Linear, lm_head) may match nothing."""
    from llmcomp.core.select import select_linears
    from llmcomp.quant import quantize_model

    mlp = sorted(n for n, _ in select_linears(tiny_model, ("mlp",), ("lm_head",)))
    assert mlp and all(".mlp." in n for n in mlp) and len(mlp) == 3 * len(tiny_model.model.layers)
    for targets, ignore, bad in ((("q_proj", "k_prj"), ("lm_head",), "'k_prj' (targets)"),
                                 (("Linear",), ("lm_head", "down_prj"), "'down_prj' (ignore)")):
        with pytest.raises(UserError, match=re.escape(bad)):
            quantize_model(tiny_model, RTNConfig(format=Uniform(bits=4, group_size=32), targets=targets,
                                                 ignore=ignore))


def test_a_misspelt_pattern_is_refused_before_calibration(tiny_model_dir, tmp_path, monkeypatch):
    """The check ran only inside quantize_model: after calibration (and an allocation's own pass), with the resume
    folder made and left beside the output."""
    calls = []
    monkeypatch.setattr(api, "calib_windows", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(AssertionError))
    cfg = GPTQConfig(format=Uniform(bits=4, group_size=32), ignore=("lm_head", "dwn_proj"))
    with pytest.raises(UserError, match=re.escape("'dwn_proj' (ignore)")):
        api.quantize(cfg, tmp_path / "out" / "o", str(tiny_model_dir))
    assert not calls and not (tmp_path / "out").exists()  # (no .o.resume folder or lock)


def test_a_shape_its_format_cannot_take_is_refused_before_calibration(tiny_model_dir, tmp_path, monkeypatch):
    """PVQ groups of 64 rows on 32-row layers: the error came after calibration, with the resume folder left."""
    from llmcomp.formats.pyramid import Pyramid
    from llmcomp.quant.pvq import PVQConfig

    monkeypatch.setattr(api, "calib_windows", lambda *a, **k: (_ for _ in ()).throw(AssertionError("calibrated")))
    with pytest.raises(UserError, match="PVQ vector length 64 does not divide"):
        api.quantize(PVQConfig(format=Pyramid(dim=64, pulses=8)), tmp_path / "out" / "p", str(tiny_model_dir))
    assert not (tmp_path / "out").exists()
