"""End to end on the bundled real model (SmolLM2-135M-Instruct): slow, a few minutes on 2 cores."""
import pytest
import torch
from typer.testing import CliRunner

import llmcomp
from llmcomp import api
from llmcomp.cli.app import app
from llmcomp.formats import Uniform
from llmcomp.quant import RTNConfig

pytestmark = pytest.mark.slow
WINDOWS = 8


@pytest.fixture(scope="module")
def results(bundled_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bundled")
    out = {"original": api.evaluate(str(bundled_dir), n_windows=WINDOWS, device="cpu")}
    for name, fmt in {"w8": Uniform(bits=8, group_size=0, symmetric=True),
                      "w4g128": Uniform(bits=4, group_size=128),
                      "w4": Uniform(bits=4, group_size=0)}.items():
        path = api.quantize(RTNConfig(format=fmt), root / name, str(bundled_dir))
        out[name] = api.evaluate(str(path), n_windows=WINDOWS, device="cpu")
        out[name]["path_obj"] = path
    return out


def test_w8_within_one_percent(results):
    assert abs(results["w8"]["ppl"] / results["original"]["ppl"] - 1) < 0.01


def test_w4_worse_than_w8_and_ordering(results):
    assert results["w4g128"]["ppl"] > results["w8"]["ppl"]
    assert results["w4"]["ppl"] > results["w4g128"]["ppl"]  # per-channel is coarser than g128
    assert results["w4g128"]["bits_per_weight"] < results["w8"]["bits_per_weight"] < 32
    assert results["w4g128"]["size_mb"] < results["w8"]["size_mb"] < results["original"]["size_mb"]


def test_artifact_loads_and_generates(results):
    model, tok = llmcomp.load(results["w4g128"]["path_obj"], return_tokenizer=True)
    ids = tok("The weather today is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert len(tok.decode(out[0, ids.shape[1]:]).strip()) > 0


def test_cli_default_model_runs(bundled_dir, tmp_path):
    """`llmcomp quantize` with no model argument uses the bundled model (``bundled_dir``: skipped where it is not
    installed)."""
    r = CliRunner().invoke(app, ["quantize", "-o", str(tmp_path / "d"), "--bits", "8", "--group-size", "0",
                                 "--target", r"re:.*layers\.0\.mlp\..*"])
    assert r.exit_code == 0, r.output
    m = llmcomp.inspect(str(tmp_path / "d"))
    assert m["base_model"]["name"] == "SmolLM2-135M-Instruct" and len(m["modules"]) == 3


def test_the_conversion_into_an_empty_cache_gives_the_same_model(bundled_dir, tmp_path, monkeypatch):
    """Every other test reads the cache's converted copy: a NameError in the conversion (a dropped import) reached
    only a fresh machine's first command."""
    from safetensors.torch import load_file

    from llmcomp.core.model import bundled_model_dir, load_tokenizer

    monkeypatch.setenv("LLMCOMP_CACHE", str(tmp_path / "cache"))
    said = []
    fresh = bundled_model_dir(said.append)
    assert fresh == tmp_path / "cache" / "models" / bundled_dir.name
    assert said == ["Converting the bundled GGUF model (once)"]
    assert load_tokenizer(fresh)("The weather").input_ids == load_tokenizer(bundled_dir)("The weather").input_ids
    a, b = load_file(fresh / "model.safetensors"), load_file(bundled_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
