// Certified pruning of whole (query, training image) pairs in the local denoisers' passes
// (csrc/patch_pass.cpp): a lower bound on every window's patch distance from 2 x 2 block
// sums, cheap next to the pair's box sums, that can prove every position of the pair is
// left out, so the pair is skipped.
//
// The bound. For a block B of 4 pixels and one channel, sum_{j in B} (v_j - y_j)^2 >=
// (sum_B v - sum_B y)^2 / 4 (Cauchy-Schwarz). The window of position p (k = 2r + 1)
// holds r x r whole blocks (rows of blocks ceil((py - r) / 2) .. + r - 1, likewise for
// columns; blocks wrap under circular padding, and outside the image count 0 under zero
// padding), so dist(p) >= LB(p) = sum over those blocks and the channels. Computed in
// float64 from the block sums of v and y, each within 4u of the sums of |values|: the
// difference D of a block is within err = 8u (sum_B |v| + sum_B |y|) of the truth, and
// max(0, |D| - err)^2 / 4 is a bound; the float64 sums of those nonnegative terms are
// scaled by (1 - 1e-12) to cover their own rounding.
//
// The test. A position's rows whose true logit is below m(p) - kSkip are left out by the
// fold anyway (and delta counts them), so the pair is skipped when for every position
// coef LB(p) > kSkip - m(p): the thresholds tb of the window grid are the largest
// kSkip - m(p) over the positions sharing a window. Needs H and W even (whole blocks).
//
// Compiled once, included by patch_pass.cpp; the loops vectorize, and the hot functions are
// cloned for x86-64-v4 (AVX-512) and picked at load time (target_clones).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace optden {

// The grid of block windows: position p's window starts at block (by0(py), bx0(px));
// window (wy, wx) of the grid starts at block (bymin + wy, bxmin + wx).
struct BlockGrid {
  bool enabled = false;
  int C = 0, HB = 0, WB = 0, r = 0, bymin = 0, bxmin = 0, NY = 0, NX = 0;
  bool circular = true;
  std::vector<int> win_of_pos;  // (HW,) window index wy * NX + wx of each position
};

inline int ceil_half(int a) { return a >= 0 ? (a + 1) / 2 : -((-a) / 2); }

inline BlockGrid make_block_grid(const PatchGeo& g, int k) {
  BlockGrid bg;
  const int r = k / 2;
  if (g.H % 2 || g.W % 2 || r < 1) return bg;  // no whole blocks, or windows without one
  bg.enabled = true;
  bg.C = g.C, bg.HB = g.H / 2, bg.WB = g.W / 2, bg.r = r, bg.circular = g.circular;
  bg.bymin = ceil_half(-r), bg.bxmin = ceil_half(-r);
  bg.NY = ceil_half(g.H - 1 - r) - bg.bymin + 1, bg.NX = ceil_half(g.W - 1 - r) - bg.bxmin + 1;
  bg.win_of_pos.resize(g.HW);
  for (int py = 0; py < g.H; ++py)
    for (int px = 0; px < g.W; ++px)
      bg.win_of_pos[py * g.W + px] = (ceil_half(py - r) - bg.bymin) * bg.NX + (ceil_half(px - r) - bg.bxmin);
  return bg;
}

// 2 x 2 block sums s and sums of |x| a, (C, HB, WB) each, of an image x (C, H, W).
#define OPTDEN_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))

OPTDEN_CLONES inline void block_sums(const PatchGeo& g, const BlockGrid& bg, const double* x, double* s, double* a) {
  for (int c = 0; c < g.C; ++c)
    for (int by = 0; by < bg.HB; ++by) {
      const double* r0 = x + (size_t)c * g.HW + (size_t)(2 * by) * g.W;
      const double* r1 = r0 + g.W;
      double* so = s + ((size_t)c * bg.HB + by) * bg.WB;
      double* ao = a + ((size_t)c * bg.HB + by) * bg.WB;
#pragma omp simd
      for (int bx = 0; bx < bg.WB; ++bx) {
        const double p = r0[2 * bx], q = r0[2 * bx + 1], u = r1[2 * bx], w = r1[2 * bx + 1];
        so[bx] = (p + q) + (u + w);
        ao[bx] = (std::fabs(p) + std::fabs(q)) + (std::fabs(u) + std::fabs(w));
      }
    }
}

// tb[w] = the largest kSkip - m(p) over the positions p of window w (+inf where m = -inf).
OPTDEN_CLONES inline void window_thresholds(const BlockGrid& bg, int HW, const double* m, double skip, double* tb) {
  std::fill(tb, tb + (size_t)bg.NY * bg.NX, -std::numeric_limits<double>::infinity());
  for (int p = 0; p < HW; ++p) tb[bg.win_of_pos[p]] = std::max(tb[bg.win_of_pos[p]], skip - m[p]);
}

// Whether every window's bound, times coef, exceeds its threshold (the pair can be skipped).
// scratch: at least (HB + 2 r) * (WB + 2 r) + 2 (WB + 2 r) doubles.
OPTDEN_CLONES inline bool prunable(const BlockGrid& bg, const double* vs, const double* va, const double* ys, const double* ya,
                                   double coef, const double* tb, double* scratch) {
  constexpr double kErr = 8 * 1.1102230246251565e-16;
  const int HB = bg.HB, WB = bg.WB, r = bg.r, PW = WB + 2 * r, PH = HB + 2 * r;
  double* lb = scratch;            // (PH, PW): the blocks' bounds, with r blocks of margin
  double* hs = scratch + PH * PW;  // one row of window sums over r block rows (PW), then their sums (PW)
  const size_t plane = (size_t)HB * WB;
  for (int c = 0; c < bg.C; ++c)  // channel-major: unit-stride vector loops over each block row
    for (int by = 0; by < HB; ++by) {
      double* row = lb + (size_t)(by + r) * PW + r;
      const size_t o = c * plane + (size_t)by * WB;
      const double *vr = vs + o, *yr = ys + o, *var = va + o, *yar = ya + o;
      if (c == 0) {
#pragma omp simd
        for (int bx = 0; bx < WB; ++bx) {
          const double d = std::fabs(vr[bx] - yr[bx]) - kErr * (var[bx] + yar[bx]);
          row[bx] = d > 0 ? 0.25 * d * d : 0.0;
        }
      } else {
#pragma omp simd
        for (int bx = 0; bx < WB; ++bx) {
          const double d = std::fabs(vr[bx] - yr[bx]) - kErr * (var[bx] + yar[bx]);
          row[bx] += d > 0 ? 0.25 * d * d : 0.0;
        }
      }
    }
  if (bg.circular) {  // wrap the margins (r < HB, WB: one period at most), rows then columns
    for (int y = r; y < HB + r; ++y) {
      double* row = lb + (size_t)y * PW;
      for (int x = 0; x < r; ++x) {
        row[x] = row[x + WB];
        row[x + WB + r] = row[x + r];
      }
    }
    for (int y = 0; y < r; ++y) {
      std::copy(lb + (size_t)(y + HB) * PW, lb + (size_t)(y + HB + 1) * PW, lb + (size_t)y * PW);
      std::copy(lb + (size_t)(y + r) * PW, lb + (size_t)(y + r + 1) * PW, lb + (size_t)(y + HB + r) * PW);
    }
  } else {  // zero margins
    std::fill(lb, lb + (size_t)r * PW, 0.0);
    std::fill(lb + (size_t)(HB + r) * PW, lb + (size_t)PH * PW, 0.0);
    for (int y = r; y < HB + r; ++y) {
      std::fill(lb + (size_t)y * PW, lb + (size_t)y * PW + r, 0.0);
      std::fill(lb + (size_t)y * PW + WB + r, lb + (size_t)(y + 1) * PW, 0.0);
    }
  }
  // window (wy, wx) sums block rows bymin + wy .. + r - 1 (margin offset r), likewise columns
  const double scale = coef * (1.0 - 1e-12);
  double* ws = hs + PW;
  for (int wy = 0; wy < bg.NY; ++wy) {
    const double* src = lb + (size_t)(bg.bymin + wy + r) * PW;
#pragma omp simd
    for (int x = 0; x < PW; ++x) hs[x] = src[x];
    for (int j = 1; j < r; ++j) {
      const double* sj = src + (size_t)j * PW;
#pragma omp simd
      for (int x = 0; x < PW; ++x) hs[x] += sj[x];
    }
    const double* hx = hs + bg.bxmin + r;
#pragma omp simd
    for (int wx = 0; wx < bg.NX; ++wx) ws[wx] = hx[wx];
    for (int i = 1; i < r; ++i) {
#pragma omp simd
      for (int wx = 0; wx < bg.NX; ++wx) ws[wx] += hx[wx + i];
    }
    const double* t = tb + (size_t)wy * bg.NX;
    int fail = 0;
#pragma omp simd reduction(| : fail)
    for (int wx = 0; wx < bg.NX; ++wx) fail |= !(scale * ws[wx] > t[wx]);
    if (fail) return false;
  }
  return true;
}

}  // namespace optden
