#pragma once
// The streamed M <= 8 dequant-GEMM (sm_90+; included by uniform_mma.cuh before its launchers, whose per-kblock math
// it reuses: kblock_step). Opt-in while measured: LLMCOMP_MMA_STREAM=<consumer warps> (8, 16 or 24), set_stream().
//
// Why: the default kernel's warps each load a round of kblocks into registers, wait, compute, and only then load the
// next round, so an SM's loads come in bursts phase-locked with its math (ncu on an H200: 47-64 % of DRAM bandwidth,
// 55 % of stall cycles waiting on loads, while cuBLAS's bf16 GEMV streams through a TMA ring at 80-90 %).
// Here one producer warp a block streams the block's weights and scales through rings in shared memory with bulk
// asynchronous copies (cp.async.bulk, completion counted on mbarriers), independent of the math. One block an SM
// (persistent: grid = min(SMs, row tiles)), each block a contiguous run of whole 16-row tiles, contiguous bytes in
// the kernel layout (qw[tile][kblock][lane]): a stage is one 16 KB copy, 32 kblocks of one tile. The consumers are
// P groups of 8 warps; group p takes tiles p, p + P, ... of the block (the producer interleaves the groups' stages),
// a warp 4 kblocks of a stage: it loads them into registers, frees the slot (a second mbarrier), and computes.
// A group's partial sums of a tile meet in shared memory at the tile's last stage (one named barrier a tile and
// group) and one of its warps writes the tile's outputs. A tile's scales (16 rows of G) come by 16 row copies into
// a slot of their own ring, freed at the tile's end.
// Measured on an H200 (bench/results/kernels_h200_notes.md): one group is latency-bound (a warp's 4 kblocks a
// stage are one chain of dependent math; 16 warps of 2 kblocks were no faster), hence more groups.
// Same per-kblock math as the default kernel, summed in another order: equal to the reference within the GEMM
// tolerance, not bit-identical to the default kernel.

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#endif
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#endif
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t done = 0;
  do {
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  } while (!done);
#endif
}

// The next phase of mbarrier bar completes once `bytes` more have arrived (and its one arrival, made here).
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}

// bytes (a multiple of 16, both addresses 16-byte aligned) from global src to shared dst, counted on mbarrier bar.
__device__ __forceinline__ void bulk_copy(uint32_t dst, const void* src, uint32_t bytes, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
#endif
}

__device__ __forceinline__ void group_sync(int id) {  // named barrier id: one group's 8 warps
  asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory");
}

constexpr int STAGE_KBLOCKS = 32;  // a stage: 32 kblocks of one tile, 16 KB, 4 a warp of its group
constexpr int GROUP_WARPS = 8;

// Dynamic shared memory of the streamed kernel with P groups: ns weight stages, ts slots of a tile's scales (16 rows
// of G scales of szb bytes, each row padded by 16 bytes so the 8 rows a scale load touches sit on different banks),
// two sets a group of 8 partial-sum slabs (16 rows x 8 tokens of floats), 2 (ns + ts) mbarriers.
inline size_t stream_scale_slot(int G, int szb) { return 16 * ((size_t)G * szb + 16); }
inline size_t stream_smem(int P, int ns, int ts, int G, int szb) {
  return (size_t)ns * STAGE_KBLOCKS * 512 + ts * stream_scale_slot(G, szb) + (size_t)P * 2 * GROUP_WARPS * 128 * 4 +
         16 * (size_t)(ns + ts);
}

template <typename T, int BITS, int ELEM, int P>
__global__ void __launch_bounds__((P * GROUP_WARPS + 1) * 32, 1)
    uniform_stream_kernel(const T* __restrict__ x, const uint4* __restrict__ qw, const void* __restrict__ sz,
                          T* __restrict__ out, int M, int N, int K, int G, uint32_t gmagic, int ns, int ts, int math) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  static_assert(ELEM == 0 || ELEM == 1 || ELEM == 3, "formats without a second plane or a codebook");
  constexpr int KBLK = 256 / BITS, LANE_K = KBLK / 4, KPW = STAGE_KBLOCKS / GROUP_WARPS, SLAB = 16 * 8;
  constexpr int SZB = ELEM == 1 ? 2 : 4, C = P * GROUP_WARPS;
  constexpr uint32_t stage_bytes = STAGE_KBLOCKS * 512;
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int KB = K / KBLK, spt = KB / STAGE_KBLOCKS;  // stages a tile
  const int row_bytes = G * SZB, srow = row_bytes + 16, sslot = 16 * srow;  // a tile's scales in shared memory
  const int tiles = N / 16;
  const int t0 = (int)((long long)blockIdx.x * tiles / gridDim.x);
  const int nt = (int)((long long)(blockIdx.x + 1) * tiles / gridDim.x) - t0;  // this block's tiles
  unsigned char* scales = smem + (size_t)ns * stage_bytes;
  float* red = reinterpret_cast<float*>(scales + (size_t)ts * sslot);
  const uint32_t full0 = smem_u32(red + P * 2 * GROUP_WARPS * SLAB), empty0 = full0 + 8 * ns;  // weight stages
  const uint32_t sfull0 = empty0 + 8 * ns, sempty0 = sfull0 + 8 * ts;                          // scale slots

  grid_dep_launch();
  if (threadIdx.x == 0) {
    for (int s = 0; s < ns; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, GROUP_WARPS);
    }
    for (int s = 0; s < ts; ++s) {
      mbar_init(sfull0 + 8 * s, 1);
      mbar_init(sempty0 + 8 * s, 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // Stage order: chunks of P tiles (the last may have fewer, pj), within a chunk stage st of each of its tiles in
  // turn: stage (chunk j, st, tile p of the chunk) is number j * P * spt + st * pj + p.
  if (warp == C) {  // the producer: weights and scales are constant, so no wait for the previous kernel
    if (lane == 0) {
      const char* src = reinterpret_cast<const char*>(qw) + (size_t)t0 * KB * 512;
      const char* sz_src = static_cast<const char*>(sz) + (size_t)t0 * 16 * row_bytes;
      for (int j = 0, slot = 0, round = 0; j * P < nt; ++j) {
        const int pj = min(P, nt - j * P);
        for (int st = 0; st < spt; ++st)
          for (int p = 0; p < pj; ++p) {
            const int ti = j * P + p;
            if (st == 0) {  // a tile's first stage: its scales first, one copy a row (padded rows in shared memory)
              const int tslot = ti % ts, tround = ti / ts;
              if (tround > 0) mbar_wait(sempty0 + 8 * tslot, (tround - 1) & 1);
              mbar_expect(sfull0 + 8 * tslot, 16 * row_bytes);
              for (int r = 0; r < 16; ++r)
                bulk_copy(smem_u32(scales + tslot * sslot + r * srow), sz_src + ((size_t)ti * 16 + r) * row_bytes,
                          row_bytes, sfull0 + 8 * tslot);
            }
            if (round > 0) mbar_wait(empty0 + 8 * slot, (round - 1) & 1);
            mbar_expect(full0 + 8 * slot, stage_bytes);
            bulk_copy(smem_u32(smem + slot * stage_bytes), src + ((size_t)ti * spt + st) * stage_bytes, stage_bytes,
                      full0 + 8 * slot);
            if (++slot == ns) slot = 0, ++round;
          }
      }
    }
    return;
  }

  const int grp = warp / GROUP_WARPS, wig = warp % GROUP_WARPS;
  const int g = lane >> 2, c = lane & 3;
  const T* x_lane = x + (size_t)min(g, M - 1) * K + c * LANE_K;
  const int gs = srow / SZB;  // the shared rows' stride, in scales
  const uint2 no_high[1] = {make_uint2(0, 0)};
  float* my_red = red + grp * 2 * GROUP_WARPS * SLAB;
  grid_dep_wait();  // x comes from the previous kernel
  for (int j = 0, n = 0; j * P + grp < nt; ++j, ++n) {  // n: this group's tiles so far
    const int pj = min(P, nt - j * P), ti = j * P + grp, tslot = ti % ts;
    mbar_wait(sfull0 + 8 * tslot, (ti / ts) & 1);
    const void* sz_row = scales + tslot * sslot + g * srow;
    float acc[1][1][4] = {{{0.f, 0.f, 0.f, 0.f}}};
    for (int st = 0; st < spt; ++st) {
      const int s = j * P * spt + st * pj + grp, slot = s % ns;
      mbar_wait(full0 + 8 * slot, (s / ns) & 1);
      const unsigned char* mine = smem + (size_t)slot * stage_bytes + (wig * KPW) * 512 + lane * 16;
      uint4 w[KPW];
#pragma unroll
      for (int u = 0; u < KPW; ++u) w[u] = *reinterpret_cast<const uint4*>(mine + u * 512);
      __syncwarp();
      if (lane == 0) mbar_arrive(empty0 + 8 * slot);  // the slot may refill while this warp computes
      const int kb0 = st * STAGE_KBLOCKS + wig * KPW;
#pragma unroll
      for (int u = 0; u < KPW; ++u) {
        if (!math) {  // probe (LLMCOMP_MMA_STREAM_PROBE=1): bytes only
          acc[0][0][0] += __uint_as_float(w[u].x & 1);
          continue;
        }
        const uint4 wu[1] = {w[u]};
        kblock_step<T, BITS, 1, 1, ELEM, false, true>(wu, no_high, kb0 + u, x_lane, K, (kb0 + u) * KBLK, sz_row, M,
                                                      gs, gmagic, acc, nullptr, 0);
      }
    }
    // The tile's partial sums (rows g, g + 8 x tokens 2c, 2c + 1) into this warp's slab of the parity of n, then
    // one warp of the group sums the group's 8 slabs and frees the tile's scale slot. (A slab is rewritten two tiles
    // later, after the next tile's barrier, which its reader reaches only once it has read it.)
    const int tile = t0 + ti;
    float* slabs = my_red + (n & 1) * GROUP_WARPS * SLAB;
    float* sl = slabs + wig * SLAB;
    sl[(2 * c) * 16 + g] = acc[0][0][0];
    sl[(2 * c + 1) * 16 + g] = acc[0][0][1];
    sl[(2 * c) * 16 + g + 8] = acc[0][0][2];
    sl[(2 * c + 1) * 16 + g + 8] = acc[0][0][3];
    group_sync(1 + grp);
    if (wig == n % GROUP_WARPS) {
      if (lane == 0) mbar_arrive(sempty0 + 8 * tslot);  // the whole group is past the tile's math
      for (int i = lane; i < 16 * M; i += 32) {  // token i / 16, row i % 16
        float sum = 0.f;
#pragma unroll
        for (int w2 = 0; w2 < GROUP_WARPS; ++w2) sum += slabs[w2 * SLAB + i];
        out[(size_t)(i / 16) * N + tile * 16 + (i % 16)] = Num<T>::from_float(sum);
      }
    }
  }
#endif
}

// Stream mode: 0 off, else the consumer warps a block (8, 16 or 24: 1-3 groups); LLMCOMP_MMA_STREAM, read once a
// process.
int stream_mode();

// The streamed launch when it applies (sm_90+, stream mode on, M <= 8, K a multiple of 32 kblocks, a row of scales a
// multiple of 16 bytes, the rings fit): returns false to leave the call to the default kernel.
template <typename T, int BITS, int ELEM>
bool launch_stream(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& sz, torch::Tensor& out,
                   int group) {
  if constexpr (!(ELEM == 0 || ELEM == 1 || ELEM == 3)) {
    return false;
  } else {
    const int P = stream_mode() / GROUP_WARPS;
    if (P == 0) return false;
    const int M = x.size(0), K = x.size(1), N = out.size(1), G = sz.size(1);
    const int KB = K / (256 / BITS);
    if (M > 8 || KB % STAGE_KBLOCKS != 0) return false;
    int dev = 0, sms = 0, major = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    if (major < 9) return false;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    static const bool probe = [] {  // LLMCOMP_MMA_STREAM_PROBE=1: the consumers skip the math (timing the ring alone)
      const char* e = std::getenv("LLMCOMP_MMA_STREAM_PROBE");
      return e && e[0] == '1';
    }();
    static const int ns_max = [] {
      const char* e = std::getenv("LLMCOMP_MMA_STREAM_STAGES");
      return e ? std::max(2, std::atoi(e)) : 8;
    }();
    constexpr int SZB = ELEM == 1 ? 2 : 4;
    if ((G * SZB) % 16 != 0 || reinterpret_cast<uintptr_t>(sz.data_ptr()) % 16 != 0) return false;  // bulk copies
    const int spt = KB / STAGE_KBLOCKS;
    // Scale slots: the producer runs up to ns stages (ns / (P spt) chunks of P tiles) ahead of the slowest group, and
    // starts a chunk's P tiles together; fewer slots than that would stall it (at most P: deadlock).
    int ns = ns_max, ts = 0;
    for (;; --ns) {
      ts = P * (ns / (P * spt) + 2);
      if (stream_smem(P, ns, ts, G, SZB) <= (size_t)optin || ns == 2) break;
    }
    const size_t smem = stream_smem(P, ns, ts, G, SZB);
    if (smem > (size_t)optin) return false;
    auto kern = P == 3 ? uniform_stream_kernel<T, BITS, ELEM, 3>
                : P == 2 ? uniform_stream_kernel<T, BITS, ELEM, 2> : uniform_stream_kernel<T, BITS, ELEM, 1>;
    static const bool sized = [optin] {  // once an instantiation: any ring up to the device's opt-in limit
      for (auto k : {uniform_stream_kernel<T, BITS, ELEM, 1>, uniform_stream_kernel<T, BITS, ELEM, 2>,
                     uniform_stream_kernel<T, BITS, ELEM, 3>})
        C10_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, optin));
      return true;
    }();
    (void)sized;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(std::min(sms, N / 16));
    cfg.blockDim = dim3((P * GROUP_WARPS + 1) * 32);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = c10::cuda::getCurrentCUDAStream();
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl() ? 1 : 0;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, reinterpret_cast<const T*>(x.data_ptr()),
                                      reinterpret_cast<const uint4*>(qw.data_ptr()), sz.data_ptr(),
                                      reinterpret_cast<T*>(out.data_ptr()), M, N, K, G, group_magic(K, G, group), ns,
                                      ts, probe ? 0 : 1));
    return true;
  }
}
