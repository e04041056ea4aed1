// The AVX-512 VNNI variant of the dot-product kernels of qgemm.cpp (chosen at run time, see
// gemmalab/quant/kernels.py; this file is compiled for AVX-512 F/BW/VL/DQ + VNNI through the pragma
// below and only ever called on CPUs that report those flags).
//
// Two weight blocks of 32 codes are multiplied at once in one 512-bit register: the lower 256 bits
// hold the block that qgemm.cpp accumulates in its "even" accumulator, the upper 256 bits the "odd"
// one, and vpdpbusd (u8 x s8 -> s32, four products per lane) replaces maddubs + madd. The integer
// sums are exact in both variants (no 16-bit saturation can occur for these code ranges), the
// scales are formed by the same single fp32 multiplications, and each 256-bit half sees the same
// FMAs in the same order as qgemm.cpp's accumulators, so outputs are bit-identical to the AVX2
// variant (tests/test_isa.py checks this). Weight offsets enter the integer sums through the
// activations' -(sums of 4 codes) as the dot product's starting value. Everything here has internal linkage except
// run_rows_avx512: no inline function compiled for AVX-512 can be picked by the linker for the
// AVX2 code.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "qgemm.h"

#ifndef GL_TILE
#define GL_TILE 8
#endif
namespace gl {
namespace {

inline __m512i join(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
inline __m512 pair_ps(float lo, float hi) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(lo)), _mm256_set1_ps(hi), 1);
}
inline __m512i dpbusd(__m512i u, __m512i s) { return _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, s); }
inline __m512i load512(const void* p) { return _mm512_loadu_si512(p); }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// v[r]: lower half = qgemm.cpp's Acc::v, upper half = Acc::w; c[r] = Acc::c.
template <int R>
struct Acc512 {
  __m512 v[R];
  float c[R];
  Acc512() { for (int r = 0; r < R; ++r) { v[r] = _mm512_setzero_ps(); c[r] = 0.f; } }
  void store(float* out, int64_t stride) const {
    for (int r = 0; r < R; ++r)
      out[r * stride] = hsum(_mm256_add_ps(_mm512_castps512_ps256(v[r]), _mm512_extractf32x8_ps(v[r], 1))) + c[r];
  }
};

// The 32 unsigned codes of one block of a 32-value type (value = scale * (u - off) [+ min]).
template <int T>
inline __m256i codes32(const uint8_t* wb) {
  constexpr bool has_min = T == Q4_1 || T == Q5_1;
  constexpr bool five = T == Q5_0 || T == Q5_1;
  if constexpr (T == Q5_0_U8) {
    return _mm256_loadu_si256((const __m256i*)(wb + 2));
  } else {
    const uint8_t* qs = wb + (has_min ? 4 : 2) + (five ? 4 : 0);
    __m256i u = nibbles_32(qs);
    if constexpr (five)
      u = _mm256_or_si256(u, _mm256_and_si256(bits_32(wb + (has_min ? 4 : 2)), _mm256_set1_epi8(0x10)));
    return u;
  }
}

template <int T, int R>
void dot_row512(const uint8_t* w, const Act& a, int64_t row0, float* out, int64_t out_stride) {
  Acc512<R> acc;
  const int64_t K = a.K, nb32 = K / 32, nb16 = K / 16;
  const int8_t* aq[R]; const float* ad[R]; const float* dx[R]; const int32_t* as[R]; const int32_t* an[R];
  for (int r = 0; r < R; ++r) {
    aq[r] = a.q + (row0 + r) * K; ad[r] = a.d + (row0 + r) * nb32; as[r] = a.s + (row0 + r) * nb16;
    dx[r] = a.dx + (row0 + r) * nb32 * 8; an[r] = a.ns4 + (row0 + r) * (K / 4);
  }
  const __m512i zero = _mm512_setzero_si512();
  if constexpr (T == Q8_0 || T == Q8_0_SYM) {
    // |w| x (a with the sign of w): the exact integer dot product for either Q8_0 flavour.
    constexpr int BB = 34;
    auto pair = [&](const uint8_t* wb, int64_t j) {
      const __m512i qw = join(_mm256_loadu_si256((const __m256i*)(wb + 2)),
                              _mm256_loadu_si256((const __m256i*)(wb + BB + 2)));
      const __mmask64 neg = _mm512_movepi8_mask(qw);
      const __m512i aw = _mm512_abs_epi8(qw);
      const __m512 ws = pair_ps(h2f(rd16(wb)), h2f(rd16(wb + BB)));
      for (int r = 0; r < R; ++r) {
        const __m512i qa = load512(aq[r] + j * 32);
        const __m512i p = dpbusd(aw, _mm512_mask_sub_epi8(qa, neg, zero, qa));
        const __m512 s = _mm512_mul_ps(ws, _mm512_loadu_ps(dx[r] + j * 8));
        acc.v[r] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(p), acc.v[r]);
      }
    };
    int64_t j = 0;
    for (; j + 2 <= nb32; j += 2, w += 2 * BB) pair(w, j);
    for (; j < nb32; ++j, w += BB) {  // a last odd block: lower half only
      const __m512i qw = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(w + 2)));
      const __mmask64 neg = _mm512_movepi8_mask(qw) & 0xFFFFFFFFull;
      const __m512i aw = _mm512_maskz_abs_epi8(0xFFFFFFFFull, qw);
      const float dw = h2f(rd16(w));
      for (int r = 0; r < R; ++r) {
        const __m512i qa = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(aq[r] + j * 32)));
        const __m512i p = dpbusd(aw, _mm512_mask_sub_epi8(qa, neg, zero, qa));
        acc.v[r] = _mm512_mask3_fmadd_ps(_mm512_set1_ps(dw * ad[r][j]), _mm512_cvtepi32_ps(p), acc.v[r], 0x00FF);
      }
    }
  } else if constexpr (T == Q4_0 || T == Q5_0 || T == Q4_1 || T == Q5_1 || T == Q5_0_U8) {
    constexpr int BB = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : T == Q5_1 ? 24 : 34;
    constexpr bool has_min = T == Q4_1 || T == Q5_1;
    constexpr int off_shift = T == Q4_0 ? 3 : 4;  // offsets 8 (Q4_0) and 16 (Q5_0, Q5_0_U8)
    // sum (u - off) a, exactly: the dot product starts from -off * (sums of 4 codes)
    auto start = [&](int r, int64_t j) {
      if constexpr (has_min) return zero;
      else return _mm512_slli_epi32(load512(an[r] + 8 * j), off_shift);
    };
    auto min_term = [&](const uint8_t* wb, int64_t j, int r) {  // Q4_1 / Q5_1, as qgemm.cpp
      if constexpr (has_min) acc.c[r] += h2f(rd16(wb + 2)) * ad[r][j] * float(as[r][2 * j] + as[r][2 * j + 1]);
    };
    int64_t j = 0;
    for (; j + 2 <= nb32; j += 2, w += 2 * BB) {
      const __m512i u = join(codes32<T>(w), codes32<T>(w + BB));
      const __m512 ws = pair_ps(h2f(rd16(w)), h2f(rd16(w + BB)));
      for (int r = 0; r < R; ++r) {
        const __m512i p = _mm512_dpbusd_epi32(start(r, j), u, load512(aq[r] + j * 32));
        const __m512 s = _mm512_mul_ps(ws, _mm512_loadu_ps(dx[r] + j * 8));
        acc.v[r] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(p), acc.v[r]);
        min_term(w, j, r);
        min_term(w + BB, j + 1, r);
      }
    }
    for (; j < nb32; ++j, w += BB) {
      const __m512i u = _mm512_castsi256_si512(codes32<T>(w));
      const float dw = h2f(rd16(w));
      for (int r = 0; r < R; ++r) {
        const __m512i qa = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(aq[r] + j * 32)));
        __m512i st = zero;
        if constexpr (!has_min)
          st = _mm512_castsi256_si512(_mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(an[r] + 8 * j)), off_shift));
        const __m512i p = _mm512_dpbusd_epi32(st, u, qa);
        acc.v[r] = _mm512_mask3_fmadd_ps(_mm512_set1_ps(dw * ad[r][j]), _mm512_cvtepi32_ps(p), acc.v[r], 0x00FF);
        min_term(w, j, r);
      }
    }
  } else if constexpr (T == Q4_K) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m256 mins[R];
    for (int r = 0; r < R; ++r) mins[r] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; ++sb, w += 144) {
      const float d = h2f(rd16(w));
      add_mins_k4<R>(w, a.das + row0 * nb32, nb32, sb, mins);
      const uint8_t* scales = w + 4;
      const uint8_t* qs = w + 16;
      for (int p = 0; p < 4; ++p) {
        // low nibbles of the 32 bytes (block j0) below, high nibbles (block j0 + 1) above
        __m512i u = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(qs + 32 * p)));
        u = _mm512_and_si512(_mm512_mask_srli_epi16(u, 0xFFFF0000u, u, 4), m4);
        uint8_t sc0, m0, sc1, m1;
        scale_min_k4(2 * p, scales, &sc0, &m0);
        scale_min_k4(2 * p + 1, scales, &sc1, &m1);
        (void)m0; (void)m1;
        const __m512 ws = pair_ps(d * sc0, d * sc1);
        const int64_t j0 = sb * 8 + 2 * p;
        for (int r = 0; r < R; ++r) {
          const __m512i pr = dpbusd(u, load512(aq[r] + j0 * 32));
          const __m512 s = _mm512_mul_ps(ws, _mm512_loadu_ps(dx[r] + j0 * 8));
          acc.v[r] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(pr), acc.v[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) acc.c[r] = -hsum(mins[r]);
  } else if constexpr (T == Q6_K) {
    const __m128i rep4 = _mm_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int64_t sb = 0; sb < K / 256; ++sb, w += 210) {
      const float d = h2f(rd16(w + 208));
      const int8_t* sc = (const int8_t*)(w + 192);
      const __m512 dv = _mm512_set1_ps(d);
      for (int half = 0; half < 2; ++half) {
        const uint8_t* ql = w + 64 * half;
        const uint8_t* qh = w + 128 + 32 * half;
        __m256i u[4];
        unpack_q6k_half(ql, qh, u);
        const int8_t* scs = sc + 8 * half;
        for (int k = 0; k < 4; k += 2) {  // blocks k (lower half) and k + 1 (upper half)
          const __m512i uk = join(u[k], u[k + 1]);
          int32_t s4; std::memcpy(&s4, scs + 2 * k, 4);  // sA, sB of block k, then of block k + 1
          const __m512i scv = _mm512_cvtepi8_epi32(_mm_shuffle_epi8(_mm_cvtsi32_si128(s4), rep4));
          const int64_t j = sb * 8 + half * 4 + k;
          for (int r = 0; r < R; ++r) {
            // sc * sum (u - 32) a per 16 values, exactly
            const __m512i st = _mm512_slli_epi32(load512(an[r] + 8 * j), 5);
            const __m512i p = _mm512_mullo_epi32(_mm512_dpbusd_epi32(st, uk, load512(aq[r] + j * 32)), scv);
            const __m512 s = _mm512_mul_ps(dv, _mm512_loadu_ps(dx[r] + j * 8));
            acc.v[r] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(p), acc.v[r]);
          }
        }
      }
    }
  }
  acc.store(out, out_stride);
}

template <int T, int R>
inline void rows_tile(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t r0) {
  for (int64_t n = n0; n < n1; ++n)
    dot_row512<T, R>(m.w + n * m.row_bytes, a, r0, m.out + r0 * m.N + n, m.N);
}

template <int T>
void rows_all(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t M) {
  // 32 vector registers: activation tiles of up to 8 rows share each unpacked weight pair.
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t ne = imin(n1, nb + 16);
    int64_t r = 0;
    for (; r + GL_TILE <= M; r += GL_TILE) rows_tile<T, GL_TILE>(m, nb, ne, a, r);
    switch (M - r) {
#if GL_TILE > 4
      case 7: rows_tile<T, 7>(m, nb, ne, a, r); break;
      case 6: rows_tile<T, 6>(m, nb, ne, a, r); break;
      case 5: rows_tile<T, 5>(m, nb, ne, a, r); break;
      case 4: rows_tile<T, 4>(m, nb, ne, a, r); break;
#endif
      case 3: rows_tile<T, 3>(m, nb, ne, a, r); break;
      case 2: rows_tile<T, 2>(m, nb, ne, a, r); break;
      case 1: rows_tile<T, 1>(m, nb, ne, a, r); break;
      default: break;
    }
  }
}

}  // namespace

void run_rows_avx512(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t M) {
  switch (m.type) {
#define GL_CASE(T) case T: return rows_all<T>(m, n0, n1, a, M);
    GL_FOR_EACH_KERNEL_TYPE(GL_CASE)
#undef GL_CASE
  }
}

}  // namespace gl
