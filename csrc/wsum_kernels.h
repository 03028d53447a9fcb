// Exact weighted sum of a block of uint8 rows with int16 weights, compiled once per
// instruction set: cpu_dispatch.cpp includes this file right after dense_kernels.h inside
// each of its `#pragma GCC target` regions (OPTDEN_ISA 2: AVX-512 VNNI, 1: AVX2, 0:
// portable) and namespaces. No include guard on purpose; every name has a ws_ / kWs
// prefix so as not to clash with dense_kernels.h.
//
//   wsum_u8   A[out[r], j] += scale[r] * sum_{t < nrows} W[r, t] X[rows[t], j]
//             (r < R, j < d; column t of W belongs to data row rows[t])
//
// Exactness. |W| <= 2^14 (any int16 would do: 2^15), 0 <= X <= 255 and nrows <= 128, so
// every partial sum of the products is at most 2^15 * 255 * 128 < 2^31 in magnitude: the
// int32 lanes never wrap, whatever the order of the terms, and the sum S[r, j] is exact.
// (double)S is exact (|S| < 2^53) and scale[r] is a power of two (<= 2^992, so no
// overflow; >= 2^-1074 as any positive double), so (double)S * scale[r] is exact too and
// the only rounding is the one add into A. Each (r, j) gets exactly one
// `A += (double)S * scale[r]` per call, and weight rows that share an output row add in
// increasing r, so A is bit-for-bit the same in every version (an FMA contraction of the
// product and the add gives the same double, as the product is exact).
//
// Layout (vector versions). Rows are taken in pairs (rows[2p], rows[2p+1]); a 32-bit lane
// of a data vector holds (X[rows[2p], j], X[rows[2p+1], j]) as two int16, and the weight
// operand is the broadcast pair (W[r, 2p], W[r, 2p+1]): two adjacent int16 of W read as
// one int32. vpdpwssd (AVX-512 VNNI) or vpmaddwd + vpaddd (AVX2) adds both products into
// the int32 lane of column j. An odd last row gets a lane (X[rows[nrows-1], j], 0) and
// the weight (W[r, nrows-1], 0), built explicitly: W is never read past column nrows - 1.
// The columns go by chunks of kWsChunk (64); the interleaved copy of a chunk is built
// once per call into `scratch` as S[v][p][lane] (v: vector of kWsV columns, p: row pair,
// 16 KB at most, stays in L1) and read by register tiles of kWsRT weight rows x kWsJT
// column vectors (AVX-512: 6 x 4 zmm accumulators; AVX2: 4 x 2 ymm), so its cost is
// shared by all R weight rows. With R <= kWsRT (one weight tile, e.g. one query) the
// AVX-512 version builds the pairs in registers instead and needs no copy. Tail columns
// (d not a multiple of the vector) are read with masked loads (AVX-512) or one by one
// (AVX2), zero-padded, and added to A with masked loads and stores: neither X nor A is
// touched past column d - 1. The int32 sums go to double by halves (vcvtdq2pd).
//
// Preconditions: R >= 1 weight rows of stride ldw >= nrows; 1 <= nrows <= kWsMaxRows
// (128) indices rows[t] into X (distinct in practice; any order); ldx >= d; lda >= d;
// out[r] valid rows of A; scale[r] powers of two as above; scratch: ws_scratch_elems(d)
// int16 (the same value in every version; any alignment, 64 bytes is best; the portable
// version ignores it); A must not overlap W, X or scratch. No alignment is required of
// any array. R, nrows or d <= 0: nothing is done.
//
// Prefetch. pfc, pfe: a cursor into [*pfc, pfe), the rows the caller reads next; the
// vector versions ask for its cache lines (to L2) as they go, so that memory keeps
// streaming while these rows, already in cache, are summed, and advance *pfc past them:
// two lines per row pair copied into scratch, one per row pair of a register-built tile
// (spread over the whole sum: at N = 1, two lines per pair asked for the rows faster than
// memory gives them and the pass was ~4% slower).

#if !defined(OPTDEN_KNS) || !defined(OPTDEN_ISA)
#error "define OPTDEN_KNS and OPTDEN_ISA (2: AVX-512 VNNI, 1: AVX2 + FMA, 0: portable) first"
#endif

namespace optden {
namespace OPTDEN_KNS {

constexpr int kWsChunk = 64;     // columns per chunk of the interleaved copy (multiple of 16)
constexpr int kWsMaxRows = 128;  // most rows per call (the int32 bound above)

// int16 elements of scratch that wsum_u8 needs for rows of d columns: one chunk of
// kWsMaxRows / 2 pairs x 2 int16 per column, at most 8192 (16 KB)
static constexpr int ws_scratch_elems(int d) {
  return (kWsMaxRows / 2) * 2 * (((d < kWsChunk ? d : kWsChunk) + 15) / 16 * 16);
}

#if OPTDEN_ISA == 2 || OPTDEN_ISA == 1

#if OPTDEN_ISA == 2
constexpr int kWsV = 16;  // columns (int32 lanes) per vector
constexpr int kWsRT = 6, kWsJT = 4;  // register tile: 24 accumulators + 4 data + 1 weight
static_assert(kWsRT <= 6 && kWsJT <= 4, "extend the dispatch in ws_rows / wsum_u8");
typedef __m512i ws_vi;
static inline ws_vi ws_zero() { return _mm512_setzero_si512(); }
static inline ws_vi ws_load(const int32_t* p) { return _mm512_loadu_si512(reinterpret_cast<const void*>(p)); }
static inline void ws_store(int32_t* p, ws_vi x) { _mm512_storeu_si512(reinterpret_cast<void*>(p), x); }
static inline ws_vi ws_bcast(int32_t w) { return _mm512_set1_epi32(w); }
// in place through asm: GCC 12 otherwise copies a tile's accumulators around each step;
// register operands only, as dense_kernels.h's dpwssd (memory forms run at half rate)
static inline ws_vi ws_mac(ws_vi acc, ws_vi x, ws_vi w) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  return acc;
}
// kWsV uint8 of rows a and b -> lanes (a[j], b[j]) as int16 pairs (bytes interleaved
// a0 b0 a1 b1 ..., then zero-extended); ws_single: lanes (a[j], 0); ws_pair_n: only the
// first n < kWsV columns read, the other lanes 0 (b may be null: an odd last row)
static inline ws_vi ws_pair(const uint8_t* a, const uint8_t* b) {
  const __m128i xa = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  const __m128i xb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b));
  return _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(xa, xb), _mm_unpacklo_epi8(xa, xb)));
}
static inline ws_vi ws_single(const uint8_t* a) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a)));
}
static inline ws_vi ws_pair_n(const uint8_t* a, const uint8_t* b, int n) {
  const __mmask16 m = (__mmask16)((1u << n) - 1);
  const __m128i xa = _mm_maskz_loadu_epi8(m, a);
  const __m128i xb = b ? _mm_maskz_loadu_epi8(m, b) : _mm_setzero_si128();
  return _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(xa, xb), _mm_unpacklo_epi8(xa, xb)));
}
// A[0..16) += (double)acc * s
static inline void ws_add_vec(double* a, ws_vi acc, __m512d s) {
  const __m512d lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(acc));
  const __m512d hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(acc, 1));
  _mm512_storeu_pd(a, _mm512_add_pd(_mm512_loadu_pd(a), _mm512_mul_pd(lo, s)));
  _mm512_storeu_pd(a + 8, _mm512_add_pd(_mm512_loadu_pd(a + 8), _mm512_mul_pd(hi, s)));
}
// the same for the first n < 16 columns only (masked: A not touched past column n - 1;
// the lanes written get exactly the same operations)
static inline void ws_add_vec_n(double* a, ws_vi acc, __m512d s, int n) {
  const __mmask16 m = (__mmask16)((1u << n) - 1);
  const __mmask8 ml = (__mmask8)m, mh = (__mmask8)(m >> 8);
  const __m512d lo = _mm512_cvtepi32_pd(_mm512_castsi512_si256(acc));
  const __m512d hi = _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(acc, 1));
  _mm512_mask_storeu_pd(a, ml, _mm512_add_pd(_mm512_maskz_loadu_pd(ml, a), _mm512_mul_pd(lo, s)));
  _mm512_mask_storeu_pd(a + 8, mh, _mm512_add_pd(_mm512_maskz_loadu_pd(mh, a + 8), _mm512_mul_pd(hi, s)));
}
typedef __m512d ws_vd;
static inline ws_vd ws_set1d(double x) { return _mm512_set1_pd(x); }
// 64 columns of rows a and b (b null: zeros) as pairs in four vectors, by in-lane unpacks
// (8 shuffles where four ws_pair take 16 and four cross-lane zero extensions): lane
// (L, i) of x[v] holds column 16 L + 4 v + i, a 4 x 4 transpose of 128-bit blocks away
// from the natural order, which ws_unpermute undoes on the sums
static inline void ws_pair64(const uint8_t* a, const uint8_t* b, ws_vi (&x)[4]) {
  const __m512i z = _mm512_setzero_si512();
  const __m512i va = _mm512_loadu_si512(reinterpret_cast<const void*>(a));
  const __m512i vb = b ? _mm512_loadu_si512(reinterpret_cast<const void*>(b)) : z;
  const __m512i alo = _mm512_unpacklo_epi8(va, z), ahi = _mm512_unpackhi_epi8(va, z);
  const __m512i blo = _mm512_unpacklo_epi8(vb, z), bhi = _mm512_unpackhi_epi8(vb, z);
  x[0] = _mm512_unpacklo_epi16(alo, blo);
  x[1] = _mm512_unpackhi_epi16(alo, blo);
  x[2] = _mm512_unpacklo_epi16(ahi, bhi);
  x[3] = _mm512_unpackhi_epi16(ahi, bhi);
}
// block c of x[v] <-> block v of x[c]: the sums of ws_pair64's layout in column order
static inline void ws_unpermute(ws_vi (&x)[4]) {
  const __m512i t0 = _mm512_shuffle_i32x4(x[0], x[1], 0x44), t1 = _mm512_shuffle_i32x4(x[0], x[1], 0xEE);
  const __m512i t2 = _mm512_shuffle_i32x4(x[2], x[3], 0x44), t3 = _mm512_shuffle_i32x4(x[2], x[3], 0xEE);
  x[0] = _mm512_shuffle_i32x4(t0, t2, 0x88);
  x[1] = _mm512_shuffle_i32x4(t0, t2, 0xDD);
  x[2] = _mm512_shuffle_i32x4(t1, t3, 0x88);
  x[3] = _mm512_shuffle_i32x4(t1, t3, 0xDD);
}
#else
constexpr int kWsV = 8;
constexpr int kWsRT = 4, kWsJT = 2;  // 8 accumulators + 2 data + weight + product
static_assert(kWsRT <= 4 && kWsJT <= 2, "extend the dispatch in ws_rows / wsum_u8");
typedef __m256i ws_vi;
static inline ws_vi ws_zero() { return _mm256_setzero_si256(); }
static inline ws_vi ws_load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
static inline void ws_store(int32_t* p, ws_vi x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), x); }
static inline ws_vi ws_bcast(int32_t w) { return _mm256_set1_epi32(w); }
static inline ws_vi ws_mac(ws_vi acc, ws_vi x, ws_vi w) { return _mm256_add_epi32(acc, _mm256_madd_epi16(x, w)); }
static inline ws_vi ws_pair(const uint8_t* a, const uint8_t* b) {
  const __m128i xa = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a));
  const __m128i xb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b));
  return _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(xa, xb));
}
static inline ws_vi ws_single(const uint8_t* a) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a)));
}
static inline ws_vi ws_pair_n(const uint8_t* a, const uint8_t* b, int n) {
  alignas(16) int32_t t[kWsV] = {};
  for (int k = 0; k < n; ++k) t[k] = (int32_t)a[k] | (b ? (int32_t)b[k] << 16 : 0);
  return ws_load(t);
}
static inline void ws_add_vec(double* a, ws_vi acc, __m256d s) {
  const __m256d lo = _mm256_cvtepi32_pd(_mm256_castsi256_si128(acc));
  const __m256d hi = _mm256_cvtepi32_pd(_mm256_extracti128_si256(acc, 1));
  _mm256_storeu_pd(a, _mm256_add_pd(_mm256_loadu_pd(a), _mm256_mul_pd(lo, s)));
  _mm256_storeu_pd(a + 4, _mm256_add_pd(_mm256_loadu_pd(a + 4), _mm256_mul_pd(hi, s)));
}
static inline void ws_add_vec_n(double* a, ws_vi acc, __m256d s, int n) {
  const __m256i k = _mm256_setr_epi64x(0, 1, 2, 3);
  const __m256i ml = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), k);      // lane < n
  const __m256i mh = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n - 4), k);  // lane + 4 < n
  const __m256d lo = _mm256_cvtepi32_pd(_mm256_castsi256_si128(acc));
  const __m256d hi = _mm256_cvtepi32_pd(_mm256_extracti128_si256(acc, 1));
  _mm256_maskstore_pd(a, ml, _mm256_add_pd(_mm256_maskload_pd(a, ml), _mm256_mul_pd(lo, s)));
  _mm256_maskstore_pd(a + 4, mh, _mm256_add_pd(_mm256_maskload_pd(a + 4, mh), _mm256_mul_pd(hi, s)));
}
typedef __m256d ws_vd;
static inline ws_vd ws_set1d(double x) { return _mm256_set1_pd(x); }
#endif

// the weight pair (W[r, 2p], W[r, 2p+1]) as one int32 (little endian: column 2p low)
static inline int32_t ws_wpair(const int16_t* w) {
  int32_t x;
  std::memcpy(&x, w, sizeof x);
  return x;
}

// the next one (two) cache lines of the prefetch cursor [pf, pfe), which then moves past
// them (nullptr: none, or done)
static inline void ws_prefetch1(const uint8_t*& pf, const uint8_t* pfe) {
  if (!pf) return;
  _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
  pf = pf + 64 < pfe ? pf + 64 : nullptr;
}
static inline void ws_prefetch2(const uint8_t*& pf, const uint8_t* pfe) {
  if (!pf) return;
  _mm_prefetch(reinterpret_cast<const char*>(pf), _MM_HINT_T1);
  if (pf + 64 < pfe) _mm_prefetch(reinterpret_cast<const char*>(pf + 64), _MM_HINT_T1);
  pf = pf + 128 < pfe ? pf + 128 : nullptr;
}

// interleaved copy of columns [c0, c0 + w) of the rows: S[(v * np + p) * kWsV + lane],
// two lines of the prefetch cursor per row pair
static inline void ws_build(const uint8_t* X, int ldx, const int* rows, int nrows, int c0, int w, int32_t* S,
                            const uint8_t*& pf, const uint8_t* pfe) {
  const int np = (nrows + 1) / 2, nvf = w / kWsV, nt = w - nvf * kWsV;
  const size_t vs = (size_t)np * kWsV;
  for (int p = 0; p < np; ++p) {
    ws_prefetch2(pf, pfe);
    const uint8_t* a = X + (size_t)rows[2 * p] * ldx + c0;
    const uint8_t* b = 2 * p + 1 < nrows ? X + (size_t)rows[2 * p + 1] * ldx + c0 : nullptr;
    int32_t* s = S + (size_t)p * kWsV;
    if (b)
      for (int v = 0; v < nvf; ++v) ws_store(s + v * vs, ws_pair(a + v * kWsV, b + v * kWsV));
    else
      for (int v = 0; v < nvf; ++v) ws_store(s + v * vs, ws_single(a + v * kWsV));
    if (nt) ws_store(s + nvf * vs, ws_pair_n(a + nvf * kWsV, b ? b + nvf * kWsV : nullptr, nt));
  }
}

// add the tile's sums into A, in increasing r; nvalid: columns of the tile inside A
template <int RT, int JT>
static inline __attribute__((always_inline)) void ws_flush(ws_vi (&acc)[RT][JT], const double* scale, const int* out,
                                                           double* A, int lda, int j0, int nvalid) {
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r) {
    double* a = A + (size_t)out[r] * lda + j0;
    const ws_vd s = ws_set1d(scale[r]);
#pragma GCC unroll 16
    for (int c = 0; c < JT; ++c) {
      if ((c + 1) * kWsV <= nvalid) {
        ws_add_vec(a + c * kWsV, acc[r][c], s);
      } else if (c * kWsV < nvalid) {
        ws_add_vec_n(a + c * kWsV, acc[r][c], s, nvalid - c * kWsV);
      }
    }
  }
}

// Accumulators of a tile: two arrays of ceil(RT/2) and floor(RT/2) weight rows (GCC 12
// kept a single array of more than 16 zmm in memory, stored at every step). For the same
// reason nothing but the flush follows the main loop (the odd row goes first).
template <int RT>
struct ws_split {
  static constexpr int A = (RT + 1) / 2, B = RT - A, Bx = B > 0 ? B : 1;
};

// acc[r][c] += pair p of W row r * data vector c; Last: the odd last row, weight (W[r, col], 0)
template <int RT, int JT, bool Last>
static inline __attribute__((always_inline)) void ws_step(ws_vi (&acc)[RT][JT], const ws_vi (&x)[JT],
                                                          const int16_t* W, int ldw, int col) {
#pragma GCC unroll 16
  for (int r = 0; r < RT; ++r) {
    const int16_t* w = W + (size_t)r * ldw + col;
    const ws_vi wv = ws_bcast(Last ? (int32_t)(uint16_t)w[0] : ws_wpair(w));
#pragma GCC unroll 16
    for (int c = 0; c < JT; ++c) acc[r][c] = ws_mac(acc[r][c], x[c], wv);
  }
}

template <int RT, int JT, bool Last>
static inline __attribute__((always_inline)) void ws_step2(ws_vi (&a0)[ws_split<RT>::A][JT],
                                                           ws_vi (&a1)[ws_split<RT>::Bx][JT], const ws_vi (&x)[JT],
                                                           const int16_t* W, int ldw, int col) {
  ws_step<ws_split<RT>::A, JT, Last>(a0, x, W, ldw, col);
  if constexpr (ws_split<RT>::B > 0)
    ws_step<ws_split<RT>::B, JT, Last>(a1, x, W + (size_t)ws_split<RT>::A * ldw, ldw, col);
}

template <int RT, int JT>
static inline __attribute__((always_inline)) void ws_zero2(ws_vi (&a0)[ws_split<RT>::A][JT],
                                                           ws_vi (&a1)[ws_split<RT>::Bx][JT]) {
#pragma GCC unroll 16
  for (int c = 0; c < JT; ++c) {
#pragma GCC unroll 16
    for (int r = 0; r < ws_split<RT>::A; ++r) a0[r][c] = ws_zero();
#pragma GCC unroll 16
    for (int r = 0; r < ws_split<RT>::Bx; ++r) a1[r][c] = ws_zero();
  }
}

// add the tile's sums into A, in increasing r (a0 holds the first rows)
template <int RT, int JT>
static inline __attribute__((always_inline)) void ws_flush2(ws_vi (&a0)[ws_split<RT>::A][JT],
                                                            ws_vi (&a1)[ws_split<RT>::Bx][JT], const double* scale,
                                                            const int* out, double* A, int lda, int j0, int nvalid) {
  ws_flush<ws_split<RT>::A, JT>(a0, scale, out, A, lda, j0, nvalid);
  if constexpr (ws_split<RT>::B > 0)
    ws_flush<ws_split<RT>::B, JT>(a1, scale + ws_split<RT>::A, out + ws_split<RT>::A, A, lda, j0, nvalid);
}

// one tile from the interleaved copy: S at the tile's first vector, vs = np * kWsV
template <int RT, int JT>
static inline void ws_tile_s(const int32_t* S, size_t vs, const int16_t* W, int ldw, int nrows,
                             const double* scale, const int* out, double* A, int lda, int j0, int nvalid) {
  ws_vi a0[ws_split<RT>::A][JT], a1[ws_split<RT>::Bx][JT];
  ws_zero2<RT, JT>(a0, a1);
  const int npf = nrows / 2;
  // the odd last row first (exact integer sums: any order will do)
  if (nrows & 1) {
    ws_vi x[JT];
#pragma GCC unroll 16
    for (int c = 0; c < JT; ++c) x[c] = ws_load(S + c * vs + (size_t)npf * kWsV);
    ws_step2<RT, JT, true>(a0, a1, x, W, ldw, nrows - 1);
  }
  for (int p = 0; p < npf; ++p) {
    ws_vi x[JT];
#pragma GCC unroll 16
    for (int c = 0; c < JT; ++c) x[c] = ws_load(S + c * vs + (size_t)p * kWsV);
    ws_step2<RT, JT, false>(a0, a1, x, W, ldw, 2 * p);
  }
  ws_flush2<RT, JT>(a0, a1, scale, out, A, lda, j0, nvalid);
}

// one tile with the pairs built in registers (for a single weight tile: no copy)
template <int RT, int JT>
static inline void ws_tile_d(const uint8_t* X, int ldx, const int* rows, int nrows, const int16_t* W, int ldw,
                             const double* scale, const int* out, double* A, int lda, int j0, int nvalid,
                             const uint8_t*& pf, const uint8_t* pfe) {
  (void)pf, (void)pfe;  // only the AVX-512 full tile prefetches
  ws_vi a0[ws_split<RT>::A][JT], a1[ws_split<RT>::Bx][JT];
  ws_zero2<RT, JT>(a0, a1);
  const int npf = nrows / 2;
#if OPTDEN_ISA == 2
  if constexpr (JT == 4) {
    if (nvalid == JT * kWsV) {  // 64 whole columns: pairs by ws_pair64
      if (nrows & 1) {
        ws_vi x[JT];
        ws_pair64(X + (size_t)rows[nrows - 1] * ldx + j0, nullptr, x);
        ws_step2<RT, JT, true>(a0, a1, x, W, ldw, nrows - 1);
      }
      for (int p = 0; p < npf; ++p) {
        ws_prefetch1(pf, pfe);
        ws_vi x[JT];
        ws_pair64(X + (size_t)rows[2 * p] * ldx + j0, X + (size_t)rows[2 * p + 1] * ldx + j0, x);
        ws_step2<RT, JT, false>(a0, a1, x, W, ldw, 2 * p);
      }
#pragma GCC unroll 16
      for (int r = 0; r < ws_split<RT>::A; ++r) ws_unpermute(a0[r]);
      if constexpr (ws_split<RT>::B > 0) {
#pragma GCC unroll 16
        for (int r = 0; r < ws_split<RT>::B; ++r) ws_unpermute(a1[r]);
      }
      ws_flush2<RT, JT>(a0, a1, scale, out, A, lda, j0, nvalid);
      return;
    }
  }
#endif
  if (nvalid == JT * kWsV) {
    if (nrows & 1) {
      const uint8_t* a = X + (size_t)rows[nrows - 1] * ldx + j0;
      ws_vi x[JT];
#pragma GCC unroll 16
      for (int c = 0; c < JT; ++c) x[c] = ws_single(a + c * kWsV);
      ws_step2<RT, JT, true>(a0, a1, x, W, ldw, nrows - 1);
    }
    for (int p = 0; p < npf; ++p) {
      const uint8_t* a = X + (size_t)rows[2 * p] * ldx + j0;
      const uint8_t* b = X + (size_t)rows[2 * p + 1] * ldx + j0;
      ws_vi x[JT];
#pragma GCC unroll 16
      for (int c = 0; c < JT; ++c) x[c] = ws_pair(a + c * kWsV, b + c * kWsV);
      ws_step2<RT, JT, false>(a0, a1, x, W, ldw, 2 * p);
    }
  } else {  // last vector partial (not read past column j0 + nvalid - 1)
    const int nl = nvalid - (JT - 1) * kWsV;
    if (nrows & 1) {
      const uint8_t* a = X + (size_t)rows[nrows - 1] * ldx + j0;
      ws_vi x[JT];
#pragma GCC unroll 16
      for (int c = 0; c + 1 < JT; ++c) x[c] = ws_single(a + c * kWsV);
      x[JT - 1] = ws_pair_n(a + (JT - 1) * kWsV, nullptr, nl);
      ws_step2<RT, JT, true>(a0, a1, x, W, ldw, nrows - 1);
    }
    for (int p = 0; p < npf; ++p) {
      const uint8_t* a = X + (size_t)rows[2 * p] * ldx + j0;
      const uint8_t* b = X + (size_t)rows[2 * p + 1] * ldx + j0;
      ws_vi x[JT];
#pragma GCC unroll 16
      for (int c = 0; c + 1 < JT; ++c) x[c] = ws_pair(a + c * kWsV, b + c * kWsV);
      x[JT - 1] = ws_pair_n(a + (JT - 1) * kWsV, b + (JT - 1) * kWsV, nl);
      ws_step2<RT, JT, false>(a0, a1, x, W, ldw, 2 * p);
    }
  }
  ws_flush2<RT, JT>(a0, a1, scale, out, A, lda, j0, nvalid);
}

struct ws_args {
  const int16_t* W;
  int ldw;
  const double* scale;
  const int* out;
  const uint8_t* X;
  int ldx;
  const int* rows;
  int nrows;
  double* A;
  int lda;
  const uint8_t* pfe;  // end of the prefetch cursor's range
};

template <int RT, int JT>
static inline void ws_tile(const ws_args& g, int r0, const int32_t* S, size_t vs, int j0, int nvalid,
                           const uint8_t*& pf) {
  if (S)
    ws_tile_s<RT, JT>(S, vs, g.W + (size_t)r0 * g.ldw, g.ldw, g.nrows, g.scale + r0, g.out + r0, g.A, g.lda, j0,
                      nvalid);
  else
    ws_tile_d<RT, JT>(g.X, g.ldx, g.rows, g.nrows, g.W + (size_t)r0 * g.ldw, g.ldw, g.scale + r0, g.out + r0,
                      g.A, g.lda, j0, nvalid, pf, g.pfe);
}

// all weight rows over one column tile of JT vectors (tiles of kWsRT rows, then the rest)
template <int JT>
static void ws_rows(const ws_args& g, int R, const int32_t* S, size_t vs, int j0, int nvalid, const uint8_t*& pf) {
  int r0 = 0;
  for (; r0 + kWsRT <= R; r0 += kWsRT) ws_tile<kWsRT, JT>(g, r0, S, vs, j0, nvalid, pf);
  switch (R - r0) {
#if OPTDEN_ISA == 2
    case 5: ws_tile<5, JT>(g, r0, S, vs, j0, nvalid, pf); break;
    case 4: ws_tile<4, JT>(g, r0, S, vs, j0, nvalid, pf); break;
#endif
    case 3: ws_tile<3, JT>(g, r0, S, vs, j0, nvalid, pf); break;
    case 2: ws_tile<2, JT>(g, r0, S, vs, j0, nvalid, pf); break;
    case 1: ws_tile<1, JT>(g, r0, S, vs, j0, nvalid, pf); break;
    default: break;
  }
}

static void wsum_u8(const int16_t* W, int R, int ldw, const double* scale, const int* out, const uint8_t* X,
                    int ldx, const int* rows, int nrows, int d, double* A, int lda, int16_t* scratch,
                    const uint8_t** pfc, const uint8_t* pfe) {
  if (R <= 0 || nrows <= 0 || d <= 0) return;
  const ws_args g{W, ldw, scale, out, X, ldx, rows, nrows, A, lda, pfe};
  const uint8_t* pf = pfc && *pfc < pfe ? *pfc : nullptr;
  // a single weight tile (AVX-512): build the pairs in registers, no copy
  static_assert(kWsChunk % (kWsV * kWsJT) == 0, "a chunk is whole column tiles");
  const bool direct = OPTDEN_ISA == 2 && R <= kWsRT;
  int32_t* S = direct ? nullptr : reinterpret_cast<int32_t*>(scratch);
  const size_t vs = (size_t)((nrows + 1) / 2) * kWsV;
  for (int c0 = 0; c0 < d; c0 += kWsChunk) {
    const int w = std::min(kWsChunk, d - c0);
    const int nv = (w + kWsV - 1) / kWsV;
    if (!direct) ws_build(X, ldx, rows, nrows, c0, w, S, pf, pfe);
    for (int v0 = 0; v0 < nv; v0 += kWsJT) {
      const int jt = std::min(kWsJT, nv - v0);
      const int j0 = c0 + v0 * kWsV;
      const int nvalid = std::min(jt * kWsV, w - v0 * kWsV);
      const int32_t* St = direct ? nullptr : S + v0 * vs;
      switch (jt) {
#if OPTDEN_ISA == 2
        case 4: ws_rows<4>(g, R, St, vs, j0, nvalid, pf); break;
        case 3: ws_rows<3>(g, R, St, vs, j0, nvalid, pf); break;
#endif
        case 2: ws_rows<2>(g, R, St, vs, j0, nvalid, pf); break;
        default: ws_rows<1>(g, R, St, vs, j0, nvalid, pf); break;
      }
    }
  }
  if (pfc) *pfc = pf ? pf : pfe;
}

#else  // portable: int32 sums (exact, see above), one weight row at a time

// A[j] += (double)s[j] * sc for j < n
static inline void ws_add_tail(double* a, const int32_t* s, int n, double sc) {
  for (int k = 0; k < n; ++k) a[k] += (double)s[k] * sc;
}

static void wsum_u8(const int16_t* W, int R, int ldw, const double* scale, const int* out, const uint8_t* X,
                    int ldx, const int* rows, int nrows, int d, double* A, int lda, int16_t* scratch,
                    const uint8_t** pfc, const uint8_t* pfe) {
  (void)scratch, (void)pfc, (void)pfe;
  if (R <= 0 || nrows <= 0 || d <= 0) return;
  int32_t s[kWsChunk];
  for (int c0 = 0; c0 < d; c0 += kWsChunk) {
    const int w = std::min(kWsChunk, d - c0);
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < w; ++j) s[j] = 0;
      for (int t = 0; t < nrows; ++t) {
        const int32_t q = W[(size_t)r * ldw + t];
        const uint8_t* x = X + (size_t)rows[t] * ldx + c0;
        for (int j = 0; j < w; ++j) s[j] += q * (int32_t)x[j];
      }
      ws_add_tail(A + (size_t)out[r] * lda + c0, s, w, scale[r]);
    }
  }
}

#endif

}  // namespace OPTDEN_KNS
}  // namespace optden
