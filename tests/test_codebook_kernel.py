"""The codebook (VQ) Triton fast path: its prepared layout on CPU (CI), the kernel against the reference on
CUDA (opt-in with LLMCOMP_CODEBOOK_KERNEL=1 until it has been run and timed on a GPU)."""
import pytest
import torch

from llmcomp.core.qlinear import QuantLinear
from llmcomp.eval.kernel_bench import random_codebook as packed
from llmcomp.formats.codebook import Codebook
from llmcomp.kernels import codebook_triton, fast_path

FORMATS = [Codebook(dim=4, bits=(8,)), Codebook(dim=4, bits=(8, 4), group=128),
           Codebook(dim=2, bits=(6,), scale=False, outliers=0.05), Codebook(dim=8, bits=(10,), group=64),
           Codebook(dim=8, bits=(16,))]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
def test_prepared_layout_rebuilds_the_weight(fmt):
    """What the kernel reads — per-vector indices, the stored codebooks, the scale, the dequantized outlier
    columns — gives back the reference weight when evaluated the kernel's way in torch."""
    n, k = 24, 384
    t = packed(fmt, n, k, 1)
    prep = codebook_triton.prepare(fmt, t, k)
    grp = fmt.vector_group(k)
    main = sum(cb.float()[grp[None, :], idx.long()] for idx, cb in zip(prep["idx"], prep["cb"]))  # [n, nv, dim]
    w = torch.zeros(n, k)
    cols = prep.get("main_cols", torch.arange(k))
    w[:, cols] = main.reshape(n, -1) * prep["scale"][:, None]
    if "outlier_cols" in prep:
        w[:, prep["outlier_cols"]] = prep["outlier_f32"]
    assert torch.allclose(w, fmt.dequantize(t, k), atol=1e-6)
    widths = {8: torch.uint8, 15: torch.int16, 16: torch.int32}
    assert [i.dtype for i in prep["idx"]] == [widths[min(w for w in widths if w >= b)] for b in fmt.bits]


def test_opt_in_and_limits(monkeypatch):
    fmt = Codebook(dim=4, bits=(8,))
    x = torch.zeros(1, 64)
    monkeypatch.delenv("LLMCOMP_CODEBOOK_KERNEL", raising=False)
    assert not codebook_triton.supports(fmt, x)
    monkeypatch.setenv("LLMCOMP_CODEBOOK_KERNEL", "1")
    assert codebook_triton.supports(fmt, x) == (codebook_triton.triton is not None)
    assert not codebook_triton.supports(fmt, torch.zeros(9, 64))  # prefill: dequantize + matmul
    assert not codebook_triton.supports(Codebook(dim=4, bits=(4, 4, 4)), x)  # three stages
    assert not codebook_triton.supports(Codebook(dim=6, bits=(8,)), torch.zeros(1, 66))


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_kernel_matches_reference(monkeypatch, fmt, dtype):
    if codebook_triton.triton is None:
        pytest.skip("triton not installed")
    monkeypatch.setenv("LLMCOMP_CODEBOOK_KERNEL", "1")
    from llmcomp.kernels import codebook_cuda

    monkeypatch.setattr(codebook_cuda, "supports", lambda *a: False)  # the Triton kernel itself (CUDA's: its own tests)
    for n, k in [(48, 384), (1000, 2048), (4096, 4096)]:
        t = packed(fmt, n, k, n + k, "cuda")
        q = QuantLinear.from_packed(fmt, t, k)
        ref_w = fmt.dequantize(t, k)
        for m in (1, 3, 8):
            x = torch.randn(m, k, device="cuda").to(dtype)
            assert fast_path(fmt, x, t, k) is not None
            with torch.no_grad():
                y = q(x)
            ref = torch.nn.functional.linear(x.float(), ref_w)
            assert y.dtype == dtype and float((y.float() - ref).abs().max() / ref.abs().max()) < 2e-2, (n, k, m)
