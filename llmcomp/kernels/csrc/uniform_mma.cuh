#pragma once
// Dequant-GEMM for the `uniform` format (2-, 3- and 4-bit codes, group-wise scale and offset) and the E2M1
// float formats (mxfp4, nvfp4, fp4 e2m1: 4-bit codes, one scale per block) on sm_80+.
//
// y[M, N] = x[M, K] @ W[N, K]^T with W = q * scale + mz (mz = -zero * scale; E2M1: W = e2m1(q) * scale), computed as
// y^T = W x^T on the tensor cores (mma.sync m16n8k16, fp32 accumulate): a 16-row weight tile is the A
// operand, 8 tokens of x are the B operand. Weights are dequantized in registers and never written.
//
// Weight layout (built once by llmcomp/kernels/uniform_cuda.py:prepare from the canonical bit stream):
// qw[tile][kblock][lane][4 words] (uint4 per lane). A kblock holds KBLK = 256/BITS inputs; lane (g, c)
// (g = lane / 4, c = lane % 4) owns the physical inputs [c*KBLK/4, (c+1)*KBLK/4) of the block, so its x
// slice is contiguous (16-byte loads). Logical mma step s uses the four inputs c*KBLK/4 + 4s + j, j=0..3,
// and the words hold, per step, the A fragment a0..a3 = (row g | g+8) x (j 0,1 | 2,3) as "half2 pairs":
// pair e of a word has its two codes at bits sh+p and sh+p+16 (sh = 8*(e / (8/BITS)),
// p = BITS*(e % (8/BITS))), so one lop3 with a magic exponent turns a pair into two 16-bit floats.
// sz[N][G] holds (scale, mz) as one 16-bit pair per row and group, in the activation dtype.
// E2M1 (ELEM == 1): the same code layout (a code is the OCP nibble: sign bit 3, exponent bits 2-1, mantissa
// bit 0), each half-word's four nibbles rearranged as magnitudes at 3e and signs at 12 + e (decode_e2m1);
// a code's bits are moved into a 16-bit float's sign / low exponent / top mantissa bits, which reads
// as e2m1(q) * 2^-B (B = 14 for fp16, 126 for bf16; the zero-exponent code 0.5 lands on a subnormal, exact);
// sz[N][G] then holds one 16-bit value per row and block, scale * 2^B in the activation dtype (ELEM 1), or (ELEM 9,
// where every block multiplier has at most 4 significant bits: MXFP4's E8M0, NVFP4's E4M3) one byte a block: bits
// 3-7 the exponent relative to the row's smallest, bits 0-2 the 3-bit fraction; IMAD'ed into a 16-bit float
// 2^(E0 − bias + rel) · (1 + f/8) (Num<T>::E2M1_ADD; uniform_cuda.e2m1_byte_scales). Each row's first 4 bytes are an
// fp32 factor (tensor scale × the power of two that undoes the exponents' shift) applied to the fp32 sums at the
// end: half the scale bytes of ELEM 1 (NVFP4 4.5 bits a weight read instead of 5.0, MXFP4 4.25 instead of 4.5).
// Codebook (VQ) weights (ELEM == 4: one stage, 5: two) use the 2-bit shape (kblocks of 128 inputs, 8 mma steps): a
// step's four inputs of a row are one 4-vector, so lane (g, c) needs, per step s, the indices of rows g and g + 8:
// byte 2s + r of its 16 bytes (r = 0: row g, 1: row g + 8), stage 0 (<= 8 bits); a second stage (<= 4 bits) has
// nibble 2s + r of a qh plane (two words a lane). The codebooks sit in shared memory as 4 x 16-bit entries in the
// activation dtype (stage 1's from entry cb1_at): an entry's two words are the A fragment's a0/a2 (row g) or a1/a3
// (row g + 8) as they are. sz holds one fp32 scale a row, applied to the accumulators at the end.
// ELEM 6 / 7: the same with the table replicated 16 times across the banks (entry e's copy j at e * 16 + j, read by
// lanes with lane % 16 == j), so a half-warp's 8-byte lookups never collide on a bank whatever the indices.
// 3-bit codes (ELEM == 2; 8 with the post-scale pairs) are bit-sliced: their low 2 bits in the 2-bit layout above
// (BITS = 2), their high bit in qh[tile][kblock][lane][2 words]: the high bits of word wi's pair e sit at bits
// 2e + wi%2 and 16 + 2e + wi%2 of qh word wi/2 (3 bits a weight in all; high_magic).
// (Included by uniform_mma.cu, the bindings, and by the mma_*.cu units that instantiate the GEMM per format.)
#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <cstdlib>
#include <type_traits>
#include "launch.cuh"

namespace llmcomp_mma {

template <typename T> struct Num;
template <> struct Num<__half> {
  using T2 = __half2;
  // 1024 + v for v < 1024 is exact: 0x6400 is 1024 with an all-zero mantissa.
  static constexpr uint32_t MAGIC = 0x64006400u;
  static constexpr float MAGIC_F = 1024.f;
  // ELEM 9's byte scales: (byte << 7) + (E0 << 10) in each half (uniform_cuda.E2M1_BYTE: relative exponents
  // 0..19, so that e2m1(q) · 2^-14 times the scale stays exact — at least 2^-19 — and below fp16's max)
  static constexpr uint32_t E2M1_MUL = 0x00800080u, E2M1_ADD = (11u << 10) * 0x10001u;
  __device__ static float2 to_f2(T2 a) { return __half22float2(a); }
  __device__ static T2 from_f2(float2 a) { return __floats2half2_rn(a.x, a.y); }
  __device__ static T2 pair(uint32_t u) { return *reinterpret_cast<T2*>(&u); }
  __device__ static T2 fma2(T2 a, T2 b, T2 c) { return __hfma2(a, b, c); }
  __device__ static T2 sub2(T2 a, T2 b) { return __hsub2(a, b); }
  __device__ static T2 add2(T2 a, T2 b) { return __hadd2(a, b); }
  __device__ static float lo_float(uint32_t u) { return __half2float(__ushort_as_half((unsigned short)(u & 0xffff))); }
  __device__ static T2 f2(float a) { return __float2half2_rn(a); }
  __device__ static T2 lo2(T2 a) { return __low2half2(a); }
  __device__ static T2 hi2(T2 a) { return __high2half2(a); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ static float to_float(__half v) { return __half2float(v); }
};
template <> struct Num<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  // 128 + q is exact for q < 128 (0x4300 is 128 with an all-zero 7-bit mantissa).
  static constexpr uint32_t MAGIC = 0x43004300u;
  static constexpr float MAGIC_F = 128.f;
  // ELEM 9's byte scales: (byte << 4) + (E0 << 7) in each half (relative exponents 0..31; e2m1(q) · 2^-126
  // times the scale at least 2^-32)
  static constexpr uint32_t E2M1_MUL = 0x00100010u, E2M1_ADD = (222u << 7) * 0x10001u;
  __device__ static float2 to_f2(T2 a) { return __bfloat1622float2(a); }
  __device__ static T2 from_f2(float2 a) { return __floats2bfloat162_rn(a.x, a.y); }
  __device__ static T2 pair(uint32_t u) { return *reinterpret_cast<T2*>(&u); }
  __device__ static T2 fma2(T2 a, T2 b, T2 c) { return __hfma2(a, b, c); }
  __device__ static T2 sub2(T2 a, T2 b) { return __hsub2(a, b); }
  __device__ static T2 add2(T2 a, T2 b) { return __hadd2(a, b); }
  __device__ static float lo_float(uint32_t u) { return __uint_as_float(u << 16); }
  __device__ static T2 f2(float a) { return __float2bfloat162_rn(a); }
  __device__ static T2 lo2(T2 a) { return __low2bfloat162(a); }
  __device__ static T2 hi2(T2 a) { return __high2bfloat162(a); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// What the epilogue does besides storing y (all null: nothing). The RMSNorm between two GEMMs, split so that it
// needs no kernel of its own (a decoder layer's o projection, its norm, its gated MLP):
// - producer (res set; not with glu): out = y as always, and with h = T(res + T(y)): out3 = h (where set), out2 =
//   T(γ ⊙ h) and sq[tok][tile] = Σ h² over each 16-row tile's columns (fp32; [M, N / 16]);
// - consumer (sq_in set): y of token tok scaled by rsqrt(Σ sq_in[tok][:sq_n] / (16 sq_n) + eps) before it is stored
//   (before the GLU epilogue's activation): x = γ ⊙ h from a producer, so y = W · norm(h).
// Whether the post-scale kernels (M <= 16) run their lean instantiations (LEAN in mma_kernel_body: the weights through
// per-tile pointers advanced a round, row pointers kept in registers). On unless LLMCOMP_MMA_LEAN=0; set_lean for A/B.
bool lean();
bool set_lean(bool on);
// Whether the lean batch-1 post-scale kernels with 4-bit codes load a round's scale words with its weights (SE in
// mma_kernel_body) instead of each tile's before its math. On unless LLMCOMP_MMA_SCALE_EARLY=0; set_scale_early for
// A/B.
bool scale_early();
bool set_scale_early(bool on);
// scale_early's loads in the M = 9..16 kernels too (two token tiles; no norm epilogue there). On unless
// LLMCOMP_MMA_SCALE_EARLY16=0; set_scale_early16 for A/B.
bool scale_early16();
bool set_scale_early16(bool on);
// On unless LLMCOMP_MMA_SCALE_PAIR=0: the early-scale kernels (scale_early, with or without the norm split's
// epilogue; scale_early16) sum each pair of kblocks, one group, before scaling it into the accumulators (PAIR in
// mma_kernel_body): half the scale fmas; the same sums up to fp32 rounding. Not where bound7_r2 bounds a kernel (fp16,
// two tiles x 4 warps, M <= 8). set_scale_pair for A/B.
bool scale_pair();
bool set_scale_pair(bool on);
// On unless LLMCOMP_MMA_W3_LEAN=0: the plain 3-bit post-scale kernels (kind 8) of at most 256 threads run the lean
// loop too (with lean()); set_w3_lean for A/B.
bool w3_lean();
bool set_w3_lean(bool on);
// Whether the E2M1 kernels at M <= 8 with 256-thread blocks run lean (LEAN in mma_kernel_body, as the post-scale
// kernels: the weights through per-tile pointers, x's and the scales' row pointers in registers). On unless
// LLMCOMP_MMA_E2M1_LEAN=0; set_e2m1_lean for A/B.
bool e2m1_lean();
bool set_e2m1_lean(bool on);
// Whether the 3-bit post-scale kernel (ELEM 8) at one row tile x 4 warps (128 threads) runs an instantiation bounded
// to 7 blocks an SM (72 registers) where the unbounded one holds more (sm_90: fp16 75, the norm epilogue's bf16 73,
// so 6 blocks an SM) or the bound measured ahead (the fp16 norm epilogue's, 67). Not the bf16 plain kernel: it holds
// 72, and bounded it spilled and lost (H200, kernels_h200_notes.md thirty-ninth session) — but under w3_lean() its
// lean build (75 unbounded) is bounded, 72 with no spill. On unless LLMCOMP_MMA_BOUND7=0; set_bound7 for A/B.
bool bound7();
bool set_bound7(bool on);
// Whether the lean two-tile post-scale kernels (ELEM 3, M <= 8) at 4 warps run instantiations bounded to 7 blocks an
// SM (72 registers) where their builds hold more: 4-bit codes in fp16 (73-74), 2-bit codes (76-80, bounded they spill
// 10-54 bytes and still win). On unless LLMCOMP_MMA_BOUND7_R2=0; set_bound7_r2 for A/B.
bool bound7_r2();
bool set_bound7_r2(bool on);

struct EpiArgs {
  const void* res = nullptr;
  const void* gamma = nullptr;
  void* out2 = nullptr;
  void* out3 = nullptr;
  float* sq = nullptr;
  const float* sq_in = nullptr;
  int sq_n = 0;
  float eps = 0.f;
  int stage = 0;  // norm_stage, producer only (LLMCOMP_NORM_STAGE=0 turns it off); launch_mma decides
};

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t mask, uint32_t magic) {
  uint32_t r;
  // (a & mask) | magic
  asm volatile("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint2 ld_stream2(const uint2* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// p as a value the compiler cannot recompute: kept in a register across a loop instead of rematerialized.
template <typename P>
__device__ __forceinline__ void opaque(P*& p) {
  asm volatile("" : "+l"(p));
}

// 16-byte global -> shared copies in flight, completed by group (the staged-x kernel).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The 16/BITS code pairs of one word, as integer-valued 16-bit floats: out[e] = (q_lo, q_hi) of pair e,
// whose codes sit at bits BITS*e and 16 + BITS*e.
// fp16 (10 mantissa bits): a field may sit anywhere in the low byte of each half, so one shift by 8
// serves all pairs: lop3 gives MAGIC + 2^p q, and one fma recovers q exactly.
// bf16 (7 mantissa bits): bit 7 belongs to the exponent, so a field must sit below it: a 4-bit pair is shifted
// down to bit 0; 2-bit pairs are read at bit p = bf16_at(e) in {0, 2, 4} after a shift by bf16_shift(e) in
// {0, 6, 12} — one shift for three pairs (2 a word where shifting each pair down took 7), the fma dividing by 2^p.
template <int BITS>
__host__ __device__ constexpr int bf16_shift(int e) { return BITS == 2 ? 6 * (e / 3) : BITS * e; }
template <int BITS>
__host__ __device__ constexpr int bf16_at(int e) { return BITS == 2 ? 2 * (e % 3) : 0; }

// Where pair e is read: bit field_at(e) of each half of field_word(w, e) (fp16: of w or w >> 8; bf16: bf16_at /
// bf16_shift).
template <typename T, int BITS>
__host__ __device__ constexpr int field_at(int e) {
  return std::is_same<T, __half>::value ? BITS * (e % (8 / BITS)) : bf16_at<BITS>(e);
}
template <typename T, int BITS>
__device__ __forceinline__ uint32_t field_word(uint32_t w, int e) {
  return std::is_same<T, __half>::value ? (e < 8 / BITS ? w : w >> 8) : w >> bf16_shift<BITS>(e);
}

// 3-bit codes: a pair's high bit (bits at and 16 + at of hw) moved to bit p + 2, just above its 2-bit field at bit p,
// under the magic exponent: the word the field is OR-ed into before the fma. Word j of a pair of words (wi % 2) has
// pair e's high bit at at = 2e + j, so one shift serves the pairs that share p − 2e (bf16: 3 a word, fp16: 2).
template <typename T>
__device__ __forceinline__ uint32_t high_magic(uint32_t hw, int at, int p) {
  const int up = p + 2 - at;
  return lop3_and_or(up >= 0 ? hw << up : hw >> -up, 0x00010001u << (p + 2), Num<T>::MAGIC);
}

// Pair e of word w as one 32-bit pair of 16-bit floats reading MAGIC + 2^p q (p = field_at(e)); HIGH (3-bit codes,
// BITS = 2): with the pair's high bit from hw (word j of its pair of words, high_magic) just above the 2-bit field.
template <typename T, int BITS, bool HIGH>
__device__ __forceinline__ uint32_t field_magic(uint32_t w, uint32_t hw, int j, int e) {
  constexpr uint32_t LOWMASK = ((1u << BITS) - 1) | (((1u << BITS) - 1) << 16);
  const int p = field_at<T, BITS>(e);
  return lop3_and_or(field_word<T, BITS>(w, e), LOWMASK << p, HIGH ? high_magic<T>(hw, 2 * e + j, p) : Num<T>::MAGIC);
}

// out[e] = (q_lo, q_hi) of pair e: h·2^-p − MAGIC·2^-p, exact. HIGH: 3-bit codes (the 2-bit layout and the high-bit
// word hw, j = wi % 2), the same fma giving the 3-bit value.
template <typename T, int BITS, bool HIGH = false>
__device__ __forceinline__ void decode_word(uint32_t w, typename Num<T>::T2 (&out)[16 / BITS], uint32_t hw = 0,
                                            int j = 0) {
  using N = Num<T>;
#pragma unroll
  for (int e = 0; e < 16 / BITS; ++e) {
    const float inv = 1.f / float(1 << field_at<T, BITS>(e));
    out[e] = N::fma2(N::pair(field_magic<T, BITS, HIGH>(w, hw, j, e)), N::f2(inv), N::f2(-N::MAGIC_F * inv));
  }
}

// E2M1 pairs of one word: in each half, pair e (e = 0..3) has its magnitude (exponent, mantissa bits) at bits
// 3e..3e+2 and its sign at bit 12 + e (uniform_cuda.e2m1_bits moves the nibbles there); out[e] = e2m1 * 2^-B.
// The sign shifts (3 - e) and magnitude shifts (MAG_AT - 3e) coincide twice: 5 shifts a word (bf16 6, 3, 2, 1,
// -3; fp16 9, 6, 3, 2, 1) where nibbles at 4e needed 7.
template <typename T>
__device__ __forceinline__ void decode_e2m1(uint32_t w, typename Num<T>::T2 (&out)[4]) {
  constexpr bool HALF = std::is_same<T, __half>::value;
  constexpr int MAG_AT = HALF ? 9 : 6;  // where the 3 magnitude bits go: low exponent bits + top mantissa bit
  constexpr uint32_t MAG = 0x00070007u << MAG_AT;
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const uint32_t sign = w << (3 - e);  // bit 12 + e -> 15
    const uint32_t mag = (3 * e <= MAG_AT ? w << (MAG_AT - 3 * e) : w >> (3 * e - MAG_AT)) & MAG;
    out[e] = Num<T>::pair(lop3_and_or(sign, 0x80008000u, mag));
  }
}

// Kernel shape per (BITS, MT): U = kblocks loaded per round, THREADS = the usual largest block; WIDE = a second
// instantiation with up to 16 warps splitting K where the accumulators are few (MT <= 2), so shapes with few row
// tiles can fill the SMs (its own instantiation: __launch_bounds__(512) moves the 8-warp kernel's registers).
// Codebook (VQ) element kinds: 4 / 5 one table (1 / 2 stages), 6 / 7 the bank-replicated table (1 / 2 stages).
// The fp32 post-scale kinds: 3 (2- and 4-bit codes), 8 (3-bit codes: the 2-bit layout and its high-bit plane).
__host__ __device__ constexpr bool is_vq(int elem) { return elem >= 4 && elem <= 7; }
// E2M1 elements: 1 (16-bit block scales), 9 (byte block scales and a row factor)
__host__ __device__ constexpr bool is_e2m1(int elem) { return elem == 1 || elem == 9; }
// Bytes a scale entry takes in sz, and where a row's entries start (ELEM 9: after its fp32 factor).
__host__ __device__ constexpr int scale_bytes(int elem) { return elem == 9 ? 1 : elem == 1 ? 2 : 4; }
__host__ __device__ constexpr int scale_row_at(int elem) { return elem == 9 ? 4 : 0; }
__host__ __device__ constexpr bool is_post(int elem) { return elem == 3 || elem == 8; }
__host__ __device__ constexpr int vq_stages(int elem) { return (elem & 1) + 1; }
__host__ __device__ constexpr int vq_copies(int elem) { return elem == 6 || elem == 7 ? 16 : 1; }
__host__ __device__ constexpr bool has_high_plane(int elem) {
  return elem == 2 || elem == 8 || (is_vq(elem) && vq_stages(elem) == 2);
}

template <int BITS, int MT, int R = 1>
struct Shape {
  static constexpr int U = R == 2 && MT == 1 ? 2 : 4;  // M <= 8 with two row tiles a warp: the same 16-byte loads a round
  static constexpr int THREADS = 256;
  static constexpr int WIDE = MT <= 2 ? 512 : 256;
};

// The high-bit word that serves word wi of a lane's kblock: words 0, 1 take hv.x and words 2, 3 hv.y, each its
// half wi & 1 (3-bit codes' high-bit plane).
__device__ __forceinline__ uint32_t high_word(const uint2& hv, int wi) { return (wi >> 1) ? hv.y : hv.x; }

// Word wi of a lane's kblock; hv: the lane's high-bit words (ELEM == 2 only).
template <typename T, int BITS, int ELEM>
__device__ __forceinline__ void decode_any(uint32_t w, uint2 hv, int wi, typename Num<T>::T2 (&q)[16 / BITS]) {
  if constexpr (is_e2m1(ELEM)) {
    decode_e2m1<T>(w, q);
  } else if constexpr (ELEM == 2) {
    static_assert(BITS == 2, "3-bit codes use the 2-bit layout for their low bits");
    decode_word<T, 2, true>(w, q, high_word(hv, wi), wi & 1);
  } else {
    decode_word<T, BITS>(w, q);
  }
}

// The scales of one row and group: uniform stores a 32-bit (scale, mz) pair, E2M1 a 16-bit scale (ELEM 1) or a byte
// (ELEM 9). sz: a row's first entry (scale_row).
template <int ELEM>
__device__ __forceinline__ uint32_t load_scale_raw(const void* sz, size_t idx) {
  if constexpr (ELEM == 9) return __ldg(reinterpret_cast<const unsigned char*>(sz) + idx);
  else if constexpr (ELEM == 1) return __ldg(reinterpret_cast<const unsigned short*>(sz) + idx);
  else return __ldg(reinterpret_cast<const uint32_t*>(sz) + idx);
}

// Row `row`'s first scale entry in sz ([N][G] entries of scale_bytes; ELEM 9: rows of G bytes, its factor first).
template <int ELEM>
__host__ __device__ __forceinline__ const void* scale_row(const void* sz, size_t row, int G) {
  return static_cast<const char*>(sz) + row * G * scale_bytes(ELEM) + scale_row_at(ELEM);
}

// ELEM 9: the fp32 factor of the row whose first scale entry is at p (scale_row).
__device__ __forceinline__ float row_factor(const void* p) {
  return __ldg(reinterpret_cast<const float*>(static_cast<const char*>(p) - 4));
}

// One row tile's accumulators (rows g and g + 8 of each token tile) times their rows' fp32 scales.
template <int MT>
__device__ __forceinline__ void scale_rows(float (&acc)[MT][4], float s_lo, float s_hi) {
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    acc[t][0] *= s_lo;
    acc[t][1] *= s_lo;
    acc[t][2] *= s_hi;
    acc[t][3] *= s_hi;
  }
}

// ... as two T2 vectors (scale, scale) and (mz, mz).
template <typename T, int ELEM>
__device__ __forceinline__ void unpack_scale(uint32_t s, typename Num<T>::T2& sc, typename Num<T>::T2& mz) {
  if constexpr (ELEM == 9) {  // one IMAD: the byte's exponent and fraction above E0, both halves
    sc = Num<T>::pair(s * Num<T>::E2M1_MUL + Num<T>::E2M1_ADD);
    mz = Num<T>::f2(0.f);
  } else if constexpr (ELEM == 1) {
    sc = Num<T>::pair(s | (s << 16));
    mz = Num<T>::f2(0.f);
  } else {
    sc = Num<T>::lo2(Num<T>::pair(s));
    mz = Num<T>::hi2(Num<T>::pair(s));
  }
}

template <typename T, int ELEM>
__device__ __forceinline__ void load_scale(const void* sz, size_t idx, typename Num<T>::T2& sc, typename Num<T>::T2& mz) {
  unpack_scale<T, ELEM>(load_scale_raw<ELEM>(sz, idx), sc, mz);
}

// The group of input k, as floor(k * gmagic / 2^32) with gmagic = ceil(2^32 / group) (exact for k * group < 2^32,
// which group_magic checks; 0 for one group a row): one instruction where a division took ~17 of the W4 kernel's
// ~115 instructions a kblock and a warp (ncu, H200, bench/results/kernels_h200_notes.md).
__device__ __forceinline__ int group_of(int k, uint32_t gmagic) { return (int)__umulhi((uint32_t)k, gmagic); }

// Step ss's A fragment from a word's decoded pairs q: a0..a3 = rows (g | g + 8) x inputs (0,1 | 2,3), scaled.
// (A warpgroup kernel took these fragments as wgmma's register A operand, x from shared memory: 0.6-0.96x this
// kernel on an H200, removed; record commit 33b10b7, bench/results/kernels_h200_notes.md.)
template <typename T, int NQ>
__device__ __forceinline__ void scaled_a(const typename Num<T>::T2 (&q)[NQ], int ss, typename Num<T>::T2 sc_lo,
                                         typename Num<T>::T2 mz_lo, typename Num<T>::T2 sc_hi,
                                         typename Num<T>::T2 mz_hi, uint32_t (&a)[4]) {
  using N2 = typename Num<T>::T2;
  N2 v[4] = {Num<T>::fma2(q[4 * ss + 0], sc_lo, mz_lo), Num<T>::fma2(q[4 * ss + 1], sc_hi, mz_hi),
             Num<T>::fma2(q[4 * ss + 2], sc_lo, mz_lo), Num<T>::fma2(q[4 * ss + 3], sc_hi, mz_hi)};
#pragma unroll
  for (int i = 0; i < 4; ++i) a[i] = *reinterpret_cast<uint32_t*>(&v[i]);
}

// The math of one kblock: decode, scale, mma. cx: the lane's x fragments; sc/mz: the scales of rows g and g + 8.
template <typename T, int BITS, int MT, int R, int ELEM>
__device__ __forceinline__ void compute_kblock(const uint4 (&w)[R], const uint2 (&h)[R],
                                               const typename Num<T>::T2 (&sc_lo)[R], const typename Num<T>::T2 (&mz_lo)[R],
                                               const typename Num<T>::T2 (&sc_hi)[R], const typename Num<T>::T2 (&mz_hi)[R],
                                               const uint4 (&cx)[MT][(256 / BITS) / 32], float (&acc)[R][MT][4]) {
  using N2 = typename Num<T>::T2;
  constexpr int STEPS_PER_WORD = 4 / BITS;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const uint32_t words[4] = {w[r].x, w[r].y, w[r].z, w[r].w};
#pragma unroll
    for (int wi = 0; wi < 4; ++wi) {
      N2 q[16 / BITS];
      decode_any<T, BITS, ELEM>(words[wi], h[r], wi, q);
#pragma unroll
      for (int ss = 0; ss < STEPS_PER_WORD; ++ss) {
        const int s = wi * STEPS_PER_WORD + ss;  // step within the kblock: inputs 4s..4s+3 of the lane
        uint32_t a[4];
        scaled_a<T>(q, ss, sc_lo[r], mz_lo[r], sc_hi[r], mz_hi[r], a);
#pragma unroll
        for (int t = 0; t < MT; ++t) {
          const uint32_t* xw = reinterpret_cast<const uint32_t*>(&cx[t][0]);
          mma16816<T>(acc[r][t], a, xw[2 * s], xw[2 * s + 1]);
        }
      }
    }
  }
}

// NORM producer: its residual [M][rowsb] and γ [rowsb] rows (the block's rows rows0 .. rows0 + rowsb) copied into
// shared memory (`stage`, after the reduction slabs) by cp.async as soon as the previous kernel is done
// (grid_dep_wait), so that their latency passes under the main loop's weight stream instead of adding to every
// block's tail, without registers. Each thread copies its share once (from wherever it passes grid_dep_wait);
// reduce_store waits for the copies. H200, 8B W4 decode at batch 1 (twentieth session): 1.880 ms a step against 1.899
// unstaged, from one build (o 6.27 → 5.92 µs, down 10.66 → 10.43); LLMCOMP_NORM_STAGE=0 turns it off. The consumers
// read their per-tile sums after the reduction: staging them too (nineteenth session: q/k/v 8.10 → 8.38 µs, the GLU
// call 21.95 → 23.23) lost, and so did loading them into registers after grid_dep_wait (twentieth: the GLU call
// 24.3 µs in that build with the loads on and off — ptxas gave the kernel 64 registers against 70 and another main
// loop schedule); an L1 prefetch was slower too (kernels_h200_notes.md).
template <typename T>
__device__ __forceinline__ void norm_stage(const EpiArgs& epi, float* stage, int M, int N, int rows0, int rowsb) {
  if (!epi.stage) return;
  T* st = reinterpret_cast<T*>(stage);
  const int c8 = rowsb / 8;  // 16-byte chunks a token's rows (N % 16 == 0: none straddles N)
  for (int i = threadIdx.x; i < (M + 1) * c8; i += blockDim.x) {
    const int tok = i / c8, r = rows0 + (i % c8) * 8;
    if (r >= N) continue;
    cp_async16(st + i * 8, tok < M ? static_cast<const T*>(epi.res) + (size_t)tok * N + r
                                   : static_cast<const T*>(epi.gamma) + r);
  }
  cp_async_commit();
}

// acc[r][t] = rows (g, g+8) x tokens (2c, 2c+1) of tile (r, t): summed over the 2^wk_log warps of each row group
// in shared memory (red: one ROWS x TOKS float slab a warp; warp = group * 2^wk_log + its K slice), written as T.
template <typename T, int MT, int R, bool NORM = false>
__device__ __forceinline__ void reduce_store(const float (&acc)[R][MT][4], float* red, T* __restrict__ out, int M, int N,
                                             int wk_log, int glu, const EpiArgs& epi, const float* stage = nullptr) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int wk = 1 << wk_log, wr = nwarps >> wk_log;
  constexpr int ROWS = R * 16, TOKS = MT * 8;
  float* mine = red + warp * ROWS * TOKS;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      const int row = r * 16 + g, tok = t * 8 + 2 * c;
      mine[tok * ROWS + row] = acc[r][t][0];
      mine[(tok + 1) * ROWS + row] = acc[r][t][1];
      mine[tok * ROWS + row + 8] = acc[r][t][2];
      mine[(tok + 1) * ROWS + row + 8] = acc[r][t][3];
    }
  float* rs = nullptr;  // NORM consumer: each token's rsqrt(mean h² + eps)
  if constexpr (NORM) {
    __shared__ float rs_s[TOKS];
    rs = rs_s;
    if (epi.stage) cp_async_wait<0>();  // norm_stage's copies: this thread's; the barrier below: everyone's
    if (epi.sq_in) {  // one warp a token: the producer's per-tile sums (read after grid_dep_wait, as x)
      for (int tok = warp; tok < min(M, TOKS); tok += nwarps) {
        float s = 0.f;
        for (int i = lane; i < epi.sq_n; i += 32) s += epi.sq_in[(size_t)tok * epi.sq_n + i];
#pragma unroll
        for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) rs[tok] = rsqrtf(s / (16.f * epi.sq_n) + epi.eps);
      }
    }
  }
  __syncthreads();
  if (glu) {  // each 16-row tile: 8 gate rows, then their 8 up rows; out [M, N / 2] gets silu(gate) * up
    constexpr int HALF = ROWS / 2;
    for (int i = threadIdx.x; i < wr * HALF * TOKS; i += blockDim.x) {
      const int rg = i / (HALF * TOKS), j = i % (HALF * TOKS);
      const int tok = j / HALF, h = j % HALF, row = (h / 8) * 16 + h % 8, tile0 = (blockIdx.x * wr + rg) * R;
      if (tok >= M || tile0 * 16 >= N) continue;
      float sg = 0.f, su = 0.f;
      for (int w = 0; w < wk; ++w) {
        const float* part = red + (rg * wk + w) * ROWS * TOKS + tok * ROWS;
        sg += part[row];
        su += part[row + 8];
      }
      if constexpr (NORM) {
        if (epi.sq_in) {
          sg *= rs[tok];
          su *= rs[tok];
        }
      }
      out[(size_t)tok * (N / 2) + tile0 * 8 + h] = Num<T>::from_float(sg / (1.f + expf(-sg)) * su);
    }
    return;
  }
  if constexpr (!NORM) {
    for (int i = threadIdx.x; i < wr * ROWS * TOKS; i += blockDim.x) {
      const int rg = i / (ROWS * TOKS), j = i % (ROWS * TOKS);
      const int tok = j / ROWS, row = j % ROWS, tile0 = (blockIdx.x * wr + rg) * R;
      if (tok >= M || tile0 * 16 >= N) continue;
      float s = 0.f;
      for (int w = 0; w < wk; ++w) s += red[(rg * wk + w) * ROWS * TOKS + j];
      out[(size_t)tok * N + tile0 * 16 + row] = Num<T>::from_float(s);
    }
    return;
  }
  // NORM: (wr * ROWS * TOKS and the stride are multiples of 32, so the lanes of a warp run the same iterations, and 16
  // consecutive lanes hold one token's 16 rows of one tile: the producer's sums are a 16-lane reduction.)
  for (int i = threadIdx.x; i < wr * ROWS * TOKS; i += blockDim.x) {
    const int rg = i / (ROWS * TOKS), j = i % (ROWS * TOKS);
    const int tok = j / ROWS, row = j % ROWS, tile0 = (blockIdx.x * wr + rg) * R;
    const bool ok = tok < M && tile0 * 16 < N;
    float s = 0.f;
    if (ok) {
      for (int w = 0; w < wk; ++w) s += red[(rg * wk + w) * ROWS * TOKS + j];
      if (epi.sq_in) s *= rs[tok];
      out[(size_t)tok * N + tile0 * 16 + row] = Num<T>::from_float(s);
    }
    if (epi.res) {
      float h2 = 0.f;
      if (ok) {
        const size_t at = (size_t)tok * N + tile0 * 16 + row;
        // y rounded to T first, as the unsplit model adds it (T(res + T(y))): the residual stream the same bits
        T r, gm;
        if (epi.stage) {  // norm_stage: [M][wr * ROWS] residual, then γ, of the block's rows
          const T* st = reinterpret_cast<const T*>(stage);
          r = st[tok * wr * ROWS + rg * ROWS + row];
          gm = st[M * wr * ROWS + rg * ROWS + row];
        } else {
          r = static_cast<const T*>(epi.res)[at];
          gm = static_cast<const T*>(epi.gamma)[tile0 * 16 + row];
        }
        const T ht = Num<T>::from_float(Num<T>::to_float(Num<T>::from_float(s)) + Num<T>::to_float(r));
        const float h = Num<T>::to_float(ht);
        if (epi.out3) static_cast<T*>(epi.out3)[at] = ht;
        static_cast<T*>(epi.out2)[at] = Num<T>::from_float(Num<T>::to_float(gm) * h);
        h2 = h * h;
      }
#pragma unroll
      for (int o = 8; o; o >>= 1) h2 += __shfl_xor_sync(0xffffffffu, h2, o);
      if (ok && (row & 15) == 0) epi.sq[(size_t)tok * (N / 16) + tile0 + row / 16] = h2;
    }
  }
}

// ELEM == 3 (M <= 16, integer codes with integral zeros, groups of whole kblocks): the A operand is q − z, exact in
// fp16/bf16 (|q − z| < 128: prepare takes zeros in [0, 128)), the mma sums (q − z)·x in fp32 over the kblock, and the
// scale is applied once per kblock in fp32 on the 4 accumulators — instead of one 16-bit scale FMA per code pair
// (16 a kblock). sz then holds (scale, MAGIC + z) per row and group (uniform_cuda.scale_pairs with post=True). Pair e
// of a word belongs to row g + 8·(e & 1) (the A fragment's a0..a3 alternate rows g, g + 8). HIGH (ELEM == 8, 3-bit
// codes, M <= 8): each pair's high bit from hw (high_magic) joins its 2-bit field, as in decode_word.
// Pair e reads MAGIC + 2^p q (field_magic), so q − z = h·2^-p − (MAGIC·2^-p + z), the constant from zz (the same for
// the kblock's four words); bf16 at p = 0 takes h − (MAGIC + z).
template <typename T, int BITS, bool HIGH = false>
__device__ __forceinline__ void decode_centered(uint32_t w, uint32_t hw, int j, const typename Num<T>::T2 (&zz)[2],
                                                typename Num<T>::T2 (&out)[16 / BITS]) {
  using N = Num<T>;
  using N2 = typename N::T2;
  constexpr bool HALF = std::is_same<T, __half>::value;
#pragma unroll
  for (int e = 0; e < 16 / BITS; ++e) {
    const int p = field_at<T, BITS>(e);
    const float inv = 1.f / float(1 << p);
    const N2 h = N::pair(field_magic<T, BITS, HIGH>(w, hw, j, e));
    out[e] = !HALF && p == 0 ? N::sub2(h, zz[e & 1])
                             : N::fma2(h, N::f2(inv), N::sub2(N::f2(N::MAGIC_F - N::MAGIC_F * inv), zz[e & 1]));
  }
}

// One row tile's kblock on MT token tiles, unscaled: t[j] += (q − z) · x (hv: the 3-bit codes' high-bit words, ELEM
// == 8; s_lo, s_hi: the rows' post-scale pairs, of which only the zeros serve here).
template <typename T, int BITS, int MT, int ELEM>
__device__ __forceinline__ void kblock_sums_post(const uint4& w, const uint2& hv, uint32_t s_lo, uint32_t s_hi,
                                                 const uint4 (&cx)[MT][(256 / BITS) / 32], float (&t)[MT][4]) {
  using N = Num<T>;
  using N2 = typename N::T2;
  constexpr int STEPS_PER_WORD = 4 / BITS;
  const N2 zz[2] = {N::hi2(N::pair(s_lo)), N::hi2(N::pair(s_hi))};
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int wi = 0; wi < 4; ++wi) {
    N2 q[16 / BITS];
    decode_centered<T, BITS, ELEM == 8>(words[wi], high_word(hv, wi), wi & 1, zz, q);
#pragma unroll
    for (int ss = 0; ss < STEPS_PER_WORD; ++ss) {
      const int s = wi * STEPS_PER_WORD + ss;
      const uint32_t a[4] = {*reinterpret_cast<uint32_t*>(&q[4 * ss + 0]), *reinterpret_cast<uint32_t*>(&q[4 * ss + 1]),
                             *reinterpret_cast<uint32_t*>(&q[4 * ss + 2]), *reinterpret_cast<uint32_t*>(&q[4 * ss + 3])};
#pragma unroll
      for (int j = 0; j < MT; ++j) {
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(&cx[j][0]);
        mma16816<T>(t[j], a, xw[2 * s], xw[2 * s + 1]);
      }
    }
  }
}

// acc += s · t for one row tile (rows g and g + 8: the scales of s_lo and s_hi).
template <typename T, int MT>
__device__ __forceinline__ void scale_sums(const float (&t)[MT][4], uint32_t s_lo, uint32_t s_hi,
                                           float (&acc)[MT][4]) {
  const float f_lo = Num<T>::lo_float(s_lo), f_hi = Num<T>::lo_float(s_hi);
#pragma unroll
  for (int j = 0; j < MT; ++j) {
    acc[j][0] = fmaf(f_lo, t[j][0], acc[j][0]);
    acc[j][1] = fmaf(f_lo, t[j][1], acc[j][1]);
    acc[j][2] = fmaf(f_hi, t[j][2], acc[j][2]);
    acc[j][3] = fmaf(f_hi, t[j][3], acc[j][3]);
  }
}

// One row tile's kblock on MT token tiles: a fresh fp32 sum per token tile, scaled into acc at the end.
template <typename T, int BITS, int MT, int ELEM>
__device__ __forceinline__ void compute_kblock_post(const uint4& w, const uint2& hv, uint32_t s_lo, uint32_t s_hi,
                                                    const uint4 (&cx)[MT][(256 / BITS) / 32], float (&acc)[MT][4]) {
  float t[MT][4];
#pragma unroll
  for (int j = 0; j < MT; ++j) t[j][0] = t[j][1] = t[j][2] = t[j][3] = 0.f;
  kblock_sums_post<T, BITS, MT, ELEM>(w, hv, s_lo, s_hi, cx, t);
  scale_sums<T, MT>(t, s_lo, s_hi, acc);
}


// Byte offset of the entry whose index sits in bits [AT, AT + W) of v, in a table of 8-byte entries copied COPIES
// times (entry e's copies at e * COPIES .. e * COPIES + COPIES - 1), for the lane whose copy is at lane_off bytes:
// one shift and one three-input LOP3 (the caller's base pointer is warp-uniform, so the load is LDS [R + UR]).
template <int AT, int W, int COPIES>
__device__ __forceinline__ uint32_t vq_off(uint32_t v, uint32_t lane_off) {
  constexpr int LOGB = 3 + (COPIES == 16 ? 4 : 0);
  static_assert(COPIES == 1 || COPIES == 16, "1 or 16 copies");
  const uint32_t sh = AT >= LOGB ? v >> (AT - LOGB) : v << (LOGB - AT);
  return (sh & (((1u << W) - 1) << LOGB)) | lane_off;
}

// ELEM 4-7: one kblock of codebook weights (see the layout at the top). cb: the table (warp-uniform; stage 1's
// entries from cb1), lane_off: this lane's copy in bytes (0 with one table).
template <typename T, int MT, int STAGES, int COPIES>
__device__ __forceinline__ void compute_kblock_vq(const uint4& w, const uint2& h, const char* cb, const char* cb1,
                                                  uint32_t lane_off, const uint4 (&cx)[MT][4],
                                                  float (&acc)[MT][4]) {
  using N2 = typename Num<T>::T2;
  const uint32_t words[4] = {w.x, w.y, w.z, w.w};
  auto entry = [](const char* base, uint32_t off) { return *reinterpret_cast<const uint2*>(base + off); };
#pragma unroll
  for (int wi = 0; wi < 4; ++wi) {
#pragma unroll
    for (int ss = 0; ss < 2; ++ss) {
      const int s = 2 * wi + ss;
      uint2 lo = entry(cb, ss ? vq_off<16, 8, COPIES>(words[wi], lane_off) : vq_off<0, 8, COPIES>(words[wi], lane_off));
      uint2 hi = entry(cb, ss ? vq_off<24, 8, COPIES>(words[wi], lane_off) : vq_off<8, 8, COPIES>(words[wi], lane_off));
      if constexpr (STAGES == 2) {
        const uint32_t hw = (s >> 2) ? h.y : h.x;  // nibbles 2s, 2s + 1 at bits 8 * (s & 3) of the word
        uint32_t o_lo, o_hi;
        switch (s & 3) {
          case 0: o_lo = vq_off<0, 4, COPIES>(hw, lane_off); o_hi = vq_off<4, 4, COPIES>(hw, lane_off); break;
          case 1: o_lo = vq_off<8, 4, COPIES>(hw, lane_off); o_hi = vq_off<12, 4, COPIES>(hw, lane_off); break;
          case 2: o_lo = vq_off<16, 4, COPIES>(hw, lane_off); o_hi = vq_off<20, 4, COPIES>(hw, lane_off); break;
          default: o_lo = vq_off<24, 4, COPIES>(hw, lane_off); o_hi = vq_off<28, 4, COPIES>(hw, lane_off); break;
        }
        const uint2 lo1 = entry(cb1, o_lo), hi1 = entry(cb1, o_hi);
        N2 v;
        v = Num<T>::add2(Num<T>::pair(lo.x), Num<T>::pair(lo1.x)); lo.x = *reinterpret_cast<uint32_t*>(&v);
        v = Num<T>::add2(Num<T>::pair(lo.y), Num<T>::pair(lo1.y)); lo.y = *reinterpret_cast<uint32_t*>(&v);
        v = Num<T>::add2(Num<T>::pair(hi.x), Num<T>::pair(hi1.x)); hi.x = *reinterpret_cast<uint32_t*>(&v);
        v = Num<T>::add2(Num<T>::pair(hi.y), Num<T>::pair(hi1.y)); hi.y = *reinterpret_cast<uint32_t*>(&v);
      }
      const uint32_t a[4] = {lo.x, hi.x, lo.y, hi.y};
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        const uint32_t* xw = reinterpret_cast<const uint32_t*>(&cx[t][0]);
        mma16816<T>(acc[t], a, xw[2 * s], xw[2 * s + 1]);
      }
    }
  }
}

// This lane's x fragments of one kblock. x_lane/x_stride/x_at: where this lane's x of the kblock starts (global
// memory: row stride K, kb * KBLK; XS, x staged in shared memory: the chunk's padded row stride and the kblock's
// offset in the chunk). Lanes of tokens >= M read the last token's x instead of zeros: an mma's output column depends
// on its own B column only, and the columns of tokens >= M are never written out — no predicate, no zeroing.
template <typename T, int BITS, int MT, bool XS>
__device__ __forceinline__ void load_x(const T* x_lane, int x_stride, int x_at, int M,
                                       uint4 (&cx)[MT][256 / BITS / 32]) {
  constexpr int XVEC = 256 / BITS / 32;
  const int g = (threadIdx.x & 31) >> 2;
#pragma unroll
  for (int t = 0; t < MT; ++t) {
    const int tok = MT == 1 ? 0 : min(t * 8 + g, M - 1) - min(g, M - 1);  // x_lane is token min(g, M - 1)
    const uint4* xv = reinterpret_cast<const uint4*>(x_lane + tok * x_stride + x_at);
#pragma unroll
    for (int v = 0; v < XVEC; ++v) {
      if constexpr (XS) cx[t][v] = xv[v];
      else cx[t][v] = __ldg(xv + v);
    }
  }
}

// One kblock of a warp: this lane's x (load_x) and scales for kblock kb (x_lane, sz_row: mma_kernel_body's
// pointers), then the math on the weights w (and 3-bit high planes h) already loaded.
// SE (scale_early): the post-scale pairs of the kblock's rows already loaded (se: rows g and g + 8 of each tile, the
// kblock's group).
template <typename T, int BITS, int MT, int R, int ELEM, bool XS = false, bool LEAN = false, bool SE = false>
__device__ __forceinline__ void kblock_step(const uint4 (&w)[R], const uint2 (&h)[R], int kb, const T* x_lane,
                                            int x_stride, int x_at, const void* sz_row, int M, int G,
                                            uint32_t gmagic, float (&acc)[R][MT][4], const uint2* cb_s,
                                            int cb1_at, const uint32_t (&se)[R][2]) {
  using N2 = typename Num<T>::T2;
  constexpr int KBLK = 256 / BITS, LANE_K = KBLK / 4, XVEC = LANE_K / 8;
  const int lane = threadIdx.x & 31, c = lane & 3;
  uint4 cx[MT][XVEC];
  load_x<T, BITS, MT, XS>(x_lane, x_stride, x_at, M, cx);
  if constexpr (is_vq(ELEM)) {
    static_assert(BITS == 2 && R == 1, "codebook weights use the 2-bit shape, one row tile a warp");
    constexpr int CP = vq_copies(ELEM);
    const char* cb = reinterpret_cast<const char*>(cb_s);
    compute_kblock_vq<T, MT, vq_stages(ELEM), CP>(w[0], h[0], cb, cb + cb1_at * CP * 8, (lane & (CP - 1)) * 8, cx,
                                                  acc[0]);
    return;
  }
  // (post-scale groups are whole kblocks: the lane's offset in the kblock cannot change its group, and LEAN leaves it
  // out — ptxas rebuilt it from the thread index a kblock)
  const int grp = group_of(kb * KBLK + (LEAN && is_post(ELEM) ? 0 : c * LANE_K), gmagic);
  if constexpr (is_post(ELEM)) {
    static_assert(MT <= 2, "the fp32 post-scale path serves M <= 16");
#pragma unroll
    for (int r = 0; r < R; ++r)  // R row tiles on the same x fragments
      compute_kblock_post<T, BITS, MT, ELEM>(w[r], h[r],
                                             SE ? se[r][0] : load_scale_raw<0>(sz_row, r * 16 * G + grp),
                                             SE ? se[r][1] : load_scale_raw<0>(sz_row, (r * 16 + 8) * G + grp), cx,
                                             acc[r]);
    return;
  }
  N2 sc_lo[R], mz_lo[R], sc_hi[R], mz_hi[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    load_scale<T, ELEM>(sz_row, r * 16 * G + grp, sc_lo[r], mz_lo[r]);
    load_scale<T, ELEM>(sz_row, (r * 16 + 8) * G + grp, sc_hi[r], mz_hi[r]);
  }
  compute_kblock<T, BITS, MT, R, ELEM>(w, h, sc_lo, mz_lo, sc_hi, mz_hi, cx, acc);
}

// PAIR (scale_pair()): kblocks kb and kb + 1 of an SE kernel — one group, as launch_mma's scale_early condition
// makes every pair — summed unscaled into one fp32 sum a row and token tile, scaled into acc once: half the scale
// fmas (and scale unpacks) of two kblock_steps. second: kb + 1 is the warp's too. The result differs from two
// kblock_steps' in fp32 rounding only (s · (t0 + t1) against s · t0 + s · t1).
template <typename T, int BITS, int MT, int R, int ELEM>
__device__ __forceinline__ void kblock_pair(const uint4 (&w0)[R], const uint2 (&h0)[R], const uint4 (&w1)[R],
                                            const uint2 (&h1)[R], bool second, const T* x_lane, int K, int x_at,
                                            int M, const uint32_t (&se)[R][2], float (&acc)[R][MT][4]) {
  constexpr int KBLK = 256 / BITS, XVEC = KBLK / 4 / 8;
  float t[R][MT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int j = 0; j < MT; ++j) t[r][j][0] = t[r][j][1] = t[r][j][2] = t[r][j][3] = 0.f;
  uint4 cx[MT][XVEC];
  load_x<T, BITS, MT, false>(x_lane, K, x_at, M, cx);
#pragma unroll
  for (int r = 0; r < R; ++r) kblock_sums_post<T, BITS, MT, ELEM>(w0[r], h0[r], se[r][0], se[r][1], cx, t[r]);
  if (second) {
    load_x<T, BITS, MT, false>(x_lane, K, x_at + KBLK, M, cx);
#pragma unroll
    for (int r = 0; r < R; ++r) kblock_sums_post<T, BITS, MT, ELEM>(w1[r], h1[r], se[r][0], se[r][1], cx, t[r]);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) scale_sums<T, MT>(t[r], se[r][0], se[r][1], acc[r]);
}

// One warp: R row tiles (16 rows each) x MT token tiles (8 tokens each), over kblocks [kb0, kb1).
// Blocks: wr row groups of R tiles (gridDim.x = ceil(N / (16 R wr))), each group's wk warps split K; partial sums
// meet in shared memory. Row groups of one block read the same x at about the same time, so x comes from L1 once
// a block instead of from L2 once a group (faster at M = 32/64 on many rows with a short K). On 28672 x 8192 at M = 64
// eight groups alone were slower than one; with one warp a group and x staged a round ahead (XS) they are 20 %
// faster: the x loads' latency, not L2 traffic, was the limit (kernels_h200_notes.md).
template <typename T, int BITS, int MT, int R, int U, int ELEM, bool XS, bool NORM, bool LEAN, bool SE = false,
          bool PAIR = false>
__device__ __forceinline__ void mma_kernel_body(const T* __restrict__ x, const uint4* __restrict__ qw,
                                                const uint2* __restrict__ qh, const void* __restrict__ sz,
                                                T* __restrict__ out, int M, int N, int K, int G, uint32_t gmagic,
                                                int kb_per_warp, int wk_log, const uint2* __restrict__ cb,
                                                int cb1_at, int cb_n, int glu, const EpiArgs& epi) {
  constexpr int KBLK = 256 / BITS;
  constexpr int LANE_K = KBLK / 4;       // inputs per lane per kblock
  extern __shared__ float red[];

  grid_dep_launch();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int KB = K / KBLK;
  const int tile0 = (blockIdx.x * (nwarps >> wk_log) + (warp >> wk_log)) * R;
  const int kb0 = (warp & ((1 << wk_log) - 1)) * kb_per_warp;
  const int kb1 = tile0 * 16 < N ? min(KB, kb0 + kb_per_warp) : kb0;  // a last block's groups past N do no work
  // This lane's x (token min(g, M - 1), inputs from c * LANE_K; token tile t: kblock_step) and the scales of its first row
  // (g of tile0), as pointers, so a kblock's addresses are one add each (64-bit index arithmetic a kblock was
  // ~20 instructions of the W4 kernel's ~110: SASS, bench/results/kernels_h200_notes.md).
  const T* x_lane = x + (size_t)min(g, M - 1) * K + c * LANE_K;
  const void* sz_row = scale_row<ELEM>(sz, (size_t)(tile0 * 16 + g), G);

  // Codebook weights: the codebooks into shared memory, after the reduction slabs.
  uint2* cb_s = reinterpret_cast<uint2*>(red + nwarps * R * 16 * MT * 8);
  // NORM: norm_stage's copies after the slabs (no codebooks there); the block's rows.
  static_assert(!(NORM && (XS || is_vq(ELEM))), "the norm epilogue is for the post-scale kernel only");
  float* stage = reinterpret_cast<float*>(cb_s);
  const int rowsb = (nwarps >> wk_log) * R * 16, rows0 = blockIdx.x * rowsb;
  if constexpr (is_vq(ELEM)) {
    constexpr int CP = vq_copies(ELEM);
    for (int i = threadIdx.x; i < cb_n * CP; i += blockDim.x) cb_s[i] = __ldg(cb + i / CP);
    __syncthreads();
  }

  float acc[R][MT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][t][i] = 0.f;

  // Per round of U kblocks: every weight load first (U*R 16-byte streaming loads in flight per lane),
  // then per kblock the scales and x (x is small and re-read by every warp: L1/L2 hits) and the math.
  // Measured slower: a register ring refilled slot by slot (H100, bench/results/kernels_h100_notes.md);
  // on an H200 (kernels_h200_notes.md), scales loaded with the weights in the plain loop (in the lean batch-1
  // post-scale loop, one 4-byte word a pair of kblocks and row half, they are faster: SE), an L2 prefetch of the
  // next round, double-buffered rounds, and a cp.async ring in shared memory (each: more registers or more load
  // instructions per byte).
  // XS (M > 16, one warp a row group over all of K): x staged in shared memory a round ahead by cp.async, shared by
  // the block's row groups, so a kblock's x loads wait on shared memory instead of L2. (Staged so at M = 9..16 too,
  // the warps of a group splitting K and one chunk a K slice, it was slower at every launch the rule picks on an H200:
  // 28672 x 8192 M=16 66.6 against 49.5 µs at (2, 2, 2), 14336 x 4096 34.8 against 15.5 at (2, 4, 1) — record commit
  // 030302f, forty-fourth session, bench/results/kernels_h200_notes.md.)
  constexpr int CH = U * KBLK, CHP = CH + 8;  // inputs a round; padded row (16 bytes) against bank conflicts
  T* xs = reinterpret_cast<T*>(cb_s);
  const int rounds = XS ? (KB + U - 1) / U : 0;
  auto stage_x = [&](int rd) {
    T* dst = xs + (rd & 1) * (MT * 8) * CHP;
    for (int i = threadIdx.x; i < M * (CH / 8); i += blockDim.x) {
      const int tok = i / (CH / 8), k = rd * CH + (i % (CH / 8)) * 8;
      if (k < K) cp_async16(dst + tok * CHP + (k - rd * CH), x + (size_t)tok * K + k);
    }
    cp_async_commit();
  };
  bool waited = false;  // grid_dep_wait once the first round's weight loads are in flight
  if constexpr (XS) {
    grid_dep_wait();
    waited = true;
    stage_x(0);
  }
  // LEAN: each row tile's weights through a pointer advanced a round, instead of a 64-bit index computed a load
  // (the loop's SASS recomputed it from the thread index: ~16 instructions a row tile and round)
  // (and the 3-bit codes' high-bit plane through a pointer of its own, hp)
  static_assert(!(LEAN && (XS || (has_high_plane(ELEM) && ELEM != 8))),
                "the lean pointers serve unstaged kernels of one plane, or 3-bit codes' two");
  const uint4* wp[R];
  const uint2* hp[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    wp[r] = qw + ((size_t)(tile0 + r) * KB + kb0) * 32 + lane;
    if constexpr (has_high_plane(ELEM)) hp[r] = qh + ((size_t)(tile0 + r) * KB + kb0) * 32 + lane;
  }
  for (int kb = XS ? 0 : kb0, rd = 0; XS ? rd < rounds : kb < kb1; kb += U, ++rd) {
    uint4 wv[U][R];
    uint2 hv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (kb + u < kb1) {
          const size_t at = ((size_t)(tile0 + r) * KB + kb + u) * 32 + lane;
          wv[u][r] = ld_stream(LEAN ? wp[r] + u * 32 : qw + at);
          if constexpr (has_high_plane(ELEM)) hv[u][r] = ld_stream2(LEAN ? hp[r] + u * 32 : qh + at);
          else hv[u][r] = make_uint2(0, 0);
        }
    if constexpr (LEAN) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wp[r] += U * 32;
        if constexpr (has_high_plane(ELEM)) hp[r] += U * 32;
      }
    }
    // SE: the round's scale words in flight with its weights, one load a pair of kblocks (launch_mma takes SE only
    // where each pair is in one group: kb even and groups of whole pairs, or one group a row). (The E2M1 kernels
    // loading their 16-bit block scales so, one a kblock, were slower than lean alone: H200, thirtieth session.)
    uint32_t se[U][R][2];
    if constexpr (SE) {
      static_assert(ELEM == 3 && LEAN && U % 2 == 0, "early scale words: the lean post-scale kernels, even rounds");
#pragma unroll
      for (int u = 0; u < U; u += 2) {
        const int grp = group_of((kb + u) * KBLK, gmagic);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (u == 0 || kb + u < kb1) {  // (a pair past the warp's kblocks: its group may be past the row)
            se[u][r][0] = load_scale_raw<0>(sz_row, r * 16 * G + grp);
            se[u][r][1] = load_scale_raw<0>(sz_row, (r * 16 + 8) * G + grp);
          } else {
            se[u][r][0] = se[u][r][1] = 0;
          }
          se[u + 1][r][0] = se[u][r][0];
          se[u + 1][r][1] = se[u][r][1];
        }
      }
    }
    if (!waited) {
      grid_dep_wait();
      waited = true;
      if constexpr (NORM) norm_stage<T>(epi, stage, M, N, rows0, rowsb);
    }
    if constexpr (XS) {
      if (rd + 1 < rounds) stage_x(rd + 1);
      else cp_async_commit();  // an empty group keeps the wait below uniform
      cp_async_wait<1>();
      __syncthreads();
    }
    // LEAN: x's and the scales' row pointers kept in registers (opaque: ptxas rebuilt both from the thread index
    // and the kernel's arguments every round, ~35 instructions, to save their four registers)
    if constexpr (LEAN) {
      opaque(x_lane);
      opaque(sz_row);
    }
    const T* xl = XS ? xs + (rd & 1) * (MT * 8) * CHP + min(g, M - 1) * CHP + c * LANE_K : x_lane;
    if constexpr (PAIR) {  // (pairs (kb + u, kb + u + 1), u even, never straddle rounds: U is even)
      static_assert(SE && !XS, "scale pairs: the early-scale kernels");
#pragma unroll
      for (int u = 0; u < U; u += 2) {
        if (kb + u >= kb1) break;
        kblock_pair<T, BITS, MT, R, ELEM>(wv[u], hv[u], wv[u + 1], hv[u + 1], kb + u + 1 < kb1, xl, K,
                                          (kb + u) * KBLK, M, se[u], acc);
      }
    } else {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (kb + u >= kb1) break;
        kblock_step<T, BITS, MT, R, ELEM, XS, LEAN, SE>(wv[u], hv[u], kb + u, xl, XS ? CHP : K,
                                                        XS ? u * KBLK : (kb + u) * KBLK, sz_row, M, G, gmagic, acc,
                                                        cb_s, cb1_at, se[u]);
      }
    }
    if constexpr (XS) __syncthreads();  // the next round's copy reuses this buffer
  }
  if constexpr (ELEM == 9) {  // the rows' fp32 factors (byte scales)
    if (tile0 * 16 < N) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        scale_rows(acc[r], row_factor(static_cast<const char*>(sz_row) + (size_t)r * 16 * G),
                   row_factor(static_cast<const char*>(sz_row) + (size_t)(r * 16 + 8) * G));
    }
  }
  if constexpr (is_vq(ELEM)) {  // the rows' fp32 scales (sz_row: row g of the tile; row g + 8 eight floats on)
    if (tile0 * 16 < N)
      scale_rows(acc[0], __ldg(static_cast<const float*>(sz_row)), __ldg(static_cast<const float*>(sz_row) + 8));
  }

  if (!waited) {  // warps without kblocks: nothing written before the previous kernel is done
    grid_dep_wait();
    if constexpr (NORM) norm_stage<T>(epi, stage, M, N, rows0, rowsb);
  }
  reduce_store<T, MT, R, NORM>(acc, red, out, M, N, wk_log, glu, epi, stage);
}

#define LLMCOMP_MMA_PARAMS                                                                                     \
  const T *__restrict__ x, const uint4 *__restrict__ qw, const uint2 *__restrict__ qh, const void *__restrict__ sz, \
      T *__restrict__ out, int M, int N, int K, int G, uint32_t gmagic, int kb_per_warp, int wk_log, \
      const uint2 *__restrict__ cb, int cb1_at, int cb_n, int glu, EpiArgs epi
// Registers are left to the compiler here: bounding them for one more block an SM (__launch_bounds__(256, MINB)) was
// slower on the H200 in both forms measured (rounds of 2 kblocks at 40 registers; rounds of 4 at 48 with the
// division-free group index), and so were the weights streamed through a shared-memory ring by cp.async.bulk (4 x 2
// kblocks a warp, 50 registers; in the history, 73116b5): bench/results/kernels_h200_notes.md. The bound that won is
// uniform_mma_kernel_bounded's, below: only where a build's registers cost a second wave of blocks (bound7, bound7_r2).
// NORM: the RMSNorm split's epilogue (EpiArgs), its own instantiations (M <= 8, post-scale codes) so that the others
// compile as they did without it (the extra epilogue changed the main loop's register allocation: the GLU call at
// M = 1 took 22.9 µs instead of 21.3 in the 8B decode, H200, kernels_h200_notes.md eighteenth session).
template <typename T, int BITS, int MT, int R, int U, int THREADS, int ELEM, bool XS = false, bool NORM = false,
          bool LEAN = false, bool SE = false>
__global__ void __launch_bounds__(THREADS) uniform_mma_kernel(LLMCOMP_MMA_PARAMS) {
  mma_kernel_body<T, BITS, MT, R, U, ELEM, XS, NORM, LEAN, SE>(x, qw, qh, sz, out, M, N, K, G, gmagic, kb_per_warp,
                                                           wk_log, cb, cb1_at, cb_n, glu, epi);
}
// The same body bounded to MINB blocks of THREADS threads an SM (registers capped at 64K / (MINB · THREADS), rounded
// down to 8): its own __global__, since an explicit minimum moves the registers of the unbounded kernels (notes).
template <typename T, int BITS, int MT, int R, int U, int THREADS, int ELEM, bool NORM, bool LEAN, bool SE, int MINB>
__global__ void __launch_bounds__(THREADS, MINB) uniform_mma_kernel_bounded(LLMCOMP_MMA_PARAMS) {
  mma_kernel_body<T, BITS, MT, R, U, ELEM, false, NORM, LEAN, SE>(x, qw, qh, sz, out, M, N, K, G, gmagic, kb_per_warp,
                                                                  wk_log, cb, cb1_at, cb_n, glu, epi);
}
// The early-scale kernel (NORM: with the norm split's epilogue) summing each pair of kblocks before it scales them
// (PAIR; scale_pair()): its own __global__, so that the kernels above keep their names and builds.
template <typename T, int BITS, int MT, int R, int U, int THREADS, int ELEM, bool NORM>
__global__ void __launch_bounds__(THREADS) uniform_mma_kernel_pair(LLMCOMP_MMA_PARAMS) {
  mma_kernel_body<T, BITS, MT, R, U, ELEM, false, NORM, true, true, true>(x, qw, qh, sz, out, M, N, K, G, gmagic,
                                                                          kb_per_warp, wk_log, cb, cb1_at, cb_n, glu,
                                                                          epi);
}
#undef LLMCOMP_MMA_PARAMS

// W[N, K] in T from the kernel layout (prefill path: dequantize, then cuBLAS). 256 threads a block (DQ_THREADS).
// STAGE: each warp's 16 rows x KBLK inputs go through shared memory, so that every store instruction writes whole
// 128-byte lines (8 lanes a line). Unstaged, a lane writes its own LANE_K inputs of rows g and g + 8, so a store
// instruction covers 8 rows and writes 16 of the 32 bytes of each sector it touches (dequant_stage(), uniform_mma.cu).
constexpr int DQ_THREADS = 256;
template <typename T, int BITS, int ELEM, bool STAGE>
__global__ void __launch_bounds__(DQ_THREADS)
    uniform_dequant_kernel(const uint4* __restrict__ qw, const uint2* __restrict__ qh, const void* __restrict__ sz,
                           T* __restrict__ w, int N, int K, int G, uint32_t gmagic) {
  using N2 = typename Num<T>::T2;
  constexpr int KBLK = 256 / BITS, LANE_K = KBLK / 4, STEPS_PER_WORD = 4 / BITS;
  const int KB = K / KBLK;
  const uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x;  // one (tile, kblock, lane); the host checks < 2^32
  if (idx >= (uint32_t)(N / 16) * KB * 32) return;
  const int lane = idx & 31, tk = idx >> 5, kb = tk % KB, tile = tk / KB;
  const int g = lane >> 2, c = lane & 3;
  const int k_lane = kb * KBLK + c * LANE_K, grp = group_of(k_lane, gmagic);
  const int row = tile * 16 + g;
  N2 sc[2], mz[2];
  const void* sr[2] = {scale_row<ELEM>(sz, row, G), scale_row<ELEM>(sz, row + 8, G)};
  load_scale<T, ELEM>(sr[0], grp, sc[0], mz[0]);
  load_scale<T, ELEM>(sr[1], grp, sc[1], mz[1]);
  const uint4 v = qw[idx];
  const uint2 hv = ELEM == 2 ? qh[idx] : make_uint2(0, 0);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  // The lane's weights are LANE_K consecutive inputs of rows g and g + 8: gathered in registers, then written
  // 16 bytes at a time (4-byte stores, one a pair, left the output's sectors partly written per instruction).
  N2 rows[2][LANE_K / 2];
#pragma unroll
  for (int wi = 0; wi < 4; ++wi) {
    N2 q[16 / BITS];
    decode_any<T, BITS, ELEM>(words[wi], hv, wi, q);
#pragma unroll
    for (int ss = 0; ss < STEPS_PER_WORD; ++ss)
#pragma unroll
      for (int reg = 0; reg < 4; ++reg)
        rows[reg & 1][2 * (wi * STEPS_PER_WORD + ss) + (reg >> 1)] = Num<T>::fma2(q[4 * ss + reg], sc[reg & 1],
                                                                                  mz[reg & 1]);
  }
  if constexpr (ELEM == 9) {  // the rows' fp32 factors, one rounding to T (the scaled codes above are exact)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float f = row_factor(sr[h]);
#pragma unroll
      for (int i = 0; i < LANE_K / 2; ++i) {
        const float2 fv = Num<T>::to_f2(rows[h][i]);
        rows[h][i] = Num<T>::from_f2(make_float2(fv.x * f, fv.y * f));
      }
    }
  }
  // A warp's tile in shared memory: 16 rows of KBLK inputs, each row padded by 16 bytes (the 8 lanes of a store
  // phase, rows g and g + 1 at c = 0..3, then hit 8 different 16-byte bank groups for 4-bit codes). 2-bit layouts
  // (SWZ: a lane's 4 chunks of 16 bytes, 64 bytes apart a lane) would meet in pairs, c and c + 2 on the same group:
  // lanes c = 2, 3 store their chunk i in slot i ^ 2, which the copy out undoes (byte b of a row: b ^ 32 where b's
  // bit 7 is set). H200: W3 4096² 11.41 -> 10.52 µs, the larger shapes ~2 % faster; W2 4096² 10.72 -> 10.36, the
  // larger ones within the runs' spread (±2 %) (other runs of the same kernel: notes, forty-third session).
  constexpr int ROW_B = KBLK * (int)sizeof(T), PITCH = ROW_B + 16;
  constexpr bool SWZ = STAGE && LANE_K / 8 == 4 && sizeof(T) == 2;
  __shared__ __align__(16) char tiles[STAGE ? DQ_THREADS / 32 : 1][STAGE ? 16 * PITCH : 16];
  char* ws = tiles[STAGE ? threadIdx.x >> 5 : 0];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint4* dst = STAGE ? reinterpret_cast<uint4*>(ws + (g + 8 * h) * PITCH + c * LANE_K * (int)sizeof(T))
                       : reinterpret_cast<uint4*>(w + (size_t)(row + 8 * h) * K + k_lane);
    auto u = [&](int i) { return *reinterpret_cast<const uint32_t*>(&rows[h][i]); };
#pragma unroll
    for (int i = 0; i < LANE_K / 8; ++i)
      dst[SWZ ? i ^ (c & 2) : i] = make_uint4(u(4 * i), u(4 * i + 1), u(4 * i + 2), u(4 * i + 3));
  }
  if constexpr (STAGE) {
    __syncwarp();
    char* tile_out = reinterpret_cast<char*>(w + (size_t)tile * 16 * K + kb * KBLK);
#pragma unroll
    for (int j = 0; j < 16 * ROW_B / 512; ++j) {  // 16 bytes a lane: whole rows, ROW_B / 16 lanes each
      const int at = j * 512 + lane * 16, r = at / ROW_B, b = at % ROW_B;
      *reinterpret_cast<uint4*>(tile_out + (size_t)r * K * sizeof(T) + b) =
          *reinterpret_cast<const uint4*>(ws + r * PITCH + (SWZ ? b ^ ((b >> 2) & 32) : b));
    }
  }
}

// group_of's multiplier: 0 for one group a row; ceil(2^32 / group) else, exact while K * group < 2^32.
inline uint32_t group_magic(int K, int G, int group) {
  if (G == 1) return 0;
  TORCH_CHECK((uint64_t)K * group < (1ull << 32), "group size too large for the mma kernel");
  return (uint32_t)(((1ull << 32) + group - 1) / group);
}

template <typename T, int BITS, int ELEM, int MT, int R>
void launch_mma(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& qh, const torch::Tensor& sz,
                torch::Tensor& out, int group, int warps, int wr, const torch::Tensor* cb, int cb1_at,
                const EpiArgs& epi) {
  // N: the weight's rows (sz has one row of scales each); an output half as wide asks for the GLU epilogue
  const int M = x.size(0), K = x.size(1), N = sz.size(0), G = sz.size(1), glu = out.size(1) != N;
  TORCH_CHECK(!glu || (2 * out.size(1) == N && N % 16 == 0), "the GLU epilogue's output is half the weight's rows");
  const int cb_n = cb ? (int)cb->size(0) : 0;
  constexpr int KBLK = 256 / BITS;
  const int KB = K / KBLK;
  using S = Shape<BITS, MT, R>;
  if (warps <= 0) warps = 8;
  int wk_log = 0;  // warps splitting K (a row group): a power of two, at most KB
  while ((2 << wk_log) <= std::min({warps, KB, S::WIDE / 32})) ++wk_log;
  warps = 1 << wk_log;
  wr = std::max(1, std::min(wr, S::WIDE / 32 / warps));  // row groups a block
  const int kb_per_warp = (KB + warps - 1) / warps;
  const int groups = N / (16 * R), threads = wr * warps * 32;
  size_t smem = (size_t)wr * warps * R * 16 * MT * 8 * sizeof(float) + (size_t)cb_n * vq_copies(ELEM) * sizeof(uint2);
  auto kern = threads > S::THREADS ? uniform_mma_kernel<T, BITS, MT, R, S::U, S::WIDE, ELEM>
                                   : uniform_mma_kernel<T, BITS, MT, R, S::U, S::THREADS, ELEM>;
  EpiArgs e = epi;
  const bool norm = e.res || e.sq_in;
  if (norm) {  // the RMSNorm split's epilogue: the post-scale kernel at M <= 8 only
    // norm_stage's shared memory (a producer's): the residual and γ rows of the block, in 16-byte chunks
    const size_t st = (size_t)(M + 1) * wr * R * 16 * sizeof(T);
    auto a16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
    e.stage = e.stage && e.res && !e.sq_in && a16(e.res) && a16(e.gamma) && smem + st <= 48 * 1024;
    if (e.stage) smem += st;
    TORCH_CHECK(is_post(ELEM) && MT == 1, "the norm epilogue runs in the post-scale kernel at M <= 8 only");
  }
  if constexpr (is_post(ELEM)) {  // the post-scale kernels (M <= 16): the norm epilogue (M <= 8), lean (lean())
    // (3-bit codes, ELEM 8: lean only under w3_lean(), below)
    const bool wide = threads > S::THREADS, thin = ELEM == 3 && lean();
    if constexpr (MT == 1) {
      if (norm)
        kern = wide ? uniform_mma_kernel<T, BITS, MT, R, S::U, S::WIDE, ELEM, false, true>
                    : uniform_mma_kernel<T, BITS, MT, R, S::U, S::THREADS, ELEM, false, true>;
    }
    if constexpr (ELEM == 3) {
      if constexpr (MT == 1) {
        if (norm && thin)
          kern = wide ? uniform_mma_kernel<T, BITS, MT, R, S::U, S::WIDE, ELEM, false, true, true>
                      : uniform_mma_kernel<T, BITS, MT, R, S::U, S::THREADS, ELEM, false, true, true>;
      }
      if (!norm && thin)
        kern = wide ? uniform_mma_kernel<T, BITS, MT, R, S::U, S::WIDE, ELEM, false, false, true>
                    : uniform_mma_kernel<T, BITS, MT, R, S::U, S::THREADS, ELEM, false, false, true>;
      // scale_early(): lean, M <= 8, 4-bit codes, each pair of kblocks (kb even) in one group (or one group a row);
      // scale_early16(): M = 9..16 too, where the post-scale kernel runs (two row tiles a warp)
      const bool early = thin && scale_early() && (G == 1 || (group % (2 * KBLK) == 0 && kb_per_warp % 2 == 0));
      if constexpr (MT == 2 && R == 2 && BITS == 4 && S::U % 2 == 0) {
        if (early && scale_early16())
          kern = scale_pair() ? (wide ? uniform_mma_kernel_pair<T, BITS, MT, R, S::U, S::WIDE, ELEM, false>
                                      : uniform_mma_kernel_pair<T, BITS, MT, R, S::U, S::THREADS, ELEM, false>)
                 : wide       ? uniform_mma_kernel<T, BITS, MT, R, S::U, S::WIDE, ELEM, false, false, true, true>
                              : uniform_mma_kernel<T, BITS, MT, R, S::U, S::THREADS, ELEM, false, false, true, true>;
      }
      if constexpr (MT == 1 && BITS == 4 && S::U % 2 == 0) {
        if (early && norm)
          kern = scale_pair() ? (wide ? uniform_mma_kernel_pair<T, BITS, MT, R, S::U, S::WIDE, ELEM, true>
                                      : uniform_mma_kernel_pair<T, BITS, MT, R, S::U, S::THREADS, ELEM, true>)
                 : wide       ? uniform_mma_kernel<T, BITS, MT, R, S::U, S::WIDE, ELEM, false, true, true, true>
                              : uniform_mma_kernel<T, BITS, MT, R, S::U, S::THREADS, ELEM, false, true, true, true>;
        else if (early)
          kern = scale_pair() ? (wide ? uniform_mma_kernel_pair<T, BITS, MT, R, S::U, S::WIDE, ELEM, false>
                                      : uniform_mma_kernel_pair<T, BITS, MT, R, S::U, S::THREADS, ELEM, false>)
                 : wide       ? uniform_mma_kernel<T, BITS, MT, R, S::U, S::WIDE, ELEM, false, false, true, true>
                              : uniform_mma_kernel<T, BITS, MT, R, S::U, S::THREADS, ELEM, false, false, true, true>;
      }
      // bound7_r2(): the lean two-tile kernels at 4 warps (128 threads) bounded to 72 registers, 7 blocks an SM,
      // where their builds hold more (sm_90: 4-bit fp16 73-74, 2-bit 76-80; on 28672 rows 896 blocks in 792 slots)
      if constexpr (MT == 1 && R == 2 && (BITS == 2 || std::is_same_v<T, __half>)) {
        if (thin && threads == 128 && bound7_r2()) {
          if constexpr (BITS == 4 && S::U % 2 == 0) {
            if (early)
              kern = norm ? uniform_mma_kernel_bounded<T, BITS, MT, R, S::U, 128, ELEM, true, true, true, 7>
                          : uniform_mma_kernel_bounded<T, BITS, MT, R, S::U, 128, ELEM, false, true, true, 7>;
          }
          if (BITS != 4 || !early)
            kern = norm ? uniform_mma_kernel_bounded<T, BITS, MT, R, S::U, 128, ELEM, true, true, false, 7>
                        : uniform_mma_kernel_bounded<T, BITS, MT, R, S::U, 128, ELEM, false, true, false, 7>;
        }
      }
    }
    // w3_lean(): 3-bit codes (kind 8) through the lean loop too, the high-bit plane through its own pointers — the
    // plain kernels of at most 256 threads only, what its A/B times (sm_90: the 512-thread fp16 build spills lean)
    if constexpr (ELEM == 8 && MT == 1) {
      if (lean() && w3_lean() && !norm && !wide)
        kern = uniform_mma_kernel<T, BITS, MT, R, S::U, S::THREADS, ELEM, false, false, true>;
    }
  }
  // bound7(): one tile x 4 warps at 72 registers, 7 blocks an SM (on 14336 rows: 924 slots for 896 blocks, one wave)
  if constexpr (ELEM == 8 && MT == 1 && R == 1) {
    if (threads == 128 && bound7()) {
      if (norm) {
        kern = uniform_mma_kernel_bounded<T, BITS, MT, R, S::U, 128, ELEM, true, false, false, 7>;
      } else if (lean() && w3_lean()) {  // (bf16 too: lean it holds 75 unbounded, 72 bounded with no spill)
        kern = uniform_mma_kernel_bounded<T, BITS, MT, R, S::U, 128, ELEM, false, true, false, 7>;
      } else if constexpr (std::is_same_v<T, __half>) {
        kern = uniform_mma_kernel_bounded<T, BITS, MT, R, S::U, 128, ELEM, false, false, false, 7>;
      }
    }
  }
  // e2m1_lean(): the E2M1 kernels at M <= 8 with 256-thread blocks lean. H200, MXFP4 bf16 M = 1 (thirtieth
  // session, bench/kernel_ab.py --knob e2m1, the last call): 28672 x 8192 45.6 -> 42.2 µs, 14336 x 4096 13.9 -> 13.4,
  // 6144 x 4096 8.2 -> 7.5; in an earlier call the 512-thread (wide) kernels were slower lean (4096² 6.1 -> 6.7,
  // 4096 x 14336 14.1 -> 14.3).
  if constexpr (is_e2m1(ELEM) && MT == 1) {
    if (threads <= S::THREADS && e2m1_lean())
      kern = uniform_mma_kernel<T, BITS, MT, R, S::U, S::THREADS, ELEM, false, false, true>;
  }
  // one warp a row group above M = 16: x staged (XS), one or two tiles
  if constexpr (MT >= 4 && (ELEM <= 2 || ELEM == 9)) {
    static const bool xs_on = !env_off("LLMCOMP_MMA_XSTAGE");
    if (warps == 1 && xs_on) {
      kern = uniform_mma_kernel<T, BITS, MT, R, S::U, S::THREADS, ELEM, true>;
      smem += 2 * (size_t)(MT * 8) * (S::U * KBLK + 8) * sizeof(T);
    }
  }
  launch_ex(kern, (groups + wr - 1) / wr, threads, smem, reinterpret_cast<const T*>(x.data_ptr()),
            reinterpret_cast<const uint4*>(qw.data_ptr()), reinterpret_cast<const uint2*>(qh.data_ptr()), sz.data_ptr(),
            reinterpret_cast<T*>(out.data_ptr()), M, N, K, G, group_magic(K, G, group), kb_per_warp, wk_log,
            cb ? reinterpret_cast<const uint2*>(cb->data_ptr()) : nullptr, cb1_at, cb_n, glu, e);
}

// Wider tiles only where registers allow (MT x R accumulators of 4 floats per lane). (Rounds of U = 8 kblocks
// at M = 1 were slower than 4 on every shape on an H200, W2/W3/W4: bench/results/kernels_h200_notes.md.)
// One or two row tiles per warp at every M (launch_config, from the H200 sweeps; two only where they divide the
// rows, else the last tile would go unwritten); one for codebook weights (rt is ignored there).
// Instantiated once per (T, BITS, ELEM) in its own translation unit (mma_*.cu), so the builds run in parallel.
template <typename T, int BITS, int ELEM>
void dispatch_mt(const torch::Tensor& x, const torch::Tensor& qw, const torch::Tensor& qh, const torch::Tensor& sz,
                 torch::Tensor& out, int group, int rt, int warps, int wr, const torch::Tensor* cb, int cb1_at,
                 const EpiArgs& epi) {
  const int M = x.size(0);
  // Two row tiles a warp (sharing each x fragment) where rt asks for them and they divide the rows.
  const bool two = rt >= 2 && sz.size(0) % 32 == 0;  // (sz: one row of scales a weight row)
  auto tiles = [&](auto mt) {  // mt: std::integral_constant, the token tiles of 8 the kernel is built for
    constexpr int MT = decltype(mt)::value;
    if (two) return launch_mma<T, BITS, ELEM, MT, 2>(x, qw, qh, sz, out, group, warps, wr, cb, cb1_at, epi);
    return launch_mma<T, BITS, ELEM, MT, 1>(x, qw, qh, sz, out, group, warps, wr, cb, cb1_at, epi);
  };
  using One = std::integral_constant<int, 1>;
  if constexpr (ELEM == 8) {  // 3-bit codes: M <= 8 (two token tiles spilled at 512 threads; gemm_tensors)
    TORCH_CHECK(M <= 8, "the fp32 post-scale kernel takes at most 8 rows of x for 3-bit codes");
    return tiles(One{});
  } else if constexpr (ELEM == 3) {
    TORCH_CHECK(M <= 16, "the fp32 post-scale kernel takes at most 16 rows of x");
    if (M <= 8) return tiles(One{});
    // M = 9..16: two row tiles a warp only (one tile lost everywhere on the H200, forty-third session; gemm_tensors)
    TORCH_CHECK(two, "the fp32 post-scale kernel at M = 9..16 takes two row tiles a warp (rt = 2, rows % 32 == 0)");
    return launch_mma<T, BITS, ELEM, 2, 2>(x, qw, qh, sz, out, group, warps, wr, cb, cb1_at, epi);
  } else if constexpr (is_vq(ELEM)) {  // codebook weights: one row tile a warp
    TORCH_CHECK(cb != nullptr, "codebook weights need their codebooks");
    if (M <= 8) return launch_mma<T, BITS, ELEM, 1, 1>(x, qw, qh, sz, out, group, warps, wr, cb, cb1_at, epi);
    if (M <= 16) return launch_mma<T, BITS, ELEM, 2, 1>(x, qw, qh, sz, out, group, warps, wr, cb, cb1_at, epi);
    if (M <= 32) return launch_mma<T, BITS, ELEM, 4, 1>(x, qw, qh, sz, out, group, warps, wr, cb, cb1_at, epi);
    return launch_mma<T, BITS, ELEM, 8, 1>(x, qw, qh, sz, out, group, warps, wr, cb, cb1_at, epi);
  } else {
    if (M <= 8) return tiles(One{});
    if (M <= 16) return tiles(std::integral_constant<int, 2>{});
    if (M <= 32) return tiles(std::integral_constant<int, 4>{});
    return tiles(std::integral_constant<int, 8>{});
  }
}

#define LLMCOMP_MMA_DISPATCH(T, BITS, ELEM)                                                                      \
  template void dispatch_mt<T, BITS, ELEM>(const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,      \
                                           const torch::Tensor&, torch::Tensor&, int, int, int, int,             \
                                           const torch::Tensor*, int, const EpiArgs&)
#define LLMCOMP_MMA_FORMATS(X) X(__half, 4, 0); X(__nv_bfloat16, 4, 0); X(__half, 2, 0); X(__nv_bfloat16, 2, 0); \
  X(__half, 2, 2); X(__nv_bfloat16, 2, 2); X(__half, 4, 1); X(__nv_bfloat16, 4, 1); \
  X(__half, 4, 9); X(__nv_bfloat16, 4, 9); \
  X(__half, 4, 3); X(__nv_bfloat16, 4, 3); X(__half, 2, 3); X(__nv_bfloat16, 2, 3); X(__half, 2, 8); \
  X(__nv_bfloat16, 2, 8); \
  X(__half, 2, 4); X(__nv_bfloat16, 2, 4); X(__half, 2, 5); X(__nv_bfloat16, 2, 5); \
  X(__half, 2, 6); X(__nv_bfloat16, 2, 6); X(__half, 2, 7); X(__nv_bfloat16, 2, 7)

}  // namespace llmcomp_mma
