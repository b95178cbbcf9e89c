import copy

import numpy as np
import pytest
import torch

from llmcomp.eval import perplexity
from llmcomp.eval.agreement import Reference, common_prefix
from llmcomp.formats import Uniform
from llmcomp.quant import RTNConfig, quantize_model


@pytest.fixture(scope="module")
def setup():
    from tests.conftest import tiny_llama

    model = tiny_llama(hidden=64, layers=2, vocab=128, seed=3)
    windows = torch.randint(0, 128, (6, 40), generator=torch.Generator().manual_seed(0))
    ref = Reference.record(model, windows, batch_size=4, n_prompts=3)
    return model, windows, ref


def _score(model, ref):
    return perplexity(model, None, windows=ref.windows, batch_size=4, comparer=ref.comparer())


def test_reference_streams_to_disk(setup):
    _, windows, ref = setup
    assert isinstance(ref.logprobs, np.memmap)  # on disk, read back batch by batch
    assert ref.logprobs.shape == (6, 39, 128) and str(ref.logprobs.filename).endswith("ref_logprobs.npy")
    assert ref.continuations.shape == (3, 32)


def test_model_against_itself(setup):
    model, _, ref = setup
    r = _score(model, ref)
    assert r["kld_mean"] == pytest.approx(0, abs=1e-6)
    assert r["top1_agree"] == 1.0 and r["greedy_prefix"] == 32 and r["greedy_prompts"] == 3  # (n_prompts)
    assert r["ppl"] == pytest.approx(ref.ppl, rel=1e-5)


def test_kl_grows_as_bits_drop(setup):
    model, _, ref = setup
    kls, agree = [], []
    for bits in (8, 4, 3, 2):
        q = copy.deepcopy(model)
        quantize_model(q, RTNConfig(format=Uniform(bits=bits, group_size=32)))
        r = _score(q, ref)
        kls.append(r["kld_mean"])
        agree.append(r["top1_agree"])
    assert kls == sorted(kls) and kls[0] > 0
    assert agree[0] >= agree[-1]


def test_common_prefix():
    a = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    b = torch.tensor([[1, 2, 9, 4], [5, 2, 3, 4]])
    assert common_prefix(a, b).tolist() == [2, 0]
