#pragma once
// The warpgroup path of the dequant-GEMM (sm_90a): the same weight layout, decode and scale as uniform_mma.cuh, but
// each k16 step is one wgmma.mma_async a warpgroup (m64 n(8·MT) k16, fp32 accumulate) with the A operand — the
// dequantized weights — in registers and x (B) read by the tensor cores from shared memory, instead of MT
// mma.sync a warp fed with x fragments from registers. Four warps of a warpgroup each bring their own R row tiles
// (rows 16w..16w+15 of the m64 tile are warp w's tile, whatever rows those are), so a warp's accumulators keep the
// mma.sync layout (d[t][i] = acc[t][i]) and reduce_store serves both paths.
// x of a round of U kblocks is staged per warpgroup in the wgmma's no-swizzle K-major layout, permuted into the
// logical k order of the A fragment: step s of a kblock, lane column c holds inputs c·LANE_K + 4s + j (j = 0..3) as
// logical k 2c + j (j < 2) and 8 + 2c + j − 2; a core matrix (8 tokens × 8 logical k, 16 bytes a token) sits at
// kh · 128 + nb · 256 bytes within its step (LBO = 128: the K step between core matrices; SBO = 256: the N step;
// bench/wgmma_probe.cu checks the convention), steps MT · 256 bytes apart. Staged by 4-byte cp.async (the
// permutation moves 4-byte pairs), double-buffered a round ahead.
// (Included by uniform_mma.cuh, inside its namespace, after the mma.sync kernel; the wgmma instructions are emitted
// only where the build targets sm_90a, and launched only from such a build: LLMCOMP_SM90A.)

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LLMCOMP_WG_DEVICE 1
#endif

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem));
}
// Writes by the threads (cp.async included) made visible to the tensor cores' reads (the async proxy).
__device__ __forceinline__ void fence_async_smem() {
#ifdef LLMCOMP_WG_DEVICE
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void warpgroup_sync(int wg) {  // named barrier 1 + wg over the warpgroup's 128 threads
  asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
}
__device__ __forceinline__ void wgmma_fence() {
#ifdef LLMCOMP_WG_DEVICE
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#ifdef LLMCOMP_WG_DEVICE
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef LLMCOMP_WG_DEVICE
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Shared-memory matrix descriptor, no swizzle: start address, LBO 128 bytes, SBO 256 (all in units of 16 bytes).
__device__ __forceinline__ uint64_t wg_desc(const void* smem) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)(128 >> 4) << 16) | ((uint64_t)(256 >> 4) << 32);
}

// D[64, 8·MT] += A[64, 16] (registers, this warp's 16 rows) · B[16, 8·MT] (descriptor).
template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[2][4], const uint32_t (&a)[4], uint64_t desc) {
#ifdef LLMCOMP_WG_DEVICE
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
  else
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
#endif
}
template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[4][4], const uint32_t (&a)[4], uint64_t desc) {
#ifdef LLMCOMP_WG_DEVICE
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
  else
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
#endif
}
template <typename T>
__device__ __forceinline__ void wgmma_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc) {
#ifdef LLMCOMP_WG_DEVICE
  if constexpr (std::is_same<T, __half>::value)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
  else
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
#endif
}

// Warpgroups of 4 warps; wk_log: log2 of the warpgroups splitting K (each stages its own x); the block's row groups
// (a warp each, R tiles) come 4 a warpgroup. Warp w of warpgroup wg: row group (wg >> wk_log) · 4 + w % 4, K slice
// wg & (wk − 1) of kb_per_warp kblocks. A warp past the last row tile still takes part in every wgmma (they are
// warpgroup-wide) on a real tile's weights, and writes nothing.
// WAIT: the warpgroup's kblocks of wgmma left in flight while the next kblock is decoded.
template <typename T, int BITS, int MT, int R, int U, int ELEM, int WAIT>
__device__ __forceinline__ void wg_kernel_body(const T* __restrict__ x, const uint4* __restrict__ qw,
                                               const uint2* __restrict__ qh, const void* __restrict__ sz,
                                               T* __restrict__ out, int M, int N, int K, int G, uint32_t gmagic,
                                               int kb_per_warp, int wk_log) {
  using N2 = typename Num<T>::T2;
  constexpr int KBLK = 256 / BITS, LANE_K = KBLK / 4, SPK = LANE_K / 4;  // steps (k16) a kblock
  constexpr int STEP_B = MT * 256, BUF_B = U * SPK * STEP_B;            // bytes of x a step, a round
  extern __shared__ float red[];
  grid_dep_launch();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, c = lane & 3, wg = warp >> 2, t128 = threadIdx.x & 127;
  const int wr = nwarps >> wk_log;  // row groups a block (a multiple of 4)
  const int rg = (wg >> wk_log) * 4 + (warp & 3), ks = wg & ((1 << wk_log) - 1);
  const int KB = K / KBLK;
  const int tile0 = (blockIdx.x * wr + rg) * R, tile_ld = min(tile0, N / 16 - R);
  const int kb0 = ks * kb_per_warp, kb1 = min(KB, kb0 + kb_per_warp);
  const void* sz_row = static_cast<const char*>(sz) + (size_t)(tile_ld * 16 + g) * G * (ELEM == 1 ? 2 : 4);
  char* xs = reinterpret_cast<char*>(red) + (size_t)wg * 2 * BUF_B;  // this warpgroup's two round buffers
  const uint64_t desc0 = wg_desc(xs);

  // x of the round starting at kblock kbs into buffer buf: a unit is 8 inputs (16 bytes) of one token, moved as 4
  // pairs; lanes (c, token % 8) of a unit row write 32 distinct banks.
  auto stage = [&](int kbs, int buf) {
    char* dst = xs + buf * BUF_B;
    constexpr int HALVES = LANE_K / 8, UNITS = MT * 8 * U * KBLK / 8;  // a multiple of 128
#pragma unroll
    for (int j = 0; j < UNITS / 128; ++j) {
      const int i = t128 + 128 * j, cc = i & 3, nlo = (i >> 2) & 7, rest = i >> 5;
      const int hh = rest % HALVES, u = (rest / HALVES) % U, nb = rest / (HALVES * U);
      if (kbs + u < kb1) {
        const T* src = x + (size_t)min(nb * 8 + nlo, M - 1) * K + (size_t)(kbs + u) * KBLK + cc * LANE_K + 8 * hh;
        char* d = dst + (u * SPK + 2 * hh) * STEP_B + nb * 256 + nlo * 16 + 4 * cc;
        cp_async4(d, src);
        cp_async4(d + 128, src + 2);
        cp_async4(d + STEP_B, src + 4);
        cp_async4(d + STEP_B + 128, src + 6);
      }
    }
    cp_async_commit();
  };

  float acc[R][MT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][t][i] = 0.f;

  const int rounds = kb1 > kb0 ? (kb1 - kb0 + U - 1) / U : 0;
  // A round's weights are loaded a round ahead (two register sets, the loop unrolled by two so they swap roles
  // without moves): the warpgroup's warps move in step, so a load issued at the round that uses it would leave
  // the HBM latency exposed once a round.
  auto load_round = [&](int kb, uint4 (&wv)[U][R], uint2 (&hv)[U][R]) {
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (kb + u < kb1) {
          const size_t at = ((size_t)(tile_ld + r) * KB + kb + u) * 32 + lane;
          wv[u][r] = ld_stream(qw + at);
          if constexpr (has_high_plane(ELEM)) hv[u][r] = ld_stream2(qh + at);
          else hv[u][r] = make_uint2(0, 0);
        }
  };
  auto round = [&](int rd, const uint4 (&wv)[U][R], const uint2 (&hv)[U][R], uint4 (&wn)[U][R], uint2 (&hn)[U][R]) {
    const int kb = kb0 + rd * U;
    if (rd + 1 < rounds) {
      load_round(kb + U, wn, hn);
      stage(kb + U, (rd + 1) & 1);
    } else {
      cp_async_commit();  // an empty group keeps the wait below uniform
    }
    cp_async_wait<1>();
    fence_async_smem();
    warpgroup_sync(wg);
    const uint64_t desc_rd = desc0 + (uint64_t)(((rd & 1) * BUF_B) >> 4);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (kb + u >= kb1) break;
      const int grp = group_of((kb + u) * KBLK + c * LANE_K, gmagic);
      uint32_t a[R][SPK][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        N2 sc_lo, mz_lo, sc_hi, mz_hi;
        load_scale<T, ELEM>(sz_row, r * 16 * G + grp, sc_lo, mz_lo);
        load_scale<T, ELEM>(sz_row, (r * 16 + 8) * G + grp, sc_hi, mz_hi);
        const uint32_t words[4] = {wv[u][r].x, wv[u][r].y, wv[u][r].z, wv[u][r].w};
#pragma unroll
        for (int wi = 0; wi < 4; ++wi) {
          N2 q[16 / BITS];
          decode_any<T, BITS, ELEM>(words[wi], hv[u][r], wi, q);
#pragma unroll
          for (int ss = 0; ss < 4 / BITS; ++ss) scaled_a<T>(q, ss, sc_lo, mz_lo, sc_hi, mz_hi, a[r][wi * (4 / BITS) + ss]);
        }
      }
      wgmma_fence();
#pragma unroll
      for (int s = 0; s < SPK; ++s)
#pragma unroll
        for (int r = 0; r < R; ++r)
          wgmma_rs<T>(acc[r], a[r][s], desc_rd + (uint64_t)(((u * SPK + s) * STEP_B) >> 4));
      wgmma_commit();
      wgmma_wait<WAIT>();
    }
    wgmma_wait<0>();
    warpgroup_sync(wg);  // the next round's staging reuses this buffer
  };

  grid_dep_wait();
  uint4 w0[U][R], w1[U][R];
  uint2 h0[U][R], h1[U][R];
  if (rounds > 0) {
    load_round(kb0, w0, h0);
    stage(kb0, 0);
  }
  for (int rd = 0; rd < rounds; rd += 2) {
    round(rd, w0, h0, w1, h1);
    if (rd + 1 < rounds) round(rd + 1, w1, h1, w0, h0);
  }
  __syncthreads();  // the reduction slabs overlap the x buffers
  reduce_store<T, MT, R>(acc, red, out, M, N, wk_log, rg * (1 << wk_log) + ks);
}

template <typename T, int BITS, int MT, int R, int U, int THREADS, int ELEM, int WAIT>
__global__ void __launch_bounds__(THREADS) uniform_wg_kernel(const T* __restrict__ x, const uint4* __restrict__ qw,
                                                             const uint2* __restrict__ qh, const void* __restrict__ sz,
                                                             T* __restrict__ out, int M, int N, int K, int G,
                                                             uint32_t gmagic, int kb_per_warp, int wk_log) {
  wg_kernel_body<T, BITS, MT, R, U, ELEM, WAIT>(x, qw, qh, sz, out, M, N, K, G, gmagic, kb_per_warp, wk_log);
}

