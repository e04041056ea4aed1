// Quantized matrix-vector / matrix-matrix products on GGUF weight blocks (AVX2 + FMA + F16C, an
// AVX-512 VNNI variant in qgemm_avx512.cpp and an AMX variant in qgemm_amx.cpp, chosen at run time).
//
// Weights stay in the file's block layouts (see gemmalab/quant/gguf_blocks.py for the byte maps);
// activations are quantized on the fly to 8 bits per block of 32 values with one fp32 scale, the
// way llama.cpp's CPU backend pairs Q8_0/Q8_K activations with its weight types. Each weight block
// is unpacked once into unsigned bytes and multiplied against R activation rows with
// _mm256_maddubs_epi16 (u8 x s8 -> s16 pairs) and _mm256_madd_epi16 (-> s32); weight offsets and
// minimums are applied through per-block sums of the activation codes.
#pragma once

#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <cmath>

namespace gl {

// ggml type ids (gguf.GGMLQuantizationType)
enum QType : int { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8,
                   Q4_K = 12, Q6_K = 14, BF16 = 30,
                   // gemmalab's own repacks (not in GGUF files):
                   Q5_0_U8 = 201,  // Q5_0 with each 5-bit code in a byte: fp16 d, u8 q[32]; w = d*(q - 16)
                   Q8_0_SYM = 202 };  // Q8_0 rows without a -128 code (llama.cpp never writes one):
                                      // |a| x sign(w, a) needs one sign op per block instead of two

static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t rd16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }

static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// Bytes per block and weights per block of each supported weight type.
static inline int block_bytes(int t) {
  switch (t) {
    case Q4_0: return 18; case Q4_1: return 20; case Q5_0: return 22; case Q5_1: return 24;
    case Q8_0: return 34; case Q4_K: return 144; case Q6_K: return 210; case Q5_0_U8: return 34; case Q8_0_SYM: return 34;
    default: return 0;
  }
}
static inline int block_weights(int t) { return (t == Q4_K || t == Q6_K) ? 256 : 32; }

// ---- activations ---------------------------------------------------------------------------
// Row r of an (M, K) activation matrix: q[r*K + i] int8 codes, d[r*K/32 + j] fp32 scale of block j,
// s[r*K/16 + j] sum of the codes of each 16-value half block (for weight offsets and minimums).
// ns4[r*K/4 + g] = -(sum of the 4 codes 4g..4g+3): the offset of unsigned weight codes (u - off)
// folds into the integer sums (one shift and add per block instead of a scalar term), laid out like
// the int32 lanes of a dot product; das[r*K/32 + j] = d_j * (sum of block j's codes), for the
// minimums of Q4_K.
struct Act {
  const int8_t* q;
  const uint8_t* qabs;  // |q|
  const float* d;
  const int32_t* s;
  int64_t K;
  const float* dx;      // AVX-512 variant only: d of each block repeated 8 times (one 256-bit half)
  const int32_t* ns4;
  const float* das;
  // AMX variant only (expand_act_amx): activation tiles of up to 16 rows, tile t = rows [16t, 16t + mt):
  const int8_t* vq;     // at 16t*K + 32*mt*j: block j in VNNI layout (8 rows of 4 codes x mt rows)
  const float* dap;     // at 16t*(K/32)*16 + 16*mt*j: mt vectors, lane l of vector v = d of row (16v + l) % mt
  const int32_t* ns16;  // at 16t*(K/32) + mt*j: -16 x (sum of block j's codes) of each row
};

// A weight matrix of N rows of quantized blocks and its (M, N) fp32 output.
struct Mat {
  const uint8_t* w;
  int type;
  int64_t N;       // rows (output features)
  int64_t row_bytes;
  float* out;      // (M, N) row-major
};

// Kernel variants (gemmalab.quant.kernels.isa()): avx2 and avx512 do the same integer sums and the
// same fp32 operations in the same order, so they give bit-identical outputs; amx scales whole-block
// integer sums (one fp32 FMA per block instead of 8 lanes): a different rounding (qgemm_amx.cpp).
enum Isa : int { ISA_AVX2 = 0, ISA_AVX512 = 1, ISA_AMX = 2 };
// out rows [n0, n1) of m for all M activation rows, with the given variant.
void run_rows_avx2(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t M);
void run_rows_avx512(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t M);
void run_rows_amx(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t M);
// The AVX-512 variant's expanded scales: dx[r*K/4 + 8*j + i] = d[r*K/32 + j] for i < 8.
void expand_scales(const float* d, int64_t nblocks, float* dx);
// The AMX variant's activation layouts (Act::vq, dap, ns16) from q, d, s of M rows.
void expand_act_amx(const int8_t* q, const float* d, const int32_t* s, int64_t M, int64_t K, int8_t* vq, float* dap,
                    int32_t* ns16);
// nullptr once this process may use the AMX tile data state (asked of the kernel once), else why not.
const char* amx_permission_error();

// Quantize rows [m0, m1) of x (M, K) fp32: d = max|x| / 127, q = round(x / d).
void quantize_rows(const float* x, int64_t m0, int64_t m1, int64_t K, int8_t* q, uint8_t* qabs, float* d, int32_t* s,
                   int32_t* ns4, float* das);

// ---- weight unpacking helpers (llama.cpp's AVX2 idioms) -------------------------------------
// 32 nibbles -> 32 bytes: low nibbles of the 16 bytes are values 0..15, high nibbles 16..31.
static inline __m256i nibbles_32(const uint8_t* p) {
  __m128i t = _mm_loadu_si128((const __m128i*)p);
  __m256i b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}
// 32 bits -> 32 bytes of 0xFF (bit set) or 0x00.
static inline __m256i bits_32(const uint8_t* p) {
  uint32_t x32; std::memcpy(&x32, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                         0x0101010101010101, 0x0000000000000000);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}
// Q6_K: the four 32-code runs of one half super-block (128 values) from its ql / qh bytes.
static inline void unpack_q6k_half(const uint8_t* ql, const uint8_t* qh, __m256i u[4]) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
  const __m256i qlA = _mm256_loadu_si256((const __m256i*)ql);
  const __m256i qlB = _mm256_loadu_si256((const __m256i*)(ql + 32));
  const __m256i qhv = _mm256_loadu_si256((const __m256i*)qh);
  u[0] = _mm256_or_si256(_mm256_and_si256(qlA, m4), _mm256_and_si256(_mm256_slli_epi16(qhv, 4), m2));
  u[1] = _mm256_or_si256(_mm256_and_si256(qlB, m4), _mm256_and_si256(_mm256_slli_epi16(qhv, 2), m2));
  u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlA, 4), m4), _mm256_and_si256(qhv, m2));
  u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlB, 4), m4),
                         _mm256_and_si256(_mm256_srli_epi16(qhv, 2), m2));
}

// The weight types both kernel variants compute on, for their dispatch switches.
#define GL_FOR_EACH_KERNEL_TYPE(X) X(Q4_0) X(Q4_1) X(Q5_0) X(Q5_1) X(Q8_0) X(Q4_K) X(Q6_K) X(Q5_0_U8) X(Q8_0_SYM)

// Sum of u8 x s8 products of 32 bytes -> 8 int32 lanes.
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// Q4_K six-bit scales and mins of sub-block j (ggml's get_scale_min_k4).
static inline void scale_min_k4(int j, const uint8_t* q, uint8_t* sc, uint8_t* m) {
  if (j < 4) { *sc = q[j] & 63; *m = q[j + 4] & 63; }
  else { *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}

// Q4_K: the 8 six-bit minimums of a super-block's scales as floats.
static inline __m256 mins_k4(const uint8_t* q) {
  alignas(32) float m[8];
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, mn;
    scale_min_k4(j, q, &sc, &mn);
    m[j] = float(mn);
  }
  return _mm256_load_ps(m);
}
// Q4_K super-block sb of weight row w: mins[r] += dmin * m_j * das[r][8 sb + j] (8 lanes, j < 8).
template <int R>
static inline void add_mins_k4(const uint8_t* w, const float* das, int64_t nb32, int64_t sb, __m256* mins) {
  const __m256 wm = _mm256_mul_ps(_mm256_set1_ps(h2f(rd16(w + 2))), mins_k4(w + 4));
  for (int r = 0; r < R; ++r) mins[r] = _mm256_fmadd_ps(wm, _mm256_loadu_ps(das + r * nb32 + sb * 8), mins[r]);
}

// out[r] = dot(weight row w (K values in blocks of type T), activation row r) for r < R.
template <int T, int R>
void dot_row(const uint8_t* w, const Act& a, int64_t row0, float* out, int64_t out_stride);

// Repack one Q5_0 row into Q5_0_U8 (the 5-bit unpacking costs more than the extra bytes on
// CPUs where decode is compute-bound, such as 2-core Zen 1).
void repack_q5_0_row(const uint8_t* src, int64_t K, uint8_t* dst);
// Quantize one fp32 row to Q8_0 (ggml's quantize_row_q8_0_ref: d = max|x|/127 in fp16, round to nearest).
void quantize_row_q8_0(const float* x, int64_t K, uint8_t* dst);

// Dequantize one weight row of K values to fp32 (used by prefill and the embedding lookup).
void dequant_row(int type, const uint8_t* w, int64_t K, float* out);

}  // namespace gl
