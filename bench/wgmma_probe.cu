// Standalone check of the wgmma conventions a warpgroup path of the dequant-GEMM relied on (sm_90a; no torch). That
// kernel was measured slower than the mma.sync one and removed (record commit 33b10b7, kernels_h200_notes.md);
// this probe stays for the next attempt (it passed on an H200: bench/results/wgmma_probe_h200.log).
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a bench/wgmma_probe.cu -o /tmp/wgmma_probe && /tmp/wgmma_probe
// One warpgroup computes D[64, N] = A[64, 16] B[16, N] (bf16 in, fp32 out) with A from registers in the
// mma.m16n8k16 fragment layout (warp w: rows 16w..16w+15) and B ("x", N tokens x 16 inputs, K-major) from shared
// memory through a no-swizzle descriptor whose core matrices (8 tokens x 8 inputs, 128 contiguous bytes) sit at
// kh * LBO + nb * SBO. Prints the largest error against a host reference for both readings of LBO / SBO and
// N = 8 / 16 / 32 / 64, and the D fragment layout check (d[4t + i] = the mma C layout of token tile t).
#include <cuda_bf16.h>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <vector>

__device__ __forceinline__ uint64_t desc_of(const void* smem, uint32_t lbo, uint32_t sbo) {
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  return (uint64_t)((a & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}

template <int N>
__device__ __forceinline__ void wgmma(float* d, const uint32_t (&a)[4], uint64_t desc);

template <>
__device__ __forceinline__ void wgmma<8>(float* d, const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k16.f32.bf16.bf16 {%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<16>(float* d, const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}
template <>
__device__ __forceinline__ void wgmma<32>(float* d, const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, "
      "{%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
        "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc));
}

__global__ void probe(const __nv_bfloat16* A, const __nv_bfloat16* B, float* D, int N, uint32_t lbo, uint32_t sbo) {
  __shared__ __align__(128) __nv_bfloat16 bs[64 * 16];
  const int t = threadIdx.x, warp = t / 32, lane = t % 32, g = lane / 4, c = lane % 4;
  // B[k][n] (16 x N) into the core-matrix layout: token n, input k -> core (kh = k / 8, nb = n / 8), row n % 8,
  // element k % 8.
  for (int i = t; i < 16 * N; i += 128) {
    const int k = i % 16, n = i / 16;
    const int off = (k / 8) * lbo + (n / 8) * sbo + (n % 8) * 16 + (k % 8) * 2;
    reinterpret_cast<__nv_bfloat16*>(reinterpret_cast<char*>(bs) + off)[0] = B[k * N + n];
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  auto pair = [&](int row, int k) {
    __nv_bfloat162 v;
    v.x = A[row * 16 + k];
    v.y = A[row * 16 + k + 1];
    return *reinterpret_cast<uint32_t*>(&v);
  };
  const int r0 = 16 * warp + g;
  const uint32_t a[4] = {pair(r0, 2 * c), pair(r0 + 8, 2 * c), pair(r0, 2 * c + 8), pair(r0 + 8, 2 * c + 8)};
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
  const uint64_t desc = desc_of(bs, lbo, sbo);
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
  if (N == 8) wgmma<8>(d, a, desc);
  if (N == 16) wgmma<16>(d, a, desc);
  if (N == 32) wgmma<32>(d, a, desc);
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  // the mma C layout per token tile tt: d[4tt + 0/1] = (row g, tokens 2c, 2c+1), d[4tt + 2/3] = row g + 8
  for (int tt = 0; tt < N / 8; ++tt) {
    const int n = 8 * tt + 2 * c;
    D[r0 * N + n] = d[4 * tt + 0];
    D[r0 * N + n + 1] = d[4 * tt + 1];
    D[(r0 + 8) * N + n] = d[4 * tt + 2];
    D[(r0 + 8) * N + n + 1] = d[4 * tt + 3];
  }
}

int main() {
  std::vector<__nv_bfloat16> hA(64 * 16), hB(16 * 64);
  std::vector<float> fA(64 * 16), fB(16 * 64);
  srand(1);
  for (int i = 0; i < 64 * 16; ++i) {
    fA[i] = __bfloat162float(hA[i] = __float2bfloat16((rand() % 17 - 8) / 8.f));
    fB[i] = __bfloat162float(hB[i] = __float2bfloat16((rand() % 13 - 6) / 4.f));
  }
  __nv_bfloat16 *dA, *dB;
  float* dD;
  cudaMalloc(&dA, 64 * 16 * 2);
  cudaMalloc(&dB, 16 * 64 * 2);
  cudaMalloc(&dD, 64 * 64 * 4);
  cudaMemcpy(dA, hA.data(), 64 * 16 * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(dB, hB.data(), 16 * 64 * 2, cudaMemcpyHostToDevice);
  int bad = 0;
  for (int N : {8, 16, 32}) {
    for (int order = 0; order < 2; ++order) {
      // order 0: LBO = the K step between core matrices (128 B, the two K halves adjacent), SBO = the N step
      // (256 B); order 1: the other reading (LBO = N step 128 B... with cores of one K half adjacent along N).
      const uint32_t lbo = order == 0 ? 128 : (uint32_t)(N / 8) * 128, sbo = order == 0 ? 256 : 128;
      std::vector<float> hD(64 * N, 0.f);
      cudaMemset(dD, 0, 64 * 64 * 4);
      probe<<<1, 128>>>(dA, dB, dD, N, lbo, sbo);
      cudaError_t e = cudaDeviceSynchronize();
      if (e != cudaSuccess) {
        printf("N=%d order %d: CUDA error %s\n", N, order, cudaGetErrorString(e));
        return 1;
      }
      cudaMemcpy(hD.data(), dD, 64 * N * 4, cudaMemcpyDeviceToHost);
      double err = 0;
      for (int m = 0; m < 64; ++m)
        for (int n = 0; n < N; ++n) {
          double s = 0;
          for (int k = 0; k < 16; ++k) s += (double)fA[m * 16 + k] * fB[k * N + n];
          err = fmax(err, fabs(s - hD[m * N + n]));
        }
      printf("wgmma m64n%dk16 A regs, B smem no-swizzle, LBO %u SBO %u: max abs err %.3g %s\n", N, lbo, sbo, err,
             err < 1e-3 ? "OK" : "WRONG");
      if (order == 0 && err >= 1e-3) bad = 1;
    }
  }
  printf(bad ? "convention 0 FAILED\n" : "convention 0 (LBO = K step, SBO = N step) holds\n");
  return bad;
}
