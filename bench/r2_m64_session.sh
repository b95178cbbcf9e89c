#!/usr/bin/env bash
# One device call: the two-row-tile launches above M = 16 (R = 2 at 16 < M <= 64) checked against the reference
# (W4 bf16, every two-tile launch at M = 17..64) and swept on the three many-row / long-K shapes at M = 64 and 32.
#   bash bench/r2_m64_session.sh   (on the GPU machine; writes to $OUT)
BUILD=1 . bench/session_common.sh
python3 - <<'PY' 2>&1 | grep -v Warn | tee $OUT/r2_check.log
import torch
from llmcomp.formats import Uniform
from llmcomp.quant.rtn import rtn_fields
from llmcomp.kernels import uniform_cuda as uc
fmt = Uniform(bits=4, group_size=128)
for n, k in [(1536, 576), (4096, 1024)]:
    t = fmt.pack(rtn_fields(torch.randn(n, k, device="cuda") * 0.02, fmt)); p = uc.prepare(fmt, t, k)
    ref_w = fmt.dequantize(t, k)
    for m in (17, 32, 40, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16); ref = x.float() @ ref_w.T
        for cfg in [(2, 1, 8), (2, 2, 4), (2, 4, 1), (2, 8, 1)]:
            y = uc.gemm(x, p, cfg).float(); e = ((y - ref).abs().max() / ref.abs().max()).item()
            print("check", n, k, m, cfg, f"{e:.2e}", "OK" if e < 2e-2 else "FAIL")
PY
timeout 150 python3 bench/bench_kernels.py --sweep w4 --shapes 28672x8192,14336x4096,4096x14336 --ms 64,32 \
  --out "$OUT/sweep_r2_m64.json" 2>&1 | grep -v Warn | tee $OUT/sweep.log
