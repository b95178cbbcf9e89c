// Codebook (VQ) weights at one row of x: a lookup-table GEMV instead of the mma kernel's dequantize-and-multiply.
//
// With one token, y[r] = scale[r] * sum_v <codebook[idx[r][v]], x[4v : 4v + 4]>. A block takes a slice of 128
// vectors (512 inputs) and first computes, for every codebook entry e and vector v of the slice, the dot product
// T[e][v] = <codebook[e], x[4v : 4v + 4]> (fp32, in shared memory, from the codebook staged there first by one
// load a thread); a row's partial sum is then one 4-byte lookup
// per index byte — where the mma kernel reads an 8-byte entry per index and multiplies it on the tensor cores.
// The table's layout makes every lookup conflict-free: lane l of a warp owns vectors 4l .. 4l + 3 of the slice
// (one 32-bit word of a row's indices, loaded four rows to a 16-byte piece), and T[e][4l + j] sits at float
// (e * 4 + j) * 32 + l, in bank l whatever e.
// A warp takes 16 rows at a time (their index words loaded a batch ahead); the 32 lanes' partials of 16 rows are
// summed by a transposing butterfly (15 shuffles, not 16 x 5), after which lane 2i holds row i.
// Blocks split K into slices (grid.x) and rows into chunks (grid.y); each writes its slice's partial sums of its
// chunk's rows (part[slice][row], plain stores), and the last block of a chunk to finish (a counter, reset by that
// block) adds the slices in order and writes y: deterministic, one launch, and nothing to zero beforehand.
// PRMT = true (the default with two stages: up to 4 % faster there on the smaller shapes, within 2 % either way on
// the larger; up to 4 % slower with one; H200, kernels_h200_vq_lut_next2.json): the table
// in two halves of 64 KB (vectors j = 0, 1 and j = 2, 3 of each lane), an entry 256 bytes: T[e][4l + j] at byte
// (j >> 1) * 65536 + e * 256 + (j & 1) * 128 + 4l — still bank l — so a lookup's address is the index byte placed
// in byte 1 over this lane's 4l in byte 0: one PRMT, the half and the vector pair in the load's immediate (instead
// of extract + multiply-add). Stage 1's 16 entries likewise, at 128 KB, halves of 4 KB.
// Layout: index words stored by batch, idx[slice][N / 16][Q][lane][16 / Q rows] (Q = 4 for stage 0, 2 for stage 1):
// the word of lane l in a slice holds vectors 4l .. 4l + 3 of that slice — stage 0: int32, byte j the index of
// vector 4l + j; stage 1 (two stages): int16, nibble j — so a lane loads a batch's words in Q 16-byte pieces and
// each load of a warp reads one contiguous 512 bytes (the batch 2 KB, 1 KB). Row-major words instead (16 four-byte
// loads of 128 bytes a batch, rows K / 4 bytes apart) were 5-12 % slower at the same block size (H200,
// kernels_h200_vq_lut_next.json); pieces of a lane's 64 contiguous bytes slower still (every warp-wide load
// touched 32 half-used sectors, kernels_h200_vq_lut_stream.json). cb [entries][4] fp32 (stage 1's from e1_at); K a
// multiple of 512 (the caller pads indices with entry 0 and x with zeros).
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <type_traits>
#include "launch.cuh"

namespace llmcomp_lut {

// Programmatic dependent launch, as the mma kernels use it (csrc/launch.cuh): with the launch
// attribute this kernel may start while the previous one finishes; it reads only its indices, codebook and chunk
// table (never written by the kernels before it) until griddepcontrol.wait, and lets the next kernel start once all its blocks
// have begun. No-ops without the attribute.
using llmcomp_mma::grid_dep_launch;
using llmcomp_mma::grid_dep_wait;

// A 16-byte global load issued where it stands: the compiler sinks a plain read-only one below the barrier that
// follows it (after the codebook's store, which waits for its own load), losing the overlap of the two loads.
__device__ __forceinline__ uint4 load_now(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
  return v;
}

constexpr int SLICE = 512;        // inputs a block's table covers: 128 vectors, 4 a lane
constexpr int BATCH = 16;         // rows a warp takes at a time
constexpr int ENTRY_FLOATS = 128; // one entry's row of the table: 4 vectors a lane x 32 lanes

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// One butterfly stage: rows i and i + H of v fold into v[i], lanes with bit M set keeping the upper ones.
template <int H, int M>
__device__ __forceinline__ void fold(float (&v)[BATCH], bool up) {
#pragma unroll
  for (int i = 0; i < H; ++i) {
    const float send = up ? v[i] : v[i + H];
    const float keep = up ? v[i + H] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, M);
  }
}

// The 32 lanes' partial sums of 16 rows → the row sums, row i in lanes 2i and 2i + 1.
__device__ __forceinline__ float transpose_sum(float (&v)[BATCH], int lane) {
  fold<8, 16>(v, lane & 16);
  fold<4, 8>(v, lane & 8);
  fold<2, 4>(v, lane & 4);
  fold<1, 2>(v, lane & 2);
  return v[0] + __shfl_xor_sync(0xffffffffu, v[0], 1);
}

// T[e][4l + j] for entries [0, entries) of cb (shared memory) into tab, at (e * 4 + j) * 32 + l; xs: this lane's
// 16 inputs.
template <int WARPS, bool PRMT>
__device__ __forceinline__ void build_table(float* tab, const float4* cb, int entries, const float (&xs)[16], int warp,
                                            int lane, int half_floats) {
  for (int e = warp; e < entries; e += WARPS) {
    const float4 c = cb[e];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float v = c.x * xs[4 * j] + c.y * xs[4 * j + 1] + c.z * xs[4 * j + 2] + c.w * xs[4 * j + 3];
      if constexpr (PRMT) tab[(j >> 1) * half_floats + e * 64 + (j & 1) * 32 + lane] = v;
      else tab[(e * 4 + j) * 32 + lane] = v;
    }
  }
}

// The PRMT form's shared memory: stage 0's halves (256 entries each, whatever e0), stage 1's, then the codebook.
constexpr int PRMT_HALF0 = 256 * 256, PRMT_HALF1 = 16 * 256, PRMT_STAGE1 = 2 * PRMT_HALF0;  // bytes

// The chunks of rows (grid.y): `count` chunks of `rows` rows (the last one shorter); or, with `start` (a group of
// weights stacked along the rows, each with its own codebook: q / k / v, gate / up), chunk c spans rows start[c] ..
// start[c + 1] and takes codebook book[c] — entries book[c] * stride .. (book[c] + 1) * stride of cb.
struct Chunks {
  int count, rows;
  const int* start;
  const int* book;
  int stride;
};

template <typename T, int STAGES, int THREADS, bool PRMT>
__global__ void __launch_bounds__(THREADS) vq_lut_kernel(const T* __restrict__ x, const uint32_t* __restrict__ idx0,
                                                         const uint16_t* __restrict__ idx1, const float4* __restrict__ cb,
                                                         int e0, int e1_at, int e1, const float* __restrict__ scale,
                                                         float* __restrict__ part, unsigned* __restrict__ counters,
                                                         T* __restrict__ out, int n, Chunks ch) {
  constexpr int WARPS = THREADS / 32;
  extern __shared__ float tab[];  // stage 0's e0 entries, then stage 1's e1, then the codebook (e1_at + e1 float4)
  __shared__ bool last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int slice = blockIdx.x, chunk = blockIdx.y;
  const int r0 = ch.start ? __ldg(ch.start + chunk) : chunk * ch.rows;
  const int r1 = ch.start ? __ldg(ch.start + chunk + 1) : min(n, r0 + ch.rows), batches = (r1 - r0) / BATCH;
  if (ch.start) cb += (size_t)__ldg(ch.book + chunk) * ch.stride;
  const size_t slice_words = (size_t)slice * (n / BATCH) * 32 * BATCH;  // the slice's batches

  grid_dep_launch();
  // The first batch's index words fly while the table is built (and, with dependent launch, while the previous
  // kernel finishes).
  // Stage 1's words two to a register, rows 2j and 2j + 1 in the low and high halves of h[j]: as loaded, no
  // unpacking (with one a register the two-stage kernel spills at 1024 threads).
  constexpr int H = BATCH / 2;
  uint32_t cur[BATCH], cur1[H];
  auto load = [&](uint32_t (&w)[BATCH], uint32_t (&h)[H], int row) {
    const size_t at = slice_words + (size_t)(row / BATCH) * 32 * BATCH;
    const uint4* p = reinterpret_cast<const uint4*>(idx0 + at) + lane;
#pragma unroll
    for (int q = 0; q < BATCH / 4; ++q) {
      const uint4 v = __ldg(p + 32 * q);
      w[4 * q] = v.x; w[4 * q + 1] = v.y; w[4 * q + 2] = v.z; w[4 * q + 3] = v.w;
    }
    if constexpr (STAGES == 2) {
      const uint4* p1 = reinterpret_cast<const uint4*>(idx1 + at) + lane;
#pragma unroll
      for (int q = 0; q < BATCH / 8; ++q) {
        const uint4 v = __ldg(p1 + 32 * q);
        h[4 * q] = v.x; h[4 * q + 1] = v.y; h[4 * q + 2] = v.z; h[4 * q + 3] = v.w;
      }
    }
  };
  if (warp < batches) load(cur, cur1, r0 + warp * BATCH);

  // The codebook into shared memory (one entry a thread: at most 256 + 16), read back by every warp as it builds
  // the table; its load and x's are in flight together (the store waits for both).
  static_assert(THREADS >= 256 + 16, "one codebook entry a thread");
  float* tab1 = PRMT ? tab + PRMT_STAGE1 / 4 : tab + (size_t)e0 * ENTRY_FLOATS;
  float4* cb_s = PRMT ? reinterpret_cast<float4*>(tab1 + (STAGES == 2 ? 2 * PRMT_HALF1 / 4 : 0))
                      : reinterpret_cast<float4*>(tab1 + (size_t)(STAGES == 2 ? e1 : 0) * ENTRY_FLOATS);
  const int cb_n = STAGES == 2 ? e1_at + e1 : e0;
  const bool has_entry = threadIdx.x < cb_n;
  float4 entry = make_float4(0.f, 0.f, 0.f, 0.f);
  if (has_entry) entry = __ldg(cb + threadIdx.x);
  grid_dep_wait();  // x, and the scratch written below, belong to the kernels before
  const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)slice * SLICE + lane * 16);
  const uint4 xa = load_now(xv), xb = load_now(xv + 1);
  if (has_entry) cb_s[threadIdx.x] = entry;
  float xs[16];
  {
    const T* t = reinterpret_cast<const T*>(&xa);
    const T* u = reinterpret_cast<const T*>(&xb);
#pragma unroll
    for (int i = 0; i < 8; ++i) { xs[i] = to_float(t[i]); xs[8 + i] = to_float(u[i]); }
  }
  __syncthreads();
  build_table<WARPS, PRMT>(tab, cb_s, e0, xs, warp, lane, PRMT_HALF0 / 4);
  if constexpr (STAGES == 2) build_table<WARPS, PRMT>(tab1, cb_s + e1_at, e1, xs, warp, lane, PRMT_HALF1 / 4);
  __syncthreads();

  // Lookups: the entry's byte offset (index << 9) added to this lane's column, vector j at an immediate offset.
  const char* t0 = reinterpret_cast<const char*>(tab + lane);
  const char* t1 = reinterpret_cast<const char*>(tab1 + lane);
  auto at = [](const char* base, uint32_t e, int j) {
    return *reinterpret_cast<const float*>(base + (e << 9) + j * 128);
  };
  // PRMT form: the address of T[e][4l + j] less its immediate part, from the word holding e and this lane's 4l.
  const char* tb = reinterpret_cast<const char*>(tab);
  const uint32_t lane4 = lane * 4;
  auto at_p = [&](uint32_t addr, int imm) { return *reinterpret_cast<const float*>(tb + addr + imm); };
  float* my_part = part + (size_t)slice * n;
  for (int b = warp; b < batches; b += WARPS) {
    uint32_t nxt[BATCH], nxt1[H];
    load(nxt, nxt1, r0 + (b + WARPS < batches ? b + WARPS : b) * BATCH);  // the last batch reloads itself
    float acc[BATCH];
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
      const uint32_t w = cur[i];
      float s;
      if constexpr (PRMT) {
        s = at_p(__byte_perm(w, lane4, 0x5504), 0) + at_p(__byte_perm(w, lane4, 0x5514), 128);
        s += at_p(__byte_perm(w, lane4, 0x5524), PRMT_HALF0) + at_p(__byte_perm(w, lane4, 0x5534), PRMT_HALF0 + 128);
      } else {
        s = at(t0, __byte_perm(w, 0, 0x4440), 0) + at(t0, __byte_perm(w, 0, 0x4441), 1);
        s += at(t0, __byte_perm(w, 0, 0x4442), 2) + at(t0, w >> 24, 3);
      }
      if constexpr (STAGES == 2) {
        const uint32_t h = (i & 1) ? cur1[i / 2] >> 16 : cur1[i / 2] & 0xffffu;
        if constexpr (PRMT) {
          s += at_p(((h << 8) & 0xf00u) | lane4, PRMT_STAGE1) + at_p(((h << 4) & 0xf00u) | lane4, PRMT_STAGE1 + 128);
          s += at_p((h & 0xf00u) | lane4, PRMT_STAGE1 + PRMT_HALF1) +
               at_p(((h >> 4) & 0xf00u) | lane4, PRMT_STAGE1 + PRMT_HALF1 + 128);
        } else {
          s += at(t1, h & 0xfu, 0) + at(t1, (h >> 4) & 0xfu, 1);
          s += at(t1, (h >> 8) & 0xfu, 2) + at(t1, h >> 12, 3);
        }
      }
      acc[i] = s;
    }
    const float row_sum = transpose_sum(acc, lane);
    if (!(lane & 1)) my_part[r0 + b * BATCH + (lane >> 1)] = row_sum;
#pragma unroll
    for (int i = 0; i < BATCH; ++i) { cur[i] = nxt[i]; if constexpr (STAGES == 2) if (i < H) cur1[i] = nxt1[i]; }
  }

  // The chunk's last block to finish adds the slices' partials in order.
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + blockIdx.y, 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int slices = gridDim.x;
  // Two rows a thread and sixteen slices of each in flight (32 loads), added in slice order. This tail runs after
  // the main loop, on the kernel's critical path: at 28672 x 8192 (3584 rows a chunk, 16 slices) it waits on 2
  // dependent L2 round trips where one row and eight slices a thread waited on 8 — the same sums, 7-11 % faster
  // (H200, kernels_h200_vq_lut_ring.json: vq2 24.35 us against 27.50, vq3 34.31 against 37.05).
  for (int r = r0 + threadIdx.x; r < r1; r += 2 * THREADS) {
    const int rb = r + THREADS;
    const bool both = rb < r1;
    float sa = 0.f, sb = 0.f;
    for (int k0 = 0; k0 < slices; k0 += 16) {
      float va[16], vb[16];
#pragma unroll
      for (int k = 0; k < 16; ++k) {
        const bool in = k0 + k < slices;
        const float* p = part + (size_t)(k0 + k) * n;
        va[k] = in ? __ldcg(p + r) : 0.f;
        vb[k] = in && both ? __ldcg(p + rb) : 0.f;
      }
#pragma unroll
      for (int k = 0; k < 16; ++k) { sa += va[k]; sb += vb[k]; }
    }
    out[r] = from_float<T>(sa * scale[r]);
    if (both) out[rb] = from_float<T>(sb * scale[rb]);
  }
  if (threadIdx.x == 0) counters[blockIdx.y] = 0u;
}

template <typename T, int STAGES, int THREADS, bool PRMT>
void launch(const torch::Tensor& x, const torch::Tensor& idx0, const torch::Tensor& idx1, const torch::Tensor& cb,
            int e0, int e1_at, int e1, const torch::Tensor& scale, torch::Tensor& part, torch::Tensor& counters,
            torch::Tensor& out, int n, const Chunks& ch) {
  const int k = x.size(1), slices = k / SLICE;
  const int entries = e0 + (STAGES == 2 ? e1 : 0);
  const size_t tables = PRMT ? PRMT_STAGE1 + (STAGES == 2 ? 2 * PRMT_HALF1 : 0) : (size_t)entries * ENTRY_FLOATS * 4;
  const size_t smem = tables + (size_t)(STAGES == 2 ? e1_at + e1 : e0) * 16;
  auto kernel = vq_lut_kernel<T, STAGES, THREADS, PRMT>;
  llmcomp_mma::launch_ex(kernel, dim3(slices, ch.count), THREADS, smem, reinterpret_cast<const T*>(x.data_ptr()),
      reinterpret_cast<const uint32_t*>(idx0.data_ptr()), reinterpret_cast<const uint16_t*>(idx1.data_ptr()),
      reinterpret_cast<const float4*>(cb.data_ptr()), e0, e1_at, e1, (const float*)scale.data_ptr<float>(),
      part.data_ptr<float>(), reinterpret_cast<unsigned*>(counters.data_ptr()), reinterpret_cast<T*>(out.data_ptr()),
      n, ch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The launch for the run-time choices: block size, table addressing.
template <typename T, int STAGES>
void dispatch(int threads, bool prmt, const torch::Tensor& x, const torch::Tensor& idx0, const torch::Tensor& idx1,
              const torch::Tensor& cb, int e0, int e1_at, int e1, const torch::Tensor& scale, torch::Tensor& part,
              torch::Tensor& counters, torch::Tensor& out, int n, const Chunks& ch) {
  auto go = [&](auto p) {
    constexpr bool P = decltype(p)::value;
    if (threads == 1024)
      launch<T, STAGES, 1024, P>(x, idx0, idx1, cb, e0, e1_at, e1, scale, part, counters, out, n, ch);
    else
      launch<T, STAGES, 512, P>(x, idx0, idx1, cb, e0, e1_at, e1, scale, part, counters, out, n, ch);
  };
  if (prmt) go(std::true_type{});
  else go(std::false_type{});
}

// The checks and launch both entry points share (ch: the chunks of rows, ch.stride: one codebook's entries).
torch::Tensor run(torch::Tensor x, torch::Tensor idx0, torch::Tensor idx1, torch::Tensor cb, int64_t e0,
                  int64_t e1_at, torch::Tensor scale, torch::Tensor part, torch::Tensor counters, int64_t n,
                  int64_t threads, bool prmt, const Chunks& ch) {
  TORCH_CHECK(threads == 512 || threads == 1024, "threads: 512 or 1024");
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.size(0) == 1 && x.is_contiguous() && x.size(1) % SLICE == 0 &&
                  x.data_ptr() != nullptr && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0,
              "x: one contiguous 16-byte-aligned CUDA row, inputs a multiple of 512");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be float16 or bfloat16");
  const int64_t words = x.size(1) / 16;
  TORCH_CHECK(n > 0 && n % BATCH == 0, "rows: a multiple of 16");
  // The words stored by batch: [K / 512, n / 16, Q, 32, 16 / Q] (a row-major [n, K / 16] has as many words).
  auto by_batch = [&](const torch::Tensor& t, int64_t q) {
    return t.dim() == 5 && t.size(0) == words / 32 && t.size(1) == n / BATCH && t.size(2) == q && t.size(3) == 32 &&
           t.size(4) == BATCH / q;
  };
  TORCH_CHECK(idx0.is_cuda() && idx0.is_contiguous() && idx0.scalar_type() == at::kInt && by_batch(idx0, 4) &&
                  reinterpret_cast<uintptr_t>(idx0.data_ptr()) % 16 == 0,
              "idx0: int32 [K / 512, n / 16, 4, 32, 4] (words stored by batch), 16-byte aligned");
  const bool two = e1_at > 0;
  TORCH_CHECK(!two || (idx1.is_cuda() && idx1.is_contiguous() && idx1.scalar_type() == at::kShort &&
                       by_batch(idx1, 2) && reinterpret_cast<uintptr_t>(idx1.data_ptr()) % 16 == 0),
              "idx1: int16 [K / 512, n / 16, 2, 32, 8] (words stored by batch), 16-byte aligned");
  TORCH_CHECK(cb.is_cuda() && cb.is_contiguous() && cb.scalar_type() == at::kFloat && cb.dim() == 2 && cb.size(1) == 4,
              "cb: float32 [entries, 4]");
  const int64_t e1 = two ? ch.stride - e1_at : 0;
  TORCH_CHECK(e0 >= 1 && e0 <= 256 && e0 <= ch.stride &&
                  (!two || (e1_at >= e0 && e1_at <= 256 && e1 >= 1 && e1 <= 16)),
              "entries: stage 0 at most 256 (stage 1 from entry e1_at <= 256), stage 1 at most 16");
  TORCH_CHECK(scale.is_cuda() && scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n,
              "scale: float32, one a row");
  TORCH_CHECK(part.is_cuda() && part.scalar_type() == at::kFloat && part.numel() >= (x.size(1) / SLICE) * n,
              "part: float32 scratch of K / 512 · n values");
  TORCH_CHECK(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.numel() >= ch.count,
              "counters: int32, one a chunk");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({1, n}, x.options());
  const int a = (int)e0, a1 = (int)e1_at, b = (int)e1, nn = (int)n;
  const int t = (int)threads;
  if (x.scalar_type() == at::kHalf) {
    if (two) dispatch<__half, 2>(t, prmt, x, idx0, idx1, cb, a, a1, b, scale, part, counters, out, nn, ch);
    else dispatch<__half, 1>(t, prmt, x, idx0, idx0, cb, a, a1, b, scale, part, counters, out, nn, ch);
  } else {
    using B16 = __nv_bfloat16;
    if (two) dispatch<B16, 2>(t, prmt, x, idx0, idx1, cb, a, a1, b, scale, part, counters, out, nn, ch);
    else dispatch<B16, 1>(t, prmt, x, idx0, idx0, cb, a, a1, b, scale, part, counters, out, nn, ch);
  }
  return out;
}

}  // namespace llmcomp_lut

// x [1, K] (K % 512 == 0) → y [1, n] in x's dtype. idx0 int32 [K / 512, n / 16, 4, 32, 4]; idx1 int16 [K / 512,
// n / 16, 2, 32, 8] (e1_at > 0: two stages, stage 1's entries cb[e1_at:]): the words stored by batch (see the top;
// 16-byte aligned); cb float32 [entries, 4]; scale float32 (n values); part float32 (K / 512 · n values, scratch);
// counters int32, one per chunk of rows_per_chunk rows, zero (and left zero); threads: a block's, 512 or 1024;
// prmt: the PRMT-addressed table.
torch::Tensor vq_lut(torch::Tensor x, torch::Tensor idx0, torch::Tensor idx1, torch::Tensor cb, int64_t e0, int64_t e1_at,
                     torch::Tensor scale, torch::Tensor part, torch::Tensor counters, int64_t n, int64_t rows_per_chunk,
                     int64_t threads, bool prmt) {
  TORCH_CHECK(rows_per_chunk > 0 && rows_per_chunk % llmcomp_lut::BATCH == 0, "rows a chunk: a multiple of 16");
  const int chunks = (int)((n + rows_per_chunk - 1) / rows_per_chunk);
  const llmcomp_lut::Chunks ch{chunks, (int)rows_per_chunk, nullptr, nullptr, (int)cb.size(0)};
  return llmcomp_lut::run(x, idx0, idx1, cb, e0, e1_at, scale, part, counters, n, threads, prmt, ch);
}

// vq_lut for a group of weights stacked along the rows (n in all), each with its own codebook of `stride` entries
// (cb: the codebooks one after another; e0 / e1_at within each): chunk c spans rows start[c] .. start[c + 1] (int32,
// chunks + 1 values from 0 to n, multiples of 16, increasing, no chunk across two weights) with codebook book[c]
// (int32, one a chunk); the rest as vq_lut.
torch::Tensor vq_lut_group(torch::Tensor x, torch::Tensor idx0, torch::Tensor idx1, torch::Tensor cb, int64_t e0,
                           int64_t e1_at, int64_t stride, torch::Tensor scale, torch::Tensor part,
                           torch::Tensor counters, int64_t n, torch::Tensor start, torch::Tensor book, int64_t threads,
                           bool prmt) {
  TORCH_CHECK(start.is_cuda() && start.is_contiguous() && start.scalar_type() == at::kInt && start.dim() == 1 &&
                  book.is_cuda() && book.is_contiguous() && book.scalar_type() == at::kInt &&
                  book.numel() + 1 == start.numel() && book.numel() >= 1,
              "start / book: int32 CUDA, chunks + 1 and chunks values");
  TORCH_CHECK(stride >= 1 && cb.dim() == 2 && cb.size(0) >= stride && cb.size(0) % stride == 0,
              "cb: whole codebooks of `stride` entries");
  TORCH_CHECK(start.device() == x.device() && book.device() == x.device(), "start / book: on x's device");
  const llmcomp_lut::Chunks ch{(int)book.numel(), 0, start.data_ptr<int>(), book.data_ptr<int>(), (int)stride};
  return llmcomp_lut::run(x, idx0, idx1, cb, e0, e1_at, scale, part, counters, n, threads, prmt, ch);
}
