// Inner kernels of the CPU dense pass, compiled once per instruction set.
//
// cpu_dispatch.cpp includes this file several times, each time inside its own namespace
// and `#pragma GCC target` region (AVX-512 VNNI, AVX2+FMA, portable baseline), so one
// source gives every version; the dense pass (dense_cpu.cpp) calls the one pick_kernels
// chose, through its Kernels table. No include guard on
// purpose. GCC vector extensions give the float kernels in the width of the target;
// the exact integer dot product uses intrinsics where the target has them.
//
//   dot_u8   S[r, i]  = sum_j Q_r[j] * X[i, j]          int16 x uint8, exact in int64
//   dot_q0   the same for |Q| <= 127 (int8 x uint8 with vpdpbusd on AVX-512)
//   dot_f64  D[n, i] += sum_j V[n, j] * XC[i, j]        float64 (any order; gamma_d bound)
//   acc_f64  A[n, j] += sum_{i in rows} P[n, i] XC[i, j] float64 weighted sum of a chunk
//   classify the rows of a sub-block that one query refines, from their coarse logits
//   dot_fused1  every limb of one query in one pass (dot_q0 and dot_u8 together)
//   center_row  out[j] = (double)x[j] - c[j]: one row's chunk of fp16 / bf16 / fp32 / uint8
//               data, centered in float64 (the float path's rows)
//   dot_raw  D[n, i] += sum_j V[n, j] ((double)X[i, j] - c[j]): center_row and dot_f64 in one
//   acc_raw  center_row and acc_f64 in one (N <= 4)

#if !defined(OPTDEN_KNS) || !defined(OPTDEN_ISA)
#error "define OPTDEN_KNS and OPTDEN_ISA (2: AVX-512 VNNI, 1: AVX2 + FMA, 0: portable) first"
#endif
// (GCC does not reliably define __AVX2__ etc. inside `#pragma GCC target` regions in
// C++, hence the explicit OPTDEN_ISA.)

namespace optden {
namespace OPTDEN_KNS {

#if OPTDEN_ISA == 2
constexpr int kVecBytes = 64;
#elif OPTDEN_ISA == 1
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
typedef double vd __attribute__((vector_size(kVecBytes)));
constexpr int kW = kVecBytes / 8;  // doubles per vector

static inline vd vload(const double* p) {
  vd x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}
static inline void vstore(double* p, vd x) { __builtin_memcpy(p, &x, sizeof x); }
// Keeps x in a register: GCC otherwise folds a load used by several FMAs into each of them
// (one load per use), and Zen 4 runs the memory forms of 512-bit FMAs at about half rate.
static inline void in_register(vd& x) {
#if OPTDEN_ISA >= 1
  asm("" : "+v"(x));
#else
  (void)x;
#endif
}
static inline double vsum(vd x) {
  double s = 0.0;
  for (int t = 0; t < kW; ++t) s += x[t];
  return s;
}

// ---------------------------------------------------------------- exact int dot
// Qp: R pointers to int16 query limbs of length >= d (padding ignored; any rows of any
// array, so a caller can pick a subset of limbs); X: (B, d) uint8 rows with stride d;
// S: (R, ldS) int64, written (not accumulated). |Q| <= 2^15, so one pair of int16
// products is below 2^24 and int32 lanes are flushed to int64 every 2048 elements.
constexpr int kFlush = 2048;

// S[r, b] = tot[r][b] + the columns [nv, d) past the vector part, in scalar code
template <int RT, int BT, typename QT>
static inline void store_tile(const int64_t (&tot)[RT][BT], const QT* const* Qp, const uint8_t* X, int d, int nv,
                              int64_t* S, int ldS) {
  for (int r = 0; r < RT; ++r)
    for (int b = 0; b < BT; ++b) {
      int64_t t = tot[r][b];
      for (int j = nv; j < d; ++j) t += (int64_t)Qp[r][j] * X[(size_t)b * d + j];
      S[(size_t)r * ldS + b] = t;
    }
}

#if OPTDEN_ISA == 2
constexpr int kIntStep = 32;
// the sum of the 16 int32 lanes, each widened to int64 first (no overflow)
static inline int64_t hsum_epi32(__m512i a) {
  const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a));
  const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1));
  return _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi));
}
// acc += pairwise int16 products, in place. GCC 12 keeps the intrinsic's accumulators of a
// tile in copies and spills them to the stack every step; the asm ties each to one register.
// Every operand is a register ("v", not "vm"): given the choice, GCC folded a tile's query
// load into each instruction that uses it (21 of the 24 vpdpbusd of dot8_tile<8, 3>), and
// on Zen 4 the memory forms of these 512-bit instructions ran at half the rate of the
// register forms (8 x 3 tile on L1-resident rows: 3.7 vs 6.4 G instructions/s on 2 cores).
static inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
// acc += u8 . s8 (four products per int32 lane), in place, for the same reasons
static inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}
// pf, pfe: one cache line of [pf, pfe) is prefetched per 32 columns (2 d bytes per tile),
// so the rows this thread reads next arrive while this tile computes (nullptr: none)
template <int RT, int BT>
static inline void dot_tile(const int16_t* const* Qp, const uint8_t* X, int d, int64_t* S, int ldS,
                            const uint8_t* pf = nullptr, const uint8_t* pfe = nullptr) {
  const int nv = d / kIntStep * kIntStep;
  int64_t tot[RT][BT] = {};
  for (int c0 = 0; c0 < nv; c0 += kFlush) {
    const int c1 = c0 + kFlush < nv ? c0 + kFlush : nv;
    __m512i acc[RT][BT];
    for (int r = 0; r < RT; ++r)
      for (int b = 0; b < BT; ++b) acc[r][b] = _mm512_setzero_si512();
    for (int j = c0; j < c1; j += kIntStep) {
      if (pf && pf + 2 * (size_t)j < pfe) _mm_prefetch(reinterpret_cast<const char*>(pf + 2 * (size_t)j), _MM_HINT_T1);
      __m512i x[BT];
      for (int b = 0; b < BT; ++b)
        x[b] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(X + (size_t)b * d + j)));
      for (int r = 0; r < RT; ++r) {
        const __m512i q = _mm512_loadu_si512(reinterpret_cast<const void*>(Qp[r] + j));
        for (int b = 0; b < BT; ++b) acc[r][b] = dpwssd(acc[r][b], q, x[b]);
      }
    }
    for (int r = 0; r < RT; ++r)
      for (int b = 0; b < BT; ++b) tot[r][b] += hsum_epi32(acc[r][b]);
  }
  store_tile<RT, BT>(tot, Qp, X, d, nv, S, ldS);
}
constexpr int kRT = 4, kBT = 4;
#elif OPTDEN_ISA == 1
constexpr int kIntStep = 16;
template <int RT, int BT>
static inline void dot_tile(const int16_t* const* Qp, const uint8_t* X, int d, int64_t* S, int ldS) {
  const int nv = d / kIntStep * kIntStep;
  int64_t tot[RT][BT] = {};
  for (int c0 = 0; c0 < nv; c0 += kFlush) {
    const int c1 = c0 + kFlush < nv ? c0 + kFlush : nv;
    __m256i acc[RT][BT];
    for (int r = 0; r < RT; ++r)
      for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_setzero_si256();
    for (int j = c0; j < c1; j += kIntStep) {
      __m256i x[BT];
      for (int b = 0; b < BT; ++b)
        x[b] = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(X + (size_t)b * d + j)));
      for (int r = 0; r < RT; ++r) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Qp[r] + j));
        for (int b = 0; b < BT; ++b) acc[r][b] = _mm256_add_epi32(acc[r][b], _mm256_madd_epi16(q, x[b]));
      }
    }
    for (int r = 0; r < RT; ++r)
      for (int b = 0; b < BT; ++b) {
        const __m256i lo = _mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc[r][b]));
        const __m256i hi = _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc[r][b], 1));
        alignas(32) int64_t t[4];
        _mm256_store_si256(reinterpret_cast<__m256i*>(t), _mm256_add_epi64(lo, hi));
        tot[r][b] += t[0] + t[1] + t[2] + t[3];
      }
  }
  store_tile<RT, BT>(tot, Qp, X, d, nv, S, ldS);
}
constexpr int kRT = 4, kBT = 2;
#else
template <int RT, int BT>
static inline void dot_tile(const int16_t* const* Qp, const uint8_t* X, int d, int64_t* S, int ldS) {
  for (int r = 0; r < RT; ++r)
    for (int b = 0; b < BT; ++b) {
      // 64-bit sums: a 32-bit partial over kFlush terms of |2^15 * 255| could overflow
      int64_t tot = 0;
      for (int j = 0; j < d; ++j) tot += (int64_t)Qp[r][j] * (int64_t)X[(size_t)b * d + j];
      S[(size_t)r * ldS + b] = tot;
    }
}
constexpr int kRT = 2, kBT = 2;
#endif

// pf: the prefetch cursor (AVX-512: each full tile prefetches the next 2 d bytes), pfe its end
template <int RT>
static void dot_rows(const int16_t* const* Qp, const uint8_t* X, int B, int d, int64_t* S, int ldS,
                     const uint8_t*& pf, const uint8_t* pfe) {
  int b = 0;
#if OPTDEN_ISA == 2
  const size_t span = 2 * (size_t)(d / kIntStep * kIntStep);
  for (; b + kBT <= B; b += kBT) {
    dot_tile<RT, kBT>(Qp, X + (size_t)b * d, d, S + b, ldS, pf, pfe);
    if (pf) pf = pf + span < pfe ? pf + span : nullptr;
  }
#else
  (void)pf, (void)pfe;
  for (; b + kBT <= B; b += kBT) dot_tile<RT, kBT>(Qp, X + (size_t)b * d, d, S + b, ldS);
#endif
  for (; b < B; ++b) dot_tile<RT, 1>(Qp, X + (size_t)b * d, d, S + b, ldS);
}

// pfc, pfe: a prefetch cursor into [*pfc, pfe), the rows this thread reads next, so that
// memory keeps streaming while these rows, already in cache, are computed on; the lines
// asked for are taken off the front (*pfc advances). nullptr: none. Only the AVX-512 path
// prefetches.
static void dot_u8(const int16_t* const* Qp, int R, const uint8_t* X, int B, int d, int64_t* S, int ldS,
                   const uint8_t** pfc, const uint8_t* pfe) {
  const uint8_t* pf = pfc && *pfc < pfe ? *pfc : nullptr;
  int r = 0;
  for (; r + kRT <= R; r += kRT) dot_rows<kRT>(Qp + r, X, B, d, S + (size_t)r * ldS, ldS, pf, pfe);
  // the last 1..3 limb rows in one tile, so each row of X is read once more, not 3 times
  const int rest = R - r;
  if (rest >= 3) dot_rows<3>(Qp + r, X, B, d, S + (size_t)r * ldS, ldS, pf, pfe), r += 3;
  else if (rest == 2) dot_rows<2>(Qp + r, X, B, d, S + (size_t)r * ldS, ldS, pf, pfe), r += 2;
  for (; r < R; ++r) dot_rows<1>(Qp + r, X, B, d, S + (size_t)r * ldS, ldS, pf, pfe);
  if (pfc) *pfc = pf ? pf : pfe;
}

// The coarse limb: S[r, i] = sum_j Q_r[j] X[i, j] with |Q| <= 127. AVX-512: the int8
// copies Q8p, u8 x s8 products with vpdpbusd (64 per instruction, twice vpdpwssd's; four
// products of <= 255 * 127 per int32 lane per step, flushed to int64 every 16384
// columns); other paths: the same values as int16 (Q16p) through dot_u8. Both exact, so
// every path gives the same integers.
#if OPTDEN_ISA == 2
constexpr int kFlush8 = 16384;
// pf, pfe: per 64 columns, the next `nper` cache lines of [pf, pfe) are prefetched, so
// rows this thread reads later arrive while this tile computes (nullptr: none)
template <int RT, int BT>
static inline void dot8_tile(const int8_t* const* Qp, const uint8_t* X, int d, int64_t* S, int ldS,
                             const uint8_t* pf, const uint8_t* pfe, int nper = 1) {
  const int nv = d / 64 * 64;
  int64_t tot[RT][BT] = {};
  for (int c0 = 0; c0 < nv; c0 += kFlush8) {
    const int c1 = c0 + kFlush8 < nv ? c0 + kFlush8 : nv;
    __m512i acc[RT][BT];
    for (int r = 0; r < RT; ++r)
      for (int b = 0; b < BT; ++b) acc[r][b] = _mm512_setzero_si512();
    for (int j = c0; j < c1; j += 64) {
      if (pf)
        for (int u = 0; u < nper; ++u) {
          const uint8_t* p = pf + (size_t)nper * j + 64 * u;
          if (p < pfe) _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T1);
        }
      __m512i x[BT];
      for (int b = 0; b < BT; ++b) x[b] = _mm512_loadu_si512(reinterpret_cast<const void*>(X + (size_t)b * d + j));
      for (int r = 0; r < RT; ++r) {
        const __m512i q = _mm512_loadu_si512(reinterpret_cast<const void*>(Qp[r] + j));
        for (int b = 0; b < BT; ++b) acc[r][b] = dpbusd(acc[r][b], x[b], q);
      }
    }
    for (int r = 0; r < RT; ++r)
      for (int b = 0; b < BT; ++b) tot[r][b] += hsum_epi32(acc[r][b]);
  }
  store_tile<RT, BT>(tot, Qp, X, d, nv, S, ldS);
}

// lookahead: the first pass over these rows (they come from memory); otherwise they are
// in cache, and pf is the prefetch cursor (advanced by the lines each tile asked for), pfe
// its end
template <int RT>
static void dot8_rows(const int8_t* const* Qp, const uint8_t* X, int B, int d, int64_t* S, int ldS,
                      const uint8_t*& pf, const uint8_t* pfe, bool lookahead) {
  const int span = d / 64 * 64;
  int b = 0;
  if (lookahead) {  // the first pass over the rows (from memory): one row at a time, in
    // memory order, a single stream. One or two queries leave it to the hardware
    // prefetcher: N = 1 and 2 at sigma = 0.5 were 8-14% faster than with 4-row tiles and
    // software prefetch of the rows two tiles ahead (in-process A/B). With 3 or 4 queries a
    // row takes long enough that the hardware prefetcher falls behind (N = 4: 40% slower),
    // so the row 4 ahead is prefetched, a line per 64 columns. A standalone copy of the
    // loop (fast phase of this VM): 1 query 39 GB/s (tiles 35), 3 and 4 queries 43 (tiles
    // 37 and 34, row by row without prefetch 29 and 20).
    constexpr int kAhead = 4;
    for (; b < B; ++b) {
      const uint8_t* ahead = RT >= 3 && b + kAhead < B ? X + (size_t)(b + kAhead) * d : nullptr;
      dot8_tile<RT, 1>(Qp, X + (size_t)b * d, d, S + b, ldS, ahead, X + (size_t)B * d);
    }
    return;
  }
  for (; b + 4 <= B; b += 4) {
    if (pf) {  // later passes (rows in cache): a slice of the next sub-block per tile
      dot8_tile<RT, 4>(Qp, X + (size_t)b * d, d, S + b, ldS, pf, pfe);
      pf = pf + span < pfe ? pf + span : nullptr;
    } else {
      dot8_tile<RT, 4>(Qp, X + (size_t)b * d, d, S + b, ldS, nullptr, nullptr);
    }
  }
  for (; b < B; ++b) dot8_tile<RT, 1>(Qp, X + (size_t)b * d, d, S + b, ldS, nullptr, nullptr);
}

// The first pass over the rows with 8 queries: tiles of 8 queries x 3 rows (24
// accumulators), so 8 queries cost one read of the rows from memory, not one from memory
// and one from cache; the rows two tiles ahead are prefetched as one stream.
static void dot8_first8(const int8_t* const* Qp, const uint8_t* X, int B, int d, int64_t* S, int ldS) {
  int b = 0;
  for (; b + 3 <= B; b += 3) {
    const uint8_t* ahead = b + 6 < B ? X + (size_t)(b + 6) * d : nullptr;
    dot8_tile<8, 3>(Qp, X + (size_t)b * d, d, S + b, ldS, ahead, X + (size_t)B * d, 3);
  }
  for (; b < B; ++b) dot8_tile<8, 1>(Qp, X + (size_t)b * d, d, S + b, ldS, nullptr, nullptr);
}

// pfc, pfe: the prefetch cursor (as dot_u8's), used during the passes after the first
// when R >= 8. The first pass over X prefetches X's own rows ahead.
static void dot_q0(const int8_t* const* Q8p, const int16_t* const* Q16p, int R, const uint8_t* X, int B, int d,
                   int64_t* S, int ldS, const uint8_t** pfc, const uint8_t* pfe) {
  (void)Q16p;
  if (R < 8 || d < 64) pfc = nullptr;
  const uint8_t* pf = pfc && *pfc < pfe ? *pfc : nullptr;
  int r = 0;
  if (R >= 8 && d >= 64) dot8_first8(Q8p, X, B, d, S, ldS), r = 8;
  for (; r + 4 <= R; r += 4) dot8_rows<4>(Q8p + r, X, B, d, S + (size_t)r * ldS, ldS, pf, pfe, r == 0);
  const int rest = R - r;
  if (rest == 3) dot8_rows<3>(Q8p + r, X, B, d, S + (size_t)r * ldS, ldS, pf, pfe, r == 0);
  else if (rest == 2) dot8_rows<2>(Q8p + r, X, B, d, S + (size_t)r * ldS, ldS, pf, pfe, r == 0);
  else if (rest == 1) dot8_rows<1>(Q8p + r, X, B, d, S + (size_t)r * ldS, ldS, pf, pfe, r == 0);
  if (pfc) *pfc = pf ? pf : pfe;
}
#else
static void dot_q0(const int8_t* const* Q8p, const int16_t* const* Q16p, int R, const uint8_t* X, int B, int d,
                   int64_t* S, int ldS, const uint8_t** pfc, const uint8_t* pfe) {
  (void)Q8p, (void)pfc, (void)pfe;
  dot_u8(Q16p, R, X, B, d, S, ldS, nullptr, nullptr);
}
#endif

// Every limb of one query in one pass over the rows: S0[i] = sum_j q8[j] X[i, j] (the
// coarse limb, as dot_q0) and Sr[l * ldS + i] = sum_j Qr[l][j] X[i, j] for l < NL (as
// dot_u8), the same integers, each row read once instead of twice. For a query whose
// rows all carry weight (large sigma) every limb of every row is needed anyway.
// pfc, pfe: the prefetch cursor (AVX-512: two lines per 64 columns of each 4-row tile).
#if OPTDEN_ISA == 2
template <int NL, int BT>
static inline void fused1_tile(const int8_t* q8, const int16_t* const* Qr, const uint8_t* X, int d, int64_t* S0,
                               int64_t* Sr, int ldS, const uint8_t* pf, const uint8_t* pfe) {
  const int nv = d / 64 * 64;
  int64_t t0[1][BT] = {}, tr[NL][BT] = {};
  for (int c0 = 0; c0 < nv; c0 += kFlush) {  // kFlush (int16 products) < kFlush8
    const int c1 = c0 + kFlush < nv ? c0 + kFlush : nv;
    __m512i a0[BT], ar[NL][BT];
    for (int b = 0; b < BT; ++b) {
      a0[b] = _mm512_setzero_si512();
      for (int l = 0; l < NL; ++l) ar[l][b] = _mm512_setzero_si512();
    }
    for (int j = c0; j < c1; j += 64) {
      if (pf && pf + 2 * (size_t)j < pfe) {
        _mm_prefetch(reinterpret_cast<const char*>(pf + 2 * (size_t)j), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(pf + 2 * (size_t)j + 64), _MM_HINT_T1);
      }
      const __m512i q = _mm512_loadu_si512(reinterpret_cast<const void*>(q8 + j));
      __m512i ql[NL], qh[NL];
      for (int l = 0; l < NL; ++l) {
        ql[l] = _mm512_loadu_si512(reinterpret_cast<const void*>(Qr[l] + j));
        qh[l] = _mm512_loadu_si512(reinterpret_cast<const void*>(Qr[l] + j + 32));
      }
      for (int b = 0; b < BT; ++b) {
        const __m512i x = _mm512_loadu_si512(reinterpret_cast<const void*>(X + (size_t)b * d + j));
        a0[b] = dpbusd(a0[b], x, q);
        const __m512i xl = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(x));
        const __m512i xh = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(x, 1));
        for (int l = 0; l < NL; ++l) ar[l][b] = dpwssd(dpwssd(ar[l][b], ql[l], xl), qh[l], xh);
      }
    }
    for (int b = 0; b < BT; ++b) {
      t0[0][b] += hsum_epi32(a0[b]);
      for (int l = 0; l < NL; ++l) tr[l][b] += hsum_epi32(ar[l][b]);
    }
  }
  store_tile<1, BT>(t0, &q8, X, d, nv, S0, ldS);
  store_tile<NL, BT>(tr, Qr, X, d, nv, Sr, ldS);
}

template <int NL>
static void fused1_rows(const int8_t* q8, const int16_t* const* Qr, const uint8_t* X, int B, int d, int64_t* S0,
                        int64_t* Sr, int ldS, const uint8_t*& pf, const uint8_t* pfe) {
  const size_t span = 2 * (size_t)(d / 64 * 64);
  int b = 0;
  for (; b + 4 <= B; b += 4) {
    fused1_tile<NL, 4>(q8, Qr, X + (size_t)b * d, d, S0 + b, Sr + b, ldS, pf, pfe);
    if (pf) pf = pf + span < pfe ? pf + span : nullptr;
  }
  for (; b < B; ++b) fused1_tile<NL, 1>(q8, Qr, X + (size_t)b * d, d, S0 + b, Sr + b, ldS, nullptr, nullptr);
}
#endif

static void dot_fused1(const int8_t* q8, const int16_t* q16, const int16_t* const* Qr, int NL, const uint8_t* X,
                       int B, int d, int64_t* S0, int64_t* Sr, int ldS, const uint8_t** pfc, const uint8_t* pfe) {
#if OPTDEN_ISA == 2
  if (d >= 64 && NL >= 1 && NL <= 3) {
    const uint8_t* pf = pfc && *pfc < pfe ? *pfc : nullptr;
    if (NL == 1) fused1_rows<1>(q8, Qr, X, B, d, S0, Sr, ldS, pf, pfe);
    else if (NL == 2) fused1_rows<2>(q8, Qr, X, B, d, S0, Sr, ldS, pf, pfe);
    else fused1_rows<3>(q8, Qr, X, B, d, S0, Sr, ldS, pf, pfe);
    if (pfc) *pfc = pf ? pf : pfe;
    return;
  }
#endif
  dot_q0(&q8, &q16, 1, X, B, d, S0, ldS, pfc, pfe);
  dot_u8(Qr, NL, X, B, d, Sr, ldS, pfc, pfe);
}

// ---------------------------------------------------------------- float64 dot
// V: (N, ldv) queries (the chunk's columns start at V); XC: (B, w) centered rows of a
// column chunk of width w; D: (N, ldD), accumulated.
template <int NT, int BT>
static inline void dotf_tile(const double* V, int ldv, const double* XC, int w, double* D, int ldD) {
  const int nv = w / kW * kW;
  vd acc[NT][BT];
  for (int n = 0; n < NT; ++n)
    for (int b = 0; b < BT; ++b) acc[n][b] = vd{} ;
  for (int j = 0; j < nv; j += kW) {
    vd x[BT];
    for (int b = 0; b < BT; ++b) x[b] = vload(XC + (size_t)b * w + j);
    for (int n = 0; n < NT; ++n) {
      vd q = vload(V + (size_t)n * ldv + j);
      in_register(q);
      for (int b = 0; b < BT; ++b) acc[n][b] += q * x[b];
    }
  }
  for (int n = 0; n < NT; ++n)
    for (int b = 0; b < BT; ++b) {
      double t = vsum(acc[n][b]);
      for (int j = nv; j < w; ++j) t += V[(size_t)n * ldv + j] * XC[(size_t)b * w + j];
      D[(size_t)n * ldD + b] += t;
    }
}

template <int NT>
static void dotf_rows(const double* V, int ldv, const double* XC, int B, int w, double* D, int ldD) {
  int b = 0;
  for (; b + 2 <= B; b += 2) dotf_tile<NT, 2>(V, ldv, XC + (size_t)b * w, w, D + b, ldD);
  for (; b < B; ++b) dotf_tile<NT, 1>(V, ldv, XC + (size_t)b * w, w, D + b, ldD);
}

static void dot_f64(const double* V, int N, int ldv, const double* XC, int B, int w, double* D, int ldD) {
  int n = 0;
  for (; n + 4 <= N; n += 4) dotf_rows<4>(V + (size_t)n * ldv, ldv, XC, B, w, D + (size_t)n * ldD, ldD);
  for (; n < N; ++n) dotf_rows<1>(V + (size_t)n * ldv, ldv, XC, B, w, D + (size_t)n * ldD, ldD);
}

// ---------------------------------------------------------------- weighted sum
// P: (N, ldp) weights of the block's rows; XC: (B, w) centered rows of the chunk;
// A: (N, lda) accumulators, columns of the chunk start at A; rows: the rows to add.
#if OPTDEN_ISA == 2
constexpr int kJV = 3;  // vectors of columns per register tile (4 x 3 accumulators of 32)
#else
constexpr int kJV = 1;
#endif

// A[n, j] += sum_t P[n, rows[t]] X[rows[t], j] for n < NT, j < w, in list order per (n, j);
// row_vec(i, j): kW columns of row i from column j, row_at(i, j): one (acc_tile's centered
// copy, or accr_tile's raw rows centered in registers: the same doubles either way)
template <int NT, class RowVec, class RowAt>
static inline void acc_rows(const double* P, int ldp, const int* rows, int nrows, int w, double* A, int lda,
                            RowVec row_vec, RowAt row_at) {
  const int nv = w / (kW * kJV) * (kW * kJV);
  for (int j = 0; j < nv; j += kW * kJV) {
    vd a[NT][kJV];
    for (int n = 0; n < NT; ++n)
      for (int c = 0; c < kJV; ++c) a[n][c] = vload(A + (size_t)n * lda + j + c * kW);
    for (int t = 0; t < nrows; ++t) {
      const int i = rows[t];
      vd x[kJV];
      for (int c = 0; c < kJV; ++c) {
        x[c] = row_vec(i, j + c * kW);
        in_register(x[c]);
      }
      for (int n = 0; n < NT; ++n) {
        const double p = P[(size_t)n * ldp + i];
        for (int c = 0; c < kJV; ++c) a[n][c] += p * x[c];
      }
    }
    for (int n = 0; n < NT; ++n)
      for (int c = 0; c < kJV; ++c) vstore(A + (size_t)n * lda + j + c * kW, a[n][c]);
  }
  for (int j = nv; j < w; ++j)
    for (int n = 0; n < NT; ++n) {
      double a = A[(size_t)n * lda + j];
      for (int t = 0; t < nrows; ++t) a += P[(size_t)n * ldp + rows[t]] * row_at(rows[t], j);
      A[(size_t)n * lda + j] = a;
    }
}

template <int NT>
static inline void acc_tile(const double* P, int ldp, const double* XC, int w, double* A, int lda, const int* rows,
                            int nrows) {
  acc_rows<NT>(P, ldp, rows, nrows, w, A, lda, [&](int i, int j) { return vload(XC + (size_t)i * w + j); },
               [&](int i, int j) { return XC[(size_t)i * w + j]; });
}

static void acc_f64(const double* P, int N, int ldp, const double* XC, int w, double* A, int lda,
                    const int* rows, int nrows, int tile_first) {
  // tile_first: the caller's query tiling (4), so the row list of each tile applies
  (void)tile_first;
  if (N == 4) acc_tile<4>(P, ldp, XC, w, A, lda, rows, nrows);
  else if (N == 3) acc_tile<3>(P, ldp, XC, w, A, lda, rows, nrows);
  else if (N == 2) acc_tile<2>(P, ldp, XC, w, A, lda, rows, nrows);
  else if (N == 1) acc_tile<1>(P, ldp, XC, w, A, lda, rows, nrows);
}

// ---------------------------------------------------------------- centering (float path)
// Storage types as dense_cpu.cpp's DType: 0 uint8, 1 float16, 2 bfloat16, 3 float32.
// Every conversion to double is exact (so is fp16 -> fp32 -> fp64), so the vector versions
// and this scalar reference give the same doubles: the one rounding is the subtraction.
static inline double raw_value(const void* base, int dt, size_t idx) {
  if (dt == 0) return (double)static_cast<const uint8_t*>(base)[idx];
  if (dt == 3) return (double)static_cast<const float*>(base)[idx];
  const uint16_t h = static_cast<const uint16_t*>(base)[idx];
  uint32_t b;
  if (dt == 2) {
    b = (uint32_t)h << 16;
  } else {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) return sign ? -std::ldexp((double)man, -24) : std::ldexp((double)man, -24);  // zero, subnormal
    b = sign | ((exp == 31 ? 255u : exp + 112u) << 23) | (man << 13);
  }
  float f;
  __builtin_memcpy(&f, &b, 4);
  return (double)f;
}

template <int DT>
static inline vd raw_vec(const char* x, int j) {  // kW elements from column j, exact
#if OPTDEN_ISA == 2
  __m256 f;
  if (DT == 0) f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x + j))));
  else if (DT == 3) f = _mm256_loadu_ps(reinterpret_cast<const float*>(x) + j);
  else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(x) + j));
    f = DT == 1 ? _mm256_cvtph_ps(h) : _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  return (vd)_mm512_cvtps_pd(f);
#elif OPTDEN_ISA == 1
  __m128 f;
  if (DT == 0) {
    int32_t q;
    __builtin_memcpy(&q, x + j, 4);
    f = _mm_cvtepi32_ps(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(q)));
  } else if (DT == 3) f = _mm_loadu_ps(reinterpret_cast<const float*>(x) + j);
  else {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(reinterpret_cast<const uint16_t*>(x) + j));
    f = DT == 1 ? _mm_cvtph_ps(h) : _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(h), 16));
  }
  return (vd)_mm256_cvtps_pd(f);
#else
  vd r;
  for (int t = 0; t < kW; ++t) r[t] = raw_value(x, DT, j + t);
  return r;
#endif
}

// f(std::integral_constant<int, DT>()) for the storage type dt: one instantiation per type
template <class F>
static inline void with_dtype(int dt, F&& f) {
  if (dt == 0) f(std::integral_constant<int, 0>());
  else if (dt == 1) f(std::integral_constant<int, 1>());
  else if (dt == 2) f(std::integral_constant<int, 2>());
  else f(std::integral_constant<int, 3>());
}

template <int DT>
static void center_row_t(const char* x, int w, const double* c, double* out) {
  int j = 0;
  for (; j + kW <= w; j += kW) vstore(out + j, raw_vec<DT>(x, j) - vload(c + j));
  for (; j < w; ++j) out[j] = raw_value(x, DT, j) - c[j];
}

static void center_row(int dt, const void* x, int w, const double* c, double* out) {
  with_dtype(dt, [&](auto t) { center_row_t<decltype(t)::value>(static_cast<const char*>(x), w, c, out); });
}

// ---------------------------------------------------------------- fused centering + dot
// D[n, i] += sum_{j < w} V[n, j] ((double)x_i[j] - c[j]) for n < N, i < B, row x_i at
// x + i * ldx bytes, storage type dt (as center_row): the float path's logit dots for a few
// queries, the rows centered in registers instead of through a copy (which cost about as
// much as the dots at N = 1). Each difference is rounded once, as by center_row, and the
// products summed in float64 in some order: the same gamma_d bound as dot_f64.
// NT queries x BT rows, each sum in two interleaved accumulators (four independent FMA
// chains at NT = 1)
template <int DT, int NT, int BT>
static inline void dotr_tile(const double* V, int ldv, const char* x, size_t ldx, int w, const double* c, double* D,
                             int ldD) {
  const int nv2 = w / (2 * kW) * (2 * kW), nv = w / kW * kW;
  vd acc[NT][BT][2];
  for (int n = 0; n < NT; ++n)
    for (int b = 0; b < BT; ++b) acc[n][b][0] = acc[n][b][1] = vd{};
  int j = 0;
  for (; j < nv2; j += 2 * kW)
    for (int u = 0; u < 2; ++u) {
      const vd cu = vload(c + j + u * kW);
      vd xb[BT];
      for (int b = 0; b < BT; ++b) xb[b] = raw_vec<DT>(x + (size_t)b * ldx, j + u * kW) - cu;
      for (int n = 0; n < NT; ++n) {
        const vd q = vload(V + (size_t)n * ldv + j + u * kW);
        for (int b = 0; b < BT; ++b) acc[n][b][u] += q * xb[b];
      }
    }
  for (; j < nv; j += kW) {
    const vd cu = vload(c + j);
    for (int b = 0; b < BT; ++b) {
      const vd xv = raw_vec<DT>(x + (size_t)b * ldx, j) - cu;
      for (int n = 0; n < NT; ++n) acc[n][b][0] += vload(V + (size_t)n * ldv + j) * xv;
    }
  }
  for (int n = 0; n < NT; ++n)
    for (int b = 0; b < BT; ++b) {
      double t = vsum(acc[n][b][0] + acc[n][b][1]);
      for (int jj = nv; jj < w; ++jj)
        t += V[(size_t)n * ldv + jj] * (raw_value(x + (size_t)b * ldx, DT, jj) - c[jj]);
      D[(size_t)n * ldD + b] += t;
    }
}

template <int DT>
static void dot_raw_t(const double* V, int N, int ldv, const char* x, size_t ldx, int B, int w, const double* c,
                      double* D, int ldD) {
  for (int n = 0; n < N;) {
    const int nt = N - n >= 4 ? 4 : N - n >= 2 ? 2 : 1;
    for (int b = 0; b < B;) {
      const int bt = B - b >= 2 ? 2 : 1;
      const double* Vn = V + (size_t)n * ldv;
      const char* xb = x + (size_t)b * ldx;
      double* Dn = D + (size_t)n * ldD + b;
      if (nt == 4 && bt == 2) dotr_tile<DT, 4, 2>(Vn, ldv, xb, ldx, w, c, Dn, ldD);
      else if (nt == 4) dotr_tile<DT, 4, 1>(Vn, ldv, xb, ldx, w, c, Dn, ldD);
      else if (nt == 2 && bt == 2) dotr_tile<DT, 2, 2>(Vn, ldv, xb, ldx, w, c, Dn, ldD);
      else if (nt == 2) dotr_tile<DT, 2, 1>(Vn, ldv, xb, ldx, w, c, Dn, ldD);
      else if (bt == 2) dotr_tile<DT, 1, 2>(Vn, ldv, xb, ldx, w, c, Dn, ldD);
      else dotr_tile<DT, 1, 1>(Vn, ldv, xb, ldx, w, c, Dn, ldD);
      b += bt;
    }
    n += nt;
  }
}

static void dot_raw(int dt, const double* V, int N, int ldv, const void* x, size_t ldx, int B, int w, const double* c,
                    double* D, int ldD) {
  with_dtype(dt, [&](auto t) {
    dot_raw_t<decltype(t)::value>(V, N, ldv, static_cast<const char*>(x), ldx, B, w, c, D, ldD);
  });
}

// A[n, j] += sum_{t < nrows} P[n, rows[t]] ((double)x_{rows[t]}[j] - c[j]), n < N <= 4, j < w:
// acc_f64 with the rows centered in registers (row i at x + i * ldx bytes, storage type dt).
// The same differences and the same sequential sum over the rows per (n, j) as center_row
// then acc_f64: bit-for-bit the same A.
template <int DT, int NT>
static void accr_tile(const double* P, int ldp, const char* x, size_t ldx, const int* rows, int nrows, int w,
                      const double* c, double* A, int lda) {
  acc_rows<NT>(P, ldp, rows, nrows, w, A, lda,
               [&](int i, int j) { return raw_vec<DT>(x + (size_t)i * ldx, j) - vload(c + j); },
               [&](int i, int j) { return raw_value(x + (size_t)i * ldx, DT, j) - c[j]; });
}

template <int DT>
static void acc_raw_t(const double* P, int N, int ldp, const char* x, size_t ldx, const int* rows, int nrows, int w,
                      const double* c, double* A, int lda) {
  if (N == 4) accr_tile<DT, 4>(P, ldp, x, ldx, rows, nrows, w, c, A, lda);
  else if (N == 3) accr_tile<DT, 3>(P, ldp, x, ldx, rows, nrows, w, c, A, lda);
  else if (N == 2) accr_tile<DT, 2>(P, ldp, x, ldx, rows, nrows, w, c, A, lda);
  else if (N == 1) accr_tile<DT, 1>(P, ldp, x, ldx, rows, nrows, w, c, A, lda);
}

static void acc_raw(int dt, const double* P, int N, int ldp, const void* x, size_t ldx, const int* rows, int nrows,
                    int w, const double* c, double* A, int lda) {
  with_dtype(dt, [&](auto t) {
    acc_raw_t<decltype(t)::value>(P, N, ldp, static_cast<const char*>(x), ldx, rows, nrows, w, c, A, lda);
  });
}

// ---------------------------------------------------------------- row classification
// One query's rows of a sub-block, from their coarse logits C (nb) and the coarse bound
// d1: with ub = C[i] + d1, row i is a weight row if ub >= thr, a candidate for the top K
// if ub > hmin (and not a weight row), left out otherwise. lst gets the rows that are
// either, ascending; kind[i] = 1 for weight rows, cand_kind for candidates, 0 for the
// rest. Returns how many lst got; *cw: the weight rows among them; *skmax: the largest
// ub of the rows left out (-inf if none; a NaN ub is passed over, as std::max does).
// Comparisons and a max only, so every version gives the same result.
static int classify(const double* C, int nb, double d1, double thr, double hmin, char cand_kind, int* lst,
                    char* kind, int* cw, double* skmax) {
  int c = 0, w = 0, i = 0;
  double sk = -std::numeric_limits<double>::infinity();
#if OPTDEN_ISA == 2
  const __m512d vd1 = _mm512_set1_pd(d1), vthr = _mm512_set1_pd(thr), vhmin = _mm512_set1_pd(hmin);
  const __m128i k1 = _mm_set1_epi8(1), kc = _mm_set1_epi8(cand_kind);
  __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m512d vsk = _mm512_set1_pd(sk);
  for (; i < nb; i += 8, idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8))) {
    const __mmask8 m = nb - i >= 8 ? (__mmask8)0xff : (__mmask8)((1u << (nb - i)) - 1);
    const __m512d ub = _mm512_add_pd(_mm512_maskz_loadu_pd(m, C + i), vd1);
    const __mmask8 fw = _mm512_mask_cmp_pd_mask(m, ub, vthr, _CMP_GE_OQ);
    const __mmask8 f = fw | _mm512_mask_cmp_pd_mask(m, ub, vhmin, _CMP_GT_OQ);
    // compress in a register, then a masked store: Zen 4 runs vpcompressd with a memory
    // destination as microcode, ~10x slower than the two instructions
    const int nf = __builtin_popcount(f);
    _mm256_mask_storeu_epi32(lst + c, (__mmask8)((1u << nf) - 1), _mm256_maskz_compress_epi32(f, idx));
    c += nf;
    w += __builtin_popcount(fw);
    const __m128i k = _mm_mask_mov_epi8(_mm_maskz_mov_epi8(f, kc), fw, k1);
    _mm_mask_storeu_epi8(kind + i, m, k);
    vsk = _mm512_mask_max_pd(vsk, m & (__mmask8)~f, ub, vsk);  // vsk where ub is NaN
  }
  sk = _mm512_reduce_max_pd(vsk);
#endif
  for (; i < nb; ++i) {
    const double ub = C[i] + d1;
    const bool fw = ub >= thr, f = fw || ub > hmin;
    lst[c] = i;
    c += f;
    w += fw;
    kind[i] = (char)(fw ? 1 : f ? cand_kind : 0);
    sk = f ? sk : std::max(sk, ub);
  }
  *cw = w;
  *skmax = sk;
  return c;
}

}  // namespace OPTDEN_KNS
}  // namespace optden
