// PVQ (`pyramid`) weights at 1..8 rows of x: the pyramid points held as 4-bit integers, multiplied on the tensor cores.
//
// A PVQ weight is W[r][k] = y[r][k] * s[r / dim][k]: integer pulses y (a point of the pyramid, sum |y| = K, per group
// of `dim` rows down a column) times one fp32 scale per group (gain / |y|). The stored enumeration index takes a
// sequential big-integer walk to decode, so llmcomp/kernels/pyramid_cuda.py decodes it once, at the first call, into
// this kernel's layout: y clamped to [-8, 7] as 4-bit codes (y + 8), the few pulses outside that range kept apart as
// escapes. Because the scale varies along k but is shared by the `dim` rows of a group, it goes onto x: for a 16-row
// tile inside one group, W_tile · x = Y_tile · (x ⊙ s[group]), so the mma's A operand is the integer codes (exact in
// fp16 and bf16) and its B operand x ⊙ s rounded to x's dtype (one rounding, as the reference rounds W).
//
// Layout: qw uint32 [N / 16][chunks][32 lanes][4] — for each 16-row tile and chunk of 64 inputs, lane (g, c) = lane /
// 4, lane % 4 holds one word a kblock of 16 inputs with its A fragment's 8 codes: nibble e·4 + h2·2 + h (e, h2, h
// in {0, 1}) is row g + 8h, input 16·kb + 8·h2 + 2c + e — so (w >> 4j) & 0x000f000f is the fragment's register j, a
// pair of codes, and one lop3 and one subtraction make the pair of values (the mma m16n8k16 A layout). s fp32
// [N / dim][Kp] (Kp = 64 · chunks, zero past K). Escapes (y outside [-8, 7]): per row group and chunk
// (esc_ptr[rg · chunks + c] .. [+1]) entries (k << 6 | row within the group, (y - clamp(y)) · s), added in the main
// loop into a per-warp shared-memory tile by the lane that read them (shared atomics: rows with escapes may differ
// in their last bit from run to run).
//
// A block of WARPS warps takes one row group of R tiles (16R rows inside one PVQ group, so one scale row) and a share
// of its chunks: grid (row groups, S); warp w of split s takes chunks s·WARPS + w, stepping S·WARPS. The warps'
// partial sums are added in order in shared memory; with S > 1 each split stores them (part [S][N][8] fp32) and the
// row group's last block to finish adds the splits in order and writes y (counters [row groups], left zero).
#include "uniform_mma.cuh"

namespace llmcomp_pvq {

using llmcomp_mma::Num;
using llmcomp_mma::grid_dep_launch;
using llmcomp_mma::grid_dep_wait;
using llmcomp_mma::ld_stream;
using llmcomp_mma::lop3_and_or;
using llmcomp_mma::mma16816;

constexpr int CHUNK = 64;  // inputs a lane's 16-byte load of a tile covers: 4 kblocks of 16
constexpr int MAXM = 8;    // the mma's n: rows of x

__device__ __forceinline__ uint32_t pack2(float a, float b, __half) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __nv_bfloat16) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

template <typename T, int R, int WARPS>
__global__ void __launch_bounds__(WARPS * 32) pvq_kernel(
    const T* __restrict__ x, int M, int K, const uint4* __restrict__ qw, const float* __restrict__ s, int Kp, int dim,
    int chunks, const int* __restrict__ esc_ptr, const int* __restrict__ esc_pos, const float* __restrict__ esc_val,
    float* __restrict__ part, unsigned* __restrict__ counters, T* __restrict__ out, int N) {
  using Tr = Num<T>;
  constexpr int ROWS = 16 * R;
  __shared__ float red[WARPS][ROWS][MAXM];
  __shared__ bool last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int rg = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int row0 = rg * ROWS;
  const float* srow = s + (size_t)(row0 / dim) * Kp;
  const uint4* q0 = qw + (size_t)rg * R * chunks * 32 + lane;

  for (int i = threadIdx.x; i < WARPS * ROWS * MAXM; i += WARPS * 32) (&red[0][0][0])[i] = 0.f;
  float acc[R][4];
#pragma unroll
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  grid_dep_wait();
  __syncthreads();

  const bool col = g < M;  // this lane's B column (row of x) exists
  const T* xg = x + (size_t)(col ? g : 0) * K;
  const uint32_t SUB = Tr::MAGIC + 0x00080008u;  // MAGIC + 8 in both halves: the code's offset
  for (int ch = split * WARPS + warp; ch < chunks; ch += splits * WARPS) {
    uint4 w[R];
#pragma unroll
    for (int i = 0; i < R; ++i) w[i] = ld_stream(q0 + ((size_t)i * chunks + ch) * 32);
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      const int k = ch * CHUNK + kb * 16 + 2 * c;
      float v[4] = {0.f, 0.f, 0.f, 0.f};
      if (col) {
        const int ks[4] = {k, k + 1, k + 8, k + 9};
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = ks[j] < K ? Tr::to_float(xg[ks[j]]) * srow[ks[j]] : 0.f;
      }
      const uint32_t b0 = pack2(v[0], v[1], T()), b1 = pack2(v[2], v[3], T());
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const uint32_t word = kb == 0 ? w[i].x : kb == 1 ? w[i].y : kb == 2 ? w[i].z : w[i].w;
        uint32_t a[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const typename Tr::T2 p = Tr::sub2(Tr::pair(lop3_and_or(word >> (4 * j), 0x000f000fu, Tr::MAGIC)),
                                             Tr::pair(SUB));
          a[j] = *reinterpret_cast<const uint32_t*>(&p);
        }
        mma16816<T>(acc[i], a, b0, b1);
      }
    }
    // this chunk's escapes, one a lane, into the warp's tile (rare: ~1e-4 of the pulses at 2 bits a weight)
    const int e0 = esc_ptr[rg * chunks + ch], e1 = esc_ptr[rg * chunks + ch + 1];
    for (int e = e0 + lane; e < e1; e += 32) {
      const int pos = esc_pos[e];
      const float val = esc_val[e];
      const int r = pos & 63, kk = pos >> 6;
      for (int m = 0; m < M; ++m) atomicAdd(&red[warp][r][m], val * Tr::to_float(x[(size_t)m * K + kk]));
    }
  }
  grid_dep_launch();
  __syncwarp();
  // D fragment: (row g, cols 2c, 2c + 1), (row g + 8, same cols); this lane's positions of the warp's tile
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int r = i * 16 + g + (j >> 1) * 8, m = 2 * c + (j & 1);
      red[warp][r][m] += acc[i][j];
    }
  __syncthreads();
  // the warps' tiles in order; then this split's partial, or y
  for (int t = threadIdx.x; t < ROWS * MAXM; t += WARPS * 32) {
    const int r = t / MAXM, m = t % MAXM;
    float sum = 0.f;
#pragma unroll
    for (int ww = 0; ww < WARPS; ++ww) sum += red[ww][r][m];
    red[0][r][m] = sum;
  }
  if (splits == 1) {
    __syncthreads();
    for (int t = threadIdx.x; t < ROWS * M; t += WARPS * 32) {
      const int m = t / ROWS, r = t % ROWS;
      if (row0 + r < N) out[(size_t)m * N + row0 + r] = Tr::from_float(red[0][r][m]);
    }
    return;
  }
  __syncthreads();
  for (int t = threadIdx.x; t < ROWS * MAXM; t += WARPS * 32)
    part[((size_t)split * N + row0) * MAXM + t] = red[0][t / MAXM][t % MAXM];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + rg, 1u) == (unsigned)splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int t = threadIdx.x; t < ROWS * M; t += WARPS * 32) {
    const int m = t / ROWS, r = t % ROWS;
    float sum = 0.f;
    for (int sp = 0; sp < splits; ++sp) sum += __ldcg(part + ((size_t)sp * N + row0 + r) * MAXM + m);
    out[(size_t)m * N + row0 + r] = Tr::from_float(sum);
  }
  if (threadIdx.x == 0) counters[rg] = 0u;
}

// W = y · s from the kernel's layout (escapes not included: the caller overwrites their positions), [N, K] in T.
template <typename T>
__global__ void pvq_dequant_kernel(const uint4* __restrict__ qw, const float* __restrict__ s, int Kp, int dim,
                                   int chunks, T* __restrict__ w, int N, int K) {
  const size_t id = (size_t)blockIdx.x * blockDim.x + threadIdx.x;  // (tile, chunk, lane)
  if (id >= (size_t)(N / 16) * chunks * 32) return;
  const int lane = id % 32, ch = (id / 32) % chunks, tile = id / 32 / chunks;
  const int g = lane >> 2, c = lane & 3;
  const uint4 q = qw[id];
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int kb = 0; kb < 4; ++kb)
#pragma unroll
    for (int nib = 0; nib < 8; ++nib) {
      const int h = nib & 1, h2 = (nib >> 1) & 1, e = nib >> 2;
      const int r = tile * 16 + g + 8 * h, k = ch * CHUNK + kb * 16 + 8 * h2 + 2 * c + e;
      if (k >= K) continue;
      const float y = (float)((int)((words[kb] >> (4 * nib)) & 0xfu) - 8);
      w[(size_t)r * K + k] = Num<T>::from_float(y * s[(size_t)(r / dim) * Kp + k]);
    }
}

template <typename T, int R, int WARPS>
void launch(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& s, int dim, int chunks,
            const torch::Tensor& esc_ptr, const torch::Tensor& esc_pos, const torch::Tensor& esc_val,
            torch::Tensor& part, torch::Tensor& counters, torch::Tensor& out, int n, int splits) {
  auto kernel = pvq_kernel<T, R, WARPS>;
  llmcomp_mma::launch_ex(kernel, dim3(n / (16 * R), splits), WARPS * 32, 0, reinterpret_cast<const T*>(x.data_ptr()),
                         (int)x.size(0), (int)x.size(1), reinterpret_cast<const uint4*>(qw.data_ptr()),
                         s.data_ptr<float>(), (int)s.size(1), dim, chunks, esc_ptr.data_ptr<int>(),
                         esc_pos.data_ptr<int>(), esc_val.data_ptr<float>(), part.data_ptr<float>(),
                         reinterpret_cast<unsigned*>(counters.data_ptr()), reinterpret_cast<T*>(out.data_ptr()), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int R>
void by_warps(int warps, const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& s, int dim, int chunks,
              const torch::Tensor& esc_ptr, const torch::Tensor& esc_pos, const torch::Tensor& esc_val,
              torch::Tensor& part, torch::Tensor& counters, torch::Tensor& out, int n, int splits) {
  if (warps == 4) return launch<T, R, 4>(x, qw, s, dim, chunks, esc_ptr, esc_pos, esc_val, part, counters, out, n, splits);
  launch<T, R, 8>(x, qw, s, dim, chunks, esc_ptr, esc_pos, esc_val, part, counters, out, n, splits);
}

template <typename T>
void by_tiles(int r, int warps, const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& s, int dim,
              int chunks, const torch::Tensor& esc_ptr, const torch::Tensor& esc_pos, const torch::Tensor& esc_val,
              torch::Tensor& part, torch::Tensor& counters, torch::Tensor& out, int n, int splits) {
  if (r == 4) return by_warps<T, 4>(warps, x, qw, s, dim, chunks, esc_ptr, esc_pos, esc_val, part, counters, out, n, splits);
  if (r == 2) return by_warps<T, 2>(warps, x, qw, s, dim, chunks, esc_ptr, esc_pos, esc_val, part, counters, out, n, splits);
  by_warps<T, 1>(warps, x, qw, s, dim, chunks, esc_ptr, esc_pos, esc_val, part, counters, out, n, splits);
}

}  // namespace llmcomp_pvq

static void check_cuda(const torch::Tensor& t, at::ScalarType type, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == type, what);
}

// x [M <= 8, K] (fp16 / bf16) → y [M, n]. qw int32 [n / 16, chunks, 32, 4]; s fp32 [n / dim, 64 · chunks]; escapes:
// esc_ptr int32 [n / (16 r) · chunks + 1], esc_pos int32, esc_val fp32; part fp32 scratch of splits · n · 8 values
// (splits > 1); counters int32 [n / (16 r)], zero (left zero); r: tiles a row group (1, 2, 4; 16 r divides dim);
// warps a block: 4 or 8.
torch::Tensor pvq_gemm(torch::Tensor x, torch::Tensor qw, torch::Tensor s, int64_t dim, torch::Tensor esc_ptr,
                       torch::Tensor esc_pos, torch::Tensor esc_val, torch::Tensor part, torch::Tensor counters,
                       int64_t n, int64_t r, int64_t warps, int64_t splits) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous() && x.size(0) >= 1 &&
                  x.size(0) <= llmcomp_pvq::MAXM && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16),
              "x: contiguous float16 or bfloat16 CUDA [M <= 8, K]");
  TORCH_CHECK(r == 1 || r == 2 || r == 4, "r: 1, 2 or 4 tiles a row group");
  TORCH_CHECK(warps == 4 || warps == 8, "warps: 4 or 8");
  TORCH_CHECK(dim > 0 && dim % (16 * r) == 0 && n % dim == 0, "dim: a multiple of 16 r dividing n");
  const int64_t chunks = (x.size(1) + llmcomp_pvq::CHUNK - 1) / llmcomp_pvq::CHUNK;
  check_cuda(qw, at::kInt, "qw: contiguous int32 CUDA");
  TORCH_CHECK(qw.dim() == 4 && qw.size(0) == n / 16 && qw.size(1) == chunks && qw.size(2) == 32 && qw.size(3) == 4,
              "qw: [n / 16, chunks of 64 inputs, 32, 4]");
  check_cuda(s, at::kFloat, "s: contiguous float32 CUDA");
  TORCH_CHECK(s.dim() == 2 && s.size(0) == n / dim && s.size(1) == chunks * llmcomp_pvq::CHUNK, "s: [n / dim, Kp]");
  check_cuda(esc_ptr, at::kInt, "esc_ptr: contiguous int32 CUDA");
  check_cuda(esc_pos, at::kInt, "esc_pos: contiguous int32 CUDA");
  check_cuda(esc_val, at::kFloat, "esc_val: contiguous float32 CUDA");
  TORCH_CHECK(esc_ptr.numel() == n / (16 * r) * chunks + 1 && esc_pos.numel() == esc_val.numel(),
              "esc_ptr: one a row group and chunk, + 1");
  TORCH_CHECK(splits >= 1 && splits <= 65535, "splits: 1 .. 65535");
  check_cuda(part, at::kFloat, "part: contiguous float32 CUDA");
  TORCH_CHECK(splits == 1 || part.numel() >= splits * n * llmcomp_pvq::MAXM, "part: splits · n · 8 values");
  check_cuda(counters, at::kInt, "counters: contiguous int32 CUDA");
  TORCH_CHECK(counters.numel() >= n / (16 * r), "counters: one a row group");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), n}, x.options());
  const int a = (int)dim, ch = (int)chunks, nn = (int)n, sp = (int)splits, rr = (int)r, wp = (int)warps;
  if (x.scalar_type() == at::kHalf)
    llmcomp_pvq::by_tiles<__half>(rr, wp, x, qw, s, a, ch, esc_ptr, esc_pos, esc_val, part, counters, out, nn, sp);
  else
    llmcomp_pvq::by_tiles<__nv_bfloat16>(rr, wp, x, qw, s, a, ch, esc_ptr, esc_pos, esc_val, part, counters, out, nn,
                                         sp);
  return out;
}

// W [n, k] in bf16 (else fp16) from the kernel layout, escapes left at their clamped values.
torch::Tensor pvq_dequant(torch::Tensor qw, torch::Tensor s, int64_t dim, int64_t n, int64_t k, bool bf16) {
  check_cuda(qw, at::kInt, "qw: contiguous int32 CUDA");
  check_cuda(s, at::kFloat, "s: contiguous float32 CUDA");
  const int64_t chunks = (k + llmcomp_pvq::CHUNK - 1) / llmcomp_pvq::CHUNK;
  TORCH_CHECK(qw.dim() == 4 && qw.size(0) == n / 16 && qw.size(1) == chunks && qw.size(2) == 32 && qw.size(3) == 4,
              "qw: [n / 16, chunks of 64 inputs, 32, 4]");
  TORCH_CHECK(dim > 0 && n % dim == 0 && s.dim() == 2 && s.size(0) == n / dim && s.size(1) == chunks * 64,
              "s: [n / dim, Kp]");
  const c10::cuda::CUDAGuard guard(qw.device());
  auto w = torch::empty({n, k}, qw.options().dtype(bf16 ? at::kBFloat16 : at::kHalf));
  const int64_t threads = (n / 16) * chunks * 32;
  const int blocks = (int)((threads + 255) / 256);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* q = reinterpret_cast<const uint4*>(qw.data_ptr());
  if (!bf16)
    llmcomp_pvq::pvq_dequant_kernel<__half><<<blocks, 256, 0, stream>>>(
        q, s.data_ptr<float>(), (int)s.size(1), (int)dim, (int)chunks, reinterpret_cast<__half*>(w.data_ptr()),
        (int)n, (int)k);
  else
    llmcomp_pvq::pvq_dequant_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(
        q, s.data_ptr<float>(), (int)s.size(1), (int)dim, (int)chunks, reinterpret_cast<__nv_bfloat16*>(w.data_ptr()),
        (int)n, (int)k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}
