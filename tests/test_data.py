import torch

from llmcomp.core import data
from llmcomp.core.rdata import unserialize


def test_corpus_has_disjoint_splits():
    c = data.corpus()
    assert c.name in ("austen", "pydoc")
    assert len(c.calib) > 100_000 and len(c.eval) > 50_000
    probe = c.eval[10_000:10_200]
    assert probe not in c.calib
    if c.name == "austen":
        assert "It is a truth universally acknowledged" in c.eval[:2000]
        assert "Persuasion" not in c.calib[:200] and "Elinor" in c.calib


def test_pydoc_fallback_splits():
    c = data.corpus("pydoc")
    assert c.name == "pydoc" and c.eval[:500] not in c.calib


class _CharTok:
    """A stand-in tokenizer: one token per byte."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(text.encode("utf-8"))}


def test_sampling_is_seeded_and_deterministic():
    tok = _CharTok()
    a = data.calib_windows(tok, 64, 5, seed=1, source="pydoc")
    b = data.calib_windows(tok, 64, 5, seed=1, source="pydoc")
    c = data.calib_windows(tok, 64, 5, seed=2, source="pydoc")
    assert a.shape == (5, 64) and torch.equal(a, b) and not torch.equal(a, c)
    e = data.eval_windows(tok, 32, 3, source="pydoc")
    assert e.shape == (3, 32)
    assert bytes(e[0].tolist()).decode() == data.corpus("pydoc").eval[:32]


def test_rds_reader_on_handmade_stream():
    import struct

    def i(v):
        return struct.pack(">i", v)

    # STRSXP of two CHARSXPs, serialization version 2
    blob = b"X\n" + i(2) + i(0) + i(0) + i(16) + i(2) + i(9) + i(2) + b"hi" + i(9) + i(-1)
    assert unserialize(blob) == ["hi", None]


def test_rds_reader_reads_pairlists():
    """A names attribute (a tagged pairlist), and a pairlist with an attribute of its own, read past: the reader of
    every cached-text miss (the Austen index is a named list); a pairlist raised UnboundLocalError for one commit
    (f3cbf3b), which only a clean cache found."""
    import struct

    def i(v):
        return struct.pack(">i", v)

    def chars(text):
        return i(9) + i(len(text)) + text.encode()

    nil = i(254)
    head = b"X\n" + i(2) + i(0) + i(0)
    names = i(2 | 1 << 10) + i(1) + chars("names") + i(16) + i(2) + chars("x") + chars("y") + nil
    named = i(19 | 1 << 9) + i(2) + i(16) + i(1) + chars("hi") + i(13) + i(1) + i(7) + names
    assert unserialize(head + named) == {"x": ["hi"], "y": [7]}
    own = i(2 | 1 << 9 | 1 << 10) + nil + i(1) + chars("a") + i(13) + i(1) + i(3) + nil  # (its attribute: NULL)
    assert unserialize(head + own) == [("a", [3])]


def test_an_unreadable_package_falls_back_to_pydoc(tmp_path, monkeypatch):
    """A package tarfile cannot read (zstd, Ubuntu's) or damaged data gave a traceback from the default text
    source instead of the standard-library fallback; a data archive in a codec tarfile lacks goes through
    dpkg-deb where there is one."""
    import io
    import tarfile
    import zlib

    import pytest

    monkeypatch.setenv("LLMCOMP_CACHE", str(tmp_path))
    for exc in (tarfile.ReadError("bad"), zlib.error("bad"), EOFError()):
        def fail(root, exc=exc):
            raise exc
        monkeypatch.setattr(data, "_fetch_austen", fail)
        data.corpus.cache_clear()
        try:
            assert data.corpus("auto").name == "pydoc"
            with pytest.raises(data.UserError, match="Could not fetch the Austen text"):
                data.corpus("austen")
        finally:
            data.corpus.cache_clear()

    plain = io.BytesIO()
    with tarfile.open(fileobj=plain, mode="w") as tar:
        info = tarfile.TarInfo("./usr/x/Rdata.rdb")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    runs = []
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/dpkg-deb")
    monkeypatch.setattr(data.subprocess, "run", lambda cmd, **kw: runs.append(cmd) or
                        type("R", (), {"stdout": plain.getvalue()})())
    assert data._plain_tar(tmp_path / "p.deb", b"not a tar in any codec tarfile reads") == plain.getvalue()
    assert runs and runs[0][:2] == ["dpkg-deb", "--fsys-tarfile"]
    assert data._plain_tar(tmp_path / "p.deb", plain.getvalue()) == plain.getvalue()


def test_ids_past_the_embeddings_are_one_error():
    """A tokenizer of another model gave an IndexError from the embedding (a device-side assert on a GPU)."""
    import pytest

    from conftest import tiny_llama
    from llmcomp.errors import UserError
    from llmcomp.eval.perplexity import perplexity

    model = tiny_llama(vocab=64)
    data.check_vocab(torch.tensor([[0, 63]]), model)
    with pytest.raises(UserError, match="token id 100, past the model's 64 embeddings"):
        data.check_vocab(torch.tensor([[5, 100]]), model)
    with pytest.raises(UserError, match="past the model's 64 embeddings"):
        perplexity(model, _CharTok(), seq_len=16, n_windows=1, source="pydoc")


def test_an_empty_text_variable_means_unset(monkeypatch):
    """LLMCOMP_TEXT='' (or spaces) was refused as an unknown text source '': an empty variable is commonly unset."""
    monkeypatch.setattr(data, "_austen", lambda: None)  # (auto's fallback: no fetch)
    for value in ("", " "):
        monkeypatch.setenv("LLMCOMP_TEXT", value)
        data.corpus.cache_clear()
        try:
            assert data.corpus().name == "pydoc"
        finally:
            data.corpus.cache_clear()


def test_a_bad_text_variable_is_named(tmp_path, monkeypatch):
    """LLMCOMP_TEXT=x said 'Unknown text source 'x'', not that the value came from the variable; a source a caller
    names keeps its own message."""
    import pytest
    from typer.testing import CliRunner

    from conftest import save_char_model
    from llmcomp.cli.app import app

    monkeypatch.setenv("LLMCOMP_TEXT", " x ")
    data.corpus.cache_clear()
    try:
        with pytest.raises(data.UserError, match=r"^LLMCOMP_TEXT='x' is not a text source; use auto, austen or "
                                                 r"pydoc \(or unset it\)\.$"):
            data.corpus()
        with pytest.raises(data.UserError, match=r"^Unknown text source 'y'; use auto, austen or pydoc\.$"):
            data.corpus("y")
        assert data.corpus("pydoc").name == "pydoc"  # (a source given wins over the variable)
        r = CliRunner().invoke(app, ["eval", str(save_char_model(tmp_path / "m", layers=1)), "--windows", "1",
                                     "--seq-len", "16"])
    finally:
        data.corpus.cache_clear()
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert errors == ["error: LLMCOMP_TEXT='x' is not a text source; use auto, austen or pydoc (or unset it)."]


def test_a_damaged_cached_text_is_one_error(tmp_path, monkeypatch):
    """A byte that is not UTF-8 in the cached novels was a UnicodeDecodeError traceback from every command."""
    import pytest

    monkeypatch.setenv("LLMCOMP_CACHE", str(tmp_path))
    root = tmp_path / "text" / "austen"
    root.mkdir(parents=True)
    for name in (*data.CALIB_NOVELS, *data.EVAL_NOVELS, "prideprejudice"):
        (root / f"{name}.txt").write_text("It is a truth universally acknowledged.")
    (root / f"{data.EVAL_NOVELS[0]}.txt").write_bytes(b"caf\xe9")
    data.corpus.cache_clear()
    try:
        with pytest.raises(data.UserError, match="cached Austen text .* is damaged"):
            data.corpus("austen")
    finally:
        data.corpus.cache_clear()


def test_the_bundled_conversion_draws_no_bar_of_its_own(capsys):
    """transformers' GGUF reader drew ~30 tqdm redraws under `quantize`'s own message: TQDM_DISABLE, set for the
    conversion, is read by tqdm at import, and by then tqdm was imported."""
    import tqdm  # noqa: F401  (imported before, as in a quantize run)
    from transformers import modeling_gguf_pytorch_utils as gguf

    from llmcomp.core.model import _no_gguf_bar

    before = gguf.tqdm
    with _no_gguf_bar():
        assert list(gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
    assert gguf.tqdm is before
    assert "Converting" not in capsys.readouterr().err
    list(gguf.tqdm(range(3), desc="Converting after"))  # (outside, the reader's bar is as it was)
    assert "Converting after" in capsys.readouterr().err
