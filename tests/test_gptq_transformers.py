"""The GPTQ export loaded by transformers itself (optimum + gptqmodel), not by llmcomp's own reader.

Skipped unless gptqmodel and optimum are importable (they are not llmcomp dependencies; see
bench/gptq_transformers.py for a venv that has them on torch 2.13 CPU). gptqmodel's plain torch kernel
multiplies the float16 scales in float16, so its weights must equal llmcomp's rounded to float16 bit for
bit; with its scales upcast to float32 it does llmcomp's arithmetic, so the logits must match."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum.gptq")

import llmcomp  # noqa: E402
from llmcomp import api  # noqa: E402
from llmcomp.core.qlinear import QuantLinear  # noqa: E402
from llmcomp.formats import Uniform  # noqa: E402
from llmcomp.quant import RTNConfig  # noqa: E402

IDS = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(0))


def _hf(path, bits, backend):
    from transformers import AutoModelForCausalLM, GPTQConfig

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                quantization_config=GPTQConfig(bits=bits, backend=backend))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("fmt,inter,checkpoint_format", [
    (Uniform(4, 32), 128, "gptq"), (Uniform(3, 32), 128, "gptq"), (Uniform(2, 16), 128, "gptq_v2"),
    (Uniform(8, 0, True), 128, "gptq"), (Uniform(4, 64), 96, "gptq")],
    ids=["w4g32", "w3g32", "w2g16-v2", "w8-per-channel", "w4g64-ragged"])
def test_transformers_loads_gptq_export(tmp_path, fmt, inter, checkpoint_format):
    from tests.conftest import tiny_llama

    torch.set_num_threads(1)
    tiny_llama(hidden=64, inter=inter).save_pretrained(tmp_path / "m")
    art = api.quantize(RTNConfig(format=fmt), tmp_path / "a", str(tmp_path / "m"))
    assert api.export(art, "gptq", tmp_path / "g")["checkpoint_format"] == checkpoint_format
    ref = llmcomp.load(art)
    hf = _hf(tmp_path / "g", fmt.bits, "gptq_torch")
    layers = [(n, m) for n, m in ref.named_modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    for name, mod in layers:
        theirs = hf.get_submodule(name)
        assert type(theirs).__name__ == "TorchLinear", name
        assert torch.equal(theirs.dequantize_weight().t(), mod.dequantize().half()), name
    ref_logits = _logits(ref)
    assert (_logits(hf) - ref_logits).abs().max().item() < 1e-3  # float16 weight rounding only
    for name, _ in layers:  # float32 scales: llmcomp's own dequantize arithmetic
        theirs = hf.get_submodule(name)
        theirs.scales = theirs.scales.float()
    assert (_logits(hf) - ref_logits).abs().max().item() < 1e-6


def test_transformers_default_kernel(tmp_path):
    """backend="auto" on CPU: 4 bits go to the ATen int4 kernel (bfloat16 scales), close but not exact."""
    from tests.conftest import tiny_llama

    torch.set_num_threads(1)
    tiny_llama(hidden=64, inter=128).save_pretrained(tmp_path / "m")
    art = api.quantize(RTNConfig(format=Uniform(4, 32, True)), tmp_path / "a", str(tmp_path / "m"))
    api.export(art, "gptq", tmp_path / "g")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype=torch.float32)
    assert hf.config.quantization_config.bits == 4
    ref_logits = _logits(llmcomp.load(art))
    diff = (_logits(hf) - ref_logits).abs().max().item()
    assert diff < 0.02 * ref_logits.abs().max().item(), diff
