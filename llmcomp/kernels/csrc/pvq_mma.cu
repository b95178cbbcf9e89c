// PVQ (`pyramid`) weights at 1..32 rows of x: the pyramid points held as 4-bit integers, multiplied on the tensor
// cores.
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
// loop into a per-warp shared-memory tile, one (escape, row of x) pair a lane (shared atomics: rows with escapes
// may differ in their last bit from run to run).
//
// A block of WARPS (4, 8, 16) warps takes one row group of R tiles (16R rows inside one PVQ group, so one scale row;
// R = 1, 2 or 4 by launch) and a share of its chunks: grid (row groups, S); warp w of split s takes chunks s·WARPS + w,
// stepping S·WARPS, the next chunk's codes, s and escape range (and x, at NT <= 2) loaded before this one's math (two
// stages in registers). NT n-tiles of 8 rows of x (1, 2, 4: M up to 32) share each decoded A fragment. The warps'
// partial sums are added in order in shared memory; with S > 1 each split stores them (part [S][N][8 NT] fp32) and the
// row group's last block to finish adds the splits in order and writes y (counters [row groups], left zero). x comes
// padded with zeros to whole chunks (Kp inputs), so nothing is bounds-checked.
#include "uniform_mma.cuh"

namespace llmcomp_pvq {

using llmcomp_mma::Num;
using llmcomp_mma::grid_dep_launch;
using llmcomp_mma::grid_dep_wait;
using llmcomp_mma::ld_stream;
using llmcomp_mma::lop3_and_or;
using llmcomp_mma::mma16816;

constexpr int CHUNK = 64;  // inputs a lane's 16-byte load of a tile covers: 4 kblocks of 16
constexpr int MAXM = 32;   // rows of x: up to 4 n-tiles of the mma's n = 8

// (R, WARPS, NT) the kernel is built for: the warps' shared tiles (WARPS · 16R · 8NT floats) within 48 KB, at most 8
// accumulator fragments (R · NT) a lane, 8 or 16 warps above one n-tile. Not 8 n-tiles: at M = 64 (one row tile a
// block: every 16 rows read all of x again) it ran at 0.43-0.56x of dequantize + cuBLAS (sweep_pvq2_ms_h200_s33.json).
__host__ __device__ constexpr bool valid_launch(int r, int warps, int nt) {
  return (r == 1 || r == 2 || r == 4) && (warps == 4 || warps == 8 || warps == 16) &&
         (nt == 1 || nt == 2 || nt == 4) && warps * r * nt * 16 * 8 * 4 <= 48 * 1024 && r * nt <= 8 &&
         (nt == 1 || warps >= 8);
}

__device__ __forceinline__ uint32_t pack2(float a, float b, __half) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __nv_bfloat16) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ float2 to_float2(uint32_t u, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}
__device__ __forceinline__ float2 to_float2(uint32_t u, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}

// One chunk's operands as a lane holds them: the codes of its R tiles, s and (XS) x of each n-tile at its 8 input
// pairs (k, k + 1) of the B fragments (kblock kb: pairs 2kb at 2c, 2kb + 1 at 2c + 8), the chunk's escape range.
template <int R, int NX>
struct Stage {
  uint4 w[R];
  uint32_t x[NX][8];
  float2 s[8];
  int e0, e1;
};

template <typename T, int R, int WARPS, int NT>
__global__ void __launch_bounds__(WARPS * 32) pvq_kernel(
    const T* __restrict__ x, int M, int Kp, const uint4* __restrict__ qw, const float* __restrict__ s, int dim,
    int chunks, const int* __restrict__ esc_ptr, const int* __restrict__ esc_pos, const float* __restrict__ esc_val,
    float* __restrict__ part, unsigned* __restrict__ counters, T* __restrict__ out, int N) {
  using Tr = Num<T>;
  constexpr int ROWS = 16 * R, MT = 8 * NT;
  constexpr bool XS = NT <= 2;  // x staged with the codes (else loaded a kblock at a time: registers)
  static_assert(valid_launch(R, WARPS, NT), "launch not built");
  __shared__ float red[WARPS][ROWS][MT];
  __shared__ bool last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int rg = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int row0 = rg * ROWS;
  const float* srow = s + (size_t)(row0 / dim) * Kp;
  const uint4* q0 = qw + (size_t)rg * R * chunks * 32 + lane;

  for (int i = threadIdx.x; i < WARPS * ROWS * MT; i += WARPS * 32) (&red[0][0][0])[i] = 0.f;
  float acc[R][NT][4];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int t = 0; t < NT; ++t) acc[i][t][0] = acc[i][t][1] = acc[i][t][2] = acc[i][t][3] = 0.f;

  // this lane's B column (row of x) in n-tile t: row 8t + g, if it exists
  bool col[NT];
  const T* xg[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    col[t] = 8 * t + g < M;
    xg[t] = x + (size_t)(col[t] ? 8 * t + g : 0) * Kp;
  }
  auto x_at = [&](int t, int k) { return col[t] ? *reinterpret_cast<const uint32_t*>(xg[t] + k) : 0u; };
  auto k_at = [&](int ch, int p) { return ch * CHUNK + (p >> 1) * 16 + (p & 1) * 8 + 2 * c; };
  const uint32_t SUB = Tr::MAGIC + 0x00080008u;  // MAGIC + 8 in both halves: the code's offset
  using St = Stage<R, XS ? NT : 1>;
  auto load = [&](int ch, St& st) {
#pragma unroll
    for (int i = 0; i < R; ++i) st.w[i] = ld_stream(q0 + ((size_t)i * chunks + ch) * 32);
#pragma unroll
    for (int p = 0; p < 8; ++p) {
      const int k = k_at(ch, p);
      if constexpr (XS) {
#pragma unroll
        for (int t = 0; t < NT; ++t) st.x[t][p] = x_at(t, k);
      }
      st.s[p] = *reinterpret_cast<const float2*>(srow + k);
    }
    st.e0 = esc_ptr[rg * chunks + ch];
    st.e1 = esc_ptr[rg * chunks + ch + 1];
  };
  auto compute = [&](const St& st, int ch) {
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      const float2 s0 = st.s[2 * kb], s1 = st.s[2 * kb + 1];
      uint32_t b0[NT], b1[NT];
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        uint32_t u0, u1;
        if constexpr (XS) {
          u0 = st.x[t][2 * kb];
          u1 = st.x[t][2 * kb + 1];
        } else {
          u0 = x_at(t, k_at(ch, 2 * kb));
          u1 = x_at(t, k_at(ch, 2 * kb + 1));
        }
        const float2 x0 = to_float2(u0, T()), x1 = to_float2(u1, T());
        b0[t] = pack2(x0.x * s0.x, x0.y * s0.y, T());
        b1[t] = pack2(x1.x * s1.x, x1.y * s1.y, T());
      }
#pragma unroll
      for (int i = 0; i < R; ++i) {
        const uint32_t word = kb == 0 ? st.w[i].x : kb == 1 ? st.w[i].y : kb == 2 ? st.w[i].z : st.w[i].w;
        uint32_t a[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const typename Tr::T2 p = Tr::sub2(Tr::pair(lop3_and_or(word >> (4 * j), 0x000f000fu, Tr::MAGIC)),
                                             Tr::pair(SUB));
          a[j] = *reinterpret_cast<const uint32_t*>(&p);
        }
#pragma unroll
        for (int t = 0; t < NT; ++t) mma16816<T>(acc[i][t], a, b0[t], b1[t]);
      }
    }
    // the chunk's escapes into the warp's tile (~1e-4 of the pulses at 2 bits a weight, ~4e-3 at 3). Above one row
    // of x the (row, escape) pairs spread over the lanes, a row's escapes on neighbouring lanes (their x within the
    // chunk's 128 bytes): one escape a lane looping over the rows ran pvq3 at M = 16 / 32 1.4-2.1x slower. At one
    // row, one escape a lane without the division (the pairs' form ran pvq3 M = 1 15-24 % slower).
    auto escape = [&](int e, int m) {
      const int pos = esc_pos[e];
      atomicAdd(&red[warp][pos & 63][m], esc_val[e] * Tr::to_float(x[(size_t)m * Kp + (pos >> 6)]));
    };
    const int ne = st.e1 - st.e0;
    if (M == 1) {
      for (int e = st.e0 + lane; e < st.e1; e += 32) escape(e, 0);
    } else {
      for (int i = lane; i < ne * M; i += 32) {
        const int m = i / ne;
        escape(st.e0 + i - m * ne, m);
      }
    }
  };

  grid_dep_wait();
  __syncthreads();
  // chunks split * WARPS + warp, stepping splits * WARPS; the next one's loads in flight during this one's math
  const int step = splits * WARPS;
  St sa, sb;
  int ch = split * WARPS + warp;
  if (ch < chunks) load(ch, sa);
  for (; ch < chunks; ch += 2 * step) {
    if (ch + step < chunks) load(ch + step, sb);
    compute(sa, ch);
    if (ch + step >= chunks) break;
    if (ch + 2 * step < chunks) load(ch + 2 * step, sa);
    compute(sb, ch + step);
  }
  grid_dep_launch();
  __syncwarp();
  // D fragment: (row g, cols 2c, 2c + 1), (row g + 8, same cols); this lane's positions of the warp's tile
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int r = i * 16 + g + (j >> 1) * 8, m = 8 * t + 2 * c + (j & 1);
        red[warp][r][m] += acc[i][t][j];
      }
  __syncthreads();
  // the warps' tiles in order; then this split's partial, or y
  for (int t = threadIdx.x; t < ROWS * MT; t += WARPS * 32) {
    const int r = t / MT, m = t % MT;
    float sum = 0.f;
#pragma unroll
    for (int ww = 0; ww < WARPS; ++ww) sum += red[ww][r][m];
    red[0][r][m] = sum;
  }
  __syncthreads();
  if (splits == 1) {
    for (int t = threadIdx.x; t < ROWS * M; t += WARPS * 32) {
      const int m = t / ROWS, r = t % ROWS;
      out[(size_t)m * N + row0 + r] = Tr::from_float(red[0][r][m]);
    }
    return;
  }
  for (int t = threadIdx.x; t < ROWS * MT; t += WARPS * 32)
    part[((size_t)split * N + row0) * MT + t] = red[0][t / MT][t % MT];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + rg, 1u) == (unsigned)splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int t = threadIdx.x; t < ROWS * M; t += WARPS * 32) {
    const int m = t / ROWS, r = t % ROWS;
    float sum = 0.f;
    for (int sp = 0; sp < splits; ++sp) sum += __ldcg(part + ((size_t)sp * N + row0 + r) * MT + m);
    out[(size_t)m * N + row0 + r] = Tr::from_float(sum);
  }
  if (threadIdx.x == 0) counters[rg] = 0u;
}

// W = y · s from the kernel's layout (escapes not included: the caller overwrites their positions), [N, K] in T. A
// warp takes one 16-row tile and chunk: its lanes' codes decoded into shared memory, then written row by row (two
// lanes a row, 64 bytes each), so the stores are whole sectors.
template <typename T>
__global__ void __launch_bounds__(128) pvq_dequant_kernel(const uint4* __restrict__ qw, const float* __restrict__ s,
                                                          int Kp, int dim, int chunks, T* __restrict__ w, int N,
                                                          int K) {
  __shared__ __align__(16) T tile[4][16][CHUNK + 8];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const size_t item = (size_t)blockIdx.x * 4 + warp;  // (tile, chunk)
  if (item >= (size_t)(N / 16) * chunks) return;
  const int t = (int)(item / chunks), ch = (int)(item % chunks);
  const int g = lane >> 2, c = lane & 3;
  const uint4 q = qw[item * 32 + lane];
  const uint32_t words[4] = {q.x, q.y, q.z, q.w};
  const float* srow = s + (size_t)((t * 16) / dim) * Kp + ch * CHUNK;
#pragma unroll
  for (int kb = 0; kb < 4; ++kb)
#pragma unroll
    for (int nib = 0; nib < 8; ++nib) {
      const int h = nib & 1, h2 = (nib >> 1) & 1, e = nib >> 2;
      const int kk = kb * 16 + 8 * h2 + 2 * c + e;
      const float y = (float)((int)((words[kb] >> (4 * nib)) & 0xfu) - 8);
      tile[warp][g + 8 * h][kk] = Num<T>::from_float(y * srow[kk]);
    }
  __syncwarp();
  const int row = lane >> 1, k0 = ch * CHUNK + (lane & 1) * 32;
  T* dst = w + (size_t)(t * 16 + row) * K + k0;
  const T* src = &tile[warp][row][(lane & 1) * 32];
  if (K % 8 == 0 && k0 + 32 <= K) {
#pragma unroll
    for (int j = 0; j < 4; ++j) reinterpret_cast<uint4*>(dst)[j] = reinterpret_cast<const uint4*>(src)[j];
  } else {
    for (int j = 0; j < 32 && k0 + j < K; ++j) dst[j] = src[j];
  }
}

struct Args {  // the launch's operands (pvq_gemm checks them)
  const void* x;
  int m, kp, dim, chunks, n, splits;
  const void* qw;
  const float* s;
  const int *esc_ptr, *esc_pos;
  const float* esc_val;
  float* part;
  unsigned* counters;
  void* out;
};

template <typename T, int R, int WARPS, int NT>
void launch(const Args& a) {
  if constexpr (valid_launch(R, WARPS, NT)) {
    llmcomp_mma::launch_ex(pvq_kernel<T, R, WARPS, NT>, dim3(a.n / (16 * R), a.splits), WARPS * 32, 0,
                           reinterpret_cast<const T*>(a.x), a.m, a.kp, reinterpret_cast<const uint4*>(a.qw), a.s,
                           a.dim, a.chunks, a.esc_ptr, a.esc_pos, a.esc_val, a.part, a.counters,
                           reinterpret_cast<T*>(a.out), a.n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    TORCH_CHECK(false, "pvq_gemm: launch not built");  // pvq_gemm checks valid_launch first
  }
}

template <typename T, int R, int NT>
void by_warps(int warps, const Args& a) {
  if (warps == 4) return launch<T, R, 4, NT>(a);
  if (warps == 8) return launch<T, R, 8, NT>(a);
  launch<T, R, 16, NT>(a);
}

template <typename T, int NT>
void by_tiles(int r, int warps, const Args& a) {
  if (r == 4) return by_warps<T, 4, NT>(warps, a);
  if (r == 2) return by_warps<T, 2, NT>(warps, a);
  by_warps<T, 1, NT>(warps, a);
}

// n-tiles of 8 rows of x: the fewest (a power of two) that cover M
inline int n_tiles(int m) { return m <= 8 ? 1 : m <= 16 ? 2 : 4; }

template <typename T>
void dispatch(int r, int warps, const Args& a) {
  switch (n_tiles(a.m)) {
    case 1: return by_tiles<T, 1>(r, warps, a);
    case 2: return by_tiles<T, 2>(r, warps, a);
    default: by_tiles<T, 4>(r, warps, a);
  }
}

}  // namespace llmcomp_pvq

static void check_cuda(const torch::Tensor& t, at::ScalarType type, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous() && t.scalar_type() == type, what);
}

// x [M <= 32, Kp] (fp16 / bf16; Kp = 64 · chunks, zero past the weight's inputs) → y [M, n]. qw int32 [n / 16,
// chunks, 32, 4]; s fp32 [n / dim, Kp]; escapes for row groups of 16 r rows: esc_ptr int32 [n / (16 r) · chunks + 1],
// esc_pos int32, esc_val fp32; part fp32 scratch of splits · n · 8 NT values (splits > 1; NT = n_tiles(M));
// counters int32 [n / (16 r)], zero (left zero); r: tiles a row group (1, 2, 4; 16 r divides dim); warps a block:
// 4, 8 or 16 — (r, warps, NT) one of valid_launch's.
torch::Tensor pvq_gemm(torch::Tensor x, torch::Tensor qw, torch::Tensor s, int64_t dim, torch::Tensor esc_ptr,
                       torch::Tensor esc_pos, torch::Tensor esc_val, torch::Tensor part, torch::Tensor counters,
                       int64_t n, int64_t r, int64_t warps, int64_t splits) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous() && x.size(0) >= 1 &&
                  x.size(0) <= llmcomp_pvq::MAXM && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16),
              "x: contiguous float16 or bfloat16 CUDA [M <= 32, Kp]");
  TORCH_CHECK(x.size(1) % llmcomp_pvq::CHUNK == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 4 == 0,
              "x: inputs padded to a multiple of 64, 4-byte aligned");
  const int nt = llmcomp_pvq::n_tiles((int)x.size(0));
  TORCH_CHECK(llmcomp_pvq::valid_launch((int)r, (int)warps, nt),
              "(r, warps) not built for this many rows of x (pyramid_cuda.valid_launch)");
  TORCH_CHECK(dim > 0 && dim % (16 * r) == 0 && n % dim == 0, "dim: a multiple of 16 r dividing n");
  const int64_t chunks = x.size(1) / llmcomp_pvq::CHUNK;
  check_cuda(qw, at::kInt, "qw: contiguous int32 CUDA");
  TORCH_CHECK(qw.dim() == 4 && qw.size(0) == n / 16 && qw.size(1) == chunks && qw.size(2) == 32 && qw.size(3) == 4,
              "qw: [n / 16, chunks of 64 inputs, 32, 4]");
  check_cuda(s, at::kFloat, "s: contiguous float32 CUDA");
  TORCH_CHECK(s.dim() == 2 && s.size(0) == n / dim && s.size(1) == x.size(1), "s: [n / dim, Kp]");
  check_cuda(esc_ptr, at::kInt, "esc_ptr: contiguous int32 CUDA");
  check_cuda(esc_pos, at::kInt, "esc_pos: contiguous int32 CUDA");
  check_cuda(esc_val, at::kFloat, "esc_val: contiguous float32 CUDA");
  TORCH_CHECK(esc_ptr.numel() == n / (16 * r) * chunks + 1 && esc_pos.numel() == esc_val.numel(),
              "esc_ptr: one a row group of 16 r rows and chunk, + 1");
  TORCH_CHECK(splits >= 1 && splits <= 65535, "splits: 1 .. 65535");
  check_cuda(part, at::kFloat, "part: contiguous float32 CUDA");
  TORCH_CHECK(splits == 1 || part.numel() >= splits * n * 8 * nt, "part: splits · n · 8 NT values");
  check_cuda(counters, at::kInt, "counters: contiguous int32 CUDA");
  TORCH_CHECK(counters.numel() >= n / (16 * r), "counters: one a row group");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), n}, x.options());
  const llmcomp_pvq::Args a{x.data_ptr(), (int)x.size(0), (int)x.size(1), (int)dim, (int)chunks, (int)n, (int)splits,
                            qw.data_ptr(), s.data_ptr<float>(), esc_ptr.data_ptr<int>(), esc_pos.data_ptr<int>(),
                            esc_val.data_ptr<float>(), part.data_ptr<float>(),
                            reinterpret_cast<unsigned*>(counters.data_ptr()), out.data_ptr()};
  if (x.scalar_type() == at::kHalf) llmcomp_pvq::dispatch<__half>((int)r, (int)warps, a);
  else llmcomp_pvq::dispatch<__nv_bfloat16>((int)r, (int)warps, a);
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
  const int blocks = (int)(((n / 16) * chunks + 3) / 4);  // a warp a tile and chunk, 4 warps a block
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* q = reinterpret_cast<const uint4*>(qw.data_ptr());
  if (!bf16)
    llmcomp_pvq::pvq_dequant_kernel<__half><<<blocks, 128, 0, stream>>>(
        q, s.data_ptr<float>(), (int)s.size(1), (int)dim, (int)chunks, reinterpret_cast<__half*>(w.data_ptr()),
        (int)n, (int)k);
  else
    llmcomp_pvq::pvq_dequant_kernel<__nv_bfloat16><<<blocks, 128, 0, stream>>>(
        q, s.data_ptr<float>(), (int)s.size(1), (int)dim, (int)chunks, reinterpret_cast<__nv_bfloat16*>(w.data_ptr()),
        (int)n, (int)k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}
