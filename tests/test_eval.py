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
