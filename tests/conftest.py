"""Shared fixtures: tiny random models built in code, and the bundled real model (slow tests)."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _torch_threads():
    """A test (or a bench script it runs) that sets torch's thread count leaves it to itself: the rest of the run
    went on under one thread."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def tiny_llama(hidden=64, layers=2, inter=96, vocab=128, seed=0):
    """A tiny random Llama-style causal LM (fast unit tests)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      max_position_embeddings=256, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def save_char_model(path, layers: int = 3):
    """Save the tiny random Llama with a character-level tokenizer at ``path``, so calibrated methods
    run on the real text (no hub)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(string.printable)}
    vocab["[UNK]"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tiny_llama(layers=layers).save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(path)
    return path


def static_decode(model, ids, steps, max_len=32):
    """Greedy decode through ``decode_bench.StaticDecoder``: (decoder, logits of the prefill and each step, the
    tokens fed at each step). Here rather than in test_decode_bench.py, whose module-level custom op must be
    registered by one import only (pytest imports test files by their base name, a ``tests.`` import is a second
    copy)."""
    from llmcomp.eval import decode_bench as db

    dec = db.StaticDecoder(model, ids.shape[0], max_len)
    logits, tokens = [dec.prefill(ids).clone()], []
    for _ in range(steps):
        tokens.append(dec.tokens.clone())
        logits.append(dec.step().clone())
    return dec, logits, tokens


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny random Llama saved as a normal HF directory (no tokenizer)."""
    model = tiny_llama()
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    return path


def bundled_or_skip():
    """The bundled SmolLM2-135M-Instruct directory (converted once into the cache); the test is skipped where its
    package is not installed and no converted copy is cached (a GPU machine: the GGUF does not travel). A package
    that is there but broken is an error, as before."""
    import importlib.util

    from llmcomp.core.model import BUNDLED_GGUF_PACKAGE, bundled_model_dir
    from llmcomp.errors import UserError

    try:
        return bundled_model_dir()
    except UserError as exc:
        if importlib.util.find_spec(BUNDLED_GGUF_PACKAGE) is not None:
            raise
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def bundled_dir():
    return bundled_or_skip()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)
