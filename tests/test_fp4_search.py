"""LLM-FP4 format search and GPTQ on an FP4 grid (CPU, tiny layers and models)."""
import pytest
import torch

import llmcomp
from llmcomp import api
from llmcomp.cli.methods import build_quant_config
from llmcomp.core.artifact import write_artifact
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats.fp4 import FP4, MXFP4, NVFP4
from llmcomp.quant import GPTQConfig, quantize_model
from llmcomp.quant.fp4 import FP4Config, FP4Quantizer, fp4_fields, output_error, search_fp4
from llmcomp.quant.rtn import RTNConfig
from tests.test_gptq import correlated_inputs, gptq, hessian_of, layer


def _deq(fmt, fields, in_f):
    return fmt.dequantize(fmt.pack(fields), in_f)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_never_worse_than_default(seed):
    X = correlated_inputs(512, 64, seed=seed)
    w = layer(64, 32, seed=seed).weight * torch.exp(torch.randn(64) * 0.5)  # uneven input channels
    H = 2 * X.T @ X / X.shape[0]
    default = FP4(group_size=32)
    base_err = output_error(w, _deq(default, fp4_fields(w, default), 64), H)
    fmt, fields, metrics = search_fp4(w, default, H)
    err = output_error(w, _deq(fmt, fields, 64), H)
    assert err <= base_err * (1 + 1e-6)
    assert metrics["err_vs_default"] == pytest.approx(err / base_err, rel=1e-3)
    assert fmt.group_size == 32 and fmt.element.bits == 4


def test_search_quantizer_records_choice_and_needs_calibration():
    X = correlated_inputs(256, 64, seed=5)
    lin = layer(64, 32, seed=5)
    q = FP4Quantizer(FP4Config(format=FP4(group_size=32), search=True))
    assert q.needs_calibration and not FP4Quantizer(FP4Config()).needs_calibration
    res = q.quantize_linear("l", lin, hessian_of(X, lin))
    assert isinstance(res.module, QuantLinear) and {"element", "clip", "err_vs_default"} <= set(res.metrics)
    assert res.module.fmt.element.describe() == res.metrics["element"]


@pytest.mark.parametrize("fmt", [NVFP4(), MXFP4(), FP4(group_size=32)], ids=["nvfp4", "mxfp4", "fp4"])
def test_gptq_on_fp4_grid_beats_rtn(fmt):
    X = correlated_inputs(1024, 64, seed=7)
    lin = layer(64, 48, seed=7)
    H = 2 * X.T @ X / X.shape[0]
    res = gptq(lin, X, format=fmt)
    assert res.module.fmt == fmt
    rtn = _deq(fmt, fp4_fields(lin.weight, fmt), 64)
    assert output_error(lin.weight, res.module.dequantize(), H) < 0.9 * output_error(lin.weight, rtn, H)
    # the solver's values lie on the stored grid: re-encoding the dequantized weight gives the same codes
    f = fmt.unpack(res.module.packed_tensors(), 64)
    S = fmt.expand(fmt.block_scale(f), 64)
    assert torch.equal(fmt.encode(res.module.dequantize(), S), f["codes"])


def test_cli_flags():
    cfg, _ = build_quant_config(method="gptq", bits=4, group_size=128, symmetric=False, preset=None,
                                targets=("Linear",), ignore=("lm_head",), fp4_format="nvfp4")
    assert isinstance(cfg, GPTQConfig) and cfg.format == NVFP4()
    cfg, _ = build_quant_config(method="fp4", bits=4, group_size=32, symmetric=False, preset=None,
                                targets=("Linear",), ignore=("lm_head",), fp4_format="fp4", search=True)
    assert cfg.search and cfg.format == FP4(group_size=32)
    with pytest.raises(UserError, match="fixes"):
        build_quant_config(method="fp4", bits=4, group_size=128, symmetric=False, preset=None,
                           targets=("Linear",), ignore=("lm_head",), fp4_format="mxfp4", search=True)
    with pytest.raises(UserError, match="--search"):
        build_quant_config(method="rtn", bits=4, group_size=128, symmetric=False, preset=None,
                           targets=("Linear",), ignore=("lm_head",), search=True)
    with pytest.raises(UserError, match="--format applies"):
        build_quant_config(method="rtn", bits=4, group_size=128, symmetric=False, preset=None,
                           targets=("Linear",), ignore=("lm_head",), fp4_format="nvfp4")
    # --group-size 128 given with a spec-blocked format was taken for the flag's default and dropped, silently
    for method in ("fp4", "gptq"):
        with pytest.raises(UserError, match="uses blocks of 16 inputs"):
            build_quant_config(method=method, bits=4, group_size=128, symmetric=False, preset=None,
                               targets=("Linear",), ignore=("lm_head",), fp4_format="nvfp4", group_given=True)
    # the fp4 format takes any group; Uniform's multiple-of-8 rule refused it
    cfg, _ = build_quant_config(method="fp4", bits=4, group_size=20, symmetric=False, preset=None,
                                targets=("Linear",), ignore=("lm_head",), fp4_format="fp4", group_given=True)
    assert cfg.format == FP4(group_size=20)


def test_search_end_to_end_save_load(tiny_model_dir, tmp_path):
    model, _, base, _ = api.open_model(str(tiny_model_dir))
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    report = quantize_model(model, FP4Config(format=FP4(group_size=32), search=True), calib, batch_size=4)
    layers = {k: v for k, v in report.items() if not k.startswith("_")}
    assert all(v["err_vs_default"] <= 1.0 for v in layers.values())
    out = write_artifact(tmp_path / "fp4s", model, None, base_model=base,
                         stages=[{"method": "fp4", "config": {}, "wall_time_s": 0, "metrics": {}}])
    loaded = llmcomp.load(out)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.model.layers[0].mlp.down_proj.fmt == model.model.layers[0].mlp.down_proj.fmt


# -- W4A4 --------------------------------------------------------------------------------------------

def test_actquant_input_rounding():
    from llmcomp.formats.actquant import ActQuant

    fmt = ActQuant(base=FP4(group_size=32))
    x = torch.randn(3, 7, 64) * 5
    t = {"input_scale": torch.full((64,), 2.0, dtype=torch.float16)}
    q = fmt.quantize_input(x, t)
    xs = x / 2
    # every token's values land on the E2M1 grid times its own scale (max |x| / 6); the max is exact
    scale = xs.abs().amax(-1, keepdim=True) / 6
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    ratio = (q / scale).abs()
    assert torch.allclose(ratio.unsqueeze(-1).sub(grid).abs().amin(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(q.abs().amax(-1), xs.abs().amax(-1))


def test_w4a4_saved_artifact_reproduces_logits(tiny_model_dir, tmp_path):
    from llmcomp.formats.actquant import ActQuant

    model, _, base, _ = api.open_model(str(tiny_model_dir))
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    w4 = FP4Config(format=FP4(group_size=32), act_bits=4, search=True)
    quantize_model(model, w4, calib, batch_size=4)
    lin = model.model.layers[0].self_attn.q_proj
    assert isinstance(lin.fmt, ActQuant) and lin.input_scale.shape == (64,)
    out = write_artifact(tmp_path / "w4a4", model, None, base_model=base,
                         stages=[{"method": "fp4", "config": {}, "wall_time_s": 0, "metrics": {}}])
    loaded = llmcomp.load(out)
    with torch.no_grad():
        mine, again = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.equal(mine, again)
    assert not torch.allclose(mine, ref)  # the activations really are quantized
    with pytest.raises(UserError, match="--act-bits"):
        FP4Config(act_bits=8)
    with pytest.raises(UserError, match="--act-bits"):
        build_quant_config(method="gptq", bits=4, group_size=128, symmetric=False, preset=None,
                           targets=("Linear",), ignore=("lm_head",), act_bits=4)
    with pytest.raises(UserError, match="--act-bits"):
        build_quant_config(method="rtn", bits=3.5, group_size=128, symmetric=False, preset=None,
                           targets=("Linear",), ignore=("lm_head",), act_bits=4)
    with pytest.raises(UserError, match="--act-format"):
        build_quant_config(method="rtn", bits=4, group_size=128, symmetric=False, preset=None,
                           targets=("Linear",), ignore=("lm_head",), act_format="int")
    with pytest.raises(UserError, match="activation format"):
        RTNConfig(act_bits=4, act_format="int8")


def test_int4_activation_grid():
    """``int`` activations: per token, integers -7..7 times max|x| / 7 (E0M3 is the symmetric INT4 grid)."""
    from llmcomp.formats.actquant import ActQuant
    from llmcomp.quant.actquant import ACT_ELEMENTS

    fmt = ActQuant(base=FP4(group_size=32), act=ACT_ELEMENTS["int"])
    x = torch.randn(5, 64) * 3
    q = fmt.quantize_input(x, {"input_scale": torch.ones(64, dtype=torch.float16)})
    step = x.abs().amax(-1, keepdim=True) / 7
    k = q / step
    assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 7 + 1e-4
    assert torch.allclose(k.round(), (x / step).round(), atol=0)  # round to nearest, no clipping
    assert len(set(k.round().flatten().tolist())) > 8  # really 15 levels, not the E2M1 grid


def test_rtn_int4_w4a4_artifact_reproduces_logits(tiny_model_dir, tmp_path):
    from llmcomp.formats.actquant import ActQuant
    from llmcomp.formats.uniform import Uniform

    model, _, base, _ = api.open_model(str(tiny_model_dir))
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    cfg, _ = build_quant_config(method="rtn", bits=4, group_size=32, symmetric=False, preset=None,
                                targets=("Linear",), ignore=("lm_head",), act_bits=4)
    assert cfg.act_format == "int"
    quantize_model(model, cfg, calib, batch_size=4)
    lin = model.model.layers[0].mlp.down_proj
    assert isinstance(lin.fmt, ActQuant) and isinstance(lin.fmt.base, Uniform)
    assert lin.fmt.act.exp_bits == 0 and lin.fmt.act.man_bits == 3
    out = write_artifact(tmp_path / "int4a4", model, None, base_model=base,
                         stages=[{"method": "rtn", "config": {}, "wall_time_s": 0, "metrics": {}}])
    loaded = llmcomp.load(out)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_w4a4_report_compares_the_unfolded_weight(tiny_model_dir):
    """The per-layer SQNR compared W with the dequantized W·diag(input_scale) (17 dB reported for 22 real)."""
    from llmcomp.quant.base import sqnr_db

    model, _, _, _ = api.open_model(str(tiny_model_dir))
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    report = quantize_model(model, RTNConfig(act_bits=4), calib, batch_size=4)
    lin = model.model.layers[0].self_attn.q_proj
    real = sqnr_db(w, lin.dequantize() / lin.input_scale.float())
    assert report["model.layers.0.self_attn.q_proj"]["sqnr_db"] == pytest.approx(real, abs=1e-3)
    assert abs(sqnr_db(w, lin.dequantize()) - real) > 0.1  # (what it reported before)


def test_a_channel_silent_in_calibration_keeps_a_neutral_input_scale():
    """Its floor of 1e-5 gave it a tiny divisor: a token reaching it at inference was multiplied by up to 1e4."""
    from llmcomp.quant.actquant import input_scale

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=g)
    x[:, 5] = 0
    H = 2 * x.T @ x / x.shape[0]
    w = torch.randn(16, 32, generator=g)
    s = input_scale(w, H, 0.5)
    assert s[5] == 1 and torch.isfinite(s).all()
    live = torch.arange(32) != 5
    assert abs(float(s[live].log().mean())) < 1e-2  # the live channels' geometric mean is still 1
    assert torch.equal(input_scale(w, torch.zeros(32, 32), 0.5), torch.ones(32))


def test_stage_labels_name_w4a4_and_the_search():
    """They read as plain W4 of the format searched from: only bits/weight told the rows apart."""
    from llmcomp.core.config import to_dict
    from llmcomp.formats import Uniform
    from llmcomp.quant import RTNConfig

    def label(cfg):
        return api.stage_label({"method": cfg.method, "config": to_dict(cfg)})

    assert label(RTNConfig(format=Uniform(bits=4, group_size=32))) == "rtn int4 g32 asym"
    assert label(RTNConfig(format=Uniform(bits=4, group_size=32), act_bits=4)) == "rtn int4 g32 asym, A4 int"
    searched = label(FP4Config(format=FP4(group_size=32), search=True, act_bits=4, act_format="int"))
    assert searched.endswith(", searched element/clip, A4 int") and searched.startswith("fp4 fp4 e2m1 g32")
