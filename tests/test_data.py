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
