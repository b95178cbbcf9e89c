"""The ``outliers`` format (uniform + fp16 sparse side tensor) and GPTQ's SpQR-style outlier selection."""
import pytest
import torch

import llmcomp
from llmcomp import api
from llmcomp.cli.methods import build_quant_config, parse_fraction
from llmcomp.core.artifact import write_artifact
from llmcomp.core.config import from_json, to_json
from llmcomp.core.qlinear import QuantLinear
from llmcomp.errors import UserError
from llmcomp.formats import Uniform
from llmcomp.formats.outliers import Outliers
from llmcomp.kernels import outlier_correction, reference_linear
from llmcomp.quant import GPTQConfig, quantize_model
from llmcomp.quant.rtn import rtn_fields
from tests.test_gptq import correlated_inputs, gptq, layer


def _packed(fmt: Outliers, w: torch.Tensor, k_idx: torch.Tensor):
    fields = rtn_fields(w, fmt.base)
    fields.update(outlier_index=k_idx, outlier_value=w.flatten()[k_idx])
    return fmt.pack(fields)


def test_format_round_trip_and_bits():
    fmt = Outliers(base=Uniform(bits=4, group_size=32), fraction=0.01)
    w = torch.randn(24, 100)
    k = fmt.count(24, 100)
    assert k == 24
    idx = torch.randperm(2400, generator=torch.Generator().manual_seed(0))[:k]
    t = _packed(fmt, w, idx)
    assert {n: (tuple(x.shape), x.dtype) for n, x in t.items()} == {
        n: (s.shape, s.dtype) for n, s in fmt.param_specs(24, 100).items()}
    assert torch.all(t["outlier_index"][1:] > t["outlier_index"][:-1])  # stored ascending
    deq = fmt.dequantize(t, 100)
    base = fmt.base.dequantize(t, 100)
    flat = deq.flatten()
    assert torch.equal(flat[idx], w.flatten()[idx].half().float())  # outliers exact (fp16)
    others = torch.ones(2400, dtype=torch.bool)
    others[idx] = False
    assert torch.equal(flat[others], base.flatten()[others])
    # 48 bits per outlier on top of the base format
    extra = fmt.bits_per_weight(24, 100) - fmt.base.bits_per_weight(24, 100)
    assert extra == pytest.approx(48 * k / 2400)
    assert from_json(to_json(fmt)) == fmt
    with pytest.raises(UserError, match="fraction"):
        Outliers(fraction=0.7)


def test_gptq_outliers_lower_error_and_are_counted():
    X = correlated_inputs(1024, 64, seed=3)
    lin = layer(64, 48, seed=4)
    lin.weight[5, 7] = 3.0  # a planted outlier: far outside its group's range
    H = 2 * X.T @ X / X.shape[0]

    def out_err(res):
        D = res.module.dequantize() - lin.weight
        return float(((D @ H) * D).sum())

    plain = gptq(lin, X, format=Uniform(bits=3, group_size=32))
    spqr = gptq(lin, X, format=Uniform(bits=3, group_size=32), outliers=0.01)
    fmt = spqr.module.fmt
    assert isinstance(fmt, Outliers) and fmt.base == Uniform(bits=3, group_size=32)
    idx = spqr.module.outlier_index.long()
    assert idx.numel() == fmt.count(48, 64) == 31
    assert 5 * 64 + 7 in idx.tolist()  # the planted weight is kept
    assert out_err(spqr) < 0.8 * out_err(plain)
    assert spqr.metrics["out_err_rel"] < plain.metrics["out_err_rel"]


def test_outlier_correction_matches_reference():
    """The fast-path wrapper: base product + sparse correction == reference dequantize + matmul."""
    fmt = Outliers(base=Uniform(bits=4, group_size=16), fraction=0.02)
    w = torch.randn(32, 64)
    idx = torch.randperm(2048, generator=torch.Generator().manual_seed(1))[:fmt.count(32, 64)]
    t = _packed(fmt, w * 3, idx)
    x = torch.randn(5, 64)
    y = reference_linear(x, fmt.base, t, 64) + outlier_correction(x, fmt, t, 64)
    assert torch.allclose(y, reference_linear(x, fmt, t, 64), atol=1e-5)


def test_cli_parsing_and_errors():
    assert parse_fraction("0.5%", "--outliers") == pytest.approx(0.005)
    assert parse_fraction("0.01", "--outliers") == pytest.approx(0.01)
    for bad in ("x", "60%", "-1"):
        with pytest.raises(UserError, match="--outliers"):
            parse_fraction(bad, "--outliers")
    cfg, _ = build_quant_config(method="gptq", bits=3, group_size=128, symmetric=False, preset=None,
                                targets=("Linear",), ignore=("lm_head",), outliers="0.5%")
    assert cfg.outliers == pytest.approx(0.005)
    with pytest.raises(UserError, match="GPTQ option"):
        build_quant_config(method="rtn", bits=3, group_size=128, symmetric=False, preset=None,
                           targets=("Linear",), ignore=("lm_head",), outliers="0.5%")
    with pytest.raises(UserError, match="static groups"):
        GPTQConfig(outliers=0.01, act_order=False, static_groups=False)


def test_end_to_end_save_load(tiny_model_dir, tmp_path):
    model, _, base, _ = api.open_model(str(tiny_model_dir))
    calib = torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    cfg = GPTQConfig(format=Uniform(bits=3, group_size=32), outliers=0.005)
    quantize_model(model, cfg, calib, batch_size=4)
    q = model.model.layers[0].mlp.down_proj
    assert isinstance(q, QuantLinear) and isinstance(q.fmt, Outliers)
    out = write_artifact(tmp_path / "spqr", model, None, base_model=base,
                         stages=[{"method": "gptq", "config": {}, "wall_time_s": 0, "metrics": {}}])
    loaded = llmcomp.load(out)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert loaded.model.layers[0].mlp.down_proj.fmt == q.fmt


def test_a_fraction_that_keeps_no_weight_is_refused_before_calibration(tiny_model_dir):
    """It wrote a plain format with no outliers under the outlier method, at the same bits/weight, silently."""
    model, _, _, _ = api.open_model(str(tiny_model_dir))
    with pytest.raises(UserError, match=r"--outliers 1e-05% keeps none of the weights of any layer \(the largest"):
        quantize_model(model, GPTQConfig(format=Uniform(bits=3, group_size=32), outliers=1e-7), None)


def test_a_layer_too_small_for_any_outlier_does_not_refuse_the_job(tiny_model_dir):
    """q/k/v/o keep none at 0.01 %, the MLP one each: the job runs (a one-row shared-expert gate refused it)."""
    from llmcomp.quant.base import check_selection
    from llmcomp.quant.gptq import GPTQQuantizer

    model, _, _, _ = api.open_model(str(tiny_model_dir))
    cfg = GPTQConfig(format=Uniform(bits=3, group_size=32), outliers=1e-4)
    assert len(check_selection(model, cfg, GPTQQuantizer(cfg))) == 14


def test_the_stage_label_names_the_outliers():
    """eval's stages column read "gptq int3 g128 asym" beside the 3.51 bits/weight the outliers make."""
    from llmcomp.core.config import to_dict

    stage = {"method": "gptq", "config": {"format": to_dict(Uniform(bits=3, group_size=128)), "outliers": 0.005}}
    assert api.stage_label(stage) == "gptq int3 g128 asym, 0.5% fp16 outliers"
    assert api.stage_label({**stage, "config": {**stage["config"], "outliers": 0.0}}) == "gptq int3 g128 asym"


def test_the_stage_label_names_act_order_off():
    """GPTQ with and without --act-order read the same in eval --compare's stages column."""
    from llmcomp.core.config import to_dict

    stage = {"method": "gptq", "config": {"format": to_dict(Uniform(bits=4, group_size=128)), "act_order": True}}
    assert api.stage_label(stage) == "gptq int4 g128 asym"
    off = {**stage, "config": {**stage["config"], "act_order": False}}
    assert api.stage_label(off) == "gptq int4 g128 asym, no act-order"


def test_an_allocation_label_says_when_lm_head_was_in_it():
    """With --ignore '' the label's "alloc 3.50 b/w" counted lm_head, and eval's bits/weight column beside it (the
    decoder's linears) read 3.29: two numbers for one row."""
    alloc = {"achieved_bits_per_weight": 3.5, "bits": {"model.layers.0.mlp.up_proj": 4, "lm_head": 3}}
    stage = {"method": "gptq", "metrics": {"layers": {"_allocation": alloc}}}
    assert api.stage_label(stage) == "gptq alloc 3.50 b/w, with lm_head"
    del alloc["bits"]["lm_head"]
    assert api.stage_label(stage) == "gptq alloc 3.50 b/w"


def test_a_stage_label_says_when_it_quantized_lm_head():
    """`quantize ART --ignore '' --target lm_head` after a decoder stage read "rtn int4 g32 asym + rtn int4 g32 asym"
    in eval --compare (the decoder quantized twice?), its bits/weight column unchanged."""
    fmt = {"_type": "Uniform", "_version": 1, "bits": 4, "group_size": 32, "symmetric": False}
    layers = {"_wall_time_s": 0.1, "lm_head": {"sqnr_db": 20.0}}
    stage = {"method": "rtn", "config": {"format": fmt}, "metrics": {"layers": layers}}
    assert api.stage_label(stage) == "rtn int4 g32 asym, lm_head only"
    layers["model.layers.0.mlp.up_proj"] = {"sqnr_db": 20.0}
    assert api.stage_label(stage) == "rtn int4 g32 asym, with lm_head"
    del layers["lm_head"]
    assert api.stage_label(stage) == "rtn int4 g32 asym"
