// Quantized matrix products on a row-interleaved copy of the weights made at load (repack, unpack,
// qmatmul_packed): 8 rows' blocks side by side. Formats, activations and the integer arithmetic: qmatmul.h.

#include "qmatmul.h"

#include <algorithm>

namespace {

// ---- row-interleaved ("x8") layout of the 32-element formats: 8 weight rows decoded at once -------
//
// The layout above costs a 32-element block a dozen instructions of scalar work (two f16 scales,
// a broadcast, a horizontal sum per row). Repacked at load, eight rows' blocks sit side by side so one
// 256-bit vector holds four codes of each of the 8 rows (one int32 lane per row): a dot product with 4
// broadcast activation codes then sums each row in its own lane, the 8 scales convert in one
// instruction, and a row group's 8 outputs are one vector store. Nothing is summed across lanes.
//
// Group g = rows 8g..8g+7 (rows past n_out are zero: scale 0). Where the kernels read groups in pairs
// (AVX512 VNNI builds), groups 2p and 2p + 1 form pair p (an odd last group gets an all-zero partner) and
// take turns block by block: group 2p's block 0, group 2p + 1's block 0, group 2p's block 1, ...; else
// a group's blocks follow each other (GroupLayout). Read side by side, a pair's blocks are then one run
// of memory: with each group's blocks in a run of their own, the pairs read two runs at once, which the
// hardware prefetcher follows badly (16-row products 15% slower streaming, single rows 8%, AMD Zen 4).
// Block b of a group, 8 x the format's block size:
//   d[8]  f16                      the 8 rows' scales (lane r = row 8g + r)
//   m[8]  f16                      (Q4_1, Q5_1) their mins
//   qh[8] u32                      (Q5_0, Q5_1) 5th bits, rearranged: byte t, bit k   = element 4k + t,
//                                                                     byte t, bit 4+k = element 16 + 4k + t
//   4-bit codes: 4 vectors of 32 bytes; vector j, lane r = row r's qs[4j .. 4j+3] (low nibbles:
//                elements 4j..4j+3, high nibbles: elements 16+4j..16+4j+3, as in the file)
//   Q8_0 codes:  8 vectors of 32 bytes; vector j, lane r = row r's qs[4j .. 4j+3] (elements 4j..4j+3), + 128 (Q8_UNSIGNED)
// The bytes are the file's, moved: `unpack` gives them back exactly (prefill's dequantized chunks).

inline uint32_t qh_to_lanes(uint32_t qh) {
  uint32_t out = 0;
  for (int t = 0; t < 4; ++t)
    for (int k = 0; k < 4; ++k) {
      out |= ((qh >> (4 * k + t)) & 1u) << (8 * t + k);
      out |= ((qh >> (16 + 4 * k + t)) & 1u) << (8 * t + 4 + k);
    }
  return out;
}

inline uint32_t qh_from_lanes(uint32_t lanes) {
  uint32_t qh = 0;
  for (int t = 0; t < 4; ++t)
    for (int k = 0; k < 4; ++k) {
      qh |= ((lanes >> (8 * t + k)) & 1u) << (4 * k + t);
      qh |= ((lanes >> (8 * t + 4 + k)) & 1u) << (16 + 4 * k + t);
    }
  return qh;
}

// Q8_0's codes stored as q + 128 (unsigned) where the dot product is VNNI's, which cannot saturate: the
// kernel then takes 128 times the activation codes' sum off instead of moving w's sign onto x (two
// instructions fewer per 4 codes). AVX2's maddubs would saturate (255 * 127 * 2 > 32767): signed there.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr bool Q8_UNSIGNED = true;
#else
constexpr bool Q8_UNSIGNED = false;
#endif

// Where a group's blocks lie (nb blocks of gb bytes): pairs taking turns block by block (the 32-element
// formats, where the 512-bit kernels read pairs), or each group's blocks in a run, one group after
// another (the K-quants: their 1-2 KB blocks put a pair's two halves too far apart for the hardware
// prefetcher to see one run, and single-row products streamed 2-3x slower paired; and every format
// of the AVX2 and plain builds, whose kernels take one group at a time: 4-row products ~15% slower
// paired, AMD Zen 4)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
constexpr bool PAIRED_32 = true;
#else
constexpr bool PAIRED_32 = false;
#endif
struct GroupLayout {
  bool paired;
  int64_t nb, gb;
  int64_t groups(int64_t n_out) const { return paired ? (n_out + 15) / 16 * 2 : (n_out + 7) / 8; }
  int64_t start(int64_t g) const { return paired ? ((g >> 1) * 2 * nb + (g & 1)) * gb : g * nb * gb; }
  int64_t step() const { return paired ? 2 * gb : gb; }       // block b -> b + 1 of a group
  int64_t partner() const { return paired ? gb : nb * gb; }  // group g's block -> group g + 1's (paired: g even)
};

// Where the parts of one file block (format with a min? 5th bits? 8-bit codes?) go in a packed group.
struct PackedLegacy {
  bool min, high, q8;
  int bytes;  // of one file block
  constexpr int qs_in() const { return 2 + 2 * min + 4 * high; }           // codes' offset in a file block
  constexpr int qs_bytes() const { return q8 ? 32 : 16; }
  constexpr int off_m() const { return 16; }                                // in a packed block
  constexpr int off_qh() const { return 16 + 16 * min; }
  constexpr int off_qs() const { return 16 + 16 * min + 32 * high; }
  constexpr int group_bytes() const { return 8 * bytes; }
};

// file block of row lane r -> its bytes in packed block P (src null: a padding row, all zero)
void pack_block(const PackedLegacy& f, const uint8_t* src, int r, uint8_t* P) {
  static const uint8_t zero[34] = {};
  if (!src) src = zero;
  std::memcpy(P + 2 * r, src, 2);
  if (f.min) std::memcpy(P + f.off_m() + 2 * r, src + 2, 2);
  if (f.high) {
    uint32_t qh;
    std::memcpy(&qh, src + 2 + 2 * f.min, 4);
    qh = qh_to_lanes(qh);
    std::memcpy(P + f.off_qh() + 4 * r, &qh, 4);
  }
  const uint8_t* qs = src + f.qs_in();
  for (int j = 0; j < f.qs_bytes() / 4; ++j) std::memcpy(P + f.off_qs() + 32 * j + 4 * r, qs + 4 * j, 4);
  if (f.q8 && Q8_UNSIGNED)
    for (int j = 0; j < 8; ++j)
      for (int t = 0; t < 4; ++t) P[f.off_qs() + 32 * j + 4 * r + t] ^= 0x80;
}

void unpack_block(const PackedLegacy& f, const uint8_t* P, int r, uint8_t* dst) {
  std::memcpy(dst, P + 2 * r, 2);
  if (f.min) std::memcpy(dst + 2, P + f.off_m() + 2 * r, 2);
  if (f.high) {
    uint32_t lanes;
    std::memcpy(&lanes, P + f.off_qh() + 4 * r, 4);
    lanes = qh_from_lanes(lanes);
    std::memcpy(dst + 2 + 2 * f.min, &lanes, 4);
  }
  uint8_t* qs = dst + f.qs_in();
  for (int j = 0; j < f.qs_bytes() / 4; ++j) std::memcpy(qs + 4 * j, P + f.off_qs() + 32 * j + 4 * r, 4);
  if (f.q8 && Q8_UNSIGNED)
    for (int i = 0; i < 32; ++i) qs[i] ^= 0x80;
}

// the outputs acc[m][r] + lin[m][r] of group g for MT activation rows (scalar kernels; the vector ones'
// store_groups below); with two activation levels (Q8Act::levels) rows 2m and 2m + 1 sum into y's row m
template <int MT>
inline void store_group(const float (&acc)[MT][8], const float (&lin)[MT][8], float* y, int64_t m0, int64_t N,
                        int64_t g, int levels) {
  for (int m = 0; m < MT; m += levels)
    for (int r = 0; r < 8 && 8 * g + r < N; ++r) {
      float v = acc[m][r] + lin[m][r];
      if (levels == 2) v += acc[m + 1][r] + lin[m + 1][r];
      y[(m0 + m) / levels * N + 8 * g + r] = v;
    }
}

#if defined(__AVX2__)
// The vector kernels are written once over "lanes": one int32/fp32 lane per weight row, 8 rows (a group) in
// a 256-bit vector, or, where the CPU has 512-bit VNNI, 16 rows (groups g and g + 1) in a 512-bit vector,
// so that a broadcast activation dword, a scale conversion and an fmadd serve twice the rows (over_groups
// says when). Lane for lane both run the same operations: the same bits.
// Loads take the group's address p and the distance to its pair partner's same bytes (used by Lanes16).
struct Lanes8 {
  static constexpr int GROUPS = 1;
  using I = __m256i;
  using F = __m256;
  static I codes(const uint8_t* p, int64_t) { return _mm256_loadu_si256((const __m256i*)p); }
  static F f16(const uint8_t* p, int64_t) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static I u8s(const uint8_t* p, int64_t) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
  static I i8s(const uint8_t* p, int64_t) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
  static I bytes(char c) { return _mm256_set1_epi8(c); }
  static I ints(int32_t v) { return _mm256_set1_epi32(v); }
  static I x4(const int8_t* p) { return broadcast4(p); }
  static I dot(I acc, I u, I x) { return dot_acc(acc, u, x); }
  // acc + the N products u[i] . x[i], weight codes u in 0..UMAX. Without VNNI their pair sums (maddubs) add
  // up in int16 and widen once: 2 instructions a product instead of 3 (the sums are exact, the bits the same)
  template <int UMAX, int N>
  static I dots(I acc, const I (&u)[N], const I (&x)[N]) {
    static_assert(N * 2 * UMAX * 127 < 32768, "int16 pair sums would overflow");
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    for (int i = 0; i < N; ++i) acc = dot(acc, u[i], x[i]);
    return acc;
#else
    __m256i s = _mm256_maddubs_epi16(u[0], x[0]);
    for (int i = 1; i < N; ++i) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(u[i], x[i]));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(s, _mm256_set1_epi16(1)));
#endif
  }
  static I sign(I a, I b) { return _mm256_sign_epi8(a, b); }  // AVX2's signed Q8_0 only
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static I sub(I a, I b) { return _mm256_sub_epi32(a, b); }
  static I srl16(I a, int n) { return _mm256_srli_epi16(a, n); }
  static I sll16(I a, int n) { return _mm256_slli_epi16(a, n); }
  static I srl32(I a, int n) { return _mm256_srli_epi32(a, n); }
  static I sll32(I a, int n) { return _mm256_slli_epi32(a, n); }
  static F fzero() { return _mm256_setzero_ps(); }
  static F floats(float v) { return _mm256_set1_ps(v); }
  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static void store(F v, float* out) { _mm256_storeu_ps(out, v); }
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define WIDE_GROUPS 1
struct Lanes16 {
  static constexpr int GROUPS = 2;
  using I = __m512i;
  using F = __m512;
  static I codes(const uint8_t* p, int64_t next) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)p)),
                              _mm256_loadu_si256((const __m256i*)(p + next)), 1);
  }
  static __m128i two8(const uint8_t* p, int64_t next) {
    return _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)p), _mm_loadl_epi64((const __m128i*)(p + next)));
  }
  static F f16(const uint8_t* p, int64_t next) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)p)),
                                                   _mm_loadu_si128((const __m128i*)(p + next)), 1));
  }
  static I u8s(const uint8_t* p, int64_t next) { return _mm512_cvtepu8_epi32(two8(p, next)); }
  static I i8s(const uint8_t* p, int64_t next) { return _mm512_cvtepi8_epi32(two8(p, next)); }
  static I bytes(char c) { return _mm512_set1_epi8(c); }
  static I ints(int32_t v) { return _mm512_set1_epi32(v); }
  static I x4(const int8_t* p) {
    typedef int32_t __attribute__((may_alias, aligned(1))) unaligned_i32;
    return _mm512_set1_epi32(*(const unaligned_i32*)p);
  }
  static I dot(I acc, I u, I x) { return _mm512_dpbusd_epi32(acc, u, x); }
  template <int UMAX, int N>
  static I dots(I acc, const I (&u)[N], const I (&x)[N]) {
    for (int i = 0; i < N; ++i) acc = dot(acc, u[i], x[i]);
    return acc;
  }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static I sub(I a, I b) { return _mm512_sub_epi32(a, b); }
  static I srl16(I a, int n) { return _mm512_srli_epi16(a, n); }
  static I sll16(I a, int n) { return _mm512_slli_epi16(a, n); }
  static I srl32(I a, int n) { return _mm512_srli_epi32(a, n); }
  static I sll32(I a, int n) { return _mm512_slli_epi32(a, n); }
  static F fzero() { return _mm512_setzero_ps(); }
  static F floats(float v) { return _mm512_set1_ps(v); }
  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static void store(F v, float* out) { _mm512_storeu_ps(out, v); }
};
#else
#define WIDE_GROUPS 0
#endif

// the outputs (acc + lin) of the V::GROUPS groups from g for each of MT activation rows; the last group
// may be partial, groups past it are not written. With two activation levels (Q8Act::levels), rows 2m and
// 2m + 1 (m0 and MT are even) are summed into y's row m.
template <class V, int LEVELS>
inline void store_groups(const typename V::F* acc, const typename V::F* lin, int MT, float* y, int64_t m0,
                         int64_t N, int64_t g) {
  for (int m = 0; m < MT; m += LEVELS) {  // LEVELS a constant: the loop unrolls and acc stays in registers
    float out[8 * V::GROUPS];
    typename V::F v = lin ? V::add(acc[m], lin[m]) : acc[m];
    if constexpr (LEVELS == 2) v = V::add(v, lin ? V::add(acc[m + 1], lin[m + 1]) : acc[m + 1]);
    V::store(v, out);
    for (int h = 0; h < V::GROUPS; ++h) {
      const int64_t n0 = 8 * (g + h), n = std::min<int64_t>(8, N - n0);
      if (n > 0) std::memcpy(y + (m0 + m) / LEVELS * N + n0, out + 8 * h, n * sizeof(float));
    }
  }
}
template <class V>
inline void store_groups(const typename V::F* acc, const typename V::F* lin, int MT, float* y, int64_t m0,
                         int64_t N, int64_t g, int levels) {
  if (levels == 2)
    store_groups<V, 2>(acc, lin, MT, y, m0, N, g);
  else
    store_groups<V, 1>(acc, lin, MT, y, m0, N, g);
}

// A block's weights AHEAD bytes on (a pair's two blocks where V reads pairs), asked for in L1 before they are
// needed, in tiles of 8 activation rows (a step of 8+ sequences): there each weight is used 8 times and the
// hardware prefetcher alone leaves the products waiting on memory (Gemma 3 270M, 16 sequences: steps
// ~8% faster on AMD Zen 4). For 1-4 rows the prefetches cost more than they save (SmolLM2's and Gemma's
// single-sequence steps 10-25% slower with them): none there.
constexpr int AHEAD = 2048;
template <class V, int GB, int MT>
inline void prefetch_ahead(const uint8_t* pb, int64_t next) {
  if constexpr (MT >= 8)
    for (int o = 0; o < GB; o += 64)
      for (int h = 0; h < V::GROUPS; ++h) _mm_prefetch((const char*)(pb + h * next + AHEAD + o), _MM_HINT_T0);
}

// Runs Body<V>::run(g, ...) over groups [g0, g1), in 512-bit lanes a pair at a time where built (Lanes16:
// a broadcast activation dword, a scale conversion and an fmadd serve 16 rows), else (and for an odd group
// at either end) one group at a time in 256-bit lanes. Pairs laid out side by side (Body::PAIRED) beat
// single groups at every row count on AMD Zen 4 (one row ~5%, 16 rows ~15% faster streaming); pairs of
// groups laid out apart (the K-quants) only from 16 activation rows (5-8% faster for 16 decoding
// sequences; for a few rows up to 2x slower streaming). The two give the same bits.
constexpr int64_t UNPAIRED_WIDE_ROWS = 16;  // unpaired groups: Lanes16 from this many activation rows
template <template <class> class Body, class... Args>
inline void over_groups(int64_t rows, int64_t g0, int64_t g1, Args&&... args) {
  int64_t g = g0;
#if WIDE_GROUPS
  constexpr bool PAIRED = Body<Lanes8>::PAIRED;
  if (PAIRED && (g & 1) && g < g1) Body<Lanes8>::run(g++, args...);  // a pair is groups 2p and 2p + 1
  if (PAIRED || rows >= UNPAIRED_WIDE_ROWS)
    for (; g + 1 < g1; g += 2) Body<Lanes16>::run(g, args...);
#endif
  for (; g < g1; ++g) Body<Lanes8>::run(g, args...);
}
#endif

// The packed kernel for format (MIN, HIGH, Q8) and a tile of MT activation rows from m0: y[m, 8g + r] for
// groups [g0, g1). Per block, each activation row's integer sums of the 8 weight rows build up in one
// vector (exact, so the order of the dot products does not matter); then, in block order,
//   acc += (d * dx) * isum     lin += m * sx       (Q4_0 / Q5_0: isum -= 8 or 16 * sum(qx) instead of lin)
// the same operations for a row whatever MT is: a row's result never depends on what shares the call.
template <bool MIN, bool HIGH, bool Q8, int MT>
struct LegacyGroups {
  static constexpr PackedLegacy f{MIN, HIGH, Q8, 18 + 2 * MIN + 4 * HIGH + 16 * Q8};
  static constexpr int GB = 8 * f.bytes;
  static constexpr int32_t OFFSET = MIN ? 0 : Q8 ? (Q8_UNSIGNED ? 128 : 0) : (HIGH ? 16 : 8);
#if defined(__AVX2__)
  template <class V>
  struct Body {
    static constexpr bool PAIRED = PAIRED_32;
    static void run(int64_t g, const uint8_t* P, int64_t nb, const Q8Act& a, int64_t m0, float* y, int64_t N) {
      const GroupLayout L{PAIRED, nb, GB};
      const int64_t K = nb * 32, next = L.partner();
      const int8_t* xq = a.q.data() + m0 * K;
      const float* xd = a.d.data() + m0 * nb;
      const float* xs = a.s.data() + m0 * nb;
      const int32_t* xi = a.si.data() + m0 * nb;
      const uint8_t* pg = P + L.start(g);
      using I = typename V::I;
      using F = typename V::F;
      F acc[MT], lin[MT];
      for (int m = 0; m < MT; ++m) acc[m] = lin[m] = V::fzero();
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* pb = pg + b * L.step();
        prefetch_ahead<V, GB, MT>(pb, next);
        const F d = V::f16(pb, next);
        I isum[MT];
        for (int m = 0; m < MT; ++m) isum[m] = V::ints(-OFFSET * xi[m * nb + b]);  // the codes' offset, exact
        const int8_t* xb = xq + b * 32;
        if constexpr (Q8) {
#pragma GCC unroll 4
          for (int j = 0; j < 8; ++j) {
            const I v = V::codes(pb + f.off_qs() + 32 * j, next);
            if constexpr (Q8_UNSIGNED) {  // q + 128: isum started at -128 sum(x) (OFFSET)
              for (int m = 0; m < MT; ++m) isum[m] = V::dot(isum[m], v, V::x4(xb + m * K + 4 * j));
            } else {
              const I av = V::sign(v, v);  // |w|, then x takes w's sign: u8 x s8, same products
              for (int m = 0; m < MT; ++m) isum[m] = V::dot(isum[m], av, V::sign(V::x4(xb + m * K + 4 * j), v));
            }
          }
        } else {
          I hv = V::ints(0);
          if constexpr (HIGH) hv = V::codes(pb + f.off_qh(), next);
          const I low4 = V::bytes(0x0F), bit4 = V::bytes(0x10);
#pragma GCC unroll 2
          for (int h = 0; h < 2; ++h) {  // code vectors j = 2h, 2h + 1: 4 products a row
            I u[4];
            for (int t = 0; t < 2; ++t) {
              const int j = 2 * h + t;
              const I v = V::codes(pb + f.off_qs() + 32 * j, next);
              I lo = V::and_(v, low4), hi = V::and_(V::srl16(v, 4), low4);
              if constexpr (HIGH) {
                lo = V::or_(lo, V::and_(V::sll32(hv, 4 - j), bit4));
                hi = V::or_(hi, V::and_(V::srl32(hv, j), bit4));
              }
              u[2 * t] = lo;   // elements 4j..4j+3
              u[2 * t + 1] = hi;  // elements 16+4j..16+4j+3
            }
            for (int m = 0; m < MT; ++m) {
              const int8_t* xj = xb + m * K + 8 * h;
              const I x[4] = {V::x4(xj), V::x4(xj + 16), V::x4(xj + 4), V::x4(xj + 20)};
              isum[m] = V::template dots<HIGH ? 31 : 15>(isum[m], u, x);
            }
          }
        }
        F mins = V::fzero();
        if constexpr (MIN) mins = V::f16(pb + f.off_m(), next);
        for (int m = 0; m < MT; ++m) {
          acc[m] = V::fmadd(V::mul(d, V::floats(xd[m * nb + b])), V::cvt(isum[m]), acc[m]);
          if constexpr (MIN) lin[m] = V::fmadd(mins, V::floats(xs[m * nb + b]), lin[m]);
        }
      }
      store_groups<V>(acc, MIN ? lin : nullptr, MT, y, m0, N, g, a.levels);
    }
  };
#endif

  static void kernel(const uint8_t* P, int64_t nb, const Q8Act& a, int64_t m0, float* y, int64_t N, int64_t g0,
                     int64_t g1) {
#if defined(__AVX2__)
    over_groups<Body>(a.M, g0, g1, P, nb, a, m0, y, N);
#else
    const int64_t K = nb * 32;
    const int8_t* xq = a.q.data() + m0 * K;
    const float* xd = a.d.data() + m0 * nb;
    const float* xs = a.s.data() + m0 * nb;
    const int32_t* xi = a.si.data() + m0 * nb;
    for (int64_t g = g0; g < g1; ++g) {
      const GroupLayout L{PAIRED_32, nb, GB};
      const uint8_t* pg = P + L.start(g);
      float acc[MT][8] = {}, lin[MT][8] = {};
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* pb = pg + b * L.step();
        for (int r = 0; r < 8; ++r) {
          uint8_t blk[34];
          unpack_block(f, pb, r, blk);
          const float d = f16_to_f32(blk), mn = MIN ? f16_to_f32(blk + 2) : 0.f;
          int8_t u[32];
          if constexpr (Q8) {
            std::memcpy(u, blk + 2, 32);
          } else {
            nibbles_32(blk + f.qs_in(), u);
            if constexpr (HIGH) add_bits_32(blk + 2 + 2 * MIN, u);
          }
          for (int m = 0; m < MT; ++m) {
            int32_t isum = 0;
            for (int i = 0; i < 32; ++i) isum += u[i] * xq[m * K + b * 32 + i];
            isum -= OFFSET * xi[m * nb + b];
            acc[m][r] += d * xd[m * nb + b] * (float)isum;
            if constexpr (MIN) lin[m][r] += mn * xs[m * nb + b];
          }
        }
      }
      store_group<MT>(acc, lin, y, m0, N, g, a.levels);
    }
#endif
  }
};

using PackedFn = void (*)(const uint8_t*, int64_t, const Q8Act&, int64_t, float*, int64_t, int64_t, int64_t);

// Q8_0 against 16-bit activation codes (quantize_rows_16), for levels = 2 where the CPU has AVX2 but no VNNI.
// Two 8-bit levels cost there 2 x 4 instructions per code vector and activation row (sign, maddubs, madd,
// add); as int16, a row's 4 codes x0..x3 take 2 madds and 2 adds: a code vector's int32 lane r holds row r's codes
// w0..w3, whose even bytes (w0, w2) and odd bytes (w1, w3) widen in place to int16 pairs (two shifts, one
// shift) that meet the activation pairs (x0, x2) and (x1, x3) (quantize_rows_16's order), each lane still
// one row's sum: |sum| <= 32 * 128 * 32767 < 2^31 per block.
#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define Q8_WIDE 1
template <int MT>
void packed_q8_wide(const uint8_t* P, int64_t nb, const Q8Act& a, int64_t m0, float* y, int64_t N, int64_t g0,
                    int64_t g1) {
  constexpr PackedLegacy f{false, false, true, 34};
  const GroupLayout L{PAIRED_32, nb, 8 * f.bytes};
  const int64_t K = nb * 32;
  const int16_t* xq = a.q16.data() + m0 * K;
  const float* xd = a.d.data() + m0 * nb;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* pg = P + L.start(g);
    __m256 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* pb = pg + b * L.step();
      prefetch_ahead<Lanes8, 8 * f.bytes, MT>(pb, 0);
      __m256i isum[MT];
      for (int m = 0; m < MT; ++m) isum[m] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int j = 0; j < 8; ++j) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(pb + f.off_qs() + 32 * j));
        const __m256i even = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8), odd = _mm256_srai_epi16(v, 8);
        for (int m = 0; m < MT; ++m) {
          const int8_t* xj = (const int8_t*)(xq + m * K + b * 32 + 4 * j);
          isum[m] = _mm256_add_epi32(isum[m], _mm256_add_epi32(_mm256_madd_epi16(even, broadcast4(xj)),
                                                               _mm256_madd_epi16(odd, broadcast4(xj + 4))));
        }
      }
      const __m256 d = Lanes8::f16(pb, 0);
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(d, _mm256_set1_ps(xd[m * nb + b])), _mm256_cvtepi32_ps(isum[m]), acc[m]);
    }
    store_groups<Lanes8, 1>(acc, nullptr, MT, y, m0, N, g);
  }
}
#else
#define Q8_WIDE 0
#endif

template <bool MIN, bool HIGH, bool Q8>
void packed_tiles(PackedFn* t) {
  t[0] = &LegacyGroups<MIN, HIGH, Q8, 1>::kernel;
  t[1] = &LegacyGroups<MIN, HIGH, Q8, 2>::kernel;
  t[2] = &LegacyGroups<MIN, HIGH, Q8, 4>::kernel;
  t[3] = &LegacyGroups<MIN, HIGH, Q8, 8>::kernel;
}

// ---- row-interleaved ("x8") layout of the K-quants: Q4_K, Q5_K, Q6_K ----------------------------
//
// The same idea per super-block of 256: group g = rows 8g..8g+7 (rows past n_out zero), its super-blocks
// one after the other; super-block b of a group holds the 8 rows' super-blocks b, arranged so that
//   - every code vector (32 bytes) holds 4 consecutive elements of one 32-element chunk for each of the
//     8 rows (lane r = row 8g + r, one int32 lane per row, as in the legacy layout), and
//   - every per-sub-block scale is 8 consecutive bytes, one per row (pmovzx/pmovsx -> 8 int32 lanes).
// The bytes are the file's, moved, except Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins: those
// are stored decoded, one byte each (16 bytes: the same 96 bits, so `unpack` re-encodes them exactly),
// which spares the kernel a dozen shifts and masks per super-block: +4 bytes per row and super-block.
//
// Q4_K, 8 x 148 = 1184 bytes (file 8 x 144, +2.8%):
//   0     d[8]     f16   the 8 rows' super-block scales
//   16    dmin[8]  f16   their min scales
//   32    sc[8][8] u8    sc[j][r] = row r's 6-bit scale of sub-block j     value = d sc[j] q - dmin mn[j]
//   96    mn[8][8] u8    mn[j][r] = row r's 6-bit min of sub-block j
//   160   qs: 32 vectors; vector 8p + i, lane r = row r's qs[32p + 4i .. +3]: low nibbles = sub-block 2p's
//         elements 4i..4i+3, high nibbles = sub-block 2p+1's (the file's bytes, 4 at a time)
// Q5_K, 8 x 180 = 1440 bytes (file 8 x 176, +2.3%): Q4_K's first 160 bytes, then
//   160   qh: 8 vectors; vector i, lane r = row r's qh[4i .. +3]: bit j of byte t = the 5th bit of
//         sub-block j's element 4i + t
//   416   qs as Q4_K's
// Q6_K, 8 x 210 = 1680 bytes (the file's size):
//   0     d[8]      f16
//   16    sc[16][8] i8   sc[s][r] = row r's scale of 16-element sub-block s   value = d sc[s] (q - 32)
//   144   ql: 32 vectors; vector 16h + 8k2 + i, lane r = row r's ql[64h + 32k2 + 4i .. +3]
//   1168  qh: 16 vectors; vector 8h + i, lane r = row r's qh[32h + 4i .. +3]
//   chunk c = 4h + k (k = 0..3), elements 4i..4i+3: low 4 bits in ql vector 16h + 8(k % 2) + i, nibble k / 2;
//   high 2 bits in qh vector 8h + i, bits 2k, 2k + 1 (the file's arrangement, 4 bytes at a time)
//
// The kernels take the weight codes unsigned (0..15, 0..31, 0..63: maddubs' pairs stay under 2 * 63 * 127)
// and form, per 32-element chunk c of an activation row (its codes' scale dx, sum sx = dx * sum(qx)):
//   Q4_K / Q5_K:  acc += (d sc[j] * dx) * isum_j       lin -= (dmin mn[j]) * sx         (j = c)
//   Q6_K:         acc += (d sc[s] * dx) * isum_s       for s = 2c, 2c + 1 (16 elements each), with
//                 isum_s = sum (q - 32) qx = dot(q, qx) - 32 * sum(qx), exact (sums_of_16)
// in chunk order, the same operations for a row whatever the tile height (batch invariance).

constexpr int K4_D = 0, K4_DMIN = 16, K4_SC = 32, K4_MN = 96, K4_HEAD = 160;
constexpr int K6_D = 0, K6_SC = 16, K6_QL = 144, K6_QH = 1168;

// Q4_K / Q5_K: the 12 bytes at s -> 8 scales and 8 mins (6 bits each), and back
inline void k_scales_decode(const uint8_t* s, uint8_t* sc, uint8_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}
inline void k_scales_encode(const uint8_t* sc, const uint8_t* mn, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    s[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    s[j + 8] = (uint8_t)((sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4));
  }
}

// `n` bytes from src, 4 at a time, to lane r of consecutive 32-byte vectors at P (and back)
inline void to_lanes(const uint8_t* src, int n, int r, uint8_t* P) {
  for (int v = 0; v < n / 4; ++v) std::memcpy(P + 32 * v + 4 * r, src + 4 * v, 4);
}
inline void from_lanes(const uint8_t* P, int n, int r, uint8_t* dst) {
  for (int v = 0; v < n / 4; ++v) std::memcpy(dst + 4 * v, P + 32 * v + 4 * r, 4);
}

// file super-block of row lane r (null: a padding row, all zero) <-> packed super-block P
template <bool HIGH>  // Q5_K
void pack_q45_k(const uint8_t* src, int r, uint8_t* P) {
  static const uint8_t zero[176] = {};
  if (!src) src = zero;
  std::memcpy(P + K4_D + 2 * r, src, 2);
  std::memcpy(P + K4_DMIN + 2 * r, src + 2, 2);
  uint8_t sc[8], mn[8];
  k_scales_decode(src + 4, sc, mn);
  for (int j = 0; j < 8; ++j) {
    P[K4_SC + 8 * j + r] = sc[j];
    P[K4_MN + 8 * j + r] = mn[j];
  }
  if constexpr (HIGH) to_lanes(src + 16, 32, r, P + K4_HEAD);
  to_lanes(src + 16 + 32 * HIGH, 128, r, P + K4_HEAD + 256 * HIGH);
}
template <bool HIGH>
void unpack_q45_k(const uint8_t* P, int r, uint8_t* dst) {
  std::memcpy(dst, P + K4_D + 2 * r, 2);
  std::memcpy(dst + 2, P + K4_DMIN + 2 * r, 2);
  uint8_t sc[8], mn[8];
  for (int j = 0; j < 8; ++j) {
    sc[j] = P[K4_SC + 8 * j + r];
    mn[j] = P[K4_MN + 8 * j + r];
  }
  k_scales_encode(sc, mn, dst + 4);
  if constexpr (HIGH) from_lanes(P + K4_HEAD, 32, r, dst + 16);
  from_lanes(P + K4_HEAD + 256 * HIGH, 128, r, dst + 16 + 32 * HIGH);
}
void pack_q6_k(const uint8_t* src, int r, uint8_t* P) {
  static const uint8_t zero[210] = {};
  if (!src) src = zero;
  std::memcpy(P + K6_D + 2 * r, src + 208, 2);
  for (int s = 0; s < 16; ++s) P[K6_SC + 8 * s + r] = src[192 + s];
  to_lanes(src, 128, r, P + K6_QL);
  to_lanes(src + 128, 64, r, P + K6_QH);
}
void unpack_q6_k(const uint8_t* P, int r, uint8_t* dst) {
  std::memcpy(dst + 208, P + K6_D + 2 * r, 2);
  for (int s = 0; s < 16; ++s) dst[192 + s] = P[K6_SC + 8 * s + r];
  from_lanes(P + K6_QL, 128, r, dst);
  from_lanes(P + K6_QH, 64, r, dst + 128);
}

// a.s16: the activation codes' sums per 16 elements (Q6_K's 16-element sub-blocks)
void sums_of_16(Q8Act& a, int64_t K) {
  const int64_t n16 = K / 16;
  a.s16.resize(a.M * n16);
  at::parallel_for(0, a.M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t h = 0; h < n16; ++h) {
        const int8_t* q = a.q.data() + m * K + 16 * h;
        int32_t sum = 0;
        for (int i = 0; i < 16; ++i) sum += q[i];
        a.s16[m * n16 + h] = sum;
      }
  });
}

#if defined(__AVX2__)
// Q4_K (HIGH false) / Q5_K (HIGH true): V::GROUPS groups from g for a tile of MT activation rows from m0
template <bool HIGH, int MT>
struct Q45KGroups {
  template <class V>
  struct Body {
    static constexpr bool PAIRED = false;
    static void run(int64_t g, const uint8_t* P, int64_t nsb, const Q8Act& a, int64_t m0, float* y, int64_t N) {
      constexpr int GB = HIGH ? 1440 : 1184, QS = K4_HEAD + 256 * HIGH;
      const GroupLayout L{PAIRED, nsb, GB};
      const int64_t K = nsb * 256, nb = a.nb, next = L.partner();
      const int8_t* xq = a.q.data() + m0 * K;
      const float* xd = a.d.data() + m0 * nb;
      const float* xs = a.s.data() + m0 * nb;
      using I = typename V::I;
      using F = typename V::F;
      const I low4 = V::bytes(0x0F), bit4 = V::bytes(0x10);
      const uint8_t* pg = P + L.start(g);
      F acc[MT], lin[MT];
      for (int m = 0; m < MT; ++m) acc[m] = lin[m] = V::fzero();
      for (int64_t b = 0; b < nsb; ++b) {
        const uint8_t* pb = pg + b * L.step();
        prefetch_ahead<V, GB, MT>(pb, next);
        const F d = V::f16(pb + K4_D, next), dmin = V::f16(pb + K4_DMIN, next);
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) {  // sub-block j = chunk 8b + j of the activation rows
          I isum[MT];
          for (int m = 0; m < MT; ++m) isum[m] = V::ints(0);
          const int8_t* xc = xq + (8 * b + j) * 32;
#pragma GCC unroll 2
          for (int half = 0; half < 2; ++half) {  // elements 16 half .. +15: 4 products a row
            I u[4];
            for (int t = 0; t < 4; ++t) {
              const int i = 4 * half + t;
              const I v = V::codes(pb + QS + 32 * (8 * (j / 2) + i), next);
              u[t] = V::and_(j & 1 ? V::srl16(v, 4) : v, low4);
              if constexpr (HIGH) {
                const I h = V::codes(pb + K4_HEAD + 32 * i, next);
                u[t] = V::or_(u[t], V::and_(j <= 4 ? V::sll16(h, 4 - j) : V::srl16(h, j - 4), bit4));
              }
            }
            for (int m = 0; m < MT; ++m) {
              const int8_t* xi = xc + m * K + 16 * half;
              const I x[4] = {V::x4(xi), V::x4(xi + 4), V::x4(xi + 8), V::x4(xi + 12)};
              isum[m] = V::template dots<HIGH ? 31 : 15>(isum[m], u, x);
            }
          }
          const F dsc = V::mul(d, V::cvt(V::u8s(pb + K4_SC + 8 * j, next)));
          const F dmn = V::mul(dmin, V::cvt(V::u8s(pb + K4_MN + 8 * j, next)));
          for (int m = 0; m < MT; ++m) {
            const int64_t c = m * nb + 8 * b + j;
            acc[m] = V::fmadd(V::mul(dsc, V::floats(xd[c])), V::cvt(isum[m]), acc[m]);
            lin[m] = V::fnmadd(dmn, V::floats(xs[c]), lin[m]);
          }
        }
      }
      store_groups<V>(acc, lin, MT, y, m0, N, g, a.levels);
    }
  };
};

template <bool HIGH, int MT>
void packed_q45_k(const uint8_t* P, int64_t nsb, const Q8Act& a, int64_t m0, float* y, int64_t N, int64_t g0,
                  int64_t g1) {
  over_groups<Q45KGroups<HIGH, MT>::template Body>(a.M, g0, g1, P, nsb, a, m0, y, N);
}

// Q6_K, as Q4_K; needs a.s16 (sums_of_16)
template <int MT>
struct Q6KGroups {
  template <class V>
  struct Body {
    static constexpr bool PAIRED = false;
    static void run(int64_t g, const uint8_t* P, int64_t nsb, const Q8Act& a, int64_t m0, float* y, int64_t N) {
      constexpr int GB = 1680;
      const GroupLayout L{PAIRED, nsb, GB};
      const int64_t K = nsb * 256, nb = a.nb, n16 = K / 16, next = L.partner();
      const int8_t* xq = a.q.data() + m0 * K;
      const float* xd = a.d.data() + m0 * nb;
      const int32_t* x16 = a.s16.data() + m0 * n16;
      using I = typename V::I;
      using F = typename V::F;
      const I low4 = V::bytes(0x0F), high2 = V::bytes(0x30);
      const uint8_t* pg = P + L.start(g);
      F acc[MT];
      for (int m = 0; m < MT; ++m) acc[m] = V::fzero();
      for (int64_t b = 0; b < nsb; ++b) {
        const uint8_t* pb = pg + b * L.step();
        prefetch_ahead<V, GB, MT>(pb, next);
        const F d = V::f16(pb + K6_D, next);
#pragma GCC unroll 8
        for (int c = 0; c < 8; ++c) {  // chunk c: sub-blocks 2c (i = 0..3) and 2c + 1 (i = 4..7)
          const int h = c / 4, k = c % 4;
          const int8_t* xc = xq + (8 * b + c) * 32;
#pragma GCC unroll 2
          for (int s = 0; s < 2; ++s) {  // sub-block 2c + s: elements 16s..16s+15 of the chunk
            I isum[MT];  // starts at -32 * sum(qx): the codes' offset
            for (int m = 0; m < MT; ++m) isum[m] = V::ints(-32 * x16[m * n16 + 16 * b + 2 * c + s]);
#pragma GCC unroll 2
            for (int i0 = 4 * s; i0 < 4 * s + 4; i0 += 2) {  // 2 products a row
              I u[2];
              for (int t = 0; t < 2; ++t) {
                const int i = i0 + t;
                const I l = V::codes(pb + K6_QL + 32 * (16 * h + 8 * (k % 2) + i), next);
                const I q = V::codes(pb + K6_QH + 32 * (8 * h + i), next);
                const I lo = V::and_(k / 2 ? V::srl16(l, 4) : l, low4);
                const I hi = k == 2 ? q : k < 2 ? V::sll16(q, 4 - 2 * k) : V::srl16(q, 2);
                u[t] = V::or_(lo, V::and_(hi, high2));
              }
              for (int m = 0; m < MT; ++m) {
                const I x[2] = {V::x4(xc + m * K + 4 * i0), V::x4(xc + m * K + 4 * i0 + 4)};
                isum[m] = V::template dots<63>(isum[m], u, x);
              }
            }
            const F dsc = V::mul(d, V::cvt(V::i8s(pb + K6_SC + 8 * (2 * c + s), next)));
            for (int m = 0; m < MT; ++m)
              acc[m] = V::fmadd(V::mul(dsc, V::floats(xd[m * nb + 8 * b + c])), V::cvt(isum[m]), acc[m]);
          }
        }
      }
      store_groups<V>(acc, nullptr, MT, y, m0, N, g, a.levels);
    }
  };
};

template <int MT>
void packed_q6_k(const uint8_t* P, int64_t nsb, const Q8Act& a, int64_t m0, float* y, int64_t N, int64_t g0,
                 int64_t g1) {
  over_groups<Q6KGroups<MT>::template Body>(a.M, g0, g1, P, nsb, a, m0, y, N);
}
#else
// The plain C++ path: each row's super-block unpacked to the file's bytes, then decoded as qmatmul's
// file-layout kernel decodes it (F::head, F::decode); the same operations for a row whatever MT is.
template <class F, void (*UNPACK)(const uint8_t*, int, uint8_t*), int GB, int MT>
void packed_k_plain(const uint8_t* P, int64_t nsb, const Q8Act& a, int64_t m0, float* y, int64_t N, int64_t g0,
                    int64_t g1) {
  const int64_t K = nsb * 256, nb = a.nb;
  const int8_t* xq = a.q.data() + m0 * K;
  const float* xd = a.d.data() + m0 * nb;
  const float* xs = a.s.data() + m0 * nb;
  for (int64_t g = g0; g < g1; ++g) {
    float acc[MT][8] = {}, lin[MT][8] = {};
    for (int64_t b = 0; b < nsb; ++b) {
      const uint8_t* pb = P + (g * nsb + b) * GB;  // the K-quants' groups are not paired (GroupLayout)
      for (int r = 0; r < 8; ++r) {
        uint8_t blk[F::BYTES];
        UNPACK(pb, r, blk);
        typename F::Head hd;
        F::head(blk, hd);
        for (int j = 0; j < 8; ++j) {
          Chunk ch;
          F::decode(blk, hd, j, ch);
          for (int m = 0; m < MT; ++m) {
            const int64_t c = m * nb + 8 * b + j;
            acc[m][r] += ch.dw * xd[c] * chunk_dot<F::kind>(ch, xq + m * K + (8 * b + j) * 32);
            if constexpr (F::kind == UNSIGNED) lin[m][r] += ch.cw * xs[c];
          }
        }
      }
    }
    store_group<MT>(acc, lin, y, m0, N, g, a.levels);
  }
}
template <bool HIGH, int MT>
void packed_q45_k(const uint8_t* P, int64_t nsb, const Q8Act& a, int64_t m0, float* y, int64_t N, int64_t g0,
                  int64_t g1) {
  using F = std::conditional_t<HIGH, FQ5_K, FQ4_K>;
  packed_k_plain<F, &unpack_q45_k<HIGH>, HIGH ? 1440 : 1184, MT>(P, nsb, a, m0, y, N, g0, g1);
}
template <int MT>
void packed_q6_k(const uint8_t* P, int64_t nsb, const Q8Act& a, int64_t m0, float* y, int64_t N, int64_t g0,
                 int64_t g1) {
  packed_k_plain<FQ6_K, &unpack_q6_k, 1680, MT>(P, nsb, a, m0, y, N, g0, g1);
}
#endif

// ---- what repack / unpack / qmatmul_packed need of a format with a row-interleaved layout -------

struct PackedFormat {
  int qk, bytes, group_bytes;  // elements and bytes of one file block; bytes of 8 rows' blocks packed
  void (*pack)(const uint8_t* src, int r, uint8_t* P);  // file block of lane r (null: zeros) -> P
  void (*unpack)(const uint8_t* P, int r, uint8_t* dst);  // lane r of P -> the file block
  PackedFn tile[4];                                       // MT = 1, 2, 4, 8
  bool sums16;                                            // the kernel reads a.s16
  bool paired;                                            // GroupLayout
  GroupLayout layout(int64_t nb) const { return {paired, nb, group_bytes}; }
};

template <bool MIN, bool HIGH, bool Q8>
void pack_legacy(const uint8_t* src, int r, uint8_t* P) {
  constexpr PackedLegacy f{MIN, HIGH, Q8, 18 + 2 * MIN + 4 * HIGH + 16 * Q8};
  pack_block(f, src, r, P);
}
template <bool MIN, bool HIGH, bool Q8>
void unpack_legacy(const uint8_t* P, int r, uint8_t* dst) {
  constexpr PackedLegacy f{MIN, HIGH, Q8, 18 + 2 * MIN + 4 * HIGH + 16 * Q8};
  unpack_block(f, P, r, dst);
}
template <bool MIN, bool HIGH, bool Q8>
PackedFormat legacy_format() {
  constexpr int bytes = 18 + 2 * MIN + 4 * HIGH + 16 * Q8;
  PackedFormat p{32, bytes, 8 * bytes, &pack_legacy<MIN, HIGH, Q8>, &unpack_legacy<MIN, HIGH, Q8>, {}, false, PAIRED_32};
  packed_tiles<MIN, HIGH, Q8>(p.tile);
  return p;
}
template <bool HIGH>
PackedFormat q45_k_format() {
  return {256, HIGH ? 176 : 144, HIGH ? 1440 : 1184, &pack_q45_k<HIGH>, &unpack_q45_k<HIGH>,
          {&packed_q45_k<HIGH, 1>, &packed_q45_k<HIGH, 2>, &packed_q45_k<HIGH, 4>, &packed_q45_k<HIGH, 8>}, false,
          false};
}

bool packed_lookup(int64_t qtype, PackedFormat& p) {
  switch (qtype) {
    case T_Q4_0: p = legacy_format<false, false, false>(); return true;
    case T_Q4_1: p = legacy_format<true, false, false>(); return true;
    case T_Q5_0: p = legacy_format<false, true, false>(); return true;
    case T_Q5_1: p = legacy_format<true, true, false>(); return true;
    case T_Q8_0: p = legacy_format<false, false, true>(); return true;
    case T_Q4_K: p = q45_k_format<false>(); return true;
    case T_Q5_K: p = q45_k_format<true>(); return true;
    case T_Q6_K:
      p = {256, 210, 1680, &pack_q6_k, &unpack_q6_k,
           {&packed_q6_k<1>, &packed_q6_k<2>, &packed_q6_k<4>, &packed_q6_k<8>}, true, false};
      return true;
    default: return false;
  }
}

// tiles of 1, 2, 4, 8 activation rows (4 at most without AVX512's 32 vector registers)
#if defined(__AVX512F__) || !defined(__AVX2__)
constexpr int MAX_TILE_LOG2 = 3;
#else
constexpr int MAX_TILE_LOG2 = 2;
#endif

}  // namespace

// raw: the GGUF bytes of W (n_out, K) in a format with a row-interleaved layout -> the same bytes in the x8
// layout (GroupLayout::groups(n_out) groups; rows past n_out zero), written into `out` (flat uint8 of that size)
void repack_into(const at::Tensor& raw, int64_t qtype, int64_t n_out, const at::Tensor& out) {
  PackedFormat f;
  TORCH_CHECK(packed_lookup(qtype, f), "repack: ggml type ", qtype, " has no row-interleaved layout");
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.dim() == 1 && raw.is_contiguous(),
              "repack: raw must be a flat contiguous uint8 CPU tensor");
  TORCH_CHECK(n_out > 0 && raw.numel() % n_out == 0 && (raw.numel() / n_out) % f.bytes == 0,
              "repack: ", raw.numel(), " bytes are not ", n_out, " rows of whole ", f.bytes, "-byte blocks");
  const int64_t nb = raw.numel() / n_out / f.bytes;
  const GroupLayout L = f.layout(nb);
  const int64_t groups = L.groups(n_out);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kByte && out.dim() == 1 && out.is_contiguous() &&
                  out.numel() == groups * nb * f.group_bytes,
              "repack: out must be a flat contiguous uint8 CPU tensor of ", groups * nb * f.group_bytes, " bytes");
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < nb; ++b)
        for (int r = 0; r < 8; ++r) {
          const int64_t row = 8 * g + r;
          const uint8_t* blk = row < n_out ? src + (row * nb + b) * f.bytes : nullptr;
          f.pack(blk, r, dst + L.start(g) + b * L.step());
        }
  });
}

// bytes of W (n_out, K) in repack's layout
int64_t packed_nbytes(int64_t qtype, int64_t n_out, int64_t K) {
  PackedFormat f;
  TORCH_CHECK(packed_lookup(qtype, f), "packed_nbytes: ggml type ", qtype, " has no row-interleaved layout");
  TORCH_CHECK(n_out > 0 && K > 0 && K % f.qk == 0, "packed_nbytes: W (", n_out, ", ", K, ") is not whole blocks");
  const int64_t nb = K / f.qk;
  return f.layout(nb).groups(n_out) * nb * f.group_bytes;
}

at::Tensor repack(const at::Tensor& raw, int64_t qtype, int64_t n_out) {
  PackedFormat f;
  TORCH_CHECK(packed_lookup(qtype, f), "repack: ggml type ", qtype, " has no row-interleaved layout");
  TORCH_CHECK(n_out > 0 && raw.numel() % n_out == 0 && (raw.numel() / n_out) % f.bytes == 0,
              "repack: ", raw.numel(), " bytes are not ", n_out, " rows of whole ", f.bytes, "-byte blocks");
  const int64_t K = raw.numel() / n_out / f.bytes * f.qk;
  at::Tensor packed = at::empty({packed_nbytes(qtype, n_out, K)}, raw.options());
  repack_into(raw, qtype, n_out, packed);
  return packed;
}

// packed (repack's layout) -> the GGUF bytes of rows [r0, r1), (r1 - r0) * row_bytes, exactly as in the file
at::Tensor unpack(const at::Tensor& packed, int64_t qtype, int64_t n_out, int64_t r0, int64_t r1) {
  PackedFormat f;
  TORCH_CHECK(packed_lookup(qtype, f), "unpack: ggml type ", qtype, " has no row-interleaved layout");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.dim() == 1 &&
                  packed.is_contiguous(), "unpack: packed must be a flat contiguous uint8 CPU tensor");
  TORCH_CHECK(0 <= r0 && r0 <= r1 && r1 <= n_out, "unpack: rows [", r0, ", ", r1, ") are outside [0, ", n_out, ")");
  const int64_t groups = f.layout(1).groups(n_out);
  TORCH_CHECK(packed.numel() % (groups * f.group_bytes) == 0, "unpack: ", packed.numel(),
              " bytes are not ", groups, " packed row groups");
  const int64_t nb = packed.numel() / (groups * f.group_bytes);
  const GroupLayout L = f.layout(nb);
  at::Tensor raw = at::empty({(r1 - r0) * nb * f.bytes}, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = raw.data_ptr<uint8_t>();
  at::parallel_for(r0, r1, 64, [&](int64_t a0, int64_t a1) {
    for (int64_t row = a0; row < a1; ++row)
      for (int64_t b = 0; b < nb; ++b)
        f.unpack(src + L.start(row / 8) + b * L.step(), (int)(row % 8),
                 dst + ((row - r0) * nb + b) * f.bytes);
  });
  return raw;
}

// x (M, K) fp32, packed: W (n_out, K) in repack's layout -> y (M, n_out) fp32; levels as qmatmul's
at::Tensor qmatmul_packed(const at::Tensor& x, const at::Tensor& packed, int64_t qtype, int64_t n_out, int64_t levels) {
  PackedFormat f;
  TORCH_CHECK(packed_lookup(qtype, f), "qmatmul_packed: ggml type ", qtype, " has no row-interleaved layout");
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "qmatmul_packed: tensors must be on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "qmatmul_packed: x must be 2-D (M, K) float32");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.is_contiguous(),
              "qmatmul_packed: packed must be a flat contiguous uint8 tensor");
  TORCH_CHECK(n_out > 0, "qmatmul_packed: n_out must be > 0, got ", n_out);
  TORCH_CHECK(levels == 1 || levels == 2, "qmatmul_packed: levels must be 1 or 2, got ", levels);
  const int64_t M = x.size(0), K = x.size(1), groups = (n_out + 7) / 8;
  TORCH_CHECK(K > 0 && K % f.qk == 0, "qmatmul_packed: K = ", K, " is not a positive multiple of the block size ",
              f.qk);
  const int64_t nb = K / f.qk, need = f.layout(nb).groups(n_out) * nb * f.group_bytes;
  TORCH_CHECK(packed.numel() == need, "qmatmul_packed: W (", n_out, ", ", K, ") packed needs ", need, " bytes, got ",
              packed.numel());
  const PackedFn* tiles = f.tile;
  const bool wide = Q8_WIDE && qtype == T_Q8_0 && levels == 2;  // one 16-bit code per value instead
#if Q8_WIDE
  static const PackedFn wide_tiles[4] = {&packed_q8_wide<1>, &packed_q8_wide<2>, &packed_q8_wide<4>,
                                         &packed_q8_wide<8>};
  if (wide) tiles = wide_tiles;
#endif

  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({M, n_out}, x.options());
  if (M == 0) return y;
  Q8Act a;
#if Q8_WIDE
  if (wide)
    quantize_rows_16(xc.data_ptr<float>(), M, K, a);
  else
#endif
    quantize_rows(xc.data_ptr<float>(), M, K, (int)levels, a);
  if (f.sums16) sums_of_16(a, K);
  const uint8_t* W = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();  // two levels: the tiles sum each row's pair as they store
  const int64_t group_bytes = nb * f.group_bytes;
  const int64_t grain = std::max<int64_t>(1, 32768 / group_bytes / 2) * 2;  // groups per task: ~32 KiB, whole pairs
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    for (int64_t p0 = g0; p0 < g1; p0 += grain) {  // a panel of groups stays in cache across the row tiles
      const int64_t p1 = std::min(g1, p0 + grain);
      for (int64_t m0 = 0; m0 < a.M;) {
        const int64_t left = a.M - m0;
        int t = left >= 8 ? 3 : left >= 4 ? 2 : left >= 2 ? 1 : 0;
        t = std::min(t, MAX_TILE_LOG2);
        tiles[t](W, nb, a, m0, yp, n_out, p0, p1);
        m0 += int64_t(1) << t;
      }
    }
  });
  return y;
}

TORCH_LIBRARY_FRAGMENT(GGUFLM_NS, m) {
  m.def("repack(Tensor raw, int qtype, int n_out) -> Tensor", &repack);
  m.def("repack_into(Tensor raw, int qtype, int n_out, Tensor(a!) out) -> ()", &repack_into);
  m.def("packed_nbytes(int qtype, int n_out, int K) -> int", &packed_nbytes);
  m.def("unpack(Tensor packed, int qtype, int n_out, int r0, int r1) -> Tensor", &unpack);
  m.def("qmatmul_packed(Tensor x, Tensor packed, int qtype, int n_out, int levels=1) -> Tensor", &qmatmul_packed);
}
