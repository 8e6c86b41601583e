// Row-wise ops of a layer, each one call instead of several torch ops (a decode step of a 30-layer
// model runs ~90 of them; torch's dispatch, not the arithmetic, is what they cost there):
//
//   rms_norm:  y = x * w / sqrt(mean(x^2) + eps), x (T, n), w (n): torch runs ~8 elementwise ops
//              (pow, mean, add, rsqrt, mul, ...), 25-30 us for a 576-wide row, ~1 us here
//   gated:     y = act(gate) * up for gate_up (T, 2 n) = [gate | up] -> (T, n), act = SiLU (SwiGLU)
//              or tanh-approximated GELU (GeGLU, Gemma): torch's chunk, act and mul in one pass
//
// All fp32; each row's result is the same whatever else is in the call.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec_math.h"

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rms_norm: tensors must be on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: x and w must be float32");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1), "rms_norm: x must be (T, n) and w (n)");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t T = x.size(0), n = x.size(1);
  at::Tensor y = at::empty_like(xc);
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  constexpr int LANES = 16;
  at::parallel_for(0, T, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, n)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* r = xp + t * n;
      float acc[LANES] = {};
      int64_t i = 0;
      for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; ++l) acc[l] += r[i + l] * r[i + l];
      float s = 0.f;
      for (; i < n; ++i) s += r[i] * r[i];
      for (int l = 0; l < LANES; ++l) s += acc[l];
      const float scale = 1.f / std::sqrt(s / float(n) + float(eps));
      for (int64_t j = 0; j < n; ++j) yp[t * n + j] = r[j] * scale * wp[j];
    }
  });
  return y;
}

at::Tensor gated(const at::Tensor& gate_up, bool gelu) {
  TORCH_CHECK(gate_up.device().is_cpu() && gate_up.scalar_type() == at::kFloat, "gated: gate_up must be float32 on the CPU");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gated: gate_up must be (T, 2 n)");
  const at::Tensor xc = gate_up.contiguous();
  const int64_t T = xc.size(0), n = xc.size(1) / 2;
  at::Tensor y = at::empty({T, n}, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float k0 = 0.7978845608028654f, k1 = 0.044715f;  // sqrt(2 / pi), GELU's cubic term
  at::parallel_for(0, T, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float *g = xp + t * 2 * n, *u = g + n;
      float* o = yp + t * n;
      if (gelu) {  // 0.5 g (1 + tanh(z)) = g (1 - 1 / (e^2z + 1))
        for (int64_t j = 0; j < n; ++j) {
          const float z = k0 * (g[j] + k1 * g[j] * g[j] * g[j]);
          o[j] = g[j] * (1.f - 1.f / (fast_exp(2.f * z) + 1.f)) * u[j];
        }
      } else {  // g / (1 + e^-g)
        for (int64_t j = 0; j < n; ++j) o[j] = g[j] / (1.f + fast_exp(-g[j])) * u[j];
      }
    }
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(GGUFLM_NS, m) {
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm);
  m.def("gated(Tensor gate_up, bool gelu) -> Tensor", &gated);
}
