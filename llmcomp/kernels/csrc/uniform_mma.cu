// Bindings of the dequant-GEMM and dequantize kernels (device code and the weight layout: uniform_mma.cuh;
// the GEMM's instantiations: mma_*.cu, compiled in parallel).
#include "uniform_mma.cuh"

namespace llmcomp_mma {

#define LLMCOMP_MMA_EXTERN(T, BITS, ELEM) extern LLMCOMP_MMA_DISPATCH(T, BITS, ELEM)
LLMCOMP_MMA_FORMATS(LLMCOMP_MMA_EXTERN);
#undef LLMCOMP_MMA_EXTERN

template <typename T>
void dispatch_fmt(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& qh, const torch::Tensor& sz, torch::Tensor& out,
                  int bits, int elem, int group, int rt, int warps, int wr, const EpiArgs& epi) {
  if (elem == 1) return dispatch_mt<T, 4, 1>(x, qw, qh, sz, out, group, rt, warps, wr, nullptr, 0, epi);
  if (elem == 9) return dispatch_mt<T, 4, 9>(x, qw, qh, sz, out, group, rt, warps, wr, nullptr, 0, epi);
  if (elem == 2) return dispatch_mt<T, 2, 2>(x, qw, qh, sz, out, group, rt, warps, wr, nullptr, 0, epi);
  if (elem == 8) return dispatch_mt<T, 2, 8>(x, qw, qh, sz, out, group, rt, warps, wr, nullptr, 0, epi);
  if (elem == 3) {
    if (bits == 4) return dispatch_mt<T, 4, 3>(x, qw, qh, sz, out, group, rt, warps, wr, nullptr, 0, epi);
    return dispatch_mt<T, 2, 3>(x, qw, qh, sz, out, group, rt, warps, wr, nullptr, 0, epi);
  }
  if (bits == 4) return dispatch_mt<T, 4, 0>(x, qw, qh, sz, out, group, rt, warps, wr, nullptr, 0, epi);
  return dispatch_mt<T, 2, 0>(x, qw, qh, sz, out, group, rt, warps, wr, nullptr, 0, epi);
}

// Whether environment variable `name` says on ("1..."): the opt-in switches' first reading.
static bool env_on(const char* name) {
  const char* e = std::getenv(name);
  return e && e[0] == '1';
}

// 0, off, false or no (any case, surrounding spaces ignored): a default-on switch turned off (launch.cuh;
// llmcomp/kernels/switches.py reads the same)
bool env_off(const char* name) {
  const char* e = std::getenv(name);
  if (!e) return false;
  std::string v(e);
  const auto first = v.find_first_not_of(" \t"), last = v.find_last_not_of(" \t");
  v = first == std::string::npos ? std::string() : v.substr(first, last - first + 1);
  for (auto& ch : v) ch = (char)std::tolower((unsigned char)ch);
  return v == "0" || v == "off" || v == "false" || v == "no";
}

static int pdl_state = -1;  // -1: not read yet

static bool pdl_capable() {
  int dev = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  return major >= 9;
}

bool pdl() {
  if (pdl_state < 0) pdl_state = env_on("LLMCOMP_PDL") && pdl_capable();
  return pdl_state;
}

// For A/B timing in one process (a captured CUDA graph keeps the launches it was captured with).
bool set_pdl(bool on) {
  pdl_state = on && pdl_capable();
  return pdl_state;
}

// A process-wide A/B switch: read from the environment at its first use (on by default: off by env_off; else on
// by env_on), then set() switches it for this process (a captured CUDA graph keeps the kernels it captured).
struct Switch {
  const char* env;
  bool on_by_default;
  int state = -1;  // -1: not read yet
  bool get() {
    if (state < 0) state = on_by_default ? !env_off(env) : env_on(env);
    return state;
  }
  bool set(bool on) {
    state = on;
    return state;
  }
};

// On unless LLMCOMP_MMA_LEAN=0. The compiled 8B W4 decode on an H200: 1.753 / 1.756 ms a step against 1.779 / 1.770
// plain (twenty-fifth session). Lean only where a warp has more than one round of kblocks (the o projection at batch
// 1 has one, and was slower lean) was no faster: 1.771 against 1.768 (twenty-sixth; kernels_h200_notes.md).
static Switch lean_switch{"LLMCOMP_MMA_LEAN", true};
// On unless LLMCOMP_MMA_SCALE_EARLY=0 (uniform_mma.cuh). The compiled 8B W4 decode on an H200: 1.586 ms a step
// against 1.731 without, the same build (twenty-ninth session; the GLU call 18.2 µs against 21.4, down 10.4 against
// 10.9, q/k/v 6.3 against 6.8, o 4.0 against 4.6, lm_head 70.6 against 76.2; kernels_h200_notes.md).
static Switch scale_early_switch{"LLMCOMP_MMA_SCALE_EARLY", true};
// On unless LLMCOMP_MMA_SCALE_EARLY16=0 (uniform_mma.cuh). The compiled 8B W4 decode at batch 16 on an H200: 2.68
// ms a step against 2.80 without, the same build (thirtieth session; kernels_h200_notes.md).
static Switch scale_early16_switch{"LLMCOMP_MMA_SCALE_EARLY16", true};
// On unless LLMCOMP_MMA_W3_LEAN=0 (uniform_mma.cuh). H200, W3 bf16 (forty-fifth session, kernel_ab --bits 3): 28672 x
// 8192 M=4 40.54 -> 38.60 µs, 14336 x 4096 M=1 12.49 -> 12.03, the fused layer chain at M=4 50.12 -> 49.18; from 1.4 %
// slower (4096 x 4096 M=1, 5.67 -> 5.75) to 5 % faster over six shapes at M = 1, 4, 8.
static Switch w3_lean_switch{"LLMCOMP_MMA_W3_LEAN", true};
// On unless LLMCOMP_MMA_SCALE_PAIR=0 (uniform_mma.cuh). H200, W4 bf16 (forty-sixth session, kernel_ab --knob pair):
// 28672 x 8192 M=16 50.10 -> 49.05 µs, the fused layer chain at M=16 57.47 -> 56.45; from 1.1 % slower (4096 x 4096
// M=1) to 2.1 % faster over six shapes at M = 1, 4, 8, 16; the compiled 8B decode 1.6055 -> 1.6014 ms at batch 1,
// 2.682 -> 2.649 at 16. The default since the forty-seventh session, whose run of the whole CUDA test file with it on
// passed (528).
static Switch scale_pair_switch{"LLMCOMP_MMA_SCALE_PAIR", true};
// On unless LLMCOMP_MMA_E2M1_LEAN=0 (uniform_mma.cuh).
static Switch e2m1_lean_switch{"LLMCOMP_MMA_E2M1_LEAN", true};
// On unless LLMCOMP_MMA_BOUND7=0 (uniform_mma.cuh). H200, W3 14336 x 4096 M=1 at one tile x 4 warps: fp16 15.76 ->
// 12.55 µs, the bf16 norm producer 15.93 -> 13.43 and GLU consumer 15.74 -> 13.45 (thirty-ninth session).
static Switch bound7_switch{"LLMCOMP_MMA_BOUND7", true};
// On unless LLMCOMP_MMA_BOUND7_R2=0 (uniform_mma.cuh). H200, M=1 at two tiles x 4 warps (thirty-ninth session): W4
// fp16 28672 x 8192 42.67 -> 31.38 µs, 28672 x 4096 23.13 -> 17.13; W2 bf16 28672 x 4096 18.41 -> 16.96.
static Switch bound7_r2_switch{"LLMCOMP_MMA_BOUND7_R2", true};

// On unless LLMCOMP_DEQUANT_STAGE=0 (uniform_dequant_kernel's STAGE).
static Switch dequant_stage_switch{"LLMCOMP_DEQUANT_STAGE", true};

bool dequant_stage() { return dequant_stage_switch.get(); }
bool set_dequant_stage(bool on) { return dequant_stage_switch.set(on); }
bool lean() { return lean_switch.get(); }
bool set_lean(bool on) { return lean_switch.set(on); }
bool scale_early() { return scale_early_switch.get(); }
bool set_scale_early(bool on) { return scale_early_switch.set(on); }
bool scale_early16() { return scale_early16_switch.get(); }
bool set_scale_early16(bool on) { return scale_early16_switch.set(on); }
bool scale_pair() { return scale_pair_switch.get(); }
bool set_scale_pair(bool on) { return scale_pair_switch.set(on); }
bool w3_lean() { return w3_lean_switch.get(); }
bool set_w3_lean(bool on) { return w3_lean_switch.set(on); }
bool e2m1_lean() { return e2m1_lean_switch.get(); }
bool set_e2m1_lean(bool on) { return e2m1_lean_switch.set(on); }
bool bound7() { return bound7_switch.get(); }
bool set_bound7(bool on) { return bound7_switch.set(on); }
bool bound7_r2() { return bound7_r2_switch.get(); }
bool set_bound7_r2(bool on) { return bound7_r2_switch.set(on); }

// The weight's description as the kernels take it: 3-bit codes become their 2-bit layout plus the high-bit
// plane (elem 2; with the post-scale pairs, elem 3, the post-scale kind 8); checks the planes and the scales.
void normalize_codes(const torch::Tensor& qw, const torch::Tensor& qh, const torch::Tensor& sz, int64_t n,
                     int64_t& bits, int64_t& elem) {
  TORCH_CHECK(bits >= 2 && bits <= 4, "bits must be 2, 3 or 4");
  TORCH_CHECK(elem == 0 || ((elem == 1 || elem == 9) && bits == 4) || elem == 3,
              "elem: 0 (integer codes), 1 (e2m1, 4 bits), 9 (e2m1, byte scales) or 3 (integer codes, fp32 post-scale)");
  if (bits == 3) {
    TORCH_CHECK(qh.is_cuda() && qh.numel() * qh.element_size() * 2 == qw.numel() * qw.element_size(),
                "3-bit codes need their high-bit plane");
    elem = elem == 3 ? 8 : 2;
    bits = 2;
  }
  TORCH_CHECK(sz.is_cuda() && sz.is_contiguous() && sz.dim() == 2 && sz.size(0) == n && sz.size(1) > 0,
              "bad scale tensor");
  TORCH_CHECK(sz.element_size() == scale_bytes(elem) && (elem != 9 || (sz.size(1) % 4 == 0 && sz.size(1) > 4)),
              "scales: 16-bit for e2m1, bytes after a 4-byte factor a row for e2m1 with byte scales, 32-bit pairs for "
              "uniform");
}

// The codes hold n rows of K inputs at the layout's bits (after normalize_codes): x's K padded to whole kblocks as
// prepare pads the codes (kernel_input). Another K would read past the codes or misplace every row.
void check_codes(const torch::Tensor& qw, int64_t n, int64_t k, int64_t bits) {
  TORCH_CHECK(qw.is_cuda() && qw.is_contiguous() && qw.numel() * qw.element_size() * 8 == n * k * bits,
              "the codes must hold n rows of x's K inputs (K padded to whole kblocks, as kernel_input pads x)");
}

// x as both GEMMs take it: [M <= 64, K] contiguous, float16 or bfloat16, on the GPU.
void check_x(const torch::Tensor& x) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous 2-D CUDA tensor");
  TORCH_CHECK(x.size(0) <= 64, "the mma kernel takes at most 64 rows of x");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be float16 or bfloat16");
}

}  // namespace llmcomp_mma

using namespace llmcomp_mma;

// bits: the codes' width (2, 3, 4); elem: 0 integer codes, 1 e2m1 (bits 4; 9: with byte scales), 3 integer codes
// with the post-scale kernel's (scale, MAGIC + zero) pairs (M <= 16, groups of whole kblocks); qh: the high-bit plane
// of 3-bit codes (any tensor otherwise).
// glu: the weight's rows stacked as 8 gate rows then their 8 up rows a 16-row tile; the output [M, n / 2] is
// silu(gate) * up (the gated MLP's activation in the GEMM's epilogue).
// norm: the RMSNorm split around the GEMM (EpiArgs in uniform_mma.cuh). res and gamma (the residual [M, n] and the
// norm's weight [n], x's dtype): also returns h = T(res + y) [M, n], γ ⊙ h and h's per-tile sums of squares [M, n / 16]
// (fp32); sq (a producer's sums [M, S]): y scaled by rsqrt(Σ sq / (16 S) + eps) a token.
std::vector<torch::Tensor> gemm_norm(torch::Tensor x, torch::Tensor qw, torch::Tensor qh, torch::Tensor sz,
                                     int64_t bits, int64_t group, int64_t n, int64_t rt, int64_t warps, int64_t elem,
                                     int64_t wr, int64_t glu, c10::optional<torch::Tensor> res,
                                     c10::optional<torch::Tensor> gamma, c10::optional<torch::Tensor> sq, double eps) {
  check_x(x);
  EpiArgs epi;
  // LLMCOMP_NORM_STAGE=0 (env_off): a producer's residual and γ not staged (norm_stage)
  static const int stage = !env_off("LLMCOMP_NORM_STAGE");
  epi.stage = stage;
  std::vector<torch::Tensor> outs(1);
  if (res || gamma) {
    TORCH_CHECK(res && gamma && !glu, "the norm's producer takes the residual and the norm's weight, without glu");
    TORCH_CHECK(res->device() == x.device() && res->is_contiguous() && res->scalar_type() == x.scalar_type() &&
                    res->dim() == 2 && res->size(0) == x.size(0) && res->size(1) == n,
                "residual: contiguous [M, n] in x's dtype, on x's device");
    TORCH_CHECK(gamma->device() == x.device() && gamma->is_contiguous() && gamma->scalar_type() == x.scalar_type() &&
                    gamma->numel() == n, "norm weight: contiguous [n] in x's dtype, on x's device");
    outs.push_back(torch::empty({x.size(0), n}, x.options()));
    outs.push_back(torch::empty({x.size(0), n}, x.options()));
    outs.push_back(torch::empty({x.size(0), n / 16}, x.options().dtype(at::kFloat)));
    epi.res = res->data_ptr();
    epi.gamma = gamma->data_ptr();
    epi.out3 = outs[1].data_ptr();
    epi.out2 = outs[2].data_ptr();
    epi.sq = outs[3].data_ptr<float>();
  }
  if (sq) {
    TORCH_CHECK(sq->device() == x.device() && sq->is_contiguous() && sq->scalar_type() == at::kFloat &&
                    sq->dim() == 2 && sq->size(0) == x.size(0) && sq->size(1) > 0 && 16 * sq->size(1) <= x.size(1),
                "sums of squares: contiguous float32 [M, S] on x's device, 16 S (the norm's width) within x's");
    epi.sq_in = sq->data_ptr<float>();
    epi.sq_n = sq->size(1);
    epi.eps = (float)eps;
  }
  normalize_codes(qw, qh, sz, n, bits, elem);
  TORCH_CHECK(x.size(1) % (256 / bits) == 0 && n % 16 == 0, "shape not supported by the mma kernel");
  check_codes(qw, n, x.size(1), bits);
  // The post-scale kernel scales a lane's whole kblock sum once: its groups must be whole kblocks (prepare never
  // offers it others). A literal message, as every other check's here: the same check with formatted arguments
  // (c10::str) ended the process with a segmentation fault on the H200 build (torch 2.11 + cu130), while this form
  // raises RuntimeError there (tests/test_codebook_cuda.py::test_extension_checks_raise; kernels_h200_notes.md).
  TORCH_CHECK((elem != 3 && elem != 8) || group % (256 / bits) == 0,
              "the post-scale kernel needs groups of whole kblocks (64 inputs for 4-bit codes, 128 for 2/3-bit)");
  const c10::cuda::CUDAGuard guard(x.device());
  outs[0] = torch::empty({x.size(0), glu ? n / 2 : n}, x.options());
  if (x.scalar_type() == at::kHalf) dispatch_fmt<__half>(x, qw, qh, sz, outs[0], bits, elem, group, rt, warps, wr, epi);
  else dispatch_fmt<__nv_bfloat16>(x, qw, qh, sz, outs[0], bits, elem, group, rt, warps, wr, epi);
  return outs;
}

torch::Tensor gemm(torch::Tensor x, torch::Tensor qw, torch::Tensor qh, torch::Tensor sz, int64_t bits, int64_t group,
                   int64_t n, int64_t rt, int64_t warps, int64_t elem, int64_t wr, int64_t glu) {
  return gemm_norm(x, qw, qh, sz, bits, group, n, rt, warps, elem, wr, glu, {}, {}, {}, 0.)[0];
}

// Codebook (VQ) weights: idx [N/16, K/128, 32, 4] int32 (stage-0 indices, one byte each), idx1 the stage-1 nibble
// plane [N/16, K/128, 32, 2] int32 (or idx with one stage), table [entries, 4] in x's dtype (stage 0's entries,
// then stage 1's from cb1_at; cb1_at 0: one stage), scale [N, 1] float32.
// copies: 1 (one table) or 16 (the table replicated across the shared-memory banks, at most 512 entries).
torch::Tensor vq_gemm(torch::Tensor x, torch::Tensor idx, torch::Tensor idx1, torch::Tensor table, torch::Tensor scale,
                      int64_t n, int64_t cb1_at, int64_t warps, int64_t wr, int64_t copies) {
  check_x(x);
  TORCH_CHECK(x.size(1) % 128 == 0 && n % 16 == 0, "shape not supported by the codebook kernel");
  TORCH_CHECK(idx.is_cuda() && idx.is_contiguous() && idx.scalar_type() == at::kInt && idx.numel() * 4 == n * x.size(1) / 4,
              "bad index plane");
  TORCH_CHECK(cb1_at == 0 || (idx1.is_cuda() && idx1.is_contiguous() && idx1.scalar_type() == at::kInt &&
                              idx1.numel() * 2 == idx.numel()), "bad stage-1 plane");
  TORCH_CHECK(table.scalar_type() == x.scalar_type() && table.dim() == 2 && table.size(1) == 4 && table.is_contiguous() &&
                  table.size(0) <= 4096 && cb1_at >= 0 && cb1_at < table.size(0),
              "codebook table: [entries <= 4096, 4] in x's dtype");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == n &&
                  scale.size(1) == 1, "scale: float32 [n, 1]");
  TORCH_CHECK(copies == 1 || (copies == 16 && table.size(0) <= 512), "copies: 1, or 16 for at most 512 entries");
  const c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty({x.size(0), n}, x.options());
  const int at = (int)cb1_at;
  const torch::Tensor& i1 = at ? idx1 : idx;
  const int elem = (copies == 16 ? 6 : 4) + (at ? 1 : 0);
#define LLMCOMP_VQ_CASE(T, E) \
  case E: dispatch_mt<T, 2, E>(x, idx, i1, scale, out, 0, 1, warps, wr, &table, at, EpiArgs{}); break
  if (x.scalar_type() == at::kHalf) {
    switch (elem) { LLMCOMP_VQ_CASE(__half, 4); LLMCOMP_VQ_CASE(__half, 5); LLMCOMP_VQ_CASE(__half, 6); LLMCOMP_VQ_CASE(__half, 7); }
  } else {
    switch (elem) {
      LLMCOMP_VQ_CASE(__nv_bfloat16, 4); LLMCOMP_VQ_CASE(__nv_bfloat16, 5);
      LLMCOMP_VQ_CASE(__nv_bfloat16, 6); LLMCOMP_VQ_CASE(__nv_bfloat16, 7);
    }
  }
#undef LLMCOMP_VQ_CASE
  return out;
}

// csrc/vq_lut.cu: codebook weights at one row of x, the lookup-table GEMV.
torch::Tensor vq_lut(torch::Tensor x, torch::Tensor idx0, torch::Tensor idx1, torch::Tensor cb, int64_t e0, int64_t e1_at,
                     torch::Tensor scale, torch::Tensor part, torch::Tensor counters, int64_t n, int64_t rows_per_chunk,
                     int64_t threads, bool prmt);
torch::Tensor vq_lut_group(torch::Tensor x, torch::Tensor idx0, torch::Tensor idx1, torch::Tensor cb, int64_t e0,
                           int64_t e1_at, int64_t stride, torch::Tensor scale, torch::Tensor part,
                           torch::Tensor counters, int64_t n, torch::Tensor start, torch::Tensor book, int64_t threads,
                           bool prmt);

torch::Tensor dequant(torch::Tensor qw, torch::Tensor qh, torch::Tensor sz, int64_t bits, int64_t group, int64_t n,
                      int64_t k, c10::ScalarType dtype, int64_t elem) {
  TORCH_CHECK(elem == 0 || elem == 1 || elem == 9,
              "dequantize takes elem 0 (integer codes, (scale, -zero·scale)), 1 or 9 (e2m1)");
  normalize_codes(qw, qh, sz, n, bits, elem);
  check_codes(qw, n, k, bits);
  const c10::cuda::CUDAGuard guard(qw.device());
  auto w = torch::empty({n, k}, qw.options().dtype(dtype));
  const int G = sz.size(1);
  const int64_t threads = (n / 16) * (k / (256 / bits)) * 32;
  TORCH_CHECK(threads < (1ll << 32), "weight too large for the dequantize kernel's 32-bit index");
  const uint32_t gmagic = group_magic(k, G, group);
  const int grid = (threads + DQ_THREADS - 1) / DQ_THREADS;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool stage = dequant_stage();
#define LLMCOMP_DQ(T, B, E)                                                                                  \
  (stage ? uniform_dequant_kernel<T, B, E, true> : uniform_dequant_kernel<T, B, E, false>)<<<grid, DQ_THREADS, 0, \
      stream>>>(reinterpret_cast<const uint4*>(qw.data_ptr()), reinterpret_cast<const uint2*>(qh.data_ptr()),    \
                sz.data_ptr(), reinterpret_cast<T*>(w.data_ptr()), n, k, G, gmagic)
  if (dtype == at::kHalf) {
    if (elem == 1) LLMCOMP_DQ(__half, 4, 1);
    else if (elem == 9) LLMCOMP_DQ(__half, 4, 9);
    else if (elem == 2) LLMCOMP_DQ(__half, 2, 2);
    else if (bits == 4) LLMCOMP_DQ(__half, 4, 0);
    else LLMCOMP_DQ(__half, 2, 0);
  } else {
    TORCH_CHECK(dtype == at::kBFloat16, "dtype must be float16 or bfloat16");
    if (elem == 1) LLMCOMP_DQ(__nv_bfloat16, 4, 1);
    else if (elem == 9) LLMCOMP_DQ(__nv_bfloat16, 4, 9);
    else if (elem == 2) LLMCOMP_DQ(__nv_bfloat16, 2, 2);
    else if (bits == 4) LLMCOMP_DQ(__nv_bfloat16, 4, 0);
    else LLMCOMP_DQ(__nv_bfloat16, 2, 0);
  }
#undef LLMCOMP_DQ
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return w;
}

// csrc/pvq_mma.cu: PVQ (pyramid) weights decoded to 4-bit codes, 1..8 rows of x; their dequantize.
torch::Tensor pvq_gemm(torch::Tensor x, torch::Tensor qw, torch::Tensor s, int64_t dim, torch::Tensor esc_ptr,
                       torch::Tensor esc_pos, torch::Tensor esc_val, torch::Tensor part, torch::Tensor counters,
                       int64_t n, int64_t r, int64_t warps, int64_t splits);
torch::Tensor pvq_dequant(torch::Tensor qw, torch::Tensor s, int64_t dim, int64_t n, int64_t k, bool bf16);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemm", &gemm, "uniform 2/3/4-bit and e2m1 dequant-GEMM (mma.sync, M <= 64; glu: silu(gate) * up epilogue)");
  m.def("gemm_norm", &gemm_norm, "gemm with an RMSNorm split around it: its producer (res, gamma) or consumer (sq)");
  m.def("vq_gemm", &vq_gemm, "codebook (VQ, 4-vectors, 1-2 stages) dequant-GEMM (mma.sync, M <= 64)");
  m.def("vq_lut", &vq_lut, "codebook (VQ, 4-vectors, 1-2 stages) GEMV at one row of x by dot-product lookup tables");
  m.def("vq_lut_group", &vq_lut_group, "vq_lut for weights stacked along the rows, each with its own codebook");
  m.def("set_pdl", &set_pdl, "turn programmatic dependent launch on or off (sm_90+); returns the new state");
  m.def("dequant_stage", &dequant_stage, "whether the dequantize kernel writes whole lines through shared memory");
  m.def("set_dequant_stage", &set_dequant_stage, "the dequantize kernel staged or not (A/B in one process)");
  m.def("set_lean", &set_lean, "the post-scale kernels' lean instantiations (M <= 16), or not (A/B in one process)");
  m.def("set_scale_early", &set_scale_early, "the batch-1 4-bit post-scale kernels loading a round's scales early");
  m.def("set_e2m1_lean", &set_e2m1_lean, "the E2M1 kernels at M <= 8 (256-thread blocks) lean, or not (A/B)");
  m.def("e2m1_lean", &e2m1_lean, "whether they are (on unless LLMCOMP_MMA_E2M1_LEAN=0)");
  m.def("set_bound7", &set_bound7, "the 3-bit one-tile x 4-warp kernel bounded to 7 blocks an SM, or not (A/B)");
  m.def("bound7", &bound7, "whether it is (on unless LLMCOMP_MMA_BOUND7=0)");
  m.def("set_bound7_r2", &set_bound7_r2, "the lean two-tile 4-warp kernels bounded to 7 blocks an SM, or not (A/B)");
  m.def("bound7_r2", &bound7_r2, "whether they are (on unless LLMCOMP_MMA_BOUND7_R2=0)");
  m.def("set_scale_early16", &set_scale_early16, "the M = 9..16 post-scale kernels load a round's scales early, or not");
  m.def("scale_early16", &scale_early16, "whether they do (on unless LLMCOMP_MMA_SCALE_EARLY16=0)");
  m.def("set_scale_pair", &set_scale_pair, "the early-scale kernels scale a pair of kblocks at once, or not");
  m.def("scale_pair", &scale_pair, "whether they do (off unless LLMCOMP_MMA_SCALE_PAIR=1)");
  m.def("set_w3_lean", &set_w3_lean, "the 3-bit post-scale kernels run the lean loop, or not");
  m.def("w3_lean", &w3_lean, "whether they do (on unless LLMCOMP_MMA_W3_LEAN=0)");
  m.def("scale_early", &scale_early, "whether they do (on unless LLMCOMP_MMA_SCALE_EARLY=0)");
  m.def("lean", &lean, "whether the post-scale kernels (M <= 16) run their lean instantiations (LLMCOMP_MMA_LEAN)");
  m.def("pdl", &pdl, "whether the GEMMs launch with programmatic stream serialization (sm_90+, LLMCOMP_PDL)");
  m.def("pvq_gemm", &pvq_gemm, "PVQ weights as 4-bit codes + escapes, scales on x (mma.sync, M <= 8)");
  m.def("pvq_dequant", &pvq_dequant, "PVQ weights from pvq_gemm's layout (escapes not included)");
  m.def("dequant", &dequant, "uniform 2/3/4-bit and e2m1 dequantize from the kernel layout");
}
