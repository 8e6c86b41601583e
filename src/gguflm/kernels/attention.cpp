// Attention of a few rows (decode, parallel decode) over the KV cache, in two calls per layer:
//
//   rope_store:   q/k RMSNorm per head (optional), rope, write k and v into the cache -> q
//   attend_cells: each query row against the cells it may see -> its output
//
// Why native: in Python this is ~20 small tensor ops per layer, each costing more in dispatch than in
// arithmetic; and torch's fused attention does not give a row the same sums when it shares the call
// with other rows (B = 2 differs from B = 1 in the last bits), which breaks the engine's promise that a
// sequence samples the same tokens whatever shares its batch. Here every (row, head) is one task whose
// arithmetic depends only on that row's query and the cells it sees, in the order given (the caller
// passes each sequence set's cells in position order), never on the other rows or masked cells.
//
// Layouts (contiguous; fp32 but for the caches, which are fp32 or fp16):
//   qkv      (T, (n_head + 2 n_head_kv) hd)  the fused projection: q heads, k heads, v heads
//   rot      (T, rd/2, 2)                    mscale (cos, sin) of each rope pair at the row's position
//   k_cache  (n_ctx, n_head_kv, hd)          one layer of the KV cache, written in place
//   q        (T, n_head, hd)
// Rope pairs are adjacent elements (2j, 2j+1) of the first rd of each head (NEOX models permute their
// q/k weight rows into this order at load).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "vec_math.h"


namespace {

constexpr int LANES = 16;

// sum a[i] b[i] in LANES independent partial sums, folded in halves (same order every call; folding the
// lanes one by one was a chain of 16 dependent adds, most of a decode score's time). With AVX512 or AVX2 the
// fold is written out: the compiler's went through the stack.
inline float dot(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + LANES <= n; i += LANES) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  const __m256 lo = _mm512_castps512_ps256(acc);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
#else
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  // lanes 0-7, 8-15
  for (; i + LANES <= n; i += LANES) {
    lo = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), lo);
    hi = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), hi);
  }
#endif
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  // lanes l + (l + 8), then + (l + 4), (l + 2), (l + 1): the portable fold's order
  const __m256 h8 = _mm256_add_ps(lo, hi);
  const __m128 h4 = _mm_add_ps(_mm256_castps256_ps128(h8), _mm256_extractf128_ps(h8, 1));
  const __m128 h2 = _mm_add_ps(h4, _mm_movehl_ps(h4, h4));
  return s + _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2)));
#else
  float acc[LANES] = {};
  for (; i + LANES <= n; i += LANES)
    for (int l = 0; l < LANES; ++l) acc[l] += a[i + l] * b[i + l];
  float s = 0.f;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int w = LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return s + acc[0];
#endif
}

// x (n) <- x * w / sqrt(mean(x^2) + eps)
inline void rms_norm_inplace(float* x, const float* w, int64_t n, float eps) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / float(n) + eps);
  for (int64_t j = 0; j < n; ++j) x[j] = x[j] * r * w[j];
}

inline void rope_inplace(float* x, const float* rot, int64_t rd) {
  for (int64_t j = 0; j < rd / 2; ++j) {
    const float a = x[2 * j], b = x[2 * j + 1], c = rot[2 * j], s = rot[2 * j + 1];
    x[2 * j] = a * c - b * s;
    x[2 * j + 1] = a * s + b * c;
  }
}

void check_f32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// The KV cache holds float32 or IEEE half (llama.cpp's default cache type: half the bytes a decode step's
// attention reads). Both caches of a layer have one dtype.
void check_caches(const at::Tensor& k_cache, const at::Tensor& v_cache) {
  for (const at::Tensor* t : {&k_cache, &v_cache}) {
    TORCH_CHECK(t->device().is_cpu(), "caches must be on the CPU");
    TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kHalf,
                "caches must be float32 or float16, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 3 && t->is_contiguous(), "caches must be contiguous (n_ctx, n_head_kv, head_dim)");
  }
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "k_cache and v_cache must have one dtype");
}

}  // namespace

// -> q (T, n_head, hd); k, v of each row written to k_cache[cells[t]], v_cache[cells[t]]
at::Tensor rope_store(const at::Tensor& qkv, const at::Tensor& rot, const c10::optional<at::Tensor>& q_norm,
                      const c10::optional<at::Tensor>& k_norm, double eps, at::Tensor k_cache, at::Tensor v_cache,
                      const at::Tensor& cells, int64_t n_head) {
  check_f32(qkv, "qkv", 2);
  check_f32(rot, "rot", 3);
  check_caches(k_cache, v_cache);
  TORCH_CHECK(cells.scalar_type() == at::kLong && cells.dim() == 1, "cells must be 1-D int64");
  const int64_t T = qkv.size(0), n_ctx = k_cache.size(0), n_kv = k_cache.size(1), hd = k_cache.size(2);
  const int64_t rd = rot.size(1) * 2;
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must have k_cache's shape");
  TORCH_CHECK(qkv.size(1) == (n_head + 2 * n_kv) * hd, "qkv has ", qkv.size(1), " columns, expected ",
              (n_head + 2 * n_kv) * hd);
  TORCH_CHECK(rot.size(0) == T && rot.size(2) == 2 && rd <= hd, "rot must be (T, rd/2, 2) with rd <= head_dim");
  TORCH_CHECK(cells.size(0) == T, "cells must have one entry per row");
  const bool norm = q_norm.has_value();
  TORCH_CHECK(norm == k_norm.has_value(), "q_norm and k_norm come together");
  if (norm) {
    check_f32(*q_norm, "q_norm", 1);
    check_f32(*k_norm, "k_norm", 1);
    TORCH_CHECK(q_norm->size(0) == hd && k_norm->size(0) == hd, "q_norm and k_norm must have head_dim entries");
  }
  const at::Tensor cc = cells.contiguous();
  const int64_t* cp = cc.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(cp[t] >= 0 && cp[t] < n_ctx, "cell ", cp[t], " is outside the cache");

  at::Tensor q = at::empty({T, n_head, hd}, qkv.options());
  const float *src = qkv.data_ptr<float>(), *rp = rot.data_ptr<float>();
  const float* qn = norm ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = norm ? k_norm->data_ptr<float>() : nullptr;
  float* qp = q.data_ptr<float>();
  const int64_t width = (n_head + 2 * n_kv) * hd, heads = n_head + n_kv;
  auto run = [&](auto* kp, auto* vp) {
    const auto kp_as_floats = [](auto* cache_row, float* row) -> float* {
      if constexpr (std::is_same_v<decltype(cache_row), float*>)
        return cache_row;
      else
        return row;
    };
    at::parallel_for(0, T * heads, 16, [&](int64_t i0, int64_t i1) {
      std::vector<float> row(hd);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t t = i / heads, h = i % heads;
        const float* in = src + t * width + h * hd;
        const int64_t at_cell = (cp[t] * n_kv + (h - n_head)) * hd;  // a k head's place in the cache
        // a q head and an fp32 cache's k head are computed where they go; an fp16 one's in `row`, then rounded
        float* out = h < n_head ? qp + (t * n_head + h) * hd : kp_as_floats(kp + at_cell, row.data());
        std::copy(in, in + hd, out);
        if (norm) rms_norm_inplace(out, h < n_head ? qn : kn, hd, float(eps));
        rope_inplace(out, rp + t * rd, rd);
        if (h >= n_head) {  // a k head: it and its v head into the cache
          store_row(out, kp + at_cell, hd);
          store_row(src + t * width + (n_head + n_kv + (h - n_head)) * hd, vp + at_cell, hd);
        }
      }
    });
  };
  if (k_cache.scalar_type() == at::kHalf)
    run(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  else
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
  return q;
}

// q (T, n_head, hd), caches (n_ctx, n_head_kv, hd); for each group g of sequence sets: rows[g] (B, R) rows of q,
// cells[g] (B, C) cache cells of each set in position order, mask[g] (B, R, C) true = may attend -> out (T, n_head,
// hd): the rows named are overwritten, the others left as they are. Every (set, row, head) of every group is one
// task of one parallel loop: a server step's sequences (one group per distinct cell count) cost one fork, not one each.
void attend_cells(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, at::TensorList rows,
                  at::TensorList cells, at::TensorList mask, double scale, double softcap, at::Tensor out) {
  check_f32(q, "q", 3);
  check_caches(k_cache, v_cache);
  check_f32(out, "out", 3);
  TORCH_CHECK(out.sizes() == q.sizes(), "out must have q's shape");
  TORCH_CHECK(rows.size() == cells.size() && rows.size() == mask.size(), "rows, cells and mask need one entry per group");
  const int64_t T = q.size(0), n_head = q.size(1), hd = q.size(2);
  const int64_t n_ctx = k_cache.size(0), n_kv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == hd && v_cache.sizes() == k_cache.sizes(), "caches must be (n_ctx, n_head_kv, head_dim)");
  TORCH_CHECK(n_kv > 0 && n_head % n_kv == 0, "n_head (", n_head, ") must be a multiple of n_head_kv (", n_kv, ")");
  struct Group {
    at::Tensor rows, cells, mask;  // contiguous (copies where the caller's were not)
    int64_t R, C, first_task;
    const int64_t *rp, *cp;
    const bool* mp;
  };
  // A task is (set row, kv head, part): the query heads sharing a kv head read each key and value row
  // once (converted once from fp16), in `split` parts: the fewest parts for which the busiest thread has
  // the fewest heads (a single row's step: Gemma 3's 4 heads of one kv head in 2 parts on 2 threads).
  // Each head's arithmetic is the same whatever the split: the same bits.
  const int64_t group = n_head / n_kv, threads = at::get_num_threads();
  int64_t n_rows = 0;
  for (const at::Tensor& r : rows) n_rows += r.numel();
  int64_t split = 1, busiest = INT64_MAX;
  for (int64_t s = 1; s <= group; ++s) {
    const int64_t heads = (n_rows * n_kv * s + threads - 1) / threads * ((group + s - 1) / s);
    if (heads < busiest) busiest = heads, split = s;
  }
  const int64_t per = (group + split - 1) / split;  // query heads per task (fewer in a kv head's last part)
  std::vector<Group> groups;
  int64_t n_tasks = 0, C_max = 0;
  for (size_t g = 0; g < rows.size(); ++g) {
    TORCH_CHECK(rows[g].scalar_type() == at::kLong && rows[g].dim() == 2, "rows must be (B, R) int64");
    TORCH_CHECK(cells[g].scalar_type() == at::kLong && cells[g].dim() == 2, "cells must be (B, C) int64");
    TORCH_CHECK(mask[g].scalar_type() == at::kBool && mask[g].dim() == 3, "mask must be (B, R, C) bool");
    const int64_t B = rows[g].size(0), R = rows[g].size(1), C = cells[g].size(1);
    TORCH_CHECK(cells[g].size(0) == B && mask[g].size(0) == B && mask[g].size(1) == R && mask[g].size(2) == C,
                "mask must be (B, R, C) for rows (B, R) and cells (B, C)");
    Group grp{rows[g].contiguous(), cells[g].contiguous(), mask[g].contiguous(), R, C, n_tasks, nullptr, nullptr, nullptr};
    const int64_t *rp = grp.rp = grp.rows.data_ptr<int64_t>(), *cp = grp.cp = grp.cells.data_ptr<int64_t>();
    grp.mp = grp.mask.data_ptr<bool>();
    for (int64_t i = 0; i < B * R; ++i) TORCH_CHECK(rp[i] >= 0 && rp[i] < T, "row ", rp[i], " is outside q");
    for (int64_t i = 0; i < B * C; ++i) TORCH_CHECK(cp[i] >= 0 && cp[i] < n_ctx, "cell ", cp[i], " is outside the cache");
    n_tasks += B * R * n_kv * split;
    C_max = std::max(C_max, C);
    groups.push_back(std::move(grp));
  }

  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = float(scale), cap = float(softcap);
  auto run = [&](const auto* kp, const auto* vp) {
    constexpr int64_t LINE = 64 / sizeof(*kp);  // cache elements per 64-byte line, for the prefetches
    at::parallel_for(0, n_tasks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> score(per * C_max), row(hd), best(per), total(per);
      std::vector<int64_t> seen(C_max);
      size_t g = 0;
      for (int64_t task = i0; task < i1; ++task) {
        while (g + 1 < groups.size() && groups[g + 1].first_task <= task) ++g;
        const Group& grp = groups[g];
        const int64_t i = task - grp.first_task, C = grp.C;
        const int64_t br = i / (n_kv * split), hk = i / split % n_kv, part = i % split;
        const int64_t h0 = hk * group + part * per, nh = std::min(per, (hk + 1) * group - h0);  // heads h0..
        if (nh <= 0) continue;
        const int64_t b = br / grp.R, t = grp.rp[br];
        const int64_t* cp = grp.cp + b * C;
        const bool* m = grp.mp + br * C;
        const float* qv = qp + (t * n_head + h0) * hd;  // (nh, hd)
        int64_t n = 0;
        std::fill(best.begin(), best.begin() + nh, -INFINITY);
        for (int64_t c = 0; c < C; ++c) {
          if (c + 4 < C)  // the key 4 cells on: the cells are scattered rows of the cache
            for (int64_t l = 0; l < hd; l += LINE) __builtin_prefetch(kp + (cp[c + 4] * n_kv + hk) * hd + l);
          if (!m[c]) continue;
          const int64_t cell = cp[c];
          const float* key = as_floats(kp + (cell * n_kv + hk) * hd, row.data(), hd);
          for (int64_t j = 0; j < nh; ++j) {
            float s = dot(qv + j * hd, key, hd) * sc;
            if (cap > 0.f) s = std::tanh(s / cap) * cap;
            score[j * C_max + n] = s;
            best[j] = std::max(best[j], s);
          }
          seen[n++] = cell;
        }
        float* o = op + (t * n_head + h0) * hd;  // (nh, hd)
        std::fill(o, o + nh * hd, 0.f);
        if (n == 0) continue;  // sees nothing: zeros
        for (int64_t j = 0; j < nh; ++j) {
          float* sj = score.data() + j * C_max;
          for (int64_t x = 0; x < n; ++x) sj[x] = fast_exp(sj[x] - best[j]);  // vectorized
          float lanes[LANES] = {};
          int64_t x = 0;
          for (; x + LANES <= n; x += LANES)
            for (int l = 0; l < LANES; ++l) lanes[l] += sj[x + l];
          float sum = 0.f;
          for (; x < n; ++x) sum += sj[x];
          for (int l = 0; l < LANES; ++l) sum += lanes[l];
          total[j] = sum;
        }
        for (int64_t x = 0; x < n; ++x) {
          if (x + 4 < n)
            for (int64_t l = 0; l < hd; l += LINE) __builtin_prefetch(vp + (seen[x + 4] * n_kv + hk) * hd + l);
          const float* vv = as_floats(vp + (seen[x] * n_kv + hk) * hd, row.data(), hd);
          for (int64_t j = 0; j < nh; ++j) {
            const float p = score[j * C_max + x] / total[j];
            float* oj = o + j * hd;
            for (int64_t d = 0; d < hd; ++d) oj[d] += p * vv[d];
          }
        }
      }
    });
  };
  if (k_cache.scalar_type() == at::kHalf)
    run(k_cache.data_ptr<at::Half>(), v_cache.data_ptr<at::Half>());
  else
    run(k_cache.data_ptr<float>(), v_cache.data_ptr<float>());
}

TORCH_LIBRARY_FRAGMENT(GGUFLM_NS, m) {
  m.def(
      "rope_store(Tensor qkv, Tensor rot, Tensor? q_norm, Tensor? k_norm, float eps, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, Tensor cells, int n_head) -> Tensor",
      &rope_store);
  m.def(
      "attend_cells(Tensor q, Tensor k_cache, Tensor v_cache, Tensor[] rows, Tensor[] cells, Tensor[] mask, "
      "float scale, float softcap, Tensor(a!) out) -> ()",
      &attend_cells);
}
