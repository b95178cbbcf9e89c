"""Where the W4 mma kernel's time goes above M = 8 (two 8-token tiles a warp instead of one): the kernel timed as it
is and in probe builds with one piece of its per-kblock work removed, at the launch ``launch_config`` picks.

Variants (each a build of a text-edited copy of ``llmcomp/kernels/csrc``; the extension's cache key is the source
hash, so each gets its own build directory):
  base       the kernel as it is
  one_mma    the second token tile's mma skipped (its x loads then go too) — the cost of the 2nd tile
  x_only     the second tile's x still loaded (an empty asm takes it), its mma skipped — mma against x loads
  no_decode  codes made into the A operand by a shift and an AND instead of the decode — the decode's cost
  u2         rounds of 2 kblocks (not 4) at two row tiles a warp and M = 9..16 too, as at M <= 8 — fewer registers
  l2pf       the next round's weights prefetched into L2 (prefetch.global.L2, every lane its 16 bytes) at the start of
             each round, so the next round's loads wait on L2 instead of HBM (not with x staged)
  loads_only the post-scale kernel (M <= 16) with its math replaced by an XOR of the weights, scales and x it loads
  w_only     ... of the weights alone (the scale and x loads then go too): what the load structure reaches by itself
  db         rounds double-buffered in registers: the next round's weight loads issued before this round's math
  refill     a kblock's weight registers refilled with the next round's same kblock right after its math (one set
             of registers, the next round's loads spread over this round's math)
  refill64   refill with __launch_bounds__(THREADS, 65536 / (64 THREADS)): at most 64 registers, as the base kernel
  xtile      above M = 16 (MT >= 4 token tiles): a kblock's A fragments decoded and scaled first, then x one token
             tile at a time (fewer registers held through the kblock); the same results as base (checksums)
  lb1        __launch_bounds__(THREADS, 1) on every instantiation: the one-tile post-scale kernel at M = 9..16 no longer
             spills in a local compile (78-80 registers against 64 + spill); moves every other kernel's registers too

The probes other than xtile compute wrong results by construction: timing only, never a result. one_mma, x_only and no_decode edit the
per-pair-scale kernel: run them with LLMCOMP_MMA_POST_SCALE=8 (the post-scale kernel, which they leave alone, serves
M <= 16 by default), whose M <= 8 rows then show the run-to-run spread between the builds.
   python bench/mma_probe.py build VARIANT...   (builds, can run in parallel processes)
   python bench/mma_probe.py time VARIANT --out FILE.json [--shapes NxK,...] [--ms 4,12,16] [--launch RT,WARPS,WR]
                                 [--post]   (--post: the fp32 post-scale kernel (elem 3) at whatever launch, M <= 16)"""
import argparse
import shutil
import sys
from pathlib import Path

import torch

from llmcomp.core.paths import write_json
from llmcomp.eval import kernel_bench as kb
from llmcomp.kernels import uniform_cuda

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cli  # noqa: E402  (bench/_cli.py: the scripts' argument checks)

def _skip_post_math(fold: str) -> list:
    """The edit that ends compute_kblock_post before its math: ``fold`` defines v from what it loaded, which goes
    into an accumulator (so the loads stay)."""
    anchor = "  const N2 zz[2] = {N::hi2(N::pair(s_lo)), N::hi2(N::pair(s_hi))};"
    return [(anchor, f"  if (true) {{\n    {fold}\n    acc[0][0] += __uint_as_float(v & 0x3f7fffffu);\n"
                     f"    return;\n  }}\n{anchor}")]


XTILE_FN = """template <typename T, int BITS, int MT, int R, int ELEM, bool XS>
__device__ __forceinline__ void compute_kblock_xt(const uint4 (&w)[R], const uint2 (&h)[R],
    const typename Num<T>::T2 (&sc_lo)[R], const typename Num<T>::T2 (&mz_lo)[R],
    const typename Num<T>::T2 (&sc_hi)[R], const typename Num<T>::T2 (&mz_hi)[R],
    const T* x_lane, int x_stride, int x_at, int M, float (&acc)[R][MT][4]) {
  using N2 = typename Num<T>::T2;
  constexpr int SPW = 4 / BITS, STEPS = 4 * SPW, XVEC = 256 / BITS / 32;
  uint32_t a[R][STEPS][4];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const uint32_t words[4] = {w[r].x, w[r].y, w[r].z, w[r].w};
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {
      N2 q[16 / BITS];
      decode_any<T, BITS, ELEM>(words[wi], h[r], wi, q);
#pragma unroll
      for (int ss = 0; ss < SPW; ++ss) scaled_a<T>(q, ss, sc_lo[r], mz_lo[r], sc_hi[r], mz_hi[r], a[r][wi * SPW + ss]);
    }
  }
  const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    const int tok = min(t * 8 + g, M - 1) - min(g, M - 1);
    const uint4* xv = reinterpret_cast<const uint4*>(x_lane + tok * x_stride + x_at);
    uint4 cx[XVEC];
#pragma unroll
    for (int v = 0; v < XVEC; ++v) {
      if constexpr (XS) cx[v] = xv[v];
      else cx[v] = __ldg(xv + v);
    }
    const uint32_t* xw = reinterpret_cast<const uint32_t*>(cx);
#pragma unroll
    for (int s = 0; s < STEPS; ++s)
#pragma unroll
      for (int r = 0; r < R; ++r) mma16816<T>(acc[r][t], a[r][s], xw[2 * s], xw[2 * s + 1]);
  }
}

"""

EDITS = {
    "base": [],
    "one_mma": [(
        "        for (int t = 0; t < MT; ++t) {\n"
        "          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&cx[t][0]);\n"
        "          mma16816<T>(acc[r][t], a, xw[2 * s], xw[2 * s + 1]);",
        "        for (int t = 0; t < 1; ++t) {\n"
        "          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&cx[t][0]);\n"
        "          mma16816<T>(acc[r][t], a, xw[2 * s], xw[2 * s + 1]);")],
    "x_only": [(
        "          mma16816<T>(acc[r][t], a, xw[2 * s], xw[2 * s + 1]);\n        }\n      }\n    }\n  }\n}",
        "          if (t == 0) mma16816<T>(acc[r][t], a, xw[2 * s], xw[2 * s + 1]);\n"
        "          else asm volatile(\"\" ::\"r\"(xw[2 * s]), \"r\"(xw[2 * s + 1]));  // x loaded, no mma\n"
        "        }\n      }\n    }\n  }\n}")],
    "u2": [(
        "  static constexpr int U = R == 2 && MT == 1 ? 2 : 4;",
        "  static constexpr int U = R == 2 && MT <= 2 ? 2 : 4;")],
    "l2pf": [(  # the next round's weights prefetched into L2 while this round computes (no registers)
        "          else hv[u][r] = make_uint2(0, 0);\n        }\n",
        "          else hv[u][r] = make_uint2(0, 0);\n        }\n"
        "#pragma unroll\n    for (int u = 0; u < U; ++u)\n#pragma unroll\n      for (int r = 0; r < R; ++r)\n"
        "        if (!XS && kb + U + u < kb1)\n"
        "          asm volatile(\"prefetch.global.L2 [%0];\" ::\"l\"(qw + ((size_t)(tile0 + r) * KB + kb + U + u) * 32 + lane));\n")],
    "lb1": [(
        "__global__ void __launch_bounds__(THREADS) uniform_mma_kernel(",
        "__global__ void __launch_bounds__(THREADS, 1) uniform_mma_kernel(")],
    # the post-scale kernel's weights, scales and x loaded and folded by XOR: no decode, no mma
    "loads_only": _skip_post_math("const uint32_t* xw = reinterpret_cast<const uint32_t*>(&cx[0][0]);\n"
                                  "    const uint32_t v = w.x ^ w.y ^ w.z ^ w.w ^ s_lo ^ s_hi ^ xw[0] ^ xw[7];"),
    # the weights only (scales and x unused, so never loaded): the load side alone
    "w_only": _skip_post_math("const uint32_t v = w.x ^ w.y ^ w.z ^ w.w;"),
    "db": [(  # rounds double-buffered in registers: round rd + 1's weight loads issued before round rd's math
        "  for (int kb = XS ? 0 : kb0, rd = 0; XS ? rd < rounds : kb < kb1; kb += U, ++rd) {\n"
        "    uint4 wv[U][R];\n    uint2 hv[U][R];\n",
        "  uint4 nx[U][R];\n"
        "#pragma unroll\n  for (int u = 0; u < U; ++u)\n#pragma unroll\n    for (int r = 0; r < R; ++r)\n"
        "      if (kb0 + u < kb1) nx[u][r] = ld_stream(qw + ((size_t)(tile0 + r) * KB + kb0 + u) * 32 + lane);\n"
        "  for (int kb = XS ? 0 : kb0, rd = 0; XS ? rd < rounds : kb < kb1; kb += U, ++rd) {\n"
        "    uint4 wv[U][R];\n    uint2 hv[U][R];\n"
        "#pragma unroll\n    for (int u = 0; u < U; ++u)\n#pragma unroll\n      for (int r = 0; r < R; ++r) {\n"
        "        wv[u][r] = nx[u][r];\n        hv[u][r] = make_uint2(0, 0);\n"
        "        if (kb + U + u < kb1)\n"
        "          nx[u][r] = ld_stream(qw + ((size_t)(tile0 + r) * KB + kb + U + u) * 32 + lane);\n"
        "      }\n"
        "    if (false)\n")],
    "refill": [(  # each kblock's registers refilled with the next round's same kblock right after its math
        "  for (int kb = XS ? 0 : kb0, rd = 0; XS ? rd < rounds : kb < kb1; kb += U, ++rd) {\n"
        "    uint4 wv[U][R];\n    uint2 hv[U][R];\n",
        "  uint4 wv[U][R];\n  uint2 hv[U][R];\n"
        "#pragma unroll\n  for (int u = 0; u < U; ++u)\n#pragma unroll\n    for (int r = 0; r < R; ++r) {\n"
        "      hv[u][r] = make_uint2(0, 0);\n"
        "      if (kb0 + u < kb1) wv[u][r] = ld_stream(qw + ((size_t)(tile0 + r) * KB + kb0 + u) * 32 + lane);\n"
        "    }\n"
        "  for (int kb = XS ? 0 : kb0, rd = 0; XS ? rd < rounds : kb < kb1; kb += U, ++rd) {\n"
        "    if (false)\n"), (
        "                                            sz_row, M, G, gmagic, acc, cb_s, cb1_at);\n    }\n",
        "                                            sz_row, M, G, gmagic, acc, cb_s, cb1_at);\n"
        "#pragma unroll\n      for (int r = 0; r < R; ++r)\n"
        "        if (kb + U + u < kb1)\n"
        "          wv[u][r] = ld_stream(qw + ((size_t)(tile0 + r) * KB + kb + U + u) * 32 + lane);\n"
        "    }\n")],
    "no_decode": [(
        "      decode_any<T, BITS, ELEM>(words[wi], h[r], wi, q);",
        "#pragma unroll\n"
        "      for (int e = 0; e < 16 / BITS; ++e) q[e] = Num<T>::pair((words[wi] >> e) & 0x3c003c00u);")],
    # x one token tile at a time (M > 16): a kblock's A fragments decoded and scaled first (R x steps x 4 registers),
    # then each token tile's x loaded and its mmas issued — instead of all MT tiles' x fragments held through the
    # kblock (64 of the M = 64 two-tile kernel's 206 registers). Computes the same sums as the base kernel.
    "xtile": [(
        "  uint4 cx[MT][XVEC];\n  load_x<T, BITS, MT, XS>(x_lane, x_stride, x_at, M, cx);\n",
        "  uint4 cx[MT][XVEC];\n  constexpr bool XT = MT >= 4 && !is_vq(ELEM) && !is_post(ELEM);\n"
        "  if constexpr (!XT) load_x<T, BITS, MT, XS>(x_lane, x_stride, x_at, M, cx);\n"), (
        "  compute_kblock<T, BITS, MT, R, ELEM>(w, h, sc_lo, mz_lo, sc_hi, mz_hi, cx, acc);\n}\n",
        "  if constexpr (XT)\n"
        "    compute_kblock_xt<T, BITS, MT, R, ELEM, XS>(w, h, sc_lo, mz_lo, sc_hi, mz_hi, x_lane, x_stride, x_at, M, acc);\n"
        "  else\n    compute_kblock<T, BITS, MT, R, ELEM>(w, h, sc_lo, mz_lo, sc_hi, mz_hi, cx, acc);\n}\n"), (
        "// One kblock of a warp: this lane's x (load_x)",
        XTILE_FN + "// One kblock of a warp: this lane's x (load_x)")],
}
EDITS["refill64"] = EDITS["refill"] + [(  # refill with its registers capped at 64, as the base kernel has
    "__global__ void __launch_bounds__(THREADS) uniform_mma_kernel(",
    "__global__ void __launch_bounds__(THREADS, 65536 / (64 * THREADS)) uniform_mma_kernel(")]
ORIGINAL = uniform_cuda.CSRC
SHAPES = ((28672, 8192), (14336, 4096))
MS = (4, 12, 16)


def use(variant: str) -> None:
    """Point uniform_cuda at an edited copy of the sources (before its extension is first built or loaded). A copy
    already there with the same text is left untouched: a fresh one would look newer than the objects built from it
    and ninja would build again (the first run of this probe lost its timing steps that way, 2026-12-01)."""
    uniform_cuda.CSRC = ORIGINAL
    if variant == "base":
        return
    text = (ORIGINAL / "uniform_mma.cuh").read_text()
    for old, new in EDITS[variant]:
        if text.count(old) != 1:
            sys.exit(f"mma_probe: the {variant} edit no longer matches uniform_mma.cuh once")
        text = text.replace(old, new)
    dst = Path("/tmp/llmcomp_probe") / variant
    cuh = dst / "uniform_mma.cuh"
    if not (cuh.exists() and cuh.read_text() == text):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(ORIGINAL, dst)
        cuh.write_text(text)
    uniform_cuda.CSRC = dst


@_cli.one_line_errors
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=("build", "time"))
    ap.add_argument("variants", nargs="+", choices=sorted(EDITS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--ms", type=_cli.ints(1, "1,16"), default=",".join(map(str, MS)))
    ap.add_argument("--shapes", type=_cli.shapes(), default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--launch", type=_cli.launches(",", "+", "1,4,1+2,4,1"), default=None,
                    help="rt,warps,wr instead of launch_config's pick; several joined by +")
    ap.add_argument("--post", action="store_true", help="force the post-scale kernel (elem 3), bypassing gemm's rule")
    a = ap.parse_args()
    if a.action == "time" and len(a.variants) != 1:  # (a ValueError traceback)
        ap.error(f"time takes one variant (a process each: the checksums compare them), got {len(a.variants)}")
    _cli.writable(ap, a.out)
    _cli.needs_cuda(ap, "builds and times the CUDA extension")
    if a.action == "build":
        for v in a.variants:
            use(v)
            print(v, "built" if uniform_cuda.extension() is not None else "FAILED", flush=True)
            uniform_cuda.extension.cache_clear()
        return
    (variant,) = a.variants
    use(variant)
    assert uniform_cuda.extension() is not None, "extension did not build"
    rows = []
    for n, k in a.shapes:
        torch.manual_seed(0)  # the same weights and x in every variant's process: the checksums below compare
        nbytes, preps, call, auto = kb._sweep_subject("W4", n, k, 4, 128)
        if a.post:
            def call(x, p, c):
                sz = uniform_cuda.scale_pairs(p, x.dtype, post=True)
                return uniform_cuda.gemm_op(x, p["qw"], uniform_cuda.high_plane(p), sz, 4, p["group"], p["n"], c[0],
                                            c[1], 3, c[2])
        for m in a.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            picks = a.launch or [tuple(auto(m, x.dtype))]
            for pick in picks:
                if n % (16 * pick[0]):
                    continue
                y = call(x, preps[0], pick).double()  # (probes that skip work: checksums differ by construction)
                t = kb.per_call_seconds([lambda p=p: call(x, p, pick) for p in preps])
                rows.append({"variant": variant, "N": n, "K": k, "M": m, "launch": pick, "post": a.post,
                             "us": round(t * 1e6, 3), "sum": y.sum().item(), "abs_sum": y.abs().sum().item()})
                print(f"{variant:10s} {n}x{k} M={m:<3d} {pick}{' post' if a.post else ''} {t * 1e6:8.2f} us "
                      f"sum {rows[-1]['sum']:.6e} |{rows[-1]['abs_sum']:.6e}|", flush=True)
        del preps
        torch.cuda.empty_cache()
    if a.out:
        write_json(a.out, rows)


if __name__ == "__main__":
    main()
