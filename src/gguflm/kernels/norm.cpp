// RMSNorm of each row: y = x * w / sqrt(mean(x^2) + eps), x (T, n) fp32, w (n) fp32.
//
// Why native: torch runs it as ~8 elementwise ops (pow, mean, add, rsqrt, mul, ...), 25-30 us per call
// for a 576-wide row, against ~1 us here; a decode step of a 30-layer model takes 61 of them.
// Each row's sum is taken in the same order whatever else is in the call.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

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

TORCH_LIBRARY_FRAGMENT(GGUFLM_NS, m) { m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor", &rms_norm); }
