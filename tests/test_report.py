"""llmcomp report: plots and report.md for tiny artifacts of every stage kind (quantize with and without
calibration and bit allocation, MoE conversion and expert pruning, KV policies, linearize, import), the
markdown-only fallback without matplotlib, and bad input."""
import sys

import pytest
import torch
from typer.testing import CliRunner

from llmcomp import api
from llmcomp.cli.app import app
from llmcomp.formats import Uniform
from llmcomp.report import facts
from tests.conftest import tiny_llama

PNG = b"\x89PNG\r\n\x1a\n"
CALIB = dict(calib_samples=4, calib_seq_len=32, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread_short_text():
    """One thread (shared 2-core machine) and a slice of the calibration text (the tiny tokenizer is slow)."""
    from llmcomp.core import data

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    full = data.corpus()
    short = data.Corpus(full.name, full.calib[:40_000], full.eval[:20_000])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "corpus", lambda source=None: short)
        mp.setattr(api, "corpus", lambda source=None: short)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def dense(root):
    from test_experts import _save_with_tokenizer

    return _save_with_tokenizer(tiny_llama(vocab=300), root / "dense")


def _rtn(root, dense):
    from llmcomp.quant import RTNConfig

    return api.quantize(RTNConfig(format=Uniform(4, 32)), root / "rtn", str(dense))


def _gptq_alloc(root, dense):
    from llmcomp.quant import GPTQConfig
    from llmcomp.quant.allocate import AllocationConfig

    return api.quantize(GPTQConfig(format=Uniform(4, 32)), root / "alloc", str(dense),
                        allocation=AllocationConfig(budget=3.5, candidates=(2, 3, 4, 8), group_size=32), **CALIB)


def _alloc_duo(root, dense):
    """Bit allocation, then DuoAttention heads on top."""
    from llmcomp.prune.kv.duo import DuoConfig

    alloc = root / "alloc" if (root / "alloc").exists() else _gptq_alloc(root, dense)
    return api.prune_kv(DuoConfig(streaming=0.5, sinks=2, window=8, heads=("10", "01")), root / "duo", str(alloc))


def _moe_chain(root, dense):
    """moefy → expert pruning → RTN on the (then unfused) experts: four stages in one artifact."""
    from llmcomp.convert.moefy import MoefyConfig
    from llmcomp.prune.experts import ExpertPruneConfig
    from llmcomp.quant import RTNConfig

    moe = api.moefy(MoefyConfig(experts=4, top_k=2, shared=0, kmeans_iters=2), root / "moefied", str(dense), **CALIB)
    pruned = api.prune_experts(ExpertPruneConfig(method="frequency", ratio=0.25, protect_super_experts=False),
                               root / "pruned", str(moe), **CALIB)
    return api.quantize(RTNConfig(format=Uniform(8, 0), ignore=("lm_head", "mlp.gate")), root / "chain", str(pruned))


def _heapr(root, dense):
    from test_experts import _save_with_tokenizer, tiny_moe

    from llmcomp.prune.experts import ExpertPruneConfig

    src = _save_with_tokenizer(tiny_moe("qwen3_moe"), root / "moe")
    return api.prune_experts(ExpertPruneConfig(method="heapr", ratio=0.25), root / "heapr", str(src), **CALIB)


def _mustafar(root, dense):
    from llmcomp.prune.kv.mustafar import MustafarConfig

    return api.prune_kv(MustafarConfig(0.5, 0.7, window=4), root / "mustafar", str(dense))


def _linearize(root, dense):
    from llmcomp.linearize.distill import LinearizeConfig

    cfg = LinearizeConfig(method="hedgehog", window=4, keep_layers=(1,), transfer_steps=3, tokens=128, seq_len=32,
                          batch_size=2, checkpoint_every=1)
    return api.linearize(cfg, root / "lin", str(dense), calib_samples=2, calib_seq_len=32, device="cpu")


def _imported(root, dense):
    from llmcomp.quant import RTNConfig

    api.export(api.quantize(RTNConfig(format=Uniform(4, 32)), root / "to-export", str(dense)), "gptq", root / "gptq")
    return api.quantize(RTNConfig(format=Uniform(8, 0), ignore=()), root / "imported", str(root / "gptq"))


# artifact maker, PNG files expected, stage labels report.md must name
KINDS = {
    "rtn": (_rtn, {"errors-1.png", "bits.png"}, ["rtn int4 g32 asym"]),
    "gptq-alloc": (_gptq_alloc, {"errors-1.png", "bits.png"}, ["gptq alloc 3.50 b/w", "allocated code bits"]),
    "alloc+duo": (_alloc_duo, {"errors-1.png", "bits.png", "kv-2.png"}, ["kv-duo", "| 0 | Rs | 1 |", "| 1 | sR | 1 |"]),
    "moe-chain": (_moe_chain, {"moefy-1.png", "experts-2.png", "errors-4.png", "bits.png"},
                  ["moefy", "experts-frequency", "unfuse-experts", "rtn int8 per-channel asym"]),
    "heapr": (_heapr, {"experts-1.png"}, ["experts-heapr", "neurons removed per expert"]),
    "mustafar": (_mustafar, {"kv-1.png"}, ["kv-mustafar", "mustafar K 0.5 V 0.7 window 4"]),
    "linearize": (_linearize, {"linearize-1.png"}, ["linearize-hedgehog", "| 1 | softmax |"]),
    "import": (_imported, {"bits.png"}, ["import-gptq int4 g32 asym", "rtn int8 per-channel asym"]),
}


def _check_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000, (path, len(data))


@pytest.mark.parametrize("kind", list(KINDS))
def test_report_writes_the_plots_that_apply_and_names_every_stage(kind, root, dense):
    make, pngs, needles = KINDS[kind]
    artifact = make(root, dense)
    out = root / "reports" / kind
    r = CliRunner().invoke(app, ["report", str(artifact), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.glob("*.png")} == pngs
    for png in pngs:
        _check_png(out / png)
    md = (out / "report.md").read_text()
    stages = api.inspect(artifact)["stages"]
    for i, stage in enumerate(stages, 1):
        assert f"## Stage {i}: {api.stage_label(stage)}" in md
    for needle in needles:
        assert needle in md
    for png in pngs:
        assert f"]({png})" in md
    assert "bits per weight (decoder linears, lm_head excluded)" in md


def test_numbers_in_the_report_come_from_the_manifest(root, dense):
    artifact = root / "alloc" if (root / "alloc").exists() else _gptq_alloc(root, dense)
    out = api.report(artifact, root / "alloc-numbers")["path"]
    md = (out / "report.md").read_text()
    stage = api.inspect(artifact)["stages"][0]
    layers = stage["metrics"]["layers"]
    bits = layers["_allocation"]["bits"]
    row0 = ", ".join(f"{k} {bits[f'model.layers.0.{p}.{k}_proj']}" for p, k in
                     [("self_attn", "q"), ("self_attn", "k"), ("self_attn", "v"), ("self_attn", "o"),
                      ("mlp", "gate"), ("mlp", "up"), ("mlp", "down")])
    assert row0 in md
    worst = min((v["sqnr_db"], k) for k, v in layers.items() if k.startswith("model.layers.1."))
    assert f"{worst[1].removeprefix('model.layers.1.')} {worst[0]:.1f}" in md
    assert f"| bits per weight (decoder linears, lm_head excluded) | {stage['metrics']['bits_per_weight']:.3f} |" in md


def test_without_matplotlib_only_the_markdown_is_written(root, dense, monkeypatch):
    artifact = root / "rtn" if (root / "rtn").exists() else _rtn(root, dense)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    out = root / "no-mpl"
    r = CliRunner().invoke(app, ["report", str(artifact), "-o", str(out)])
    assert r.exit_code == 0, r.output
    lines = [line for line in r.output.splitlines() if "matplotlib" in line]
    assert lines == ["plots skipped: matplotlib is not installed; pip install matplotlib"]
    assert not list(out.glob("*.png"))
    md = (out / "report.md").read_text()
    assert "Plots not drawn: matplotlib is not installed" in md and "](" not in md
    assert "## Stage 1: rtn int4 g32 asym" in md


def test_default_output_is_beside_the_artifact(root, dense):
    artifact = root / "rtn" if (root / "rtn").exists() else _rtn(root, dense)
    r = CliRunner().invoke(app, ["report", str(artifact)])
    assert r.exit_code == 0, r.output
    assert (root / "rtn-report" / "report.md").exists()
    import os

    here = os.getcwd()
    try:  # `report .` inside the artifact: beside it still (Path('.').parent is '.')
        os.chdir(artifact)
        r = CliRunner().invoke(app, ["report", ".", "--overwrite"])
    finally:
        os.chdir(here)
    assert r.exit_code == 0, r.output
    assert not (artifact / "rtn-report").exists() and (root / "rtn-report" / "report.md").exists()


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    return lines[0]


def test_bad_input(root, dense, tmp_path):
    runner = CliRunner()
    artifact = root / "rtn" if (root / "rtn").exists() else _rtn(root, dense)
    assert "is not an llmcomp artifact" in one_error_line(runner.invoke(app, ["report", str(dense), "-o",
                                                                              str(tmp_path / "a")]))
    assert "is not an llmcomp artifact" in one_error_line(runner.invoke(app, ["report", str(tmp_path / "nope")]))
    assert not (tmp_path / "a").exists()
    out = tmp_path / "r"
    assert runner.invoke(app, ["report", str(artifact), "-o", str(out)]).exit_code == 0
    (out / "mine.txt").write_text("keep")
    assert "already exists" in one_error_line(runner.invoke(app, ["report", str(artifact), "-o", str(out)]))
    assert (out / "mine.txt").exists()
    r = runner.invoke(app, ["report", str(artifact), "-o", str(out), "--overwrite"])
    assert r.exit_code == 0 and not (out / "mine.txt").exists() and (out / "report.md").exists()
    before = sorted(p.name for p in artifact.iterdir())
    assert "would replace the input" in one_error_line(
        runner.invoke(app, ["report", str(artifact), "-o", str(artifact), "--overwrite"]))
    assert sorted(p.name for p in artifact.iterdir()) == before
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "llmcomp.json").write_text("{not json")
    assert "corrupt" in one_error_line(runner.invoke(app, ["report", str(tmp_path / "broken")]))


def test_an_edited_or_incomplete_artifact_is_refused(root, dense, tmp_path):
    """report read the manifest unverified: bits edited to 8 in an int4 artifact reported 9.0 bits a weight (inspect
    and eval refuse it), and with the weights deleted it reported 0.0 MB on disk."""
    import json
    import shutil

    runner = CliRunner()
    artifact = root / "rtn" if (root / "rtn").exists() else _rtn(root, dense)
    edited, gone = tmp_path / "edited", tmp_path / "gone"
    shutil.copytree(artifact, edited)
    m = json.loads((edited / "llmcomp.json").read_text())
    for spec in m["modules"].values():
        spec["bits"] = 8
    (edited / "llmcomp.json").write_text(json.dumps(m))
    assert "was edited" in one_error_line(runner.invoke(app, ["report", str(edited), "-o", str(tmp_path / "a")]))
    shutil.copytree(artifact, gone)
    (gone / "model.safetensors").unlink()
    assert "is missing" in one_error_line(runner.invoke(app, ["report", str(gone), "-o", str(tmp_path / "b")]))


def test_an_unsealed_manifest_with_odd_values_still_reports(root, dense, tmp_path):
    """A manifest without its seal is read as before; a string where report formatted a number was a traceback
    (bits per weight "x": ValueError in the stage summary; wall time "x": in the totals). eval and inspect read it."""
    import json
    import shutil

    from llmcomp.core.artifact import SEAL

    artifact = root / "rtn" if (root / "rtn").exists() else _rtn(root, dense)
    shutil.copytree(artifact, tmp_path / "odd")
    m = json.loads((tmp_path / "odd" / "llmcomp.json").read_text())
    del m[SEAL]
    m["stages"][0]["metrics"]["bits_per_weight"] = "x"
    m["stages"][0]["wall_time_s"] = "x"
    (tmp_path / "odd" / "llmcomp.json").write_text(json.dumps(m))
    r = CliRunner().invoke(app, ["report", str(tmp_path / "odd"), "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "| stage wall time | 0.0 s |" in (tmp_path / "rep" / "report.md").read_text()


def test_paths_split_into_decoder_layer_and_linear_kind():
    assert facts.split_path("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert facts.split_path("model.layers.3.mlp.experts.down.7") == (3, "mlp.experts.down.*")
    assert facts.split_path("lm_head") == (None, "lm_head")
    assert facts.kind_label("model.layers.3.mlp.experts.down.7") == "experts.down[7]"  # (was "*")
    assert facts.kind_label("model.layers.3.mlp.experts.5.gate_proj") == "experts.gate[5]"
    assert facts.kind_label("model.layers.3.self_attn.q_proj") == "q"
    assert facts.kind_order(["mlp.down_proj", "self_attn.q_proj", "mlp.gate_proj", "x.router"]) == [
        "self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj", "x.router"]
    # (a GLA / Mamba student's own projections: the bits heatmap drew self_attn.gate_proj among the MLP's rows)
    assert facts.kind_order(["mlp.up_proj", "self_attn.dt_proj", "mlp.gate_proj", "self_attn.gate_proj",
                             "self_attn.o_proj"]) == ["self_attn.o_proj", "self_attn.gate_proj", "self_attn.dt_proj",
                                                      "mlp.gate_proj", "mlp.up_proj"]


def test_kv_shares_per_policy():
    config = {"num_hidden_layers": 3, "num_key_value_heads": 2, "max_position_embeddings": 1000}
    stage = {"kind": "kv", "method": "kv-h2o", "config": {"ratio": 0.5, "budget": 250, "recent": 0.5}, "metrics": {}}
    f = facts.kv_facts(stage, config)
    assert f["k"] == f["v"] == [0.25] * 3 and "250 tokens" in f["what"]
    stage = {"kind": "kv", "method": "kv-duo", "config": {"heads": ["10", "00", "11"], "sinks": 40, "window": 60},
             "metrics": {}}
    f = facts.kv_facts(stage, config)
    assert f["k"] == pytest.approx([0.55, 0.1, 1.0]) and f["heads"][1] == [False, False]
    assert facts.kv_facts({"kind": "moe"}, config) is None


def test_only_an_lm_head_quantized_still_writes_the_report(tmp_path, dense):
    """No quantized linear inside a decoder layer: the bits heatmap had no cells and report crashed."""
    from llmcomp.quant import RTNConfig

    art = api.quantize(RTNConfig(format=Uniform(4, 32), targets=("lm_head",), ignore=()), tmp_path / "lmhead",
                       str(dense))
    r = CliRunner().invoke(app, ["report", str(art), "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.md").exists() and not (tmp_path / "rep" / "bits.png").exists()
    md = (tmp_path / "rep" / "report.md").read_text()  # (its "Bits per weight" section was a heading over nothing)
    section = md.split("## Bits per weight")[1].split("\n## ")[0]
    assert "No decoder layer has a quantized linear; outside them: `lm_head` " in section
    assert "(int4 g32 asym)" in section


def test_small_errors_keep_their_digits():
    from llmcomp.report.markdown import _f

    assert _f(0.00382) == "0.00382" and _f(0.019) == "0.019" and _f(24.2234) == "24.22" and _f(0.0) == "0.00"


def test_inspect_prints_no_none_for_stages_without_bits(tmp_path, dense):
    r = CliRunner().invoke(app, ["inspect", str(_moe_chain(tmp_path, dense))])
    assert r.exit_code == 0, r.output
    assert "None bits/weight" not in r.output and "moefy in" in r.output
    assert "attention" not in r.output  # (only a linearized model's layout is shown)


def test_a_model_named_dot_is_named_by_its_folder(tmp_path, monkeypatch):
    """``quantize .`` recorded an empty base-model name (Path('.').name is '')."""
    from pathlib import Path

    from llmcomp.core.model import model_name

    (tmp_path / "mymodel").mkdir()
    (tmp_path / "mymodel" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "mymodel")
    assert model_name(Path(".")) == "mymodel"


def test_kl_curve_points_sit_at_their_fine_tuning_steps():
    """The curve keeps every (steps // 20)-th KL; it was plotted at 1, 2, 3, ... under "fine-tuning step"."""
    stage = {"kind": "linearize", "layout": ["linear"], "metrics": {
        "transfer_rel_mse": {"0": 0.1}, "finetune": {"steps": 45, "kl_curve": [0.5 - 0.01 * i for i in range(23)]}}}
    f = facts.linearize_facts(stage)
    assert f["kl_steps"][:3] == [1, 3, 5] and f["kl_steps"][-1] == 45 and len(f["kl_steps"]) == 23


def test_a_linearize_summary_averages_the_linear_and_the_kept_layers_apart():
    """One mean over every layer, the kept softmax ones (the worst measured) included, was read as the linear
    layers' error (the CLI line said 182.5 % where the 27 linear layers averaged ~97 %)."""
    from llmcomp.report import markdown

    stage = {"kind": "linearize", "layout": ["linear", "softmax", "linear"], "metrics": {
        "transfer_rel_mse": {"0": 0.1, "1": 3.0, "2": 0.3}, "finetune": {}}}
    view = {"stage": stage, "facts": facts.linearize_facts(stage), "kind": "linearize"}
    assert markdown._summary(view) == ("2 linear / 1 softmax layers; transfer rel. MSE mean 0.2 over the linear "
                                       "layers, 3 over the softmax ones kept")
    stage["metrics"]["transfer_rel_mse"]["2"] = None  # (a layer without a measurement: said, not hidden)
    view = {"stage": stage, "facts": facts.linearize_facts(stage), "kind": "linearize"}
    assert "mean 0.1 over the linear layers (1 not measured), 3 over" in markdown._summary(view)


def test_a_linearized_layout_names_its_softmax_layers():
    """inspect showed a linearize stage's config only: not which layers run linear attention and which kept softmax."""
    stage = {"kind": "linearize", "method": "linearize-gla", "config": {"window": 0},
             "layout": ["linear", "softmax", "linear", "softmax"]}
    assert facts.attention_layout(stage) == "2 linear (gla, no window), 2 softmax (layers 1, 3)"
    assert facts.attention_layout({**stage, "layout": ["linear"] * 3}) == "3 linear (gla, no window)"
    assert facts.attention_layout({**stage, "layout": None}) is None  # (a hand-edited, unsealed manifest)
    assert facts.attention_layout({"method": "rtn", "config": {}}) is None


def test_an_moe_summary_ranks_each_expert_not_their_average():
    """A layer's experts were averaged into one value before the min / max / lowest: the worst expert was hidden
    (a report said 23.1 dB at its lowest where one expert had 20.0)."""
    from llmcomp.report import markdown

    layers = {"model.layers.0.self_attn.q_proj": {"sqnr_db": 23.1, "out_err_rel": 0.01},
              "model.layers.0.mlp.experts.0.down_proj": {"sqnr_db": 25.0, "out_err_rel": 0.02},
              "model.layers.0.mlp.experts.1.down_proj": {"sqnr_db": 20.0, "out_err_rel": 0.09},
              "lm_head": {"sqnr_db": 30.0}}
    stage = {"method": "rtn", "metrics": {"layers": layers, "bits_per_weight": 4.5}}
    view = {"stage": stage, "facts": facts.quant_facts(stage), "kind": "quantize"}
    assert "SQNR 20.0–30.0 dB (mean 24.5); output error mean 0.04, max 0.09" in markdown._summary(view)
    row = next(line for line in markdown._quant_details(view) if line.startswith("| 0 |"))
    assert "experts.down[1] 20.0" in row and "22.7" in row  # (per linear: (23.1 + 25.0 + 20.0) / 3)


def test_a_weights_only_config_is_shown_without_its_w4a4_settings():
    """inspect and report.md show a stage's config through ``shown_config``: an RTN weights-only run listed
    ``act_format`` and ``smooth``, which nothing reads at 16-bit activations, and its format as a nested dict."""
    from llmcomp.core.config import to_dict
    from llmcomp.quant.rtn import RTNConfig

    weights_only = to_dict(RTNConfig(format=Uniform(bits=4, group_size=128)))
    shown = facts.shown_config(weights_only)
    assert "act_format" not in shown and "smooth" not in shown and "formats" not in shown
    assert shown["format"] == "int4 g128 asym" and shown["act_bits"] == 16
    w4a4 = facts.shown_config(to_dict(RTNConfig(format=Uniform(bits=4, group_size=128), act_bits=4, smooth=0.3)))
    assert w4a4["act_format"] == "int" and w4a4["smooth"] == 0.3
    allocated = facts.shown_config({"format": to_dict(Uniform(bits=8, group_size=128)), "formats": {"a": {}, "b": {}}})
    assert allocated["formats"].startswith("<2 per-layer formats") and "format" not in allocated  # (int8 placeholder)


def test_settings_that_do_nothing_are_not_shown():
    """inspect showed a streaming policy's default ratio 0.5 beside its --budget 64, and compensate True for a
    frequency pruning (only HEAPr compensates; the CLI refuses --compensate elsewhere)."""
    from llmcomp.core.config import to_dict
    from llmcomp.prune.experts import ExpertPruneConfig
    from llmcomp.prune.kv.evict import StreamingConfig

    assert "ratio" not in facts.shown_config(to_dict(StreamingConfig(budget=64)))
    assert facts.shown_config(to_dict(StreamingConfig(ratio=0.25)))["ratio"] == 0.25
    assert "compensate" not in facts.shown_config(to_dict(ExpertPruneConfig(method="frequency")))
    assert facts.shown_config(to_dict(ExpertPruneConfig(method="heapr")))["compensate"] is True
