// The AMX variant of the dot-product kernels (chosen at run time, see gemmalab/quant/kernels.py;
// this file is compiled for AMX-TILE/AMX-INT8 + AVX-512 through the pragma below and only ever
// called on CPUs that report those flags, after the kernel granted this process the tile data
// state). Everything here has internal linkage except the functions declared in qgemm.h, for the
// reason given at the top of qgemm_avx512.cpp.
//
// What it changes: the AVX2/AVX-512 kernels keep 8 int32 lanes of partial sums per block of 32 and
// scale each lane (convert, multiply by the two scales, FMA), i.e. ~3 vector ops per (weight row,
// activation row, block), which is what bounds a batch of 8 rows. Here one AMX tile product gives
// the whole integer sum of a block for 16 weight rows x up to 16 activation rows at once:
//   A tile: 16 weight rows x the 32 codes of block j, loaded straight from the GGUF block layout
//           (stride = row bytes; Q8_0 / Q8_0_SYM / Q5_0_U8 keep one code per byte);
//   B tile: the activation codes of block j in VNNI layout (8 rows of 4 codes x up to 16 activation
//           rows), re-laid once per call (expand_act_amx: M*K bytes);
//   C tile: 16 x mt int32, the exact block sums (tdpbssd for the signed Q8_0 codes; tdpbusd for the
//           unsigned Q5_0_U8 codes, starting from -16 x the activation block's code sum, loaded as
//           a stride-0 tile, so C = sum (u - 16) a exactly).
// C is stored to L1 and scaled 16 values per 512-bit vector: out[n, i] = sum over j, in order, of
// fma(dw[n, j] * da[i, j], float(C_j[n, i]), .) in fp32, accumulators held in registers across K.
// One value per block instead of 8 lanes: ~8x less fp32 work, and a different rounding from the
// other variants (not bit-identical to them; tests/test_isa.py states and checks the tolerance).
// Every output element's operations depend only on its own weight row and activation row, never
// on the batch size, the tiling, the chunking or the thread, so a row gets the same bits alone or
// in a batch; that is also why one activation row (single-stream decode) runs here too and not on
// the AVX-512 kernel (it is memory-bound either way, and the tile products cost nothing there).
//
// The other weight types (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q6_K) run the AVX-512 kernel of
// qgemm_avx512.cpp inside this variant (their codes need unpacking into a byte buffer first; not
// done yet), bit-identical to the avx512 variant for those types.
//
// Two tile sets (C, A, B) alternate between even and odd blocks, so that block j + 1's tile loads
// and product overlap the scaling of block j; the blocks are still scaled in order.
//
// Tiles: the configuration (palette 1, tiles sized for the activation tile) is loaded at the start
// of every run_rows_amx call and released at its end: the calling thread may have run other AMX
// code in between (oneDNN's bf16 matmuls reconfigure and release the tiles), and a released tile
// state costs nothing at context switches.
#pragma GCC target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#include "qgemm.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <string>
#include <utility>
#include <vector>

namespace gl {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // arch_prctl: request permission for a dynamic xstate
constexpr int kXfeatureXtiledata = 18;

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// Tile numbers (the intrinsics take them as constants): two sets, so that the tile products of
// block j + 1 run while the vector units scale block j.
#define GL_C0 0
#define GL_C1 1
#define GL_A0 2
#define GL_A1 3
#define GL_B0 4
#define GL_B1 5

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// C: 16 weight rows x mt int32; A: 16 weight rows x 32 codes; B: 8 rows of 4 codes x mt rows.
void configure(int mt) {
  TileConfig c{};
  c.palette_id = 1;
  for (int t : {GL_C0, GL_C1}) { c.rows[t] = 16; c.colsb[t] = uint16_t(mt * 4); }
  for (int t : {GL_A0, GL_A1}) { c.rows[t] = 16; c.colsb[t] = 32; }
  for (int t : {GL_B0, GL_B1}) { c.rows[t] = 8; c.colsb[t] = uint16_t(mt * 4); }
  // not _tile_loadconfig: GCC 12's version tells the compiler it reads 8 bytes of the 64, and the
  // stores of the rest may then be dropped (tiles left unconfigured: SIGILL)
  __asm__ volatile("ldtilecfg %0" ::"m"(c));
}

// perm<MT>::idx[v][l] = weight row of lane l of scaling vector v (C element e = 16 v + l is
// C[e / MT][e % MT]).
template <int MT>
struct Perm {
  alignas(64) int32_t idx[MT][16];
  Perm() { for (int v = 0; v < MT; ++v) for (int l = 0; l < 16; ++l) idx[v][l] = (16 * v + l) / MT; }
};

// Weight rows [0, nrows) of a group of 16 starting at w (row stride rb; rows nrows..15 must be
// readable and are computed and dropped), activation tile of MT rows; out (MT rows of stride N).
template <int T, int MT>
void group16(const uint8_t* w, int64_t rb, int64_t nb, const int8_t* vq, const float* dap, const int32_t* ns16,
             float* out, int64_t N, int64_t nrows) {
  static const Perm<MT> perm;
  __m512i idx[MT];
  __m512 acc[MT];
  for (int v = 0; v < MT; ++v) { idx[v] = _mm512_load_si512(perm.idx[v]); acc[v] = _mm512_setzero_ps(); }
  const __m512i rows = _mm512_mullo_epi32(_mm512_set1_epi32(int32_t(rb)),
                                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  alignas(64) int32_t cb0[16 * MT], cb1[16 * MT];
  // block j's exact integer sums for the 16 rows x MT activation rows, stored to cb
#define GL_ISSUE(C, A, B, j, cb)                                                          \
  do {                                                                                    \
    if constexpr (T == Q5_0_U8) _tile_loadd(C, ns16 + (j) * MT, 0);                       \
    else _tile_zero(C);                                                                   \
    _tile_loadd(A, w + 34 * (j) + 2, rb);                                                 \
    _tile_loadd(B, vq + (j) * 32 * MT, MT * 4);                                           \
    if constexpr (T == Q5_0_U8) _tile_dpbusd(C, A, B);                                    \
    else _tile_dpbssd(C, A, B);                                                           \
    _tile_stored(C, cb, MT * 4);                                                          \
  } while (0)
  auto scale = [&](int64_t j, const int32_t* cb) {
    // the 16 rows' fp16 scales of block j (the gather reads each row's first 4 bytes of the block)
    const __m512 dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_i32gather_epi32(rows, w + 34 * j, 1)));
    const float* da = dap + j * 16 * MT;
    for (int v = 0; v < MT; ++v) {
      const __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(idx[v], dw), _mm512_loadu_ps(da + 16 * v));
      acc[v] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(_mm512_load_si512(cb + 16 * v)), acc[v]);
    }
  };
  GL_ISSUE(GL_C0, GL_A0, GL_B0, 0, cb0);
  for (int64_t j = 0; j < nb; j += 2) {  // the blocks are scaled in order: 0, 1, 2, ...
    if (j + 1 < nb) GL_ISSUE(GL_C1, GL_A1, GL_B1, j + 1, cb1);
    scale(j, cb0);
    if (j + 1 < nb) {
      if (j + 2 < nb) GL_ISSUE(GL_C0, GL_A0, GL_B0, j + 2, cb0);
      scale(j + 1, cb1);
    }
  }
#undef GL_ISSUE
  alignas(64) float res[16 * MT];
  for (int v = 0; v < MT; ++v) _mm512_store_ps(res + 16 * v, acc[v]);
  for (int64_t n = 0; n < nrows; ++n)
    for (int i = 0; i < MT; ++i) out[i * N + n] = res[n * MT + i];
}

using GroupFn = void (*)(const uint8_t*, int64_t, int64_t, const int8_t*, const float*, const int32_t*, float*,
                         int64_t, int64_t);

template <int T, int... MTs>
constexpr auto group_table(std::integer_sequence<int, MTs...>) {
  return std::array<GroupFn, sizeof...(MTs)>{&group16<T, MTs + 1>...};
}

template <int T>
void rows_amx(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t M) {
  static constexpr auto table = group_table<T>(std::make_integer_sequence<int, 16>{});
  const int64_t K = a.K, nb = K / 32, rb = m.row_bytes;
  thread_local std::vector<uint8_t> pad;  // the last rows of the matrix, padded to 16 rows
  for (int64_t r0 = 0; r0 < M; r0 += 16) {
    const int mt = int(imin(16, M - r0));
    configure(mt);
    const int8_t* vq = a.vq + r0 * K;
    const float* dap = a.dap + r0 * nb * 16;
    const int32_t* ns16 = a.ns16 + r0 * nb;
    for (int64_t n = n0; n < n1; n += 16) {
      const uint8_t* w = m.w + n * rb;
      // The next group's 16 rows (contiguous, 16 x row bytes) into L1 while this one computes:
      // one row of the LM head (178 MB of Q8_0) went from 10.3-11.5 ms to 8.6-9.3 ms on the
      // Sapphire Rapids Xeon (2 threads), where the hardware prefetcher alone reached 16 GB/s of
      // the 26 GB/s the two cores stream; two groups ahead or into L2 measured worse.
      if (n + 16 < n1) {
        const char* p = reinterpret_cast<const char*>(w + 16 * rb);
        for (int64_t o = 0; o < 16 * rb; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
      }
      if (n + 16 > m.N) {  // tile loads of 16 rows would read past the weights
        pad.assign(16 * rb, 0);
        std::memcpy(pad.data(), w, (m.N - n) * rb);
        w = pad.data();
      }
      table[mt - 1](w, rb, nb, vq, dap, ns16, m.out + r0 * m.N + n, m.N, imin(16, n1 - n));
    }
  }
  _tile_release();
}

}  // namespace

void run_rows_amx(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t M) {
  switch (m.type) {
    case Q8_0: return rows_amx<Q8_0>(m, n0, n1, a, M);
    case Q8_0_SYM: return rows_amx<Q8_0>(m, n0, n1, a, M);  // same bytes; tdpbssd needs no sign trick
    case Q5_0_U8: return rows_amx<Q5_0_U8>(m, n0, n1, a, M);
    default: return run_rows_avx512(m, n0, n1, a, M);
  }
}

void expand_act_amx(const int8_t* q, const float* d, const int32_t* s, int64_t M, int64_t K, int8_t* vq, float* dap,
                    int32_t* ns16) {
  const int64_t nb = K / 32;
  for (int64_t t0 = 0; t0 < M; t0 += 16) {
    const int64_t mt = imin(16, M - t0);
    for (int64_t j = 0; j < nb; ++j) {
      int8_t* dst = vq + t0 * K + j * 32 * mt;
      for (int64_t k4 = 0; k4 < 8; ++k4)
        for (int64_t i = 0; i < mt; ++i) std::memcpy(dst + (k4 * mt + i) * 4, q + (t0 + i) * K + 32 * j + 4 * k4, 4);
      float* da = dap + t0 * nb * 16 + j * 16 * mt;
      for (int64_t e = 0; e < 16 * mt; ++e) da[e] = d[(t0 + e % mt) * nb + j];
      for (int64_t i = 0; i < mt; ++i)
        ns16[t0 * nb + j * mt + i] = -16 * (s[(t0 + i) * (K / 16) + 2 * j] + s[(t0 + i) * (K / 16) + 2 * j + 1]);
    }
  }
}

const char* amx_permission_error() {
  static const std::string err = [] {
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0) return std::string();
    return std::string("the Linux kernel refused the AMX tile data state (arch_prctl(ARCH_REQ_XCOMP_PERM, "
                       "XFEATURE_XTILEDATA): ") + std::strerror(errno) + "; Linux 5.16 or later is needed)";
  }();
  return err.empty() ? nullptr : err.c_str();
}

}  // namespace gl
