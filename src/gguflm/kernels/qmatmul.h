// Shared by qmatmul.cpp (products on the file's block layout) and packed.cpp (on the row-interleaved copy):
// the block formats' decoders, the activations' 8-bit quantization and the integer dot products.
//
// Quantized matrix products for small batches: y (M, N) fp32 = x (M, K) fp32 @ W^T, W (N, K) kept in
// its GGUF block format (the raw file bytes: N rows, each K / QK blocks, no repacking).
//
// llama.cpp's idea (ggml_vec_dot_*_q8_*): quantize every activation row once, per block of 32, to
// 8 bits (Q8_0-like: d = max|x| / 127, q = round(x / d)), then per 32-element chunk of a weight row take
// an integer dot product of the weight codes with the activation codes and scale it in fp32:
//
//   y[m, n] += dw * dx[m, b] * sum_i(u_i * qx_i)  +  cw * sx[m, b]        sx = dx * sum_i(qx_i)
//
// where u are the weight's codes as stored (unsigned for the 4/5-bit formats), dw their scale and
// cw the constant part of the block (its min, or -offset * dw for the formats that centre their codes,
// e.g. Q4_0's value is (u - 8) * d). Q8_0 and Q6_K use signed codes instead (cw = 0).
//
// Paths, chosen at compile time from the -march flags of the build (one build per machine / ISA):
//   AVX512-VNNI (+VL): _mm256_dpbusd_epi32 (u8 x s8 -> s32, four products per lane, no saturation)
//   AVX2:              _mm256_maddubs_epi16 then _mm256_madd_epi16 with ones (pairs -> s16 -> s32)
//   otherwise:         plain C++ (same arithmetic, one element at a time)
// Integer dots are exact; the only approximation against the fp32 reference is the activation
// quantization (relative error about 1/254 of each block's max |x|).

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// ggml type ids (gguf.GGMLQuantizationType)
constexpr int64_t T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14;

inline float f16_to_f32(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);  // inf / nan
  } else if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalize
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400));
      bits = sign | (uint32_t)(127 - 15 - e) << 23 | ((man & 0x3FF) << 13);
    }
  } else {
    bits = sign | (exp + 112) << 23 | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

// Activations of one tile of rows, quantized per block of 32.
struct Q8Act {
  int64_t M = 0, nb = 0;     // rows, blocks of 32 per row
  int levels = 1;            // activation rows per row of x (quantize_rows): 2m and 2m + 1 sum to x's row m
  std::vector<int8_t> q;     // (M, K) codes in -127..127
  std::vector<float> d;      // (M, nb) scales
  std::vector<float> s;      // (M, nb) d * sum of the block's codes
  std::vector<int32_t> si;   // (M, nb) sum of the block's codes
  std::vector<int32_t> s16;  // (M, K / 16) sums of 16 codes: only for the packed Q6_K kernel (sums_of_16)
  std::vector<int16_t> q16;  // (M, K) 16-bit codes instead of q (quantize_rows_16): AVX2's two-level Q8_0
};

#if defined(__AVX2__)
// the 32 values at xb -> v; returns their max |x|
inline float load_block(const float* xb, __m256 (&v)[4]) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 vmax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(xb + 8 * i);
    vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, v[i]));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
}
#endif

// 32 values -> codes q = round(x / d), d = max|x| / 127; returns d, sets *sum to the codes' sum
inline float quantize_block(const float* xb, int8_t* qb, int* sum) {
#if defined(__AVX2__)
  // the same arithmetic 8 lanes at a time: cvtps rounds half to even (MXCSR's default), as nearbyint does
  __m256 v[4];
  const float d = load_block(xb, v) / 127.f;
  const __m256 id = _mm256_set1_ps(d ? 1.f / d : 0.f);
  __m256i q[4], total = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], id));
    total = _mm256_add_epi32(total, q[i]);
  }
  // int32 -> int8 (|q| <= 127: no saturation); packs work per 128-bit lane, the permute restores order
  const __m256i q16 = _mm256_packs_epi32(q[0], q[1]), r16 = _mm256_packs_epi32(q[2], q[3]);
  const __m256i q8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(q16, r16), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256((__m256i*)qb, q8);
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  *sum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1)));
  return d;
#else
  float amax = 0.f;
  for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(xb[i]));
  const float d = amax / 127.f;
  const float id = d ? 1.f / d : 0.f;
  *sum = 0;
  for (int i = 0; i < 32; ++i) {
    const int v = (int)std::nearbyint(xb[i] * id);  // round half to even, like ggml's AVX path
    qb[i] = (int8_t)v;
    *sum += v;
  }
  return d;
#endif
}

// levels = 1: row m of x -> activation row m (llama.cpp's Q8 activations).
// levels = 2: row m -> activation rows 2m (x quantized) and 2m + 1 (what that rounding left, x - d q,
// quantized again): their products sum to x's within max|x_b| / 254^2 per element instead of
// max|x_b| / 254, finer than bf16, for twice the integer work (weights are decoded once per tile).
void quantize_rows(const float* x, int64_t M, int64_t K, int levels, Q8Act& a) {
  a.M = M * levels;
  a.levels = levels;
  a.nb = K / 32;
  a.q.resize(a.M * K);
  a.d.resize(a.M * a.nb);
  a.s.resize(a.M * a.nb);
  a.si.resize(a.M * a.nb);
  // rows in parallel for a prefill (serial it was an eighth of a 512-row product); a decode's few rows
  // stay on the calling thread (grain): each row's codes are the same either way
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
  float rest[32];
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t b = 0; b < a.nb; ++b) {
      const float* xb = x + m * K + b * 32;
      const int64_t r = m * levels;  // the first activation row of x's row m
      int8_t* qb = a.q.data() + r * K + b * 32;
      int sum;
      const float d = quantize_block(xb, qb, &sum);
      a.d[r * a.nb + b] = d;
      a.s[r * a.nb + b] = d * (float)sum;
      a.si[r * a.nb + b] = sum;
      if (levels == 2) {
        for (int i = 0; i < 32; ++i) rest[i] = xb[i] - d * (float)qb[i];
        int8_t* qr = a.q.data() + (r + 1) * K + b * 32;
        const float dr = quantize_block(rest, qr, &sum);
        a.d[(r + 1) * a.nb + b] = dr;
        a.s[(r + 1) * a.nb + b] = dr * (float)sum;
        a.si[(r + 1) * a.nb + b] = sum;
      }
    }
  }
  });
}

#if defined(__AVX2__)
// Row m of x -> 16-bit codes q16 = round(x / d), d = max|x_b| / 32767 per block of 32 (a.d; a.levels 1):
// within max|x_b| / 65534 per element, finer than two 8-bit levels' max|x_b| / 64516. Where the CPU has no
// VNNI, Q8_0 takes these for levels = 2: int16 x int16 pair sums (madd) cost half the two levels' work.
// Each 4 codes are stored in the order 0 2 1 3 (the packed Q8_0 kernel's even and odd pairs).
inline void quantize_rows_16(const float* x, int64_t M, int64_t K, Q8Act& a) {
  a.M = M;
  a.levels = 1;
  a.nb = K / 32;
  a.q16.resize(M * K);
  a.d.resize(M * a.nb);
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {  // as quantize_rows: a prefill's rows in parallel
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < a.nb; ++b) {
        __m256 v[4];
        const float d = load_block(x + m * K + b * 32, v) / 32767.f;
        const __m256 id = _mm256_set1_ps(d ? 1.f / d : 0.f);
        int16_t* qb = a.q16.data() + m * K + b * 32;
        for (int i = 0; i < 4; i += 2) {  // packs saturates (x / d may round to 32767 + an ulp) per 128-bit lane
          __m256i q = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], id)),
                                         _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], id)));
          q = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(_mm256_permute4x64_epi64(q, 0xD8), 0xD8), 0xD8);
          _mm256_storeu_si256((__m256i*)(qb + 8 * i), q);
        }
        a.d[m * a.nb + b] = d;
      }
  });
}
#endif

// One decoded 32-element chunk of a weight row.
//   kind UNSIGNED: u in 0..63 (bytes);  value = dw * u + cw
//   kind SIGNED:   u in -128..127;      value = dw * u            (Q8_0)
//   kind SIGNED2:  u in -32..31;        value = dw * sc[half] * u (Q6_K: two 16-element sub-blocks)
enum Kind { UNSIGNED, SIGNED, SIGNED2 };

struct Chunk {
#if defined(__AVX2__)
  __m256i u;
#else
  int8_t u[32];  // as signed bytes; UNSIGNED codes are < 64 so they fit
#endif
  float dw, cw;
  int16_t sc[2];  // SIGNED2 only
};

#if defined(__AVX2__)
// 16 bytes of nibbles -> 32 bytes: low nibbles first (elements 0..15), then high nibbles (16..31).
inline __m256i nibbles_32(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128((const __m128i*)p);
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}
// 4 bytes, bit i = element i -> 32 bytes, 0xFF where the bit is set (llama.cpp's bytes_from_bits_32).
inline __m256i bits_32(const uint8_t* p) {
  uint32_t x32;
  std::memcpy(&x32, p, 4);
  const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
  bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
  return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}
#else
inline void nibbles_32(const uint8_t* p, int8_t* u) {
  for (int i = 0; i < 16; ++i) {
    u[i] = (int8_t)(p[i] & 0x0F);
    u[i + 16] = (int8_t)(p[i] >> 4);
  }
}
inline void add_bits_32(const uint8_t* p, int8_t* u) {
  uint32_t x32;
  std::memcpy(&x32, p, 4);
  for (int i = 0; i < 32; ++i) u[i] |= (int8_t)(((x32 >> i) & 1) << 4);
}
#endif

// ---- block formats: QK elements per block, BYTES per block, decode(block, chunk index, out) ------

// Q8_0: d f16 | qs int8[32]                                        value = d * q
struct FQ8_0 {
  static constexpr int QK = 32, BYTES = 34;
  static constexpr Kind kind = SIGNED;
  struct Head {};
  static inline void head(const uint8_t*, Head&) {}
  static inline void decode(const uint8_t* b, const Head&, int, Chunk& c) {
    c.dw = f16_to_f32(b);
    c.cw = 0.f;
#if defined(__AVX2__)
    c.u = _mm256_loadu_si256((const __m256i*)(b + 2));
#else
    std::memcpy(c.u, b + 2, 32);
#endif
  }
};

// The legacy 32-element formats differ only in an optional min and an optional 5th-bit word:
//   Q4_0: d f16 |                 qs[16]   value = d * (q - 8)
//   Q4_1: d f16 | m f16 |         qs[16]   value = d * q + m
//   Q5_0: d f16 |         qh u32 | qs[16]  value = d * (q - 16)
//   Q5_1: d f16 | m f16 | qh u32 | qs[16]  value = d * q + m
// qs: element i is the low nibble of qs[i], element i+16 the high one; qh bit i is element i's 5th bit
template <bool MIN, bool HIGH>
struct FLegacy {
  static constexpr int QK = 32, BYTES = 18 + 2 * MIN + 4 * HIGH;
  static constexpr Kind kind = UNSIGNED;
  struct Head {};
  static inline void head(const uint8_t*, Head&) {}
  static inline void decode(const uint8_t* b, const Head&, int, Chunk& c) {
    const uint8_t* qh = b + 2 + 2 * MIN;
    const uint8_t* qs = qh + 4 * HIGH;
    c.dw = f16_to_f32(b);
    c.cw = MIN ? f16_to_f32(b + 2) : (HIGH ? -16.f : -8.f) * c.dw;
#if defined(__AVX2__)
    c.u = nibbles_32(qs);
    if constexpr (HIGH) c.u = _mm256_or_si256(c.u, _mm256_and_si256(bits_32(qh), _mm256_set1_epi8(0x10)));
#else
    nibbles_32(qs, c.u);
    if constexpr (HIGH) add_bits_32(qh, c.u);
#endif
  }
};
using FQ4_0 = FLegacy<false, false>;
using FQ4_1 = FLegacy<true, false>;
using FQ5_0 = FLegacy<false, true>;
using FQ5_1 = FLegacy<true, true>;

// Q4_K, super-block of 256 = 8 sub-blocks of 32:
//   d f16 | dmin f16 | scales[12] (8 six-bit scales sc, 8 six-bit mins mn, packed) | qs[128]
//   sub-block j (0..7): bytes qs[32*(j/2) .. +32], low nibbles for even j, high nibbles for odd j
//   value = d * sc[j] * q - dmin * mn[j]
struct FQ4_K {
  static constexpr int QK = 256, BYTES = 144;
  static constexpr Kind kind = UNSIGNED;
  struct Head {
    float dw[8], cw[8];  // per sub-block: d * sc[j], -dmin * mn[j]
  };
  static inline void head(const uint8_t* b, Head& h) {
    const uint8_t* s = b + 4;
    const float d = f16_to_f32(b), dmin = f16_to_f32(b + 2);
    for (int j = 0; j < 8; ++j) {
      int sc, mn;
      if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
      } else {
        sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
      }
      h.dw[j] = d * (float)sc;
      h.cw[j] = -dmin * (float)mn;
    }
  }
  static inline void decode(const uint8_t* b, const Head& hd, int j, Chunk& c) {
    c.dw = hd.dw[j];
    c.cw = hd.cw[j];
    const uint8_t* q = b + 16 + 32 * (j / 2);
    const int shift = 4 * (j & 1);
#if defined(__AVX2__)
    const __m256i v = _mm256_loadu_si256((const __m256i*)q);
    c.u = _mm256_and_si256(_mm256_srli_epi16(v, shift), _mm256_set1_epi8(0x0F));
#else
    for (int i = 0; i < 32; ++i) c.u[i] = (int8_t)((q[i] >> shift) & 0x0F);
#endif
  }
};

// Q5_K, super-block of 256 = 8 sub-blocks of 32:
//   d f16 | dmin f16 | scales[12] (as Q4_K) | qh[32] | qs[128]
//   sub-block j: low 4 bits as Q4_K's (qs[32*(j/2) + l], nibble j&1), 5th bit = bit j of qh[l]
//   value = d * sc[j] * q - dmin * mn[j]
struct FQ5_K {
  static constexpr int QK = 256, BYTES = 176;
  static constexpr Kind kind = UNSIGNED;
  using Head = FQ4_K::Head;
  static inline void head(const uint8_t* b, Head& h) { FQ4_K::head(b, h); }
  static inline void decode(const uint8_t* b, const Head& hd, int j, Chunk& c) {
    c.dw = hd.dw[j];
    c.cw = hd.cw[j];
    const uint8_t* q = b + 48 + 32 * (j / 2);
    const uint8_t* qh = b + 16;
    const int shift = 4 * (j & 1);
#if defined(__AVX2__)
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i*)q), shift),
                                        _mm256_set1_epi8(0x0F));
    const __m256i hi = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i*)qh), j), 4),
                                        _mm256_set1_epi8(0x10));
    c.u = _mm256_or_si256(lo, hi);
#else
    for (int l = 0; l < 32; ++l) c.u[l] = (int8_t)(((q[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4));
#endif
  }
};

// Q6_K, super-block of 256 = 16 sub-blocks of 16 (two per 32-element chunk):
//   ql[128] (low 4 bits) | qh[64] (high 2 bits) | scales int8[16] | d f16
//   chunk j (0..7): half h = j / 4, k = j % 4; element l (0..31) has
//     low  = (ql[64h + 32*(k%2) + l] >> 4*(k/2)) & 15,  high = (qh[32h + l] >> 2k) & 3
//   value = d * scales[2j + l/16] * ((low | high << 4) - 32)
struct FQ6_K {
  static constexpr int QK = 256, BYTES = 210;
  static constexpr Kind kind = SIGNED2;
  struct Head {
    float d;
  };
  static inline void head(const uint8_t* b, Head& hd) { hd.d = f16_to_f32(b + 208); }
  static inline void decode(const uint8_t* b, const Head& hd, int j, Chunk& c) {
    const int h = j / 4, k = j % 4;
    const uint8_t* ql = b + 64 * h + 32 * (k % 2);
    const uint8_t* qh = b + 128 + 32 * h;
    const int8_t* sc = (const int8_t*)(b + 192);
    c.dw = hd.d;
    c.cw = 0.f;
    c.sc[0] = sc[2 * j];
    c.sc[1] = sc[2 * j + 1];
#if defined(__AVX2__)
    const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i*)ql), 4 * (k / 2)),
                                        _mm256_set1_epi8(0x0F));
    const __m256i hi = _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(_mm256_loadu_si256((const __m256i*)qh), 2 * k), 4),
                                        _mm256_set1_epi8(0x30));
    c.u = _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
#else
    for (int l = 0; l < 32; ++l) {
      const int low = (ql[l] >> (4 * (k / 2))) & 15, high = (qh[l] >> (2 * k)) & 3;
      c.u[l] = (int8_t)((low | (high << 4)) - 32);
    }
#endif
  }
};

// ---- integer dot of one decoded chunk with 32 activation codes ----------------------------------

#if defined(__AVX2__)
// u8 x s8 -> 8 int32 lane sums
inline __m256i dot_us(__m256i u, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1));
#endif
}

// acc + the u8 x s8 products of u and x summed in fours (one int32 per lane)
inline __m256i dot_acc(__m256i acc, __m256i u, __m256i x) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, x);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
#endif
}

// 4 bytes at p (any alignment) in every int32 lane
inline __m256i broadcast4(const int8_t* p) {
  typedef int32_t __attribute__((may_alias, aligned(1))) unaligned_i32;
  return _mm256_set1_epi32(*(const unaligned_i32*)p);
}

// the chunk's scaled dot as 8 fp32 lanes still to be summed (without the cw * sx term)
template <Kind K>
inline __m256 chunk_dot(const Chunk& c, __m256i x) {
  if constexpr (K == UNSIGNED) {
    return _mm256_cvtepi32_ps(dot_us(c.u, x));
  } else if constexpr (K == SIGNED) {
    // |w| * (x with w's sign): u8 x s8 without changing the products (llama.cpp's trick)
    return _mm256_cvtepi32_ps(dot_us(_mm256_sign_epi8(c.u, c.u), _mm256_sign_epi8(x, c.u)));
  } else {
    // 16-bit pair sums, then weighted by the sub-block scale of each half (lanes 0-7 | 8-15)
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(c.u, c.u), _mm256_sign_epi8(x, c.u));
    const __m256i s = _mm256_set_m128i(_mm_set1_epi16(c.sc[1]), _mm_set1_epi16(c.sc[0]));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, s));
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#else
template <Kind K>
inline float chunk_dot(const Chunk& c, const int8_t* x) {
  if constexpr (K == SIGNED2) {
    int s0 = 0, s1 = 0;
    for (int i = 0; i < 16; ++i) s0 += c.u[i] * x[i];
    for (int i = 16; i < 32; ++i) s1 += c.u[i] * x[i];
    return (float)(s0 * c.sc[0] + s1 * c.sc[1]);
  } else {
    int s = 0;
    for (int i = 0; i < 32; ++i) s += c.u[i] * x[i];
    return (float)s;
  }
}
#endif

}  // namespace
