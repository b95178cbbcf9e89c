"""Synthetic passkey / multi-key needle prompts (core/passkey.py), their scoring in eval --long, bench/kv.py."""
import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama
from llmcomp.cli.app import app
from llmcomp.core.data import corpus
from llmcomp.core.passkey import LABELS, MULTI_INTRO, multikey_samples, passkey_samples
from llmcomp.errors import UserError
from llmcomp.eval import longctx

SOURCE = "pydoc"  # always present, no download


class Chars:
    """Invertible character tokenizer (one id per character), so prompts decode to their exact text."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


TOK = Chars()
NEEDLE = re.compile(r"\nThe pass key for (\w+) is (\d{5})\.\n")


def decode(sample) -> str:
    return TOK.decode(sample.prompt)


@pytest.mark.parametrize("length,keys", [(400, 1), (700, 4), (1500, 12)])
def test_multikey_prompts(length, keys):
    samples = multikey_samples(TOK, length, 6, keys=keys, source=SOURCE)
    for s in samples:
        assert s.prompt.dtype == torch.long and s.prompt.numel() == length
        text = decode(s)
        found = NEEDLE.findall(text)
        assert len(found) == keys and dict(found) == s.needles  # every needle exactly once, in the prompt
        assert len(set(s.needles)) == keys and len(set(s.needles.values())) == keys  # distinct labels and keys
        for label, key in found:
            assert text.count(f"for {label} is") == 1 + (label == s.label) and text.count(key) == 1
        question = re.search(r"What is the pass key for (\w+)\? The pass key for (\w+) is$", text)
        assert question and question.group(1) == question.group(2) == s.label
        assert s.answer == s.needles[s.label]  # the asked label's key is the answer
        # the asked needle sits at its depth of the filler: filler before it = int(depth · filler length)
        needle_text = {lab: f"\nThe pass key for {lab} is {key}.\n" for lab, key in s.needles.items()}
        at = text.index(needle_text[s.label])
        n_fill = length - len(MULTI_INTRO) - sum(map(len, needle_text.values())) - len(question.group(0)) - 2
        fill_before = at - len(MULTI_INTRO) - sum(len(t) for t in needle_text.values() if text.index(t) < at)
        assert fill_before == int(s.depth * n_fill)
    assert [s.depth for s in samples] == [(i + 0.5) / 6 for i in range(6)]


def test_passkey_prompts_exact_length():
    for s in passkey_samples(TOK, 333, 4, source=SOURCE):
        text = decode(s)
        assert s.prompt.numel() == 333 and text.count(f"The pass key is {s.answer}.") == 1
        assert text.endswith("What is the pass key? The pass key is")


def _filler_pieces(text: str) -> list[str]:
    body = text.split("\n\n", 1)[1].rsplit("\n\nWhat is the pass key", 1)[0]
    return [p for p in re.split(r"\nThe pass key[^\n]*\n", body) if len(p) >= 40]


def test_eval_and_calib_prompts_do_not_share_filler():
    text = corpus(SOURCE)
    for split, own, other in (("eval", text.eval, text.calib), ("calib", text.calib, text.eval)):
        samples = (multikey_samples(TOK, 600, 3, keys=3, split=split, source=SOURCE)
                   + passkey_samples(TOK, 600, 3, split=split, source=SOURCE))
        pieces = [p for s in samples for p in _filler_pieces(decode(s))]
        assert len(pieces) >= 6
        assert all(p in own and p not in other for p in pieces)


def test_seeded_and_different_per_seed():
    a, b = (multikey_samples(TOK, 500, 2, keys=3, seed=s, source=SOURCE) for s in (0, 0))
    c = multikey_samples(TOK, 500, 2, keys=3, seed=1, source=SOURCE)
    assert all(torch.equal(x.prompt, y.prompt) for x, y in zip(a, b))
    assert not torch.equal(a[0].prompt, c[0].prompt)


def test_bad_needle_input():
    with pytest.raises(UserError, match="fewer keys") as e:
        multikey_samples(TOK, 300, 1, keys=8, source=SOURCE)  # 8 needles + question do not fit 300 tokens
    assert "300 tokens" in str(e.value)
    for keys in (0, len(LABELS) + 1, 2.5):
        with pytest.raises(UserError, match="between 1 and"):
            multikey_samples(TOK, 2000, 1, keys=keys, source=SOURCE)
    with pytest.raises(UserError, match=r"so at least \d+ tokens; raise the passkey lengths\.") as e:
        passkey_samples(TOK, 100, 1, source=SOURCE)  # (the message names the setting to change and by how much)
    need = int(str(e.value).split("so at least ")[1].split()[0])
    passkey_samples(TOK, need, 1, source=SOURCE)  # that many tokens are enough
    with pytest.raises(UserError, match="raise --seq-len"):
        passkey_samples(TOK, need - 1, 1, source=SOURCE, hint="--seq-len")


class Oracle(torch.nn.Module):
    """A fake model whose ``generate`` answers a prompt by reading its needles: with ``honest`` the asked
    label's key, else the key of another needle (a distractor)."""

    def __init__(self, honest: bool):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.honest = honest

    def generate(self, ids, max_new_tokens, **kw):
        text = TOK.decode(ids[0])
        needles = dict(NEEDLE.findall(text))
        asked = re.search(r"What is the pass key for (\w+)\?", text)
        if asked:
            key = needles[asked.group(1)] if self.honest else next(v for k, v in needles.items() if k != asked.group(1))
        else:
            key = re.search(r"The pass key is (\d+)", text).group(1)
        new = [ord(c) for c in f" {key}. ok"][:max_new_tokens]
        return torch.cat([ids, torch.tensor([new])], dim=1)


def test_retrieval_accuracy_scores_the_asked_key():
    samples = {500: multikey_samples(TOK, 500, 4, keys=3, source=SOURCE)}
    assert longctx.retrieval_accuracy(Oracle(True), TOK, samples, "x") == {"500": 1.0}
    assert longctx.retrieval_accuracy(Oracle(False), TOK, samples, "x") == {"500": 0.0}


def test_long_context_eval_reports_multikey(monkeypatch):
    monkeypatch.setenv("LLMCOMP_TEXT", SOURCE)
    corpus.cache_clear()
    try:
        class Mod(Chars):
            def __call__(self, text, add_special_tokens=False):
                return {"input_ids": [ord(c) % 128 for c in text]}

        r = longctx.long_context_eval(tiny_llama(), Mod(), context=64, n_windows=1, chunk=16,
                                      passkey_lengths=(330, 400), passkey_n=2, needle_keys=2)
    finally:
        corpus.cache_clear()
    assert set(r["multikey"]) == set(r["passkey"]) == {"330", "400"} and r["needle_keys"] == 2
    assert all(v in (0, 0.5, 1) for v in r["multikey"].values())
    assert set(r["times_s"]) == {"ppl", "passkey", "multikey"} and json.dumps(r)
    with pytest.raises(UserError, match="fewer keys"):  # checked before any forward pass
        longctx.long_context_eval(None, Mod(), context=64, passkey_lengths=(400,), passkey_n=1, needle_keys=9)


def test_cli_eval_long_needle_keys(tmp_path, monkeypatch):
    from conftest import save_char_model  # tiny model + character tokenizer saved as a directory

    monkeypatch.setenv("LLMCOMP_TEXT", SOURCE)
    corpus.cache_clear()
    path = save_char_model(tmp_path / "char", layers=1)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))  # room for 4 needles
    runner = CliRunner()
    base = ["eval", str(path), "--long", "--context", "64", "--windows", "1", "--device", "cpu",
            "--passkey-samples", "1"]
    try:
        ok = runner.invoke(app, [*base, "--passkey-lengths", "400", "--needle-keys", "2", "--json",
                                 str(tmp_path / "r.json")])
        assert ok.exit_code == 0, ok.output
        assert "2-key 400" in ok.output and json.loads((tmp_path / "r.json").read_text())[0]["needle_keys"] == 2
        for args, message in [(["--passkey-lengths", "400", "--needle-keys", "9"], "fewer keys"),
                              (["--passkey-lengths", "400", "--needle-keys", "99"], "--needle-keys must be at most 30"),
                              (["--passkey-lengths", "1024"], "use lengths up to 1018"),
                              (["--passkey-lengths", "2000"], "longer than the model's context"),
                              (["--context", "2000"], "longer than the model's")]:
            r = runner.invoke(app, [*base, *args])
            lines = [line for line in r.output.splitlines() if line.startswith("error:")]
            assert r.exit_code == 2 and len(lines) == 1 and message in r.output, r.output
            assert "Traceback" not in r.output
    finally:
        corpus.cache_clear()


def _bench_kv():
    spec = importlib.util.spec_from_file_location("bench_kv", Path(__file__).parents[1] / "bench" / "kv.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_kv_time_budget_and_table(tmp_path, monkeypatch, capsys):
    """bench/kv.py with the model work stubbed: rows merged after each, the budget stops early, deltas."""
    kv = _bench_kv()
    clock = {"t": 0.0}
    monkeypatch.setattr(kv, "time", SimpleNamespace(perf_counter=lambda: clock["t"]))
    monkeypatch.setattr(kv, "check_lengths", lambda args: None)

    def prune(policy, out, model, device):
        clock["t"] += 5
        Path(out).mkdir()
        return out

    def evaluate(path, **kw):
        clock["t"] += 20
        dense = path is None  # (the bundled model: None, not its alias)
        return {"path": str(path), "name": "x", "policy": "dense" if dense else "p", "ppl": 10.0 if dense else 11.0,
                "kv_bytes": 100 if dense else 50, "passkey": {"256": 1.0 if dense else 0.5},
                "multikey": {"256": 0.5 if dense else 0.0}, "needle_keys": 4}

    monkeypatch.setattr(kv.api, "prune_kv", prune)
    monkeypatch.setattr(kv.api, "evaluate_long", evaluate)
    out = tmp_path / "kv.json"
    args = ["--out", str(out), "--passkey-lengths", "256", "--only", "mustafar-0.5", "kivi-2", "kivi-4",
            "--time-budget", "80"]
    assert kv.main(args) == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["dense", "mustafar-0.5", "kivi-2"]  # 20 + 25 + 25 s; 70 + 1.25·25 > 80
    assert "--only kivi-4" in text and rows[1]["delta_multikey"] == {"256": -0.5} and rows[1]["kv_fraction"] == 0.5
    assert "| mustafar-0.5 (p) | 11.000 | +10.00 | 0.0 | 50.0 | 0.50 (-0.50) | 0.00 (-0.50) | 25 |" in text


def test_eval_long_without_passkeys_does_not_check_their_lengths(tmp_path, monkeypatch):
    """A streaming budget longer than a passkey length was refused even with --passkey-samples 0."""
    from conftest import save_char_model

    from llmcomp import api
    from llmcomp.prune.kv import StreamingConfig

    monkeypatch.setenv("LLMCOMP_TEXT", SOURCE)
    corpus.cache_clear()
    try:
        path = save_char_model(tmp_path / "char", layers=1)
        kv = api.prune_kv(StreamingConfig(budget=48, sinks=4), tmp_path / "kv", str(path), device="cpu")
        row = api.evaluate_long(str(kv), context=64, n_windows=1, passkey_lengths=(32,), passkey_samples=0,
                                device="cpu")
        assert row["policy"].startswith("streaming") and row["ppl"] > 0
    finally:
        corpus.cache_clear()
