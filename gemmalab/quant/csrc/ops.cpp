// PyTorch operators (torch.ops.gemmalab.*) over the quantized kernels of qgemm.cpp:
//   qlinear          y = x W^T for GGUF-block weights (activations quantized to 8 bits per 32)
//   qlinear_multi    several weights sharing one input (q/k/v, gate/up): one quantization, one
//                    parallel region
//   dequantize       weight rows -> fp32 (the embedding lookup, prefill, tests)
//   rmsnorm          x * rsqrt(mean(x^2) + eps) * (1 + w)
//   decode_attention one query per row against a KV cache whose slots carry absolute positions
//   decode_layer     a whole Gemma 3 / Gemma 2 block for one new token per row, in one call,
//                    optionally with LoRA side paths (fp32) on its projections
//   lora_add         y + scale * B (A x), the side path decode_layer adds
//   rope, gelu_mul   decode_layer's RoPE and GeGLU on their own (the op-by-op adapter step)
// All fp32, CPU, contiguous. Threads: ATen's intra-op pool (torch.set_num_threads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "mathx.h"
#include "pool.h"
#include "qgemm.h"

namespace gl {
namespace {

int g_isa = ISA_AVX2;  // set by gemmalab.quant.kernels (set_isa) from what the CPU reports

// ---- quantized matrix products ---------------------------------------------------------------
void run_rows(const Mat& m, int64_t n0, int64_t n1, const Act& a, int64_t M) {
  if (g_isa == ISA_AMX) return run_rows_amx(m, n0, n1, a, M);
  if (g_isa == ISA_AVX512) return run_rows_avx512(m, n0, n1, a, M);
  return run_rows_avx2(m, n0, n1, a, M);
}

// Quantized activations of an (M, K) fp32 matrix, owned.
struct ActBuf {
  std::vector<int8_t> q;
  std::vector<uint8_t> qabs;
  std::vector<float> d;
  std::vector<int32_t> s;
  std::vector<float> dx;
  std::vector<int32_t> ns4;
  std::vector<float> das;
  std::vector<int8_t> vq;  // AMX variant only (see Act)
  std::vector<float> dap;
  std::vector<int32_t> ns16;
  Act act;
  ActBuf(const float* x, int64_t M, int64_t K)
      : q(M * K), qabs(M * K), d(M * K / 32), s(M * K / 16), ns4(M * K / 4), das(M * K / 32) {
    auto rows = [&](int64_t m0, int64_t m1) {
      quantize_rows(x, m0, m1, K, q.data(), qabs.data(), d.data(), s.data(), ns4.data(), das.data());
    };
    if (M >= 8) pfor(0, M, 1, rows);
    else rows(0, M);
    if (g_isa == ISA_AVX512 || g_isa == ISA_AMX) {  // amx runs the avx512 kernel for some types
      dx.resize(M * K / 4);
      expand_scales(d.data(), M * K / 32, dx.data());
    }
    if (g_isa == ISA_AMX) {
      vq.resize(M * K);
      dap.resize(M * K / 2);
      ns16.resize(M * K / 32);
      expand_act_amx(q.data(), d.data(), s.data(), M, K, vq.data(), dap.data(), ns16.data());
    }
    act = Act{q.data(), qabs.data(), d.data(), s.data(), K, dx.empty() ? nullptr : dx.data(), ns4.data(), das.data(),
              vq.data(), dap.data(), ns16.data()};
  }
};

// ---- LoRA side paths ---------------------------------------------------------------------------
// y += scale * B (A x) in fp32 (Hu et al. 2021; the order of train.lora.LoRALinear: (B (A x)) *
// scale, then added), A (r, K), B (N, r) row-major as the adapter holds them (read in place: the
// optimizer updates them between calls). Every value is one fixed sequence of operations that
// depends on r, K and the output index only, never on the batch, the chunking or the kernel variant
// (plain AVX2 + FMA in both), so a row gets the same bits alone or in a batch.
struct Side {
  const float* a = nullptr;  // (r, K); nullptr: no side path
  const float* b = nullptr;  // (N, r)
  int64_t r = 0;
  float scale = 0.f;
  const float* t = nullptr;  // (M, r) = x A^T, filled by side_inputs
};

inline float dot(const float* a, const float* b, int64_t n);

// t = x A^T (M rows of r values): one fixed-order dot product of length K each, K a multiple of 8.
void side_inputs(const float* x, int64_t M, int64_t K, const std::vector<Side*>& sides, std::vector<float>* ts) {
  std::vector<int64_t> start(sides.size() + 1, 0);
  for (size_t i = 0; i < sides.size(); ++i) {
    ts[i].resize(M * sides[i]->r);
    sides[i]->t = ts[i].data();
    start[i + 1] = start[i] + M * sides[i]->r;
  }
  auto run = [&](int64_t j0, int64_t j1) {
    for (size_t i = 0; i < sides.size(); ++i) {
      const int64_t lo = std::max(j0, start[i]), hi = std::min(j1, start[i + 1]), r = sides[i]->r;
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t m = (j - start[i]) / r, c = (j - start[i]) % r;
        ts[i][j - start[i]] = dot(sides[i]->a + c * K, x + m * K, K);
      }
    }
  };
  // a team only when there is enough to share (r x K per dot: 16 x 640 = 10 kFLOP)
  if (start.back() * K >= (int64_t(1) << 17)) pfor(0, start.back(), 4, run);
  else run(0, start.back());
}

// out[m, n] += scale * (B t_m)[n] for n in [n0, n1), all M rows. Eight outputs at a time: each lane
// holds B[n, :] t_m as 8 partial sums (masked loads past r), reduced by one hadd tree whose lane
// formula is the same for all eight, so padding a short block changes nothing.
void side_rows(const Side& sd, float* out, int64_t N, int64_t n0, int64_t n1, int64_t M) {
  const int64_t r = sd.r;
  const int64_t full = r / 8 * 8;
  alignas(32) int32_t mk[8];
  for (int i = 0; i < 8; ++i) mk[i] = i < r - full ? -1 : 0;
  const __m256i mask = _mm256_load_si256((const __m256i*)mk);
  const __m256 sc = _mm256_set1_ps(sd.scale);
  for (int64_t n = n0; n < n1; n += 8) {
    const int64_t nv = std::min<int64_t>(8, n1 - n);
    for (int64_t m = 0; m < M; ++m) {
      const float* t = sd.t + m * r;
      __m256 p[8];
      for (int64_t i = 0; i < 8; ++i) {
        if (i >= nv) { p[i] = _mm256_setzero_ps(); continue; }
        const float* b = sd.b + (n + i) * r;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < full; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(b + j), _mm256_loadu_ps(t + j), acc);
        if (full < r) acc = _mm256_fmadd_ps(_mm256_maskload_ps(b + full, mask), _mm256_maskload_ps(t + full, mask), acc);
        p[i] = acc;
      }
      const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(p[0], p[1]), _mm256_hadd_ps(p[2], p[3]));
      const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(p[4], p[5]), _mm256_hadd_ps(p[6], p[7]));
      const __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
      alignas(32) float v[8];
      _mm256_store_ps(v, _mm256_mul_ps(s, sc));
      float* y = out + m * N + n;
      for (int64_t i = 0; i < nv; ++i) y[i] += v[i];
    }
  }
}

// One parallel region over the rows of every matrix; a matrix with a side path (sides[i]->a set,
// its t filled) adds it to the outputs of each chunk right after the chunk's integer products.
void gemv_multi(const std::vector<Mat>& mats, const Act& a, int64_t M, const std::vector<Side*>& sides = {}) {
  int64_t total = 0;
  for (auto& m : mats) total += m.N;
  pfor(0, total, 16, [&](int64_t g0, int64_t g1) {
    int64_t base = 0;
    for (size_t i = 0; i < mats.size(); ++i) {
      const Mat& m = mats[i];
      const int64_t lo = std::max(g0, base), hi = std::min(g1, base + m.N);
      if (lo < hi) {
        run_rows(m, lo - base, hi - base, a, M);
        if (i < sides.size() && sides[i] && sides[i]->a) side_rows(*sides[i], m.out, m.N, lo - base, hi - base, M);
      }
      base += m.N;
    }
  });
}

int64_t row_bytes_of(int type, int64_t K) {
  const int bw = block_weights(type);
  TORCH_CHECK(block_bytes(type) > 0, "gemmalab: unsupported quantized weight type ", type);
  TORCH_CHECK(K % bw == 0, "gemmalab: row length ", K, " is not a multiple of the block size ", bw);
  return K / bw * block_bytes(type);
}

void check_weight(const at::Tensor& w, int64_t qtype, int64_t K) {
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous(),
              "gemmalab: quantized weights must be a contiguous uint8 (rows, bytes) tensor");
  TORCH_CHECK(w.size(1) == row_bytes_of(qtype, K), "gemmalab: weight rows hold ", w.size(1),
              " bytes; type ", qtype, " with ", K, " inputs needs ", row_bytes_of(qtype, K));
}

at::Tensor as_input(const at::Tensor& x) {
  TORCH_CHECK(x.dtype() == at::kFloat, "gemmalab: activations must be float32");
  return x.contiguous();
}

std::vector<at::Tensor> qlinear_multi(const at::Tensor& x_, at::TensorList ws, at::IntArrayRef qtypes) {
  TORCH_CHECK(ws.size() == qtypes.size(), "gemmalab.qlinear_multi: one type per weight");
  auto x = as_input(x_);
  const int64_t K = x.size(-1), M = x.numel() / K;
  TORCH_CHECK(K % 32 == 0, "gemmalab.qlinear: input features must be a multiple of 32, got ", K);
  std::vector<at::Tensor> outs;
  std::vector<Mat> mats;
  auto shape = x.sizes().vec();
  for (size_t i = 0; i < ws.size(); ++i) {
    check_weight(ws[i], qtypes[i], K);
    shape.back() = ws[i].size(0);
    outs.push_back(at::empty(shape, x.options()));
    mats.push_back(Mat{ws[i].data_ptr<uint8_t>(), int(qtypes[i]), ws[i].size(0), ws[i].size(1),
                       outs.back().data_ptr<float>()});
  }
  if (M == 0) return outs;
  ActBuf a(x.data_ptr<float>(), M, K);
  gemv_multi(mats, a.act, M);
  return outs;
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
  return qlinear_multi(x, {w}, {qtype})[0];
}

// Weight rows dequantized to fp32: all rows (ids undefined) or the rows at `ids`.
at::Tensor dequantize(const at::Tensor& w, int64_t qtype, int64_t K, const c10::optional<at::Tensor>& ids_) {
  TORCH_CHECK(w.dtype() == at::kByte && w.dim() == 2 && w.is_contiguous(), "gemmalab.dequantize: uint8 rows");
  const int64_t rb = (qtype == F32) ? K * 4 : (qtype == F16 || qtype == BF16) ? K * 2 : row_bytes_of(qtype, K);
  TORCH_CHECK(w.size(1) == rb, "gemmalab.dequantize: rows of ", w.size(1), " bytes, expected ", rb);
  const uint8_t* W = w.data_ptr<uint8_t>();
  if (!ids_.has_value()) {
    auto out = at::empty({w.size(0), K}, at::kFloat);
    float* O = out.data_ptr<float>();
    pfor(0, w.size(0), 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) dequant_row(int(qtype), W + r * rb, K, O + r * K);
    });
    return out;
  }
  auto ids = ids_->to(at::kLong).contiguous();
  auto out = at::empty({ids.numel(), K}, at::kFloat);
  const int64_t* I = ids.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(I[i] >= 0 && I[i] < w.size(0), "gemmalab.dequantize: row ", I[i], " out of range");
    dequant_row(int(qtype), W + I[i] * rb, K, O + i * K);
  }
  return out;
}

// ---- small fused elementwise ops -------------------------------------------------------------
inline void rmsnorm_row(const float* x, const float* w, float* out, int64_t n, float eps) {
  __m256 ss = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) { __m256 v = _mm256_loadu_ps(x + i); ss = _mm256_fmadd_ps(v, v, ss); }
  const __m256 r = _mm256_set1_ps(1.0f / std::sqrt(hsum(ss) / float(n) + eps));
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), r),
                                            _mm256_add_ps(one, _mm256_loadu_ps(w + i))));
}

at::Tensor rmsnorm(const at::Tensor& x_, const at::Tensor& w_, double eps) {
  auto x = as_input(x_);
  auto w = w_.contiguous().to(at::kFloat);
  const int64_t n = x.size(-1), M = x.numel() / n;
  TORCH_CHECK(n % 8 == 0 && w.numel() == n, "gemmalab.rmsnorm: width must be a multiple of 8 and match the weight");
  auto out = at::empty_like(x);
  const float *X = x.data_ptr<float>(), *W = w.data_ptr<float>();
  float* O = out.data_ptr<float>();
  pfor(0, M, 64, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) rmsnorm_row(X + m * n, W, O + m * n, n, float(eps));
  });
  return out;
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
  }
  for (; i < n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
  return hsum(_mm256_add_ps(s0, s1));
}

inline void axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  for (int64_t i = 0; i < n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}

// ---- decode attention --------------------------------------------------------------------------
struct AttnArgs {
  const float* q;        // (B, H, D)
  const float* k;        // (Bmax, Hkv, S, D)
  const float* v;
  const int64_t* pos;    // (Bmax, S) absolute position held by each slot, -1 = empty
  const int64_t* rows;   // (B,) cache row of each query row
  const int64_t* qpos;   // (B,)
  float* out;            // (B, H, D)
  int64_t B, H, Hkv, S, D, n_scan, window;
  float scale, softcap;
};

// Each task is (query, kv head, 256-slot span); partial softmax statistics are merged afterwards.
// Spans start at fixed slot boundaries, so a query's result does not depend on the other queries of
// the call or on how far other rows reach (a speculative verification of k tokens computes exactly
// what k single-token steps compute).
void attend(const AttnArgs& a) {
  const int64_t G = a.H / a.Hkv, D = a.D;
  const int64_t span = 256;
  const int64_t nsplit = std::max<int64_t>(1, (a.n_scan + span - 1) / span);
  const int64_t ntask = a.B * a.Hkv * nsplit;
  std::vector<float> m_part(ntask * G), l_part(ntask * G), acc(ntask * G * D);
  pfor(0, ntask, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> sc;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t split = t % nsplit, g = (t / nsplit) % a.Hkv, b = t / (nsplit * a.Hkv);
      const int64_t row = a.rows[b], qp = a.qpos[b];
      // whole spans, even past n_scan or the end of the buffer (masked): the summation order of a
      // query must not depend on the other queries of the call nor on the cache's length
      const int64_t s0 = split * span, s1 = s0 + span;
      const int64_t* P = a.pos + row * a.S;
      const float* K = a.k + ((row * a.Hkv + g) * a.S) * D;
      const float* V = a.v + ((row * a.Hkv + g) * a.S) * D;
      float* A = acc.data() + t * G * D;
      std::fill(A, A + G * D, 0.f);
      const int64_t n = std::max<int64_t>(0, s1 - s0);
      sc.assign(G * std::max<int64_t>(n, 1), -std::numeric_limits<float>::infinity());
      for (int64_t s = s0; s < std::min(s1, a.S); ++s) {
        const int64_t p = P[s];
        if (p < 0 || p > qp || (a.window > 0 && p <= qp - a.window)) continue;
        for (int64_t h = 0; h < G; ++h) {
          float z = dot(a.q + (b * a.H + g * G + h) * D, K + s * D, D) * a.scale;
          if (a.softcap > 0) z = a.softcap * std::tanh(z / a.softcap);
          sc[h * n + (s - s0)] = z;
        }
      }
      for (int64_t h = 0; h < G; ++h) {
        float* z = sc.data() + h * n;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) mx = std::max(mx, z[i]);
        float l = 0.f;
        if (mx != -std::numeric_limits<float>::infinity()) {
          int64_t i = 0;
          for (; i + 8 <= n; i += 8) {
            __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(z + i), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(z + i, e);
            l += hsum(e);
          }
          for (; i < n; ++i) { z[i] = std::exp(z[i] - mx); l += z[i]; }
          for (int64_t j = 0; j < n; ++j)
            if (z[j] > 0.f) axpy(z[j], V + (s0 + j) * D, A + h * D, D);
        }
        m_part[t * G + h] = mx;
        l_part[t * G + h] = l;
      }
    }
  });
  // merge the splits: out = sum_i exp(m_i - M) acc_i / sum_i exp(m_i - M) l_i
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t g = 0; g < a.Hkv; ++g)
      for (int64_t h = 0; h < G; ++h) {
        const int64_t t0 = (b * a.Hkv + g) * nsplit;
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < nsplit; ++i) M = std::max(M, m_part[(t0 + i) * G + h]);
        float* O = a.out + (b * a.H + g * G + h) * D;
        std::fill(O, O + D, 0.f);
        if (M == -std::numeric_limits<float>::infinity()) continue;  // nothing visible (cannot happen for a real token)
        float L = 0.f;
        for (int64_t i = 0; i < nsplit; ++i) {
          const float f = std::exp(m_part[(t0 + i) * G + h] - M);
          L += f * l_part[(t0 + i) * G + h];
          axpy(f, acc.data() + ((t0 + i) * G + h) * D, O, D);
        }
        const float inv = 1.f / L;
        for (int64_t j = 0; j < D; ++j) O[j] *= inv;
      }
}

void check_cache(const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos) {
  TORCH_CHECK(k.dtype() == at::kFloat && v.dtype() == at::kFloat && k.is_contiguous() && v.is_contiguous() &&
              k.dim() == 4 && k.sizes() == v.sizes(), "gemmalab: KV cache must be contiguous fp32 (B, Hkv, S, D)");
  TORCH_CHECK(pos.dtype() == at::kLong && pos.is_contiguous() && pos.dim() == 2 && pos.size(0) == k.size(0) &&
              pos.size(1) == k.size(2), "gemmalab: slot positions must be int64 (B, S)");
}

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                            const at::Tensor& rows_, const at::Tensor& qpos_, int64_t n_scan, int64_t window,
                            double scale, double softcap) {
  auto q = as_input(q_);
  check_cache(k, v, pos);
  auto rows = rows_.to(at::kLong).contiguous(), qpos = qpos_.to(at::kLong).contiguous();
  TORCH_CHECK(q.dim() == 3 && q.size(2) == k.size(3) && q.size(1) % k.size(1) == 0, "gemmalab.decode_attention: q must be (B, H, D)");
  auto out = at::empty_like(q);
  AttnArgs a{q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), pos.data_ptr<int64_t>(),
             rows.data_ptr<int64_t>(), qpos.data_ptr<int64_t>(), out.data_ptr<float>(), q.size(0), q.size(1),
             k.size(1), k.size(2), k.size(3), std::min<int64_t>(n_scan, k.size(2)), window, float(scale), float(softcap)};
  attend(a);
  return out;
}

// ---- RoPE and GeGLU, shared by decode_layer and the op-by-op step ----------------------------
// cos / sin of p * inv_freq (the angles as model.text.rope_tables forms them, in fp32)
void rope_table(float p, const float* inv_freq, int64_t D, float* cs, float* sn) {
  for (int64_t i = 0; i < D / 2; ++i) { const float ang = p * inv_freq[i]; cs[i] = std::cos(ang); sn[i] = std::sin(ang); }
}
// rotate-half RoPE of one head (Su et al. 2021; the halves layout of Gemma / transformers)
void rope_row(float* vec, const float* cs, const float* sn, int64_t D) {
  for (int64_t i = 0; i < D / 2; ++i) {
    const float x1 = vec[i], x2 = vec[i + D / 2];
    vec[i] = x1 * cs[i] - x2 * sn[i];
    vec[i + D / 2] = x2 * cs[i] + x1 * sn[i];
  }
}

// x (M, H, D) rotated at positions (M,): decode_layer's RoPE as an op, so that the op-by-op step
// (quant.model._adapter_decode) computes the same bits.
at::Tensor rope(const at::Tensor& x_, const at::Tensor& positions_, const at::Tensor& inv_freq_) {
  auto x = as_input(x_).clone();
  auto positions = positions_.to(at::kLong).contiguous();
  auto inv_freq = inv_freq_.to(at::kFloat).contiguous();
  TORCH_CHECK(x.dim() == 3 && positions.numel() == x.size(0) && inv_freq.numel() * 2 == x.size(2),
              "gemmalab.rope: x (M, H, D), positions (M,), inv_freq (D/2,)");
  const int64_t M = x.size(0), H = x.size(1), D = x.size(2);
  std::vector<float> cs(D / 2), sn(D / 2);
  float* X = x.data_ptr<float>();
  for (int64_t b = 0; b < M; ++b) {
    rope_table(float(positions.data_ptr<int64_t>()[b]), inv_freq.data_ptr<float>(), D, cs.data(), sn.data());
    for (int64_t h = 0; h < H; ++h) rope_row(X + (b * H + h) * D, cs.data(), sn.data(), D);
  }
  return x;
}

// gelu_tanh(g) * u: decode_layer's GeGLU as an op (the same role as rope above)
at::Tensor gelu_mul_op(const at::Tensor& g_, const at::Tensor& u_) {
  auto g = as_input(g_), u = as_input(u_);
  TORCH_CHECK(g.sizes() == u.sizes() && g.numel() % 8 == 0, "gemmalab.gelu_mul: two tensors of one shape, a multiple of 8 values");
  auto out = at::empty_like(g);
  gelu_mul(g.data_ptr<float>(), u.data_ptr<float>(), out.data_ptr<float>(), g.numel());
  return out;
}

// ---- one decoder block for one new token per row ---------------------------------------------
// The side path of one projection with K inputs and N outputs, checked; `held` keeps the
// contiguous fp32 factors alive (views of the adapter's tensors when they already are).
Side side_of(const at::Tensor& a_, const at::Tensor& b_, double scale, int64_t K, int64_t N,
             std::vector<at::Tensor>& held) {
  TORCH_CHECK(a_.dim() == 2 && b_.dim() == 2 && a_.size(1) == K && b_.size(0) == N && b_.size(1) == a_.size(0) &&
              a_.size(0) > 0, "gemmalab: LoRA factors must be A (r, ", K, ") and B (", N, ", r), got A ",
              a_.sizes(), " and B ", b_.sizes());
  TORCH_CHECK(a_.is_floating_point() && b_.is_floating_point() && a_.device().is_cpu() && b_.device().is_cpu(),
              "gemmalab: LoRA factors must be floating-point CPU tensors");
  TORCH_CHECK(K % 8 == 0, "gemmalab: LoRA input features must be a multiple of 8");
  held.push_back(a_.to(at::kFloat).contiguous());  // the tensors themselves when fp32 and contiguous
  held.push_back(b_.to(at::kFloat).contiguous());
  Side s;
  s.a = held[held.size() - 2].data_ptr<float>();
  s.b = held.back().data_ptr<float>();
  s.r = a_.size(0);
  s.scale = float(scale);
  return s;
}

// y + scale * B (A x) for x (M, K), y (M, N): the side path of decode_layer on its own.
at::Tensor lora_add(const at::Tensor& y_, const at::Tensor& x_, const at::Tensor& a, const at::Tensor& b, double scale) {
  auto x = as_input(x_);
  auto y = as_input(y_).clone();
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "gemmalab.lora_add: x (M, K), y (M, N)");
  const int64_t M = x.size(0), K = x.size(1), N = y.size(1);
  std::vector<at::Tensor> held;
  Side s = side_of(a, b, scale, K, N, held);
  std::vector<float> t;
  side_inputs(x.data_ptr<float>(), M, K, {&s}, &t);
  side_rows(s, y.data_ptr<float>(), N, 0, N, M);  // one thread: products this small gain nothing from two
  return y;
}

// norms: input, post-attention, pre-feedforward, post-feedforward [, q_norm, k_norm] (gains 1 + w)
// weights: q, k, v, o, gate, up, down (uint8 block rows); qtypes alongside
// dims: n_heads, n_kv, head_dim, hidden, intermediate, window (0 = global)
// fparams: eps, query scale, attention softcap (0 = none)
// lora_a, lora_b, lora_scale: none (empty lists) or one entry per weight, LoRA factors A (r, K) and
// B (N, r) fp32 and the scale alpha / r; an empty tensor: no side path on that projection. Each
// projection's output gets + scale * B (A x) of its own fp32 input (the normed hidden state for
// q, k, v, gate, up; the attention output for o; the GeGLU product for down), as train.lora adds it.
at::Tensor decode_layer(const at::Tensor& x_, at::TensorList norms, at::TensorList weights, at::IntArrayRef qtypes,
                        const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& pos, const at::Tensor& rows_,
                        const at::Tensor& slot_, const at::Tensor& qpos_, const at::Tensor& inv_freq_,
                        int64_t n_scan, at::IntArrayRef dims, at::ArrayRef<double> fparams,
                        at::TensorList lora_a, at::TensorList lora_b, at::ArrayRef<double> lora_scale) {
  TORCH_CHECK(weights.size() == 7 && qtypes.size() == 7 && (norms.size() == 4 || norms.size() == 6) &&
              dims.size() == 6 && fparams.size() == 3, "gemmalab.decode_layer: bad argument lists");
  TORCH_CHECK((lora_a.empty() && lora_b.empty() && lora_scale.empty()) ||
              (lora_a.size() == 7 && lora_b.size() == 7 && lora_scale.size() == 7),
              "gemmalab.decode_layer: LoRA factors are given for all seven projections or none");
  check_cache(kc, vc, pos);
  auto x = as_input(x_).clone();
  // B query rows (one token each); several may belong to the same cache row (speculative
  // verification): all their keys are written before any attends, and positions keep it causal.
  const int64_t B = x.size(0), H = dims[0], Hkv = dims[1], D = dims[2], d = dims[3], F = dims[4], window = dims[5];
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d, "gemmalab.decode_layer: x must be (B, hidden)");
  const float eps = float(fparams[0]), scale = float(fparams[1]), softcap = float(fparams[2]);
  auto rows = rows_.to(at::kLong).contiguous(), slot = slot_.to(at::kLong).contiguous(), qpos = qpos_.to(at::kLong).contiguous();
  auto inv_freq = inv_freq_.to(at::kFloat).contiguous();
  std::vector<at::Tensor> nw;
  for (auto& n : norms) nw.push_back(n.to(at::kFloat).contiguous());
  const int64_t Ks[7] = {d, d, d, H * D, d, d, F};
  for (int i = 0; i < 7; ++i) check_weight(weights[i], qtypes[i], Ks[i]);
  Side side[7];
  std::vector<at::Tensor> held;  // contiguous factors, alive for the call
  for (int i = 0; i < (int)lora_a.size(); ++i) {
    if (!lora_a[i].defined() || lora_a[i].numel() == 0) continue;
    side[i] = side_of(lora_a[i], lora_b[i], lora_scale[i], Ks[i], weights[i].size(0), held);
  }
  std::vector<float> ts[7];
  auto mat = [&](int i, float* out) {
    return Mat{weights[i].data_ptr<uint8_t>(), int(qtypes[i]), weights[i].size(0), weights[i].size(1), out};
  };
  float* X = x.data_ptr<float>();
  std::vector<float> h(B * std::max(d, H * D)), q(B * H * D), k(B * Hkv * D), v(B * Hkv * D), att(B * H * D),
      o(B * d), g(B * F), u(B * F);

  // attention
  for (int64_t b = 0; b < B; ++b) rmsnorm_row(X + b * d, nw[0].data_ptr<float>(), h.data() + b * d, d, eps);
  {
    ActBuf a(h.data(), B, d);
    side_inputs(h.data(), B, d, {side + 0, side + 1, side + 2}, ts + 0);
    gemv_multi({mat(0, q.data()), mat(1, k.data()), mat(2, v.data())}, a.act, B, {side + 0, side + 1, side + 2});
  }
  const float* IF = inv_freq.data_ptr<float>();
  std::vector<float> cs(D / 2), sn(D / 2), tmp(D);
  float* KC = kc.data_ptr<float>();
  float* VC = vc.data_ptr<float>();
  const int64_t S = kc.size(2);
  for (int64_t b = 0; b < B; ++b) {
    rope_table(float(qpos.data_ptr<int64_t>()[b]), IF, D, cs.data(), sn.data());
    auto rope = [&](float* vec) { rope_row(vec, cs.data(), sn.data(), D); };
    for (int64_t hh = 0; hh < H; ++hh) {
      float* qv = q.data() + (b * H + hh) * D;
      if (nw.size() == 6) { rmsnorm_row(qv, nw[4].data_ptr<float>(), tmp.data(), D, eps); std::copy(tmp.begin(), tmp.end(), qv); }
      rope(qv);
    }
    const int64_t row = rows.data_ptr<int64_t>()[b], s = slot.data_ptr<int64_t>()[b];
    TORCH_CHECK(s >= 0 && s < S && row >= 0 && row < kc.size(0), "gemmalab.decode_layer: cache slot out of range");
    for (int64_t hh = 0; hh < Hkv; ++hh) {
      float* kv = k.data() + (b * Hkv + hh) * D;
      if (nw.size() == 6) { rmsnorm_row(kv, nw[5].data_ptr<float>(), tmp.data(), D, eps); std::copy(tmp.begin(), tmp.end(), kv); }
      rope(kv);
      std::copy(kv, kv + D, KC + ((row * Hkv + hh) * S + s) * D);
      std::copy(v.data() + (b * Hkv + hh) * D, v.data() + (b * Hkv + hh + 1) * D, VC + ((row * Hkv + hh) * S + s) * D);
    }
  }
  AttnArgs aa{q.data(), KC, VC, pos.data_ptr<int64_t>(), rows.data_ptr<int64_t>(), qpos.data_ptr<int64_t>(),
              att.data(), B, H, Hkv, S, D, std::min(n_scan, S), window, scale, softcap};
  attend(aa);
  {
    ActBuf a(att.data(), B, H * D);
    side_inputs(att.data(), B, H * D, {side + 3}, ts + 3);
    gemv_multi({mat(3, o.data())}, a.act, B, {side + 3});
  }
  for (int64_t b = 0; b < B; ++b) {
    rmsnorm_row(o.data() + b * d, nw[1].data_ptr<float>(), h.data() + b * d, d, eps);
    for (int64_t i = 0; i < d; ++i) X[b * d + i] += h[b * d + i];
    rmsnorm_row(X + b * d, nw[2].data_ptr<float>(), h.data() + b * d, d, eps);
  }
  // feed-forward
  {
    ActBuf a(h.data(), B, d);
    side_inputs(h.data(), B, d, {side + 4, side + 5}, ts + 4);
    gemv_multi({mat(4, g.data()), mat(5, u.data())}, a.act, B, {side + 4, side + 5});
  }
  gelu_mul(g.data(), u.data(), g.data(), B * F);
  {
    ActBuf a(g.data(), B, F);
    side_inputs(g.data(), B, F, {side + 6}, ts + 6);
    gemv_multi({mat(6, o.data())}, a.act, B, {side + 6});
  }
  for (int64_t b = 0; b < B; ++b) {
    rmsnorm_row(o.data() + b * d, nw[3].data_ptr<float>(), h.data() + b * d, d, eps);
    for (int64_t i = 0; i < d; ++i) X[b * d + i] += h[b * d + i];
  }
  return x;
}

// ---- LM head refinement ----------------------------------------------------------------------
// The k largest logits of each row recomputed in fp32 from the dequantized weight rows. The 8-bit
// activations of the integer GEMV move logits by ~1e-2, enough to flip near-ties at the top; exact
// values for the few candidates restore them (top-1 agreement with fp32 +0.6 points on code).
// One pass per row with a running threshold (almost every 8-float load fails one compare).
void refine_top(at::Tensor logits, const at::Tensor& h_, const at::Tensor& w, int64_t qtype, int64_t k) {
  auto h = as_input(h_);
  TORCH_CHECK(logits.dtype() == at::kFloat && logits.dim() == 2 && logits.is_contiguous(),
              "gemmalab.refine_top: logits must be a contiguous float32 (rows, vocab) tensor");
  const int64_t M = logits.size(0), N = logits.size(1), K = h.size(-1);
  TORCH_CHECK(h.numel() == M * K, "gemmalab.refine_top: one hidden row per logits row");
  TORCH_CHECK(k >= 1 && k <= 64 && k <= N, "gemmalab.refine_top: k must be in [1, 64]");
  check_weight(w, qtype, K);
  TORCH_CHECK(w.size(0) == N, "gemmalab.refine_top: ", w.size(0), " weight rows for ", N, " logits");
  const int64_t rb = w.size(1);
  const uint8_t* W = w.data_ptr<uint8_t>();
  float* L = logits.data_ptr<float>();
  const float* H = h.data_ptr<float>();
  pfor(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> val(k), row(K);
    std::vector<int64_t> idx(k);
    for (int64_t m = m0; m < m1; ++m) {
      const float* z = L + m * N;
      std::fill(val.begin(), val.end(), -std::numeric_limits<float>::infinity());
      std::fill(idx.begin(), idx.end(), -1);
      auto insert = [&](float x, int64_t j) {
        if (!(x > val[k - 1])) return;
        int64_t i = k - 1;
        for (; i > 0 && val[i - 1] < x; --i) { val[i] = val[i - 1]; idx[i] = idx[i - 1]; }
        val[i] = x; idx[i] = j;
      };
      __m256 thr = _mm256_set1_ps(val[k - 1]);
      int64_t j = 0;
      for (; j + 8 <= N; j += 8) {
        if (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(z + j), thr, _CMP_GT_OQ))) {
          for (int64_t t = 0; t < 8; ++t) insert(z[j + t], j + t);
          thr = _mm256_set1_ps(val[k - 1]);
        }
      }
      for (; j < N; ++j) insert(z[j], j);
      for (int64_t i = 0; i < k; ++i) {
        if (idx[i] < 0) continue;
        dequant_row(int(qtype), W + idx[i] * rb, K, row.data());
        L[m * N + idx[i]] = dot(H + m * K, row.data(), K);
      }
    }
  });
}

// Q5_0 rows -> Q5_0_U8 rows (a copy; see qgemm.h).
at::Tensor repack_q5_0(const at::Tensor& w, int64_t K) {
  check_weight(w, Q5_0, K);
  auto out = at::empty({w.size(0), row_bytes_of(Q5_0_U8, K)}, at::kByte);
  const uint8_t* W = w.data_ptr<uint8_t>();
  uint8_t* O = out.data_ptr<uint8_t>();
  const int64_t rb = w.size(1), ob = out.size(1);
  pfor(0, w.size(0), 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) repack_q5_0_row(W + r * rb, K, O + r * ob);
  });
  return out;
}

// Whether Q8_0 rows hold any -128 code (then Q8_0_SYM's sign trick would overflow).
bool q8_0_has_min_code(const at::Tensor& w) {
  TORCH_CHECK(w.dtype() == at::kByte && w.is_contiguous() && w.dim() == 2 && w.size(1) % 34 == 0,
              "gemmalab.q8_0_has_min_code: Q8_0 rows");
  const uint8_t* W = w.data_ptr<uint8_t>();
  const int64_t nblocks = w.numel() / 34;
  std::atomic<bool> found{false};
  pfor(0, nblocks, 4096, [&](int64_t b0, int64_t b1) {
    const __m256i m = _mm256_set1_epi8((char)0x80);
    for (int64_t b = b0; b < b1 && !found.load(std::memory_order_relaxed); ++b) {
      const __m256i q = _mm256_loadu_si256((const __m256i*)(W + b * 34 + 2));
      if (_mm256_movemask_epi8(_mm256_cmpeq_epi8(q, m))) found = true;
    }
  });
  return found.load();
}

at::Tensor quantize_q8_0(const at::Tensor& x_) {
  auto x = as_input(x_);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 32 == 0, "gemmalab.quantize_q8_0: (rows, K) with K a multiple of 32");
  const int64_t N = x.size(0), K = x.size(1);
  auto out = at::empty({N, K / 32 * 34}, at::kByte);
  const float* X = x.data_ptr<float>();
  uint8_t* O = out.data_ptr<uint8_t>();
  pfor(0, N, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) quantize_row_q8_0(X + r * K, K, O + r * (K / 32 * 34));
  });
  return out;
}

at::Tensor quantize_act(const at::Tensor& x_) {  // for tests: the 8-bit activations, dequantized
  auto x = as_input(x_);
  const int64_t K = x.size(-1), M = x.numel() / K;
  TORCH_CHECK(K % 32 == 0, "gemmalab.quantize_act: width must be a multiple of 32");
  ActBuf a(x.data_ptr<float>(), M, K);
  auto out = at::empty_like(x);
  float* O = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < K; ++i) O[m * K + i] = a.d[m * (K / 32) + i / 32] * float(a.q[m * K + i]);
  return out;
}

// ---- variant and pool ------------------------------------------------------------------------
void set_isa(int64_t isa) {
  TORCH_CHECK(isa == ISA_AVX2 || isa == ISA_AVX512 || isa == ISA_AMX, "gemmalab.set_isa: 0 (avx2), 1 (avx512) or 2 (amx)");
  if (isa == ISA_AMX) {
    const char* why = amx_permission_error();
    TORCH_CHECK(why == nullptr, "gemmalab.set_isa: cannot use the amx kernels: ", why ? why : "");
  }
  g_isa = int(isa);
}
int64_t get_isa() { return g_isa; }
std::vector<int64_t> pool_stats_op() {
  int64_t s[8];
  pool_stats(s);
  return std::vector<int64_t>(s, s + 8);
}
void pool_reset_op() { pool_reset_stats(); }

}  // namespace
}  // namespace gl

TORCH_LIBRARY(gemmalab, m) {
  m.def("set_isa(int isa) -> ()", gl::set_isa);
  m.def("get_isa() -> int", gl::get_isa);
  m.def("pool_stats() -> int[]", gl::pool_stats_op);
  m.def("pool_reset_stats() -> ()", gl::pool_reset_op);
  m.def("qlinear(Tensor x, Tensor w, int qtype) -> Tensor", gl::qlinear);
  m.def("qlinear_multi(Tensor x, Tensor[] ws, int[] qtypes) -> Tensor[]", gl::qlinear_multi);
  m.def("dequantize(Tensor w, int qtype, int K, Tensor? ids=None) -> Tensor", gl::dequantize);
  m.def("rmsnorm(Tensor x, Tensor w, float eps) -> Tensor", gl::rmsnorm);
  m.def("refine_top(Tensor(a!) logits, Tensor h, Tensor w, int qtype, int k) -> ()", gl::refine_top);
  m.def("quantize_act(Tensor x) -> Tensor", gl::quantize_act);
  m.def("repack_q5_0(Tensor w, int K) -> Tensor", gl::repack_q5_0);
  m.def("quantize_q8_0(Tensor x) -> Tensor", gl::quantize_q8_0);
  m.def("q8_0_has_min_code(Tensor w) -> bool", gl::q8_0_has_min_code);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor pos, Tensor rows, Tensor qpos, int n_scan, "
        "int window, float scale, float softcap) -> Tensor", gl::decode_attention);
  m.def("decode_layer(Tensor x, Tensor[] norms, Tensor[] weights, int[] qtypes, Tensor k_cache, Tensor v_cache, "
        "Tensor slot_pos, Tensor rows, Tensor write_slot, Tensor positions, Tensor inv_freq, int n_scan, int[] dims, "
        "float[] fparams, Tensor[] lora_a, Tensor[] lora_b, float[] lora_scale) -> Tensor", gl::decode_layer);
  m.def("lora_add(Tensor y, Tensor x, Tensor a, Tensor b, float scale) -> Tensor", gl::lora_add);
  m.def("rope(Tensor x, Tensor positions, Tensor inv_freq) -> Tensor", gl::rope);
  m.def("gelu_mul(Tensor g, Tensor u) -> Tensor", gl::gelu_mul_op);
}
