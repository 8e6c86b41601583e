// exp for loops the compiler vectorizes: std::exp is a scalar library call (~20-40 cycles a value), which
// made the activations and the attention's softmax of a decode step cost more than their products.
//
// e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two parts so
// that r is exact to ~1e-10), e^r by its Taylor series to r^7 (remainder < 6e-9 relative), 2^n put into
// the exponent bits. Relative error ~2 ulp against std::exp; x is clamped to [-87, 88]: e^-87 ~ 1.6e-38
// stands in for everything smaller (the smallest normal float is 1.2e-38), e^88 for everything larger.
#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX__)
#include <immintrin.h>
#endif

inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t)(n + 127.f) << 23;  // 2^n, n in [-126, 127]
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// KV cache rows (attention.cpp, prefill_attention.cpp) are float32 or IEEE half.
// a cache row as floats: the row itself (float32), or converted into buf (half)
inline const float* as_floats(const float* row, float*, int64_t) { return row; }
inline const float* as_floats(const at::Half* row, float* buf, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(row + i))));
#endif
  for (; i < n; ++i) buf[i] = float(row[i]);
  return buf;
}

// floats -> a cache row, rounded to nearest even for half (as torch's .to(float16), so the Python path
// writes the same cache)
inline void store_row(const float* src, float* dst, int64_t n) {
  if (src != dst) std::copy(src, src + n, dst);
}
inline void store_row(const float* src, at::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = at::Half(src[i]);
}
