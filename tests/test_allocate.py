import dataclasses

import pytest
import torch
from torch import nn

from llmcomp.core.config import from_json, to_json
from llmcomp.errors import UserError
from llmcomp.eval import size_report
from llmcomp.formats import Uniform
from llmcomp.quant import RTNConfig, quantize_model
from llmcomp.quant import allocate

W4G32 = Uniform(bits=4, group_size=32)  # (the allocations' group size here)


@pytest.fixture(scope="module", params=allocate.SENSITIVITIES)
def measured(request):
    from tests.conftest import tiny_llama

    model = tiny_llama(hidden=64, layers=2, inter=96, vocab=128, seed=1)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = allocate.AllocationConfig(budget=3.5, candidates=(2, 3, 4, 8), group_size=64, sensitivity=request.param)
    table = allocate.measure_errors(model, ids, ("Linear",), ("lm_head",), cfg, device="cpu")
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if n in table}
    return model, cfg, table, shapes


def test_errors_fall_with_bits(measured):
    _, _, table, _ = measured
    assert len(table) == 14
    for t in table.values():
        assert t["errors"] == sorted(t["errors"], reverse=True) and t["errors"][-1] < t["errors"][0]


@pytest.mark.parametrize("budget", [2.7, 3.25, 3.5, 5.0])
def test_budget_met_and_maximal(measured, budget):
    _, cfg, table, shapes = measured
    formats = cfg.formats()
    pick = allocate.solve(table, formats, budget, shapes)
    achieved = allocate.average_bits(pick, shapes)
    assert achieved <= budget + 1e-9
    # maximal: no single further upgrade fits the budget
    total = sum(o * i for o, i in shapes.values())
    for n, f in pick.items():
        j = formats.index(f)
        if j + 1 < len(formats):
            extra = (formats[j + 1].bits_per_weight(*shapes[n]) - f.bits_per_weight(*shapes[n])) * shapes[n][0] * shapes[n][1]
            assert achieved * total + extra > budget * total


def test_more_budget_less_error(measured):
    _, cfg, table, shapes = measured
    formats = cfg.formats()

    def err(budget):
        pick = allocate.solve(table, formats, budget, shapes)
        return sum(table[n]["errors"][formats.index(f)] for n, f in pick.items())

    assert err(2.7) > err(3.5) > err(8.5)


def test_budget_below_cheapest_rejected(measured):
    _, cfg, table, shapes = measured
    with pytest.raises(UserError, match="below the cheapest"):
        allocate.solve(table, cfg.formats(), 2.0, shapes)


def test_a_budget_below_the_cheapest_is_refused_before_measuring(tmp_path, monkeypatch):
    """It was refused only after the Fisher pass (minutes on a real model)."""
    from llmcomp import api
    from tests.conftest import save_char_model

    tiny_model_dir = save_char_model(tmp_path / "m", layers=1)
    monkeypatch.setattr(allocate, "measure_errors", lambda *a, **k: pytest.fail("measured first"))
    # (per-channel scales and zeros cost 0.5 b/w on its 64-wide layers: the config's own check, on a wide layer,
    # cannot see that)
    cfg = allocate.AllocationConfig(budget=2.1, candidates=(2, 4), group_size=0)
    with pytest.raises(UserError, match="Budget 2.1 bits/weight is below the cheapest candidate"):
        api.quantize(RTNConfig(format=Uniform(bits=4, group_size=0)), tmp_path / "q", str(tiny_model_dir),
                     allocation=cfg, calib_samples=2, calib_seq_len=16, device="cpu")


def test_a_calibrated_method_on_lm_head_is_refused_before_measuring(tmp_path, monkeypatch):
    """GPTQ with lm_head selected (--ignore '') and a fractional budget: refused after the whole sensitivity pass."""
    from llmcomp import api
    from llmcomp.quant import GPTQConfig
    from llmcomp.formats import Uniform
    from tests.conftest import save_char_model

    tiny_model_dir = save_char_model(tmp_path / "m", layers=1)
    monkeypatch.setattr(allocate, "measure_errors", lambda *a, **k: pytest.fail("measured first"))
    cfg = allocate.AllocationConfig(budget=3.5, candidates=(2, 4), group_size=32)
    with pytest.raises(UserError, match="only quantizes decoder layers; add lm_head to --ignore"):
        api.quantize(GPTQConfig(format=Uniform(bits=4, group_size=32), ignore=()), tmp_path / "q",
                     str(tiny_model_dir), allocation=cfg, calib_samples=2, calib_seq_len=16, device="cpu")


def test_lm_head_under_the_output_sensitivity_is_refused_before_measuring(tmp_path, monkeypatch):
    """RTN (which quantizes lm_head) with --sensitivity output and --ignore '': refused after the whole pass."""
    from llmcomp import api
    from tests.conftest import save_char_model

    tiny_model_dir = save_char_model(tmp_path / "m", layers=1)
    monkeypatch.setattr(allocate, "calibrate_layerwise", lambda *a, **k: pytest.fail("measured first"))
    cfg = allocate.AllocationConfig(budget=3.0, candidates=(2, 4), group_size=32, sensitivity="output")
    with pytest.raises(UserError, match="only covers decoder layers; add lm_head to --ignore"):
        api.quantize(RTNConfig(format=W4G32, ignore=()), tmp_path / "q", str(tiny_model_dir), allocation=cfg,
                     calib_samples=2, calib_seq_len=16, device="cpu")


def test_allocated_model_uses_per_layer_formats(measured):
    model, cfg, table, shapes = measured
    import copy

    q = copy.deepcopy(model)
    pick = allocate.solve(table, cfg.formats(), 3.5, shapes)
    config = dataclasses.replace(RTNConfig(), formats=pick)
    assert from_json(to_json(config)) == config
    quantize_model(q, config)
    for n, f in pick.items():
        assert q.get_submodule(n).fmt == f
    # bits/weight over the linears equals the allocation's exact accounting
    assert size_report(q)["bits_per_weight"] == pytest.approx(allocate.average_bits(pick, shapes))
    assert len({f.bits for f in pick.values()}) > 1


def test_bad_candidates():
    with pytest.raises(UserError):
        allocate.AllocationConfig(candidates=(1, 4))


def test_fisher_sees_what_the_model_output_ignores():
    """Layer 1's attention output is zeroed, so its q/k/v projections cannot change the loss: the Fisher
    sensitivity gives them zero error at every width (the allocator then leaves it at the cheapest), while the layer-output
    error still sees its (useless) output change. Gradients are off again afterwards."""
    from tests.conftest import tiny_llama

    model = tiny_llama(hidden=64, layers=2, inter=96, vocab=128, seed=1)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher = allocate.AllocationConfig(budget=3.5, candidates=(2, 4), group_size=64)
    table = allocate.measure_errors(model, ids, ("Linear",), ("lm_head",), fisher, device="cpu")
    dead = "model.layers.1.self_attn.v_proj"
    for p in ("q_proj", "k_proj", "v_proj"):
        assert table[f"model.layers.1.self_attn.{p}"]["errors"] == [0.0, 0.0]
    assert all(t["errors"][0] > t["errors"][1] > 0 for n, t in table.items() if "layers.1.self_attn" not in n)
    shapes = {n: (m.out_features, m.in_features) for n, m in model.named_modules() if n in table}
    assert allocate.solve(table, fisher.formats(), 3.5, shapes)[dead].bits == 2
    output = allocate.measure_errors(model, ids, ("Linear",), ("lm_head",),
                                     dataclasses.replace(fisher, sensitivity="output"), device="cpu")
    assert output[dead]["errors"][0] > 0
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_fisher_of_a_tied_head_is_the_heads_own():
    """A tied lm_head's Fisher took the embedding lookup's gradient too (the one Parameter got both): on the bundled
    model its total read 12 % high and some rows 2e4 times, while quantizing lm_head leaves the embedding float."""
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True)
    tied = LlamaForCausalLM(cfg).eval()
    untied = copy.deepcopy(tied)
    untied.lm_head.weight = nn.Parameter(tied.lm_head.weight.detach().clone())
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    got = allocate.fisher_diagonal(tied, ids, {"lm_head": tied.lm_head}, 3)["lm_head"]
    want = allocate.fisher_diagonal(untied, ids, {"lm_head": untied.lm_head}, 3)["lm_head"]
    assert torch.allclose(got, want, rtol=1e-5, atol=0)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # (tied again)


def test_bad_sensitivity():
    with pytest.raises(UserError, match="sensitivity"):
        allocate.AllocationConfig(sensitivity="hessian")
    with pytest.raises(UserError, match="fisher_samples"):
        allocate.AllocationConfig(fisher_samples=0)


def test_budgets_outside_the_candidates_name_the_side():
    """--bits 100.5 was told to choose a budget above 2; the bounds count the scales and zeros (g16 asym int4 costs
    6 b/w, and 5.5 was refused as past every width)."""
    with pytest.raises(UserError, match="choose a budget of at least 2.25"):
        allocate.AllocationConfig(budget=2.1, candidates=(2, 4))
    with pytest.raises(UserError, match="past every candidate width \\[2, 4\\].*cost 4.25.*at most 5.25"):
        allocate.AllocationConfig(budget=100.5, candidates=(2, 4))
    assert allocate.AllocationConfig(budget=4.5, candidates=(2, 4)).budget == 4.5
    assert allocate.AllocationConfig(budget=5.5, candidates=(2, 3, 4), group_size=16).budget == 5.5
    with pytest.raises(UserError, match="at least 6"):
        allocate.AllocationConfig(budget=5.5, candidates=(2, 3, 4), group_size=8)
    assert allocate.AllocationConfig(budget=2.005, candidates=(2, 3), group_size=0).budget == 2.005  # (8192 wide)


def test_the_output_sensitivity_pass_runs_at_calib_batch(tmp_path, monkeypatch):
    """It ran at 8 windows whatever --calib-batch said: out of memory on a GPU after following the error's advice."""
    from llmcomp import api
    from tests.conftest import save_char_model

    tiny_model_dir = save_char_model(tmp_path / "m", layers=1)
    seen = []
    real = allocate.calibrate_layerwise
    monkeypatch.setattr(allocate, "calibrate_layerwise", lambda *a, **k: seen.append(k["batch_size"]) or real(*a, **k))
    cfg = allocate.AllocationConfig(budget=3.0, candidates=(2, 4), group_size=32, sensitivity="output")
    out = api.quantize(RTNConfig(format=W4G32), tmp_path / "q", str(tiny_model_dir), allocation=cfg, calib_samples=4,
                       calib_seq_len=16, device="cpu", calib_batch=2)
    assert seen == [2]
    import io

    from rich.console import Console

    from llmcomp.cli import render

    text = io.StringIO()  # (inspect printed every layer's format inside the stage's cell)
    Console(file=text, width=300).print(*render.manifest_tables(api.inspect(out)))
    assert "<7 per-layer formats (bit allocation)>" in text.getvalue() and "'bits': 2" not in text.getvalue()
