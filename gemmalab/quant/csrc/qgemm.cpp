// Dot-product kernels of quantized weight rows against 8-bit activation rows. See qgemm.h.
#include "qgemm.h"

#include <algorithm>

namespace gl {

void quantize_rows(const float* x, int64_t m0, int64_t m1, int64_t K, int8_t* q, uint8_t* qabs, float* d, int32_t* s,
                   int32_t* ns4, float* das) {
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * K;
    int8_t* qr = q + m * K;
    for (int64_t j = 0; j < K / 32; ++j) {
      const float* xb = xr + j * 32;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_mask, v[i]));
      }
      __m128 mx = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      mx = _mm_max_ps(mx, _mm_movehl_ps(mx, mx));
      mx = _mm_max_ss(mx, _mm_movehdup_ps(mx));
      const float dm = _mm_cvtss_f32(mx) / 127.f;
      d[m * (K / 32) + j] = dm;
      const __m256 id = _mm256_set1_ps(dm != 0.f ? 1.f / dm : 0.f);
      __m256i iv[4];
      for (int i = 0; i < 4; ++i)  // round half to even, like nearbyint
        iv[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], id),
                                                   _MM_ROUND_NEAREST | _MM_FROUND_NO_EXC));
      // int32 -> int16 -> int8 with the lane shuffles that undo packs' 128-bit interleave
      __m256i p01 = _mm256_packs_epi32(iv[0], iv[1]);
      __m256i p23 = _mm256_packs_epi32(iv[2], iv[3]);
      __m256i p = _mm256_packs_epi16(p01, p23);
      p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i*)(qr + j * 32), p);
      _mm256_storeu_si256((__m256i*)(qabs + m * K + j * 32), _mm256_sign_epi8(p, p));
      // sums of each half block (16 codes)
      __m256i h01 = _mm256_add_epi32(iv[0], iv[1]);
      __m256i h23 = _mm256_add_epi32(iv[2], iv[3]);
      __m128i a = _mm_add_epi32(_mm256_castsi256_si128(h01), _mm256_extracti128_si256(h01, 1));
      __m128i b = _mm_add_epi32(_mm256_castsi256_si128(h23), _mm256_extracti128_si256(h23, 1));
      __m128i ab = _mm_hadd_epi32(a, b);  // a0+a1, a2+a3, b0+b1, b2+b3
      ab = _mm_hadd_epi32(ab, ab);        // sum a, sum b
      s[m * (K / 16) + 2 * j] = _mm_cvtsi128_si32(ab);
      s[m * (K / 16) + 2 * j + 1] = _mm_extract_epi32(ab, 1);
      // -(sums of groups of 4 codes), in the lane order of a dot product of the block
      const __m256i s4 = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, p), ones16);
      _mm256_storeu_si256((__m256i*)(ns4 + m * (K / 4) + 8 * j), _mm256_sub_epi32(_mm256_setzero_si256(), s4));
      das[m * (K / 32) + j] = dm * float(_mm_cvtsi128_si32(ab) + _mm_extract_epi32(ab, 1));
    }
  }
}

// The accumulators of R rows: two vector parts (even and odd blocks, so that consecutive FMAs do
// not wait on each other's 5-cycle latency; hsum at the end) and a scalar part (offset terms).
template <int R>
struct Acc {
  __m256 v[R], w[R];
  float c[R];
  Acc() { for (int r = 0; r < R; ++r) { v[r] = _mm256_setzero_ps(); w[r] = _mm256_setzero_ps(); c[r] = 0.f; } }
  void store(float* out, int64_t stride) const {
    for (int r = 0; r < R; ++r) out[r * stride] = hsum(_mm256_add_ps(v[r], w[r])) + c[r];
  }
};

// Unsigned-code blocks of 32 with one scale, value = dw * (u - off): Q4_0 (off 8), Q5_0 (off 16).
// Signed Q8_0 uses the sign trick (|w| x sign(a, w)) instead of an offset.
template <int T, int R>
void dot_row(const uint8_t* w, const Act& a, int64_t row0, float* out, int64_t out_stride) {
  Acc<R> acc;
  const int64_t K = a.K, nb32 = K / 32, nb16 = K / 16;
  const int8_t* aq[R]; const float* ad[R]; const int32_t* as[R]; const int32_t* an[R];
  for (int r = 0; r < R; ++r) {
    aq[r] = a.q + (row0 + r) * K; ad[r] = a.d + (row0 + r) * nb32; as[r] = a.s + (row0 + r) * nb16;
    an[r] = a.ns4 + (row0 + r) * (K / 4);
  }
  if constexpr (T == Q8_0) {
    auto step = [&](const uint8_t* wb, int64_t j, __m256* accs) {
      const __m256i qw = _mm256_loadu_si256((const __m256i*)(wb + 2));
      const __m256i aw = _mm256_sign_epi8(qw, qw);
      const float dw = h2f(rd16(wb));
      for (int r = 0; r < R; ++r) {
        __m256i qa = _mm256_loadu_si256((const __m256i*)(aq[r] + j * 32));
        __m256i p = dot_u8s8(aw, _mm256_sign_epi8(qa, qw));
        accs[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ad[r][j]), _mm256_cvtepi32_ps(p), accs[r]);
      }
    };
    int64_t j = 0;
    for (; j + 2 <= nb32; j += 2, w += 68) { step(w, j, acc.v); step(w + 34, j + 1, acc.w); }
    for (; j < nb32; ++j, w += 34) step(w, j, acc.v);
  } else if constexpr (T == Q8_0_SYM) {
    const uint8_t* ab[R];
    for (int r = 0; r < R; ++r) ab[r] = a.qabs + (row0 + r) * K;
    auto step = [&](const uint8_t* wb, int64_t j, __m256* accs) {
      const __m256i qw = _mm256_loadu_si256((const __m256i*)(wb + 2));
      const float dw = h2f(rd16(wb));
      for (int r = 0; r < R; ++r) {
        const __m256i qa = _mm256_loadu_si256((const __m256i*)(aq[r] + j * 32));
        const __m256i ua = _mm256_loadu_si256((const __m256i*)(ab[r] + j * 32));
        const __m256i p = dot_u8s8(ua, _mm256_sign_epi8(qw, qa));
        accs[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ad[r][j]), _mm256_cvtepi32_ps(p), accs[r]);
      }
    };
    int64_t j = 0;
    for (; j + 2 <= nb32; j += 2, w += 68) { step(w, j, acc.v); step(w + 34, j + 1, acc.w); }
    for (; j < nb32; ++j, w += 34) step(w, j, acc.v);
  } else if constexpr (T == Q5_0_U8) {
    auto step = [&](const uint8_t* wb, int64_t j, __m256* accs) {
      const float dw = h2f(rd16(wb));
      const __m256i u = _mm256_loadu_si256((const __m256i*)(wb + 2));
      for (int r = 0; r < R; ++r) {
        __m256i qa = _mm256_loadu_si256((const __m256i*)(aq[r] + j * 32));
        // sum (u - 16) a, exactly, in int32 lanes
        const __m256i p = _mm256_add_epi32(dot_u8s8(u, qa),
            _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(an[r] + 8 * j)), 4));
        accs[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * ad[r][j]), _mm256_cvtepi32_ps(p), accs[r]);
      }
    };
    int64_t j = 0;
    for (; j + 2 <= nb32; j += 2, w += 68) { step(w, j, acc.v); step(w + 34, j + 1, acc.w); }
    for (; j < nb32; ++j, w += 34) step(w, j, acc.v);
  } else if constexpr (T == Q4_0 || T == Q5_0 || T == Q4_1 || T == Q5_1) {
    constexpr int BB = T == Q4_0 ? 18 : T == Q4_1 ? 20 : T == Q5_0 ? 22 : 24;
    constexpr bool has_min = T == Q4_1 || T == Q5_1;
    constexpr bool five = T == Q5_0 || T == Q5_1;
    constexpr int off_shift = T == Q4_0 ? 3 : 4;  // offsets 8 (Q4_0) and 16 (Q5_0)
    auto step = [&](const uint8_t* wb, int64_t j, __m256* accs) {
      const float dw = h2f(rd16(wb));
      const float mw = has_min ? h2f(rd16(wb + 2)) : 0.f;
      const uint8_t* qs = wb + (has_min ? 4 : 2) + (five ? 4 : 0);
      __m256i u = nibbles_32(qs);
      if constexpr (five)
        u = _mm256_or_si256(u, _mm256_and_si256(bits_32(wb + (has_min ? 4 : 2)), _mm256_set1_epi8(0x10)));
      for (int r = 0; r < R; ++r) {
        __m256i qa = _mm256_loadu_si256((const __m256i*)(aq[r] + j * 32));
        __m256i p = dot_u8s8(u, qa);
        const float da = ad[r][j];
        if constexpr (!has_min)  // sum (u - off) a, exactly
          p = _mm256_add_epi32(p, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(an[r] + 8 * j)), off_shift));
        accs[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * da), _mm256_cvtepi32_ps(p), accs[r]);
        if constexpr (has_min) acc.c[r] += mw * da * float(as[r][2 * j] + as[r][2 * j + 1]);
      }
    };
    int64_t j = 0;
    for (; j + 2 <= nb32; j += 2, w += 2 * BB) { step(w, j, acc.v); step(w + BB, j + 1, acc.w); }
    for (; j < nb32; ++j, w += BB) step(w, j, acc.v);
  } else if constexpr (T == Q4_K) {
    // 256 values / 144 bytes: d, dmin, scales[12], qs[128]; value = d*sc_j*u - dmin*m_j.
    // The minimums: sum_j dmin*m_j * (d_a,j * sum of block j's codes), 8 lanes per super-block.
    __m256 mins[R];
    for (int r = 0; r < R; ++r) mins[r] = _mm256_setzero_ps();
    for (int64_t sb = 0; sb < K / 256; ++sb, w += 144) {
      const float d = h2f(rd16(w));
      add_mins_k4<R>(w, a.das + row0 * nb32, nb32, sb, mins);
      const uint8_t* scales = w + 4;
      const uint8_t* qs = w + 16;
      for (int p = 0; p < 4; ++p) {
        const __m256i q4 = _mm256_loadu_si256((const __m256i*)(qs + 32 * p));
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        const __m256i lo = _mm256_and_si256(q4, m4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
        uint8_t sc0, m0, sc1, m1;
        scale_min_k4(2 * p, scales, &sc0, &m0);
        scale_min_k4(2 * p + 1, scales, &sc1, &m1);
        (void)m0; (void)m1;
        const int64_t j0 = sb * 8 + 2 * p;  // activation block of the low nibbles
        for (int r = 0; r < R; ++r) {
          const __m256i a0 = _mm256_loadu_si256((const __m256i*)(aq[r] + j0 * 32));
          const __m256i a1 = _mm256_loadu_si256((const __m256i*)(aq[r] + j0 * 32 + 32));
          const float da0 = ad[r][j0], da1 = ad[r][j0 + 1];
          acc.v[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * sc0 * da0), _mm256_cvtepi32_ps(dot_u8s8(lo, a0)), acc.v[r]);
          acc.w[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * sc1 * da1), _mm256_cvtepi32_ps(dot_u8s8(hi, a1)), acc.w[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r) acc.c[r] = -hsum(mins[r]);
  } else if constexpr (T == Q6_K) {
    // 256 values / 210 bytes: ql[128], qh[64], scales int8[16], d; value = d*sc*(u - 32),
    // one scale per 16 values. Each half of 128 values is four 32-value runs built from ql/qh.
    for (int64_t sb = 0; sb < K / 256; ++sb, w += 210) {
      const float d = h2f(rd16(w + 208));
      const int8_t* sc = (const int8_t*)(w + 192);
      for (int half = 0; half < 2; ++half) {
        const uint8_t* ql = w + 64 * half;
        const uint8_t* qh = w + 128 + 32 * half;
        __m256i u[4];
        unpack_q6k_half(ql, qh, u);
        const int8_t* scs = sc + 8 * half;
        for (int k = 0; k < 4; ++k) {
          const int sA = scs[2 * k], sB = scs[2 * k + 1];
          const __m256i scv = _mm256_set_m128i(_mm_set1_epi32(sB), _mm_set1_epi32(sA));
          const int64_t j = sb * 8 + half * 4 + k;  // activation block
          for (int r = 0; r < R; ++r) {
            const __m256i qa = _mm256_loadu_si256((const __m256i*)(aq[r] + j * 32));
            // sc * sum (u - 32) a per 16 values, exactly
            const __m256i p = _mm256_mullo_epi32(_mm256_add_epi32(dot_u8s8(u[k], qa),
                _mm256_slli_epi32(_mm256_loadu_si256((const __m256i*)(an[r] + 8 * j)), 5)), scv);
            const float da = ad[r][j];
            __m256& av = (k & 1) ? acc.w[r] : acc.v[r];
            av = _mm256_fmadd_ps(_mm256_set1_ps(d * da), _mm256_cvtepi32_ps(p), av);
          }
        }
      }
    }
  }
  acc.store(out, out_stride);
}

#define GL_INSTANTIATE(T) \
  template void dot_row<T, 1>(const uint8_t*, const Act&, int64_t, float*, int64_t); \
  template void dot_row<T, 2>(const uint8_t*, const Act&, int64_t, float*, int64_t); \
  template void dot_row<T, 3>(const uint8_t*, const Act&, int64_t, float*, int64_t); \
  template void dot_row<T, 4>(const uint8_t*, const Act&, int64_t, float*, int64_t);
GL_INSTANTIATE(Q4_0)
GL_INSTANTIATE(Q4_1)
GL_INSTANTIATE(Q5_0)
GL_INSTANTIATE(Q5_1)
GL_INSTANTIATE(Q8_0)
GL_INSTANTIATE(Q4_K)
GL_INSTANTIATE(Q6_K)
GL_INSTANTIATE(Q5_0_U8)
GL_INSTANTIATE(Q8_0_SYM)

// ---- row loops --------------------------------------------------------------------------------
namespace {
template <int T, int R>
inline void rows_tile(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t r0) {
  for (int64_t n = n0; n < n1; ++n)
    dot_row<T, R>(m.w + n * m.row_bytes, a, r0, m.out + r0 * m.N + n, m.N);
}

template <int T>
void rows_all(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t M) {
  // Weight rows in blocks of 16 stay in L1 while the activation rows stream past in tiles of 4.
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t ne = std::min(n1, nb + 16);
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) rows_tile<T, 4>(m, nb, ne, a, r);
    switch (M - r) {
      case 3: rows_tile<T, 3>(m, nb, ne, a, r); break;
      case 2: rows_tile<T, 2>(m, nb, ne, a, r); break;
      case 1: rows_tile<T, 1>(m, nb, ne, a, r); break;
      default: break;
    }
  }
}

}  // namespace

void run_rows_avx2(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t M) {
  switch (m.type) {
#define GL_CASE(T) case T: return rows_all<T>(m, n0, n1, a, M);
    GL_FOR_EACH_KERNEL_TYPE(GL_CASE)
#undef GL_CASE
  }
  
}


void expand_scales(const float* d, int64_t nblocks, float* dx) {
  for (int64_t j = 0; j < nblocks; ++j) _mm256_storeu_ps(dx + 8 * j, _mm256_set1_ps(d[j]));
}

void repack_q5_0_row(const uint8_t* src, int64_t K, uint8_t* dst) {
  for (int64_t j = 0; j < K / 32; ++j, src += 22, dst += 34) {
    dst[0] = src[0]; dst[1] = src[1];
    uint32_t qh; std::memcpy(&qh, src + 2, 4);
    for (int i = 0; i < 16; ++i) {
      dst[2 + i] = (src[6 + i] & 0xF) | (((qh >> i) & 1) << 4);
      dst[2 + i + 16] = (src[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
    }
  }
}

void quantize_row_q8_0(const float* x, int64_t K, uint8_t* dst) {
  for (int64_t j = 0; j < K / 32; ++j, x += 32, dst += 34) {
    float amax = 0.f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.f, id = d != 0.f ? 1.f / d : 0.f;
    const uint16_t dh = _cvtss_sh(d, 0);
    std::memcpy(dst, &dh, 2);
    for (int i = 0; i < 32; ++i) dst[2 + i] = uint8_t(int8_t(std::nearbyint(x[i] * id)));
  }
}

void dequant_row(int type, const uint8_t* w, int64_t K, float* out) {
  switch (type) {
    case F32: std::memcpy(out, w, K * 4); return;
    case F16: for (int64_t i = 0; i < K; ++i) out[i] = h2f(rd16(w + 2 * i)); return;
    case BF16:
      for (int64_t i = 0; i < K; ++i) { uint32_t b = uint32_t(rd16(w + 2 * i)) << 16; std::memcpy(out + i, &b, 4); }
      return;
    case Q8_0: case Q8_0_SYM:
      for (int64_t j = 0; j < K / 32; ++j, w += 34) {
        const float d = h2f(rd16(w));
        for (int i = 0; i < 32; ++i) out[j * 32 + i] = d * float(int8_t(w[2 + i]));
      }
      return;
    case Q5_0_U8:
      for (int64_t j = 0; j < K / 32; ++j, w += 34) {
        const float d = h2f(rd16(w));
        for (int i = 0; i < 32; ++i) out[j * 32 + i] = d * float(int(w[2 + i]) - 16);
      }
      return;
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: {
      const bool has_min = type == Q4_1 || type == Q5_1, five = type == Q5_0 || type == Q5_1;
      const int bb = block_bytes(type);
      for (int64_t j = 0; j < K / 32; ++j, w += bb) {
        const float d = h2f(rd16(w)), m = has_min ? h2f(rd16(w + 2)) : 0.f;
        uint32_t qh = 0;
        if (five) std::memcpy(&qh, w + (has_min ? 4 : 2), 4);
        const uint8_t* qs = w + (has_min ? 4 : 2) + (five ? 4 : 0);
        const int off = has_min ? 0 : (five ? 16 : 8);
        for (int i = 0; i < 16; ++i) {
          int lo = qs[i] & 0xF, hi = qs[i] >> 4;
          if (five) { lo |= ((qh >> i) & 1) << 4; hi |= ((qh >> (i + 16)) & 1) << 4; }
          out[j * 32 + i] = has_min ? d * lo + m : d * float(lo - off);
          out[j * 32 + i + 16] = has_min ? d * hi + m : d * float(hi - off);
        }
      }
      return;
    }
    case Q4_K:
      for (int64_t sb = 0; sb < K / 256; ++sb, w += 144) {
        const float d = h2f(rd16(w)), dmin = h2f(rd16(w + 2));
        const uint8_t* qs = w + 16;
        for (int p = 0; p < 4; ++p) {
          uint8_t sc0, m0, sc1, m1;
          scale_min_k4(2 * p, w + 4, &sc0, &m0);
          scale_min_k4(2 * p + 1, w + 4, &sc1, &m1);
          const float d0 = d * sc0, mm0 = dmin * m0, d1 = d * sc1, mm1 = dmin * m1;
          float* o = out + sb * 256 + 64 * p;
          for (int i = 0; i < 32; ++i) {
            o[i] = d0 * float(qs[32 * p + i] & 0xF) - mm0;
            o[i + 32] = d1 * float(qs[32 * p + i] >> 4) - mm1;
          }
        }
      }
      return;
    case Q6_K:
      for (int64_t sb = 0; sb < K / 256; ++sb, w += 210) {
        const float d = h2f(rd16(w + 208));
        const int8_t* sc = (const int8_t*)(w + 192);
        for (int half = 0; half < 2; ++half) {
          const uint8_t* ql = w + 64 * half;
          const uint8_t* qh = w + 128 + 32 * half;
          float* o = out + sb * 256 + 128 * half;
          const int8_t* s = sc + 8 * half;
          for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            o[l] = d * float(s[is]) * q1;
            o[l + 32] = d * float(s[is + 2]) * q2;
            o[l + 64] = d * float(s[is + 4]) * q3;
            o[l + 96] = d * float(s[is + 6]) * q4;
          }
        }
      }
      return;
  }
}

}  // namespace gl
