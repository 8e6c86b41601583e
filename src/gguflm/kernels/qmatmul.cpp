// Quantized matrix products on the file's block layout (qmatmul): the fallback for every format and the
// reference the row-interleaved kernels (packed.cpp) are tested against. Formats, activations and the
// integer arithmetic: qmatmul.h.

#include "qmatmul.h"

namespace {

// y[m, n] for weight rows n in [n0, n1) and the MT activation rows of `a` starting at m0.
// MT is a compile-time tile height so the accumulators live in registers; two accumulator sets
// (even / odd chunks) break the FMA dependency chain.
template <class F, int MT>
void rows_kernel(const uint8_t* W, int64_t K, const Q8Act& a, int64_t m0, float* y, int64_t N, int64_t n0,
                 int64_t n1) {
  constexpr int CPB = F::QK / 32;  // 32-element chunks per block
  const int64_t nchunk = K / 32, row_bytes = K / F::QK * F::BYTES, nb = a.nb;
  const int8_t* xq = a.q.data() + m0 * K;
  const float* xd = a.d.data() + m0 * nb;
  const float* xs = a.s.data() + m0 * nb;
  // two accumulator sets whatever MT is: a row's sum then has the same order in every tile height, so a
  // row gets bit-identical results whatever else shares the call (the engine's batch invariance)
  constexpr int NP = 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = W + n * row_bytes;
#if defined(__AVX2__)
    __m256 acc[2][MT];
    for (int m = 0; m < MT; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
#else
    float acc[2][MT] = {};
#endif
    float lin[2][MT] = {};  // sums of cw * sx (UNSIGNED kinds)
    auto step = [&](const uint8_t* b, const typename F::Head& h, int64_t c, int p_) __attribute__((always_inline)) {
      const int p = p_ % NP;
      Chunk ch;
      F::decode(b, h, (int)(c % CPB), ch);
      for (int m = 0; m < MT; ++m) {
        const float dx = xd[m * nb + c];
#if defined(__AVX2__)
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + m * K + c * 32));
        acc[p][m] = _mm256_fmadd_ps(_mm256_set1_ps(ch.dw * dx), chunk_dot<F::kind>(ch, xv), acc[p][m]);
#else
        acc[p][m] += ch.dw * dx * chunk_dot<F::kind>(ch, xq + m * K + c * 32);
#endif
        if constexpr (F::kind == UNSIGNED) lin[p][m] += ch.cw * xs[m * nb + c];
      }
    };
    if constexpr (CPB == 1) {  // 32-element blocks: take them in pairs (even -> acc[0], odd -> acc[1])
      const typename F::Head h{};
      int64_t c = 0;
      for (; c + 1 < nchunk; c += 2) {
        step(row + c * F::BYTES, h, c, 0);
        step(row + (c + 1) * F::BYTES, h, c + 1, 1);
      }
      if (c < nchunk) step(row + c * F::BYTES, h, c, 0);
    } else {  // super-blocks: decode the block's header once, then its CPB chunks
      for (int64_t blk = 0; blk < nchunk / CPB; ++blk) {
        const uint8_t* b = row + blk * F::BYTES;
        typename F::Head h;
        F::head(b, h);
#pragma GCC unroll 8
        for (int j = 0; j < CPB; ++j) step(b, h, blk * CPB + j, j & 1);
      }
    }
    for (int m = 0; m < MT; ++m) {
#if defined(__AVX2__)
      y[(m0 + m) * N + n] = hsum(_mm256_add_ps(acc[0][m], acc[1][m])) + (lin[0][m] + lin[1][m]);
#else
      y[(m0 + m) * N + n] = (acc[0][m] + acc[1][m]) + (lin[0][m] + lin[1][m]);
#endif
    }
  }
}

using KernelFn = void (*)(const uint8_t*, int64_t, const Q8Act&, int64_t, float*, int64_t, int64_t, int64_t);

struct Format {
  int qk, bytes;
  KernelFn tile[4];  // MT = 1, 2, 4, 8
};

template <class F>
Format format_of() {
  return {F::QK, F::BYTES, {&rows_kernel<F, 1>, &rows_kernel<F, 2>, &rows_kernel<F, 4>, &rows_kernel<F, 8>}};
}

bool lookup(int64_t qtype, Format& f) {
  switch (qtype) {
    case T_Q4_0: f = format_of<FQ4_0>(); return true;
    case T_Q4_1: f = format_of<FQ4_1>(); return true;
    case T_Q5_0: f = format_of<FQ5_0>(); return true;
    case T_Q5_1: f = format_of<FQ5_1>(); return true;
    case T_Q8_0: f = format_of<FQ8_0>(); return true;
    case T_Q4_K: f = format_of<FQ4_K>(); return true;
    case T_Q5_K: f = format_of<FQ5_K>(); return true;
    case T_Q6_K: f = format_of<FQ6_K>(); return true;
    default: return false;
  }
}

}  // namespace

// x (M, K) fp32, raw: flat uint8 GGUF bytes of W (n_out, K) -> y (M, n_out) fp32; levels: 1 or 2
// activation codes per value (quantize_rows)
at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& raw, int64_t qtype, int64_t n_out, int64_t levels) {
  Format f;
  TORCH_CHECK(lookup(qtype, f), "qmatmul: ggml type ", qtype, " is not supported by the native kernels");
  TORCH_CHECK(x.device().is_cpu() && raw.device().is_cpu(), "qmatmul: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2, "qmatmul: x must be 2-D (M, K), got ", x.dim(), "-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat, "qmatmul: x must be float32, got ", x.scalar_type());
  TORCH_CHECK(raw.scalar_type() == at::kByte, "qmatmul: raw must be uint8, got ", raw.scalar_type());
  TORCH_CHECK(raw.dim() == 1 && raw.is_contiguous(), "qmatmul: raw must be a flat contiguous uint8 tensor");
  TORCH_CHECK(n_out >= 0, "qmatmul: n_out must be >= 0, got ", n_out);
  TORCH_CHECK(levels == 1 || levels == 2, "qmatmul: levels must be 1 or 2, got ", levels);
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % f.qk == 0, "qmatmul: K = ", K, " is not a multiple of the block size ", f.qk);
  const int64_t row_bytes = K / f.qk * f.bytes, need = n_out * row_bytes;
  TORCH_CHECK(raw.numel() == need, "qmatmul: W (", n_out, ", ", K, ") needs ", need, " bytes, got ", raw.numel());

  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, n_out}, x.options());
  if (M == 0 || n_out == 0) return y;
  if (K == 0) return y.zero_();
  Q8Act a;
  quantize_rows(xc.data_ptr<float>(), M, K, (int)levels, a);  // once per call, shared by all threads
  const uint8_t* W = raw.data_ptr<uint8_t>();
  at::Tensor y_act = levels == 1 ? y : at::empty({a.M, n_out}, x.options());  // a row per activation row
  float* yp = y_act.data_ptr<float>();
  // grain: at least ~16 KiB of weights per task, so small layers are not cut into tiny pieces
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_bytes));
  at::parallel_for(0, n_out, grain, [&](int64_t n0, int64_t n1) {
    // tiles of 8, 4, 2, 1 activation rows over panels of `grain` weight rows: a panel (~16 KiB) stays
    // in cache while every tile of activation rows passes over it
    for (int64_t p0 = n0; p0 < n1; p0 += grain) {
      const int64_t p1 = std::min(n1, p0 + grain);
      for (int64_t m0 = 0; m0 < a.M;) {
        const int64_t left = a.M - m0;
        const int t = left >= 8 ? 3 : left >= 4 ? 2 : left >= 2 ? 1 : 0;
        f.tile[t](W, K, a, m0, yp, n_out, p0, p1);
        m0 += int64_t(1) << t;
      }
    }
  });
  if (levels == 2) {  // y[m] = y_act[2m] + y_act[2m + 1]
    const float* ya = y_act.data_ptr<float>();
    float* yo = y.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < n_out; ++n) yo[m * n_out + n] = ya[2 * m * n_out + n] + ya[(2 * m + 1) * n_out + n];
  }
  return y;
}

std::string isa() {
#if defined(__AVX2__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

// Registered as torch operators (no pybind11: the build is faster); GGUFLM_NS is the op namespace,
// unique per build so several builds (paths) can be loaded in one process.
TORCH_LIBRARY(GGUFLM_NS, m) {
  m.def("qmatmul(Tensor x, Tensor raw, int qtype, int n_out, int levels=1) -> Tensor", &qmatmul);
  m.def("isa() -> str", &isa);
}
