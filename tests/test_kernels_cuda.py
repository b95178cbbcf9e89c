"""The Triton fast path against the pure-torch reference (runs only where CUDA and Triton exist)."""
import pytest
import torch

from llmcomp.core.qlinear import QuantLinear
from llmcomp.formats import Uniform
from llmcomp.quant.rtn import rtn_fields

pytestmark = pytest.mark.cuda

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (1000, 2048)]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [0, 32, 64, 128])
@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("m", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_fast_path_matches_reference(bits, group, sym, m, dtype):
    from llmcomp.kernels import fast_path

    fmt = Uniform(bits=bits, group_size=group, symmetric=sym)
    for n, k in SHAPES:
        g = torch.Generator().manual_seed(n + k + bits)
        w = torch.randn(n, k, generator=g) * 0.05
        t = {kk: v.cuda() for kk, v in fmt.pack(rtn_fields(w, fmt)).items()}
        q = QuantLinear.from_packed(fmt, t, k)
        x = torch.randn(m, k, generator=g).to("cuda", dtype)
        assert fast_path(fmt, x) is not None
        with torch.no_grad():
            y = q(x)
            ref = torch.nn.functional.linear(x.float(), fmt.dequantize(t, k, dtype=torch.float32))
        # Tolerance: the fast path sums in fp32 but reads -zero*scale rounded to fp16 and returns x.dtype.
        err = (y.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, (n, k, float(err))
