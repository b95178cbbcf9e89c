import math

import pytest
import torch

from llmcomp.eval import perplexity, size_report
from llmcomp.formats import Uniform
from llmcomp.quant import RTNConfig, quantize_model


class _CharTok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b % 128 for b in text.encode("utf-8")]}


def test_perplexity_matches_manual_nll(tiny_model):
    tok = _CharTok()
    r = perplexity(tiny_model, tok, seq_len=16, n_windows=3, batch_size=2, source="pydoc")
    from llmcomp.core.data import eval_windows

    w = eval_windows(tok, 16, 3, source="pydoc")
    with torch.no_grad():
        logits = tiny_model(w).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), w[:, 1:].reshape(-1))
    assert r["tokens"] == 3 * 15 and r["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_size_report_bits(tiny_model):
    assert size_report(tiny_model)["bits_per_weight"] == 32
    quantize_model(tiny_model, RTNConfig(format=Uniform(bits=4, group_size=32, symmetric=True)))
    assert size_report(tiny_model)["bits_per_weight"] == pytest.approx(4 + 16 / 32)


def test_reference_of_another_tokenizer_or_vocabulary_is_refused(tmp_path):
    """The windows are the reference's token ids: a model with another tokenizer would be scored on text it cannot
    read (with the same vocabulary size: a perfect-looking agreement), another logits width cannot be compared."""
    import json
    import shutil

    from llmcomp import api
    from llmcomp.errors import UserError
    from tests.conftest import save_char_model, tiny_llama

    ref_dir = save_char_model(tmp_path / "ref", layers=1)
    ref = api.record_reference(ref_dir, seq_len=16, n_windows=2, batch_size=2, device="cpu")
    perm = shutil.copytree(ref_dir, tmp_path / "perm")  # same weights, two characters' ids swapped
    spec = json.loads((perm / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (perm / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="different tokenizer from the reference"):
        api.evaluate(perm, seq_len=16, n_windows=2, batch_size=2, device="cpu", reference=ref)
    wide = tmp_path / "wide"  # the reference's tokenizer, 256 logits instead of 128
    shutil.copytree(ref_dir, wide)
    tiny_llama(layers=1, vocab=256).save_pretrained(wide)
    with pytest.raises(UserError, match="scores 256 tokens, the reference model 128"):
        api.evaluate(wide, seq_len=16, n_windows=2, batch_size=2, device="cpu", reference=ref)
    row = api.evaluate(ref_dir, seq_len=16, n_windows=2, batch_size=2, device="cpu", reference=ref)
    assert row["kld_mean"] < 1e-6 and row["greedy_prompts"] == 2  # (the caption said 8 prompts whatever the windows)
    from llmcomp.cli import render

    assert "greedy prefix of 32 new tokens over 2 prompts" in render.eval_table([row], False).caption
    with pytest.raises(UserError, match="recorded at n_windows=2, seq_len=16"):  # (its windows would be scored)
        api.evaluate(ref_dir, seq_len=32, n_windows=2, batch_size=2, device="cpu", reference=ref)


def test_eval_refuses_a_reference_of_another_tokenizer_before_running_it(tmp_path, monkeypatch):
    """eval --reference REF with a model of another tokenizer ran the reference's whole pass (minutes on a large model,
    its log-probs written to disk) before refusing."""
    import shutil

    from typer.testing import CliRunner

    from llmcomp import api
    from llmcomp.cli.app import app
    from tests.conftest import save_char_model

    ref_dir = save_char_model(tmp_path / "ref", layers=1)
    other = shutil.copytree(ref_dir, tmp_path / "other")
    (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace('"a":', '"\\u00e9":'))

    def no_run(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(api, "record_reference", no_run)
    r = CliRunner().invoke(app, ["eval", str(ref_dir), str(other), "--reference", str(ref_dir), "--windows", "1",
                                 "--seq-len", "16"])
    assert r.exit_code == 2 and "other has a different tokenizer from the reference" in " ".join(r.output.split()), \
        r.output


def test_a_broken_model_scores_inf_not_an_overflow(tiny_model):
    """A mean NLL past ~709.8 nats overflowed math.exp: eval, check and eval --long crashed instead of reporting."""
    with torch.no_grad():
        tiny_model.lm_head.weight.mul_(1e5)
    r = perplexity(tiny_model, _CharTok(), seq_len=16, n_windows=2, batch_size=2, source="pydoc")
    assert r["nll"] > 710 and r["ppl"] == math.inf


def test_size_counts_the_files_a_load_reads(tiny_model, tmp_path):
    """Not every *.safetensors beside them: a Mistral-style consolidated.safetensors or a hidden copy doubled it."""
    import shutil

    tiny_model.save_pretrained(tmp_path)
    one = size_report(tiny_model, tmp_path)["size_mb"]
    assert one == pytest.approx((tmp_path / "model.safetensors").stat().st_size / 1e6)
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "consolidated.safetensors")
    shutil.copy(tmp_path / "model.safetensors", tmp_path / "._model.safetensors")
    assert size_report(tiny_model, tmp_path)["size_mb"] == one


def test_an_all_zero_linear_has_no_sqnr_rather_than_minus_inf(tiny_model):
    """0 / 0 gave SQNR -inf: -Infinity in the manifest (not JSON) and the exactly reproduced layer reported worst."""
    import json

    with torch.no_grad():
        tiny_model.model.layers[0].self_attn.o_proj.weight.zero_()
    report = quantize_model(tiny_model, RTNConfig(format=Uniform(bits=4, group_size=32, symmetric=True)))
    assert report["model.layers.0.self_attn.o_proj"]["sqnr_db"] is None
    assert report["model.layers.0.self_attn.q_proj"]["sqnr_db"] > 10
    json.dumps(report, allow_nan=False)


def test_the_bundled_model_has_one_name_in_result_rows(tmp_path):
    """`llmcomp eval smollm2-135m ...` labelled its row with the cache folder's name (the README's quickstart table
    says smollm2-135m, which only `llmcomp eval` without a path printed)."""
    from pathlib import Path

    from llmcomp import api

    cache = Path("/cache/models/SmolLM2-135M-Instruct")
    assert api._named(None, cache) == api._named("smollm2-135m", cache) == {"path": "smollm2-135m",
                                                                             "name": "smollm2-135m"}
    assert api._named(str(tmp_path / "w4"), tmp_path / "w4")["name"] == "w4"


def test_the_long_table_gives_kv_megabytes_as_eval_gives_sizes():
    """"KV MB" divided by 2**20 (MiB) where eval's "size MB" and --max-memory's MB are 10**6: 4.6 % low."""
    import io

    from rich.console import Console

    from llmcomp.cli import render

    row = {"name": "m", "policy": "dense", "ppl": 20.0, "kv_bytes": 35_389_440, "kv_dense_bytes": 35_389_440,
           "passkey": {}, "eval_time_s": 1.0, "text": "austen", "windows": 1, "context": 1024, "prefix": 768,
           "chunk": 64}
    out = io.StringIO()
    Console(file=out, width=200).print(render.long_table([row], False))
    assert "35.4" in out.getvalue() and "33.8" not in out.getvalue()


def test_the_long_table_shows_no_delta_between_tokenizers_or_window_counts():
    """eval --long --compare of SmolLM2 and a char-level model printed Δppl +432 % (per-token perplexities under two
    tokenizers, over other spans of text), where the perplexity table shows '-'."""
    from rich.console import Console

    from llmcomp.cli import render

    row = {"name": "a", "policy": "dense", "ppl": 20.0, "kv_bytes": 1e6, "kv_dense_bytes": 1e6, "passkey": {},
           "eval_time_s": 1.0, "text": "austen", "windows": 2, "context": 128, "prefix": 96, "chunk": 64,
           "tokenizer": "t1"}
    rows = [row, {**row, "name": "b", "ppl": 22.0}, {**row, "name": "c", "tokenizer": "t2"},
            {**row, "name": "d", "windows": 1}]
    console = Console(width=200, record=True)
    console.print(render.long_table(rows, True))
    rows_shown = [[c.strip() for c in line.split("│")] for line in console.export_text().splitlines()]
    cells = {r[1]: r[4] for r in rows_shown if r[1:2] in (["a"], ["b"], ["c"], ["d"])}
    assert cells == {"a": "+0.00", "b": "+10.00", "c": "-", "d": "-"}
    assert "do not compare" in render.long_table(rows, True).caption
    assert "do not compare" not in render.long_table(rows[:2], True).caption
