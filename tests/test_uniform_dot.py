"""The Triton tl.dot dequant-GEMM (``llmcomp/kernels/uniform_dot.py``): its layout on CPU, its kernel in Triton's
interpreter (CPU, where Triton is installed; fp16 — the interpreter's bf16 product is wrong) and on a GPU against the
reference product: ‖y − ref‖∞ / ‖ref‖∞ < 2e-2 (``ref`` the fp32 product of the fp32-dequantized weight; the kernel
rounds each dequantized weight to the activation dtype and accumulates in fp32)."""
import os
import subprocess
import sys

import pytest
import torch

from llmcomp.formats import Uniform
from llmcomp.kernels import uniform_dot as ud
from llmcomp.quant.rtn import rtn_fields

TOL = 2e-2


def _packed(bits, group, n, k, seed=0, device="cpu"):
    fmt = Uniform(bits=bits, group_size=group)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    return fmt, {kk: v.to(device) for kk, v in fmt.pack(rtn_fields(w, fmt)).items()}


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_layout_round_trips_and_puts_each_shift_on_16_consecutive_inputs(bits):
    codes = torch.randint(0, 1 << bits, (48, 4 * ud.step(bits)), generator=torch.Generator().manual_seed(bits))
    words = ud.pack(codes, bits, rows_per_chunk=16)
    assert words.dtype == torch.int32 and words.shape == (48, codes.shape[1] * bits // 32)
    assert torch.equal(ud.unpack(words, bits), codes)
    # step 1, word 3, shift 2 holds input step + 2·16 + 3
    w = int(words[5, 16 + 3]) & 0xFFFFFFFF
    assert (w >> (2 * bits)) & ((1 << bits) - 1) == int(codes[5, ud.step(bits) + 2 * 16 + 3])


def test_shapes_the_kernel_cannot_take_are_refused():
    assert ud.shape_ok(4, 128, 4096, 4096)
    assert ud.shape_ok(8, 4096, 4096, 4096)  # one group a row
    assert not ud.shape_ok(4, 64, 4096, 4096)  # a step of 128 inputs would straddle groups
    assert not ud.shape_ok(2, 128, 4096, 4096)  # 2-bit steps are 256 inputs
    assert not ud.shape_ok(3, 128, 4096, 4096)
    assert not ud.shape_ok(4, 128, 4000, 4096)
    assert not ud.shape_ok(4, 128, 4096, 4104)


def test_config_splits_k_only_while_programs_are_few():
    few = ud.config(16, 4096, 4096, 4, sms=132)
    many = ud.config(64, 28672, 8192, 4, sms=132)
    assert few["SPLIT_K"] > 1 and many["SPLIT_K"] == 1
    assert ud.config(256, 4096, 4096, 4, 132)["BLOCK_M"] == 64
    for m in (9, 16, 33, 64, 300):
        cfg = ud.config(m, 4096, 14336, 4, 132)
        assert (14336 // 128) % cfg["SPLIT_K"] == 0


def test_kernel_matches_reference_in_the_interpreter():
    pytest.importorskip("triton")
    code = ("import torch, test_uniform_dot as t\nt.check_cases('cpu', torch.float16)\nprint('ok')")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


SPLIT2 = {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 3, "num_warps": 4, "num_stages": 2}
CASES = [  # bits, group, N, K, M, launch (None: config's)
    (4, 128, 64, 256, 9, None), (4, 128, 80, 384, 20, SPLIT2), (2, 256, 32, 512, 17, None), (8, 0, 48, 128, 33, None),
    (4, 0, 64, 256, 70, None),
]


def check_cases(device, dtype, cases=CASES):
    for bits, group, n, k, m, cfg in cases:
        fmt, t = _packed(bits, group, n, k, seed=n + k + m, device=device)
        prep = ud.prepare(fmt, t, k)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(device=device, dtype=dtype)
        y = ud.dot(x, prep, cfg)
        ref = x.float() @ fmt.dequantize(t, k).T
        err = ((y.float() - ref).abs().max() / ref.abs().max()).item()
        assert y.dtype == dtype and y.shape == (m, n) and err < TOL, (bits, group, n, k, m, cfg, err)


GPU_CASES = CASES + [
    (4, 128, 4096, 4096, m, None) for m in (9, 16, 31, 64, 65, 128, 300)] + [
    (4, 128, 1000 // 16 * 16, 2048, 40, None), (8, 0, 4096, 1024, 24, None), (2, 256, 1536, 1024, 100, None),
    (4, 128, 14336, 4096, 64, {"BLOCK_M": 64, "BLOCK_N": 128, "SPLIT_K": 1, "num_warps": 8, "num_stages": 3}),
    (4, 128, 4096, 14336, 16, {"BLOCK_M": 16, "BLOCK_N": 128, "SPLIT_K": 4, "num_warps": 4, "num_stages": 4}),
]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference_on_the_gpu(dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    check_cases("cuda", dtype, GPU_CASES)
