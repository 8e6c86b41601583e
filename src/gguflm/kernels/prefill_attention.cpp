// Attention of a prefill: many query rows of one sequence set against its cells of the KV cache, in one
// call, flash-attention style (the scores are never all in memory: key blocks one after the other, with
// an online softmax). torch's fused CPU attention does the same in general; this one knows the engine's
// shapes (GQA heads side by side, causal or masked cells, fp32 or fp16 cache): 512 causal rows of SmolLM2 on 2 AMD
// EPYC Zen 4 cores, 3.4x faster than torch's bf16 attention with bf16 products, 2.2x its fp32 with fp32 ones.
//
//   attend_prefill(q, k_cache, v_cache, rows, cells, mask, scale, bf16, out)
//
// Layouts (fp32 and int64 tensors contiguous):
//   q        (T, n_head, hd)         rope'd queries of the micro-batch
//   k_cache  (n_ctx, n_head_kv, hd)  one layer of the KV cache (fp32 or fp16); v_cache the same
//   rows     (R,)                    the set's rows of q
//   cells    (C,)                    the cells they may read, in position order
//   mask     (R, C) bool             true = may attend; absent: causal, row i sees cells[0..i] (R == C)
//   out      (T, n_head, hd)         out[rows] overwritten, the other rows left as they are
//
// How: the n_head / n_head_kv query heads of a kv head read the same keys and values, so one task is
// (kv head, tile of rows), its query vectors stacked as (row, head) pairs, MR of them per micro-kernel
// call. Keys and values are first packed per (kv head, block of BC cells), zero padded to whole blocks
// and head dims, in the layout the inner products read:
//   fp32 (FMA):          keys (hdp, BC) transposed: one vector holds 16 cells' products; values (BC, hdp)
//   bf16 (vdpbf16ps):    keys (hdp/2, BC, 2): dims 2j and 2j+1 of a cell side by side; values (BC/2, hdp, 2):
//                        cells 2c and 2c+1 of a dim side by side; the products are summed in fp32
// Each task walks the key blocks its rows may see: scores (MR, BC), masked only where a block is partly
// hidden from the rows (wholly hidden blocks are skipped), online softmax in fp32, values accumulated in
// fp32. bf16 (where asked and the build has AVX512_BF16): q, k, v and the softmax weights rounded to bf16
// for the products, as torch's bf16 attention does; the rest stays fp32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int BC = 64;           // cells per key block
constexpr int MR = 6;            // query vectors per micro-kernel call
constexpr int64_t TILE_Q = 48;   // query vectors per task (rows x heads of a kv head), about
constexpr int LANES = 16;        // partial sums and maxima the compiler vectorizes

#if defined(__AVX512F__)
using vf = __m512;
constexpr int VW = 16, NV = 4;  // 6 x 4 accumulators of 32 registers
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf a) { _mm512_storeu_ps(p, a); }
inline vf vset1(float s) { return _mm512_set1_ps(s); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
#elif defined(__AVX2__) && defined(__FMA__)
using vf = __m256;
constexpr int VW = 8, NV = 2;  // 6 x 2 accumulators of 16 registers
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf a) { _mm256_storeu_ps(p, a); }
inline vf vset1(float s) { return _mm256_set1_ps(s); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
#else  // the generic build: GCC's vector extension, 4 floats (SSE2 on x86-64, NEON on ARM)
typedef float vf __attribute__((vector_size(16)));
constexpr int VW = 4, NV = 2;  // 6 x 2 accumulators of 16 registers
inline vf vzero() { return vf{0.f, 0.f, 0.f, 0.f}; }
inline vf vload(const float* p) {
  vf a;
  std::memcpy(&a, p, sizeof a);
  return a;
}
inline void vstore(float* p, vf a) { std::memcpy(p, &a, sizeof a); }
inline vf vset1(float s) { return vf{s, s, s, s}; }
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
#endif
constexpr int CW = VW * NV;  // columns of one micro-kernel pass: cells of the scores, dims of the output

// s[:, c0 : c0 + NJ VW] (MR rows of BC) = q (MR, hdp) . kt[:, c0 : c0 + NJ VW], kt (hdp, BC) a key block transposed
template <int NJ>
inline void scores_f32_cols(const float* q, const float* kt, int64_t hdp, int c0, float* s) {
  vf acc[MR][NJ];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NJ; ++j) acc[r][j] = vzero();
  for (int64_t d = 0; d < hdp; ++d) {
    vf k[NJ];
    for (int j = 0; j < NJ; ++j) k[j] = vload(kt + d * BC + c0 + j * VW);
    for (int r = 0; r < MR; ++r) {
      const vf qb = vset1(q[r * hdp + d]);
      for (int j = 0; j < NJ; ++j) acc[r][j] = vfma(qb, k[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NJ; ++j) vstore(s + r * BC + c0 + j * VW, acc[r][j]);
}

// s (MR, BC) = q . kt over the block's first n_c cells, rounded up to whole vectors (the rest left as it was:
// the caller hides those cells)
inline void scores_f32(const float* q, const float* kt, int64_t hdp, int n_c, float* s) {
  const int n_end = (n_c + VW - 1) / VW * VW;
  int c0 = 0;
  for (; c0 + CW <= n_end; c0 += CW) scores_f32_cols<NV>(q, kt, hdp, c0, s);
  switch ((n_end - c0) / VW) {  // vectors left, fewer than NV
    case 1: scores_f32_cols<1>(q, kt, hdp, c0, s); break;
    case 2: scores_f32_cols<2>(q, kt, hdp, c0, s); break;
    case 3: scores_f32_cols<3>(q, kt, hdp, c0, s); break;
    default: break;
  }
}

// o (MR, hdp) += p (MR, BC) . v (BC, hdp) over the block's first n_c cells (the others' p are all 0)
inline void accumulate_f32(const float* p, const float* v, int64_t hdp, int n_c, float* o) {
  for (int64_t d0 = 0; d0 < hdp; d0 += CW) {
    vf acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = vload(o + r * hdp + d0 + j * VW);
    for (int c = 0; c < n_c; ++c) {
      vf x[NV];
      for (int j = 0; j < NV; ++j) x[j] = vload(v + c * hdp + d0 + j * VW);
      for (int r = 0; r < MR; ++r) {
        const vf pb = vset1(p[r * BC + c]);
        for (int j = 0; j < NV; ++j) acc[r][j] = vfma(pb, x[j], acc[r][j]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NV; ++j) vstore(o + r * hdp + d0 + j * VW, acc[r][j]);
  }
}

inline uint16_t to_bf16(float x) {  // round to nearest even (x finite)
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return uint16_t((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

#if defined(__AVX512BF16__)
constexpr bool HAS_BF16 = true;
inline __m512bh pairs(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh pair_bcast(const uint16_t* p) {  // the bf16 pair at p in every 32-bit lane
  int32_t x;
  std::memcpy(&x, p, 4);
  return (__m512bh)_mm512_set1_epi32(x);
}

// s[:, 0 : 16 NJ] (MR rows of BC) = q (MR, hdp) . kp[:, 0 : 16 NJ], kp (hdp/2, BC, 2); all bf16 but s
template <int NJ>
inline void scores_bf16_cols(const uint16_t* q, const uint16_t* kp, int64_t hdp, float* s) {
  __m512 acc[MR][NJ];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NJ; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t d2 = 0; d2 < hdp / 2; ++d2) {
    __m512bh k[NJ];
    for (int j = 0; j < NJ; ++j) k[j] = pairs(kp + (d2 * BC + j * 16) * 2);
    for (int r = 0; r < MR; ++r) {
      const __m512bh qb = pair_bcast(q + r * hdp + 2 * d2);
      for (int j = 0; j < NJ; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], qb, k[j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NJ; ++j) _mm512_storeu_ps(s + r * BC + j * 16, acc[r][j]);
}

// s (MR, BC) = q . kp over the block's first n_c cells, rounded up to whole vectors of 16
inline void scores_bf16(const uint16_t* q, const uint16_t* kp, int64_t hdp, int n_c, float* s) {
  static_assert(BC == 64, "4 vectors of 16 cells");
  switch ((n_c + 15) / 16) {
    case 1: scores_bf16_cols<1>(q, kp, hdp, s); break;
    case 2: scores_bf16_cols<2>(q, kp, hdp, s); break;
    case 3: scores_bf16_cols<3>(q, kp, hdp, s); break;
    default: scores_bf16_cols<4>(q, kp, hdp, s); break;
  }
}

// o (MR, hdp) fp32 += p (MR, BC) . vp (BC/2, hdp, 2) over the block's first n_c2 cell pairs
inline void accumulate_bf16(const uint16_t* p, const uint16_t* vp, int64_t hdp, int n_c2, float* o) {
  for (int64_t d0 = 0; d0 < hdp; d0 += 64) {
    __m512 acc[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_loadu_ps(o + r * hdp + d0 + j * 16);
    for (int c2 = 0; c2 < n_c2; ++c2) {
      __m512bh x[4];
      for (int j = 0; j < 4; ++j) x[j] = pairs(vp + (c2 * hdp + d0 + j * 16) * 2);
      for (int r = 0; r < MR; ++r) {
        const __m512bh pb = pair_bcast(p + r * BC + 2 * c2);
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pb, x[j]);
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) _mm512_storeu_ps(o + r * hdp + d0 + j * 16, acc[r][j]);
  }
}

inline void round_bf16(const float* x, uint16_t* y) {  // BC values, as vcvtneps2bf16 rounds (nearest even)
  for (int c = 0; c < BC; c += 16)
    _mm256_storeu_si256((__m256i*)(y + c), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + c)));
}
#else
constexpr bool HAS_BF16 = false;
inline void scores_bf16(const uint16_t*, const uint16_t*, int64_t, int, float*) {}
inline void accumulate_bf16(const uint16_t*, const uint16_t*, int64_t, int, float*) {}
inline void round_bf16(const float*, uint16_t*) {}
#endif

// A buffer for the packed keys and values, kept between calls: a fresh one of ~1 MB is fresh pages from
// the OS, faulted in on every call (~15% of a 512-token call). One per concurrent call.
class Scratch {
 public:
  explicit Scratch(size_t n) {
    {
      std::lock_guard<std::mutex> hold(lock());
      if (!pool().empty()) {
        buf_ = std::move(pool().back());
        pool().pop_back();
      }
    }
    if (buf_.size() < n) buf_.resize(n);
  }
  ~Scratch() {
    std::lock_guard<std::mutex> hold(lock());
    pool().push_back(std::move(buf_));
  }
  uint8_t* data() { return buf_.data(); }

 private:
  static std::mutex& lock() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::vector<uint8_t>>& pool() {
    static std::vector<std::vector<uint8_t>> p;
    return p;
  }
  std::vector<uint8_t> buf_;
};

#if defined(__AVX512F__)
inline __m512 exp_zmm(__m512 x) {  // fast_exp (vec_math.h) of 16 values with vscalefps for 2^n, 0 below -87
  const __mmask16 seen = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723212e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_maskz_scalef_ps(seen, p, n);
}
#endif

// One row of a block's scores, sr (BC) fp32 with -inf where hidden -> its softmax weights in place,
// e^(sc sr - m) with m the row's running maximum (updated), and l, the running sum of its weights, updated.
// Returns the factor by which the row's output so far must be scaled (1 where the maximum stayed).
inline float softmax_row(float* sr, float sc, float& m, float& l) {
#if defined(__AVX512F__)
  static_assert(BC == 64, "4 vectors a row");
  __m512 x[4], hi = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < 4; ++j) hi = _mm512_max_ps(hi, x[j] = _mm512_mul_ps(_mm512_loadu_ps(sr + 16 * j), _mm512_set1_ps(sc)));
  const float best = _mm512_reduce_max_ps(hi);
#else
  float lanes[LANES];
  std::fill(lanes, lanes + LANES, -INFINITY);
  for (int c = 0; c < BC; c += LANES)
    for (int j = 0; j < LANES; ++j) lanes[j] = std::max(lanes[j], sr[c + j] *= sc);
  const float best = *std::max_element(lanes, lanes + LANES);
#endif
  if (best == -INFINITY) {  // sees nothing here: weights 0
    std::fill(sr, sr + BC, 0.f);
    return 1.f;
  }
  const float m_new = std::max(m, best), alpha = m == -INFINITY ? 0.f : fast_exp(m - m_new);
  m = m_new;
#if defined(__AVX512F__)
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    const __m512 e = exp_zmm(_mm512_sub_ps(x[j], _mm512_set1_ps(m_new)));
    _mm512_storeu_ps(sr + 16 * j, e);
    sum = _mm512_add_ps(sum, e);
  }
  l = l * alpha + _mm512_reduce_add_ps(sum);
#else
  std::fill(lanes, lanes + LANES, 0.f);
  for (int c = 0; c < BC; c += LANES)
    for (int j = 0; j < LANES; ++j) {
      const float x = sr[c + j] - m_new, e = fast_exp(x);
      sr[c + j] = x < -87.f ? 0.f : e;  // hidden cells (-inf) exactly 0
      lanes[j] += sr[c + j];
    }
  float sum = 0.f;
  for (int j = 0; j < LANES; ++j) sum += lanes[j];
  l = l * alpha + sum;
#endif
  return alpha;
}

struct Span {  // the cells [lo, hi) within which a row sees anything; all of them where dense
  int64_t lo, hi;
  bool dense;
};

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 3 && t.is_contiguous(), name,
              " must be a contiguous 3-D float32 CPU tensor");
}

}  // namespace

void attend_prefill(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& rows,
                    const at::Tensor& cells, const c10::optional<at::Tensor>& mask, double scale, bool bf16,
                    at::Tensor out) {
  check_f32(q, "q");
  check_f32(out, "out");
  const bool half = k_cache.scalar_type() == at::kHalf;  // an fp16 cache (else fp32)
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK(t->device().is_cpu() && (t->scalar_type() == at::kFloat || half) &&
                    t->scalar_type() == k_cache.scalar_type() && t->dim() == 3 && t->is_contiguous(),
                "caches must be contiguous 3-D float32 or float16 CPU tensors of one dtype");
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
  const int64_t T = q.size(0), n_head = q.size(1), hd = q.size(2);
  const int64_t n_ctx = k_cache.size(0), n_kv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == hd && v_cache.sizes() == k_cache.sizes(), "caches must be (n_ctx, n_head_kv, head_dim)");
  TORCH_CHECK(n_kv > 0 && n_head % n_kv == 0, "n_head (", n_head, ") must be a multiple of n_head_kv (", n_kv, ")");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1, "rows must be 1-D int64");
  TORCH_CHECK(cells.scalar_type() == at::kLong && cells.dim() == 1, "cells must be 1-D int64");
  const int64_t R = rows.size(0), C = cells.size(0);
  const bool causal = !mask.has_value();
  at::Tensor mk;
  if (causal) {
    TORCH_CHECK(R == C, "a causal call needs one cell per row, got ", R, " rows and ", C, " cells");
  } else {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == R && mask->size(1) == C,
                "mask must be (R, C) bool for ", R, " rows and ", C, " cells");
    mk = mask->contiguous();
  }
  const at::Tensor rc = rows.contiguous(), cc = cells.contiguous();
  const int64_t *rp = rc.data_ptr<int64_t>(), *cp = cc.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < T, "row ", rp[i], " is outside q");
  for (int64_t i = 0; i < C; ++i) TORCH_CHECK(cp[i] >= 0 && cp[i] < n_ctx, "cell ", cp[i], " is outside the cache");
  if (R == 0) return;

  const bool use_bf16 = bf16 && HAS_BF16;
  const int64_t group = n_head / n_kv, hdp = (hd + CW - 1) / CW * CW, n_blocks = std::max<int64_t>(1, (C + BC - 1) / BC);
  const bool* mp = causal ? nullptr : mk.data_ptr<bool>();

  // each row's visible span
  std::vector<Span> span(R);
  {
    for (int64_t i = 0; i < R; ++i) {
      if (causal) {
        span[i] = {0, i + 1, true};
        continue;
      }
      const bool* m = mp + i * C;  // bools are bytes 0 / 1: memchr and memrchr find the first and last 1
      const void* first = std::memchr(m, 1, size_t(C));
      if (!first) {
        span[i] = {0, 0, true};
        continue;
      }
      const int64_t lo = static_cast<const bool*>(first) - m;
      const int64_t hi = static_cast<const bool*>(memrchr(m, 1, size_t(C))) - m + 1;
      int64_t n = 0;
      for (int64_t c = lo; c < hi; ++c) n += m[c];
      span[i] = {lo, hi, n == hi - lo};
    }
  }

  // keys and values packed per (kv head, block): element size 2 (bf16) or 4 (fp32)
  const int64_t esize = use_bf16 ? 2 : 4, block_elems = BC * hdp, block_bytes = block_elems * esize;
  Scratch packed(size_t(2 * n_kv * n_blocks * block_bytes));
  uint8_t* kbase = packed.data();
  uint8_t* vbase = kbase + n_kv * n_blocks * block_bytes;
  const uint8_t *kp = static_cast<const uint8_t*>(k_cache.data_ptr()), *vp = static_cast<const uint8_t*>(v_cache.data_ptr());
  const int64_t cache_esize = half ? 2 : 4;
  // block b = hk n_blocks + kb; row: room for a cell's keys (or two cells' values) in bf16, 2 hdp
  const auto pack = [&](int64_t b, uint16_t* row) {
    {
      const int64_t hk = b / n_blocks, kb = b % n_blocks, n_c = std::min<int64_t>(BC, C - kb * BC);
      uint8_t *kblock = kbase + b * block_bytes, *vblock = vbase + b * block_bytes;
      if (n_c < BC || hd < hdp) {  // padding: zeros
        std::memset(kblock, 0, size_t(block_bytes));
        std::memset(vblock, 0, size_t(block_bytes));
      }
      // a cell's key or value row as floats (converted into `conv` from an fp16 cache; two: v0 and v1 below)
      thread_local std::vector<float> conv;
      conv.resize(size_t(2 * hd));
      const auto row_of = [&](const uint8_t* cache, int64_t c, int64_t slot) -> const float* {
        const uint8_t* p = cache + (cp[kb * BC + c] * n_kv + hk) * hd * cache_esize;
        return half ? as_floats(reinterpret_cast<const at::Half*>(p), conv.data() + slot * hd, hd)
                    : reinterpret_cast<const float*>(p);
      };
      const auto key = [&](int64_t c) { return row_of(kp, c, 0); };
      const auto value = [&](int64_t c, int64_t slot = 0) { return row_of(vp, c, slot); };
      if (!use_bf16) {
        float *kt = reinterpret_cast<float*>(kblock), *vt = reinterpret_cast<float*>(vblock);
        for (int64_t c = 0; c < n_c; ++c) {
          const float* ks = key(c);
          for (int64_t d = 0; d < hd; ++d) kt[d * BC + c] = ks[d];
          std::memcpy(vt + c * hdp, value(c), size_t(hd) * 4);
        }
        return;
      }
      uint32_t* kw = reinterpret_cast<uint32_t*>(kblock);  // (hdp/2, BC) words: a cell's dims 2j, 2j+1
      for (int64_t c = 0; c < n_c; ++c) {
        const float* ks = key(c);
        for (int64_t d = 0; d < hd; ++d) row[d] = to_bf16(ks[d]);
        if (hd % 2) row[hd] = 0;
        for (int64_t j = 0; j < (hd + 1) / 2; ++j) kw[j * BC + c] = uint32_t(row[2 * j]) | uint32_t(row[2 * j + 1]) << 16;
      }
      uint32_t* vw = reinterpret_cast<uint32_t*>(vblock);  // (BC/2, hdp) words: cells 2c, 2c+1 of a dim
      for (int64_t c = 0; c < n_c; c += 2) {
        const float *v0 = value(c), *v1 = c + 1 < n_c ? value(c + 1, 1) : nullptr;
        for (int64_t d = 0; d < hd; ++d) row[d] = to_bf16(v0[d]);
        for (int64_t d = 0; d < hd; ++d) row[hdp + d] = v1 ? to_bf16(v1[d]) : 0;
        for (int64_t d = 0; d < hd; ++d) vw[(c / 2) * hdp + d] = uint32_t(row[d]) | uint32_t(row[hdp + d]) << 16;
      }
    }
  };

  // tasks: (kv head, tile of rows), costliest first, taken by the threads as they come free
  const int64_t tile = std::max<int64_t>(1, TILE_Q / group), n_tiles = (R + tile - 1) / tile;
  const int64_t q_max = (tile * group + MR - 1) / MR * MR;  // query vectors of a task, padded to MR
  struct Task {
    int64_t hk, i0, i1, kb0, kb1;
  };
  std::vector<Task> tasks;
  for (int64_t hk = 0; hk < n_kv; ++hk)
    for (int64_t t = 0; t < n_tiles; ++t) {
      const int64_t i0 = t * tile, i1 = std::min(R, i0 + tile);
      int64_t lo = C, hi = 0;
      for (int64_t i = i0; i < i1; ++i)
        if (span[i].lo < span[i].hi) lo = std::min(lo, span[i].lo), hi = std::max(hi, span[i].hi);
      tasks.push_back({hk, i0, i1, lo < hi ? lo / BC : 0, lo < hi ? (hi + BC - 1) / BC : 0});
    }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) {
    return (a.kb1 - a.kb0) * (a.i1 - a.i0) > (b.kb1 - b.kb0) * (b.i1 - b.i0);
  });
  std::atomic<int64_t> next_block{0}, blocks_done{0}, next{0};
  const int64_t n_tasks = int64_t(tasks.size()), n_pack = n_kv * n_blocks;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = float(scale);

  // one parallel region, its threads taking work as they come free: first the blocks to pack, then (once all
  // are packed) the tasks. On a busy machine every region waits for its slowest thread to be scheduled:
  // three regions (spans, packing, tasks) took ~20 ms where this one takes ~2.
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), std::max(n_tasks, n_pack)), 1, [&](int64_t, int64_t) {
    std::vector<uint16_t> row(2 * hdp);
    for (int64_t b = next_block.fetch_add(1); b < n_pack; b = next_block.fetch_add(1)) {
      pack(b, row.data());
      blocks_done.fetch_add(1, std::memory_order_release);
    }
    while (blocks_done.load(std::memory_order_acquire) < n_pack) std::this_thread::yield();  // others' last blocks
    std::vector<float> qf(use_bf16 ? 0 : q_max * hdp), o(q_max * hdp), m(q_max), l(q_max), s(MR * BC);
    std::vector<uint16_t> qh(use_bf16 ? q_max * hdp : 0), ph(use_bf16 ? MR * BC : 0);
    std::vector<int64_t> row_of(q_max);  // index into rows of each query vector
    for (int64_t k = next.fetch_add(1); k < n_tasks; k = next.fetch_add(1)) {
      const Task& task = tasks[k];
      const int64_t nq = (task.i1 - task.i0) * group, nq_pad = (nq + MR - 1) / MR * MR;
      for (int64_t r = 0; r < nq_pad; ++r) {  // query vectors (row, head); padding repeats the last row
        const int64_t i = std::min(task.i0 + r / group, task.i1 - 1), h = task.hk * group + r % group;
        const float* src = qp + (rp[i] * n_head + h) * hd;
        row_of[r] = i;
        for (int64_t d = 0; d < hdp; ++d) {
          const float x = d < hd ? src[d] : 0.f;
          if (use_bf16)
            qh[r * hdp + d] = to_bf16(x);
          else
            qf[r * hdp + d] = x;
        }
      }
      std::fill(o.begin(), o.begin() + nq_pad * hdp, 0.f);
      std::fill(m.begin(), m.begin() + nq_pad, -INFINITY);
      std::fill(l.begin(), l.begin() + nq_pad, 0.f);
      for (int64_t kb = task.kb0; kb < task.kb1; ++kb) {
        const int64_t c0 = kb * BC, b = task.hk * n_blocks + kb;
        for (int64_t rb = 0; rb < nq_pad; rb += MR) {
          // what this block shows the MR rows: nothing (skip), all of it (no mask) or part (mask per cell)
          bool any = false, whole = true;
          int64_t c_end = 0;  // the rows see nothing of the block from c_end on
          for (int r = 0; r < MR; ++r) {
            const Span& sp = span[row_of[rb + r]];
            const int64_t lo = std::max(sp.lo, c0), hi = std::min(sp.hi, c0 + BC);
            if (lo < hi) any = true, c_end = std::max(c_end, hi - c0);
            whole = whole && sp.dense && sp.lo <= c0 && c0 + BC <= sp.hi;
          }
          if (!any) continue;
          if (use_bf16)
            scores_bf16(qh.data() + rb * hdp, reinterpret_cast<const uint16_t*>(kbase) + b * block_elems, hdp,
                        int(c_end), s.data());
          else
            scores_f32(qf.data() + rb * hdp, reinterpret_cast<const float*>(kbase) + b * block_elems, hdp, int(c_end),
                       s.data());
          for (int r = 0; r < MR; ++r) {
            float* sr = s.data() + r * BC;
            const int64_t i = row_of[rb + r];
            if (!whole) {  // hide what the row may not see: outside its span, and inside where not dense
              const Span& sp = span[i];
              const int64_t lo = std::clamp<int64_t>(sp.lo - c0, 0, BC), hi = std::clamp<int64_t>(sp.hi - c0, lo, BC);
              std::fill(sr, sr + lo, -INFINITY);
              std::fill(sr + hi, sr + BC, -INFINITY);
              if (!sp.dense) {
                const bool* mr = mp + i * C + c0;
                for (int64_t c = lo; c < hi; ++c) sr[c] = mr[c] ? sr[c] : -INFINITY;
              }
            }
            // scaled here, not q: bf16(q) . bf16(k) in fp32, then the scale, is torch's bf16 attention too
            const float alpha = softmax_row(sr, sc, m[rb + r], l[rb + r]);
            if (alpha != 1.f)
              for (int64_t d = 0; d < hdp; ++d) o[(rb + r) * hdp + d] *= alpha;
            if (use_bf16) round_bf16(sr, ph.data() + r * BC);
          }
          float* orow = o.data() + rb * hdp;
          if (use_bf16)
            accumulate_bf16(ph.data(), reinterpret_cast<const uint16_t*>(vbase) + b * block_elems, hdp,
                            int(c_end + 1) / 2, orow);
          else
            accumulate_f32(s.data(), reinterpret_cast<const float*>(vbase) + b * block_elems, hdp, int(c_end), orow);
        }
      }
      for (int64_t r = 0; r < nq; ++r) {
        const int64_t i = task.i0 + r / group, h = task.hk * group + r % group;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // a row that sees nothing: zeros
        float* dst = op + (rp[i] * n_head + h) * hd;
        for (int64_t d = 0; d < hd; ++d) dst[d] = o[r * hdp + d] * inv;
      }
    }
  });
}

// the products this build runs: "avx512_bf16" (bf16 where asked, else fp32), "avx512", "avx2" (fp32 FMA) or
// "generic" (GCC vectors of 4 floats: half as fast as torch's attention here, so the engine keeps torch's)
std::string attend_prefill_isa() {
#if defined(__AVX512F__)
  return HAS_BF16 ? "avx512_bf16" : "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "generic";
#endif
}

TORCH_LIBRARY_FRAGMENT(GGUFLM_NS, m) {
  m.def(
      "attend_prefill(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor cells, Tensor? mask, "
      "float scale, bool bf16, Tensor(a!) out) -> ()",
      &attend_prefill);
  m.def("attend_prefill_isa() -> str", &attend_prefill_isa);
}
