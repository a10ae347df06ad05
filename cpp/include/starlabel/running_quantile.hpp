// Running quantile of spectra (a pseudo-continuum): for each pixel, the q-quantile of the
// good pixels (ivar > 0) in a window of 2 * half + 1 pixels centred on it, within its
// segment (chip). Header-only, no Python. The quantile interpolates linearly between order
// statistics exactly as numpy.quantile's default ("linear") method. Work is split by
// spectrum; each result depends only on its window, never on the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <vector>

#include "starlabel/common.hpp"

namespace starlabel {

// q-quantile of v[0..n) (n >= 1), reordering v. Same arithmetic as numpy's _lerp.
inline double quantile_linear(double* v, index_t n, double q) {
  const double h = q * static_cast<double>(n - 1);
  const index_t lo = std::min<index_t>(static_cast<index_t>(std::floor(h)), n - 1);
  const double t = h - static_cast<double>(lo);
  std::nth_element(v, v + lo, v + n);
  const double a = v[lo];
  if (lo + 1 >= n) return a;
  const double b = *std::min_element(v + lo + 1, v + n);
  const double diff = b - a;
  return t >= 0.5 ? b - diff * (1.0 - t) : a + diff * t;
}

inline void running_quantile_one(const double* flux, const double* ivar, index_t n_pixels,
                                 const std::int64_t* segments, index_t n_segments, index_t half,
                                 double q, double* buffer, double* out) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (index_t p = 0; p < n_pixels; ++p) out[p] = nan;
  for (index_t g = 0; g < n_segments; ++g) {
    const index_t start = segments[2 * g], stop = segments[2 * g + 1];
    for (index_t j = start; j < stop; ++j) {
      const index_t lo = std::max(start, j - half), hi = std::min(stop, j + half + 1);
      index_t n = 0;
      for (index_t i = lo; i < hi; ++i)
        if (ivar[i] > 0.0) buffer[n++] = flux[i];
      if (n > 0) out[j] = quantile_linear(buffer, n, q);
    }
  }
}

// flux, ivar, out: (n_spectra, n_pixels); segments (n_segments, 2) disjoint [start, stop).
// Returns false if scratch memory could not be allocated (out is then incomplete).
inline bool running_quantile(const double* flux, const double* ivar, index_t n_spectra,
                             index_t n_pixels, const std::int64_t* segments, index_t n_segments,
                             index_t half, double q, int n_threads, double* out) {
  const int threads = resolve_threads(n_threads);
  // A window wider than the spectrum holds the whole spectrum: clamping `half` changes no
  // result, keeps j + half + 1 from overflowing and the scratch buffer at most n_pixels long.
  half = std::min(half, n_pixels);
  std::atomic<bool> ok{true};
#pragma omp parallel num_threads(threads)
  {
    std::vector<double> buffer;
    try {
      buffer.resize(static_cast<std::size_t>(std::min(2 * half + 1, std::max<index_t>(n_pixels, 1))));
    } catch (const std::bad_alloc&) {
      ok = false;
    }
#pragma omp for schedule(dynamic, 1)
    for (index_t s = 0; s < n_spectra; ++s)
      if (!buffer.empty())
        running_quantile_one(flux + s * n_pixels, ivar + s * n_pixels, n_pixels, segments,
                             n_segments, half, q, buffer.data(), out + s * n_pixels);
  }
  return ok;
}

}  // namespace starlabel
