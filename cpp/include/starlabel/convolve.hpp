// Convolution of spectra with a (per-spectrum) kernel on the pixel grid, skipping bad pixels.
// Header-only, no Python. Used for instrumental (Gaussian) and rotational broadening on grids
// uniform in log(wavelength), where a velocity kernel is the same in every pixel.
//
// Normalized convolution: out_j = sum_t K_t m_i f_i / sum_t K_t m_i with i = j + t - c
// (c = n_taps / 2, the kernel centre; kernels are symmetric, so this is a convolution),
// m_i = [ivar_i > 0], taken only within the segment [start, stop) that holds j (segments
// are chips: a kernel never reaches across a gap). var_j = sum K_t^2 m_i var_i / (sum K_t m_i)^2.
// Pixel j is bad (ivar 0, NaN flux) if it was bad or its good weight falls below min_weight
// (the kernel sums to 1). Work is split by spectrum in a fixed order of summation, so the
// result does not depend on the thread count.
#pragma once

#include <limits>

#include "starlabel/common.hpp"

namespace starlabel {

inline void convolve_one(const double* flux, const double* ivar, const double* kernel,
                         index_t n_taps, const std::int64_t* segments, index_t n_segments,
                         double min_weight, double* flux_out, double* ivar_out,
                         index_t n_pixels) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const index_t centre = n_taps / 2;
  for (index_t p = 0; p < n_pixels; ++p) {  // pixels outside every segment are left bad
    flux_out[p] = nan;
    ivar_out[p] = 0.0;
  }
  for (index_t g = 0; g < n_segments; ++g) {
    const index_t start = segments[2 * g], stop = segments[2 * g + 1];
    for (index_t j = start; j < stop; ++j) {
      if (!(ivar[j] > 0.0)) continue;
      double weight = 0.0, sum_f = 0.0, sum_v = 0.0;
      for (index_t t = 0; t < n_taps; ++t) {
        const index_t i = j + t - centre;
        if (i < start || i >= stop || !(ivar[i] > 0.0)) continue;
        const double k = kernel[t];
        weight += k;
        sum_f += k * flux[i];
        sum_v += k * k / ivar[i];
      }
      if (weight >= min_weight && weight > 0.0 && sum_v > 0.0) {
        flux_out[j] = sum_f / weight;
        ivar_out[j] = weight * weight / sum_v;
      }
    }
  }
}

// flux, ivar, outputs: (n_spectra, n_pixels); kernels: (n_kernel_rows, n_taps) with
// n_kernel_rows 1 or n_spectra (kernel_stride 0 or n_taps); segments: (n_segments, 2),
// disjoint [start, stop) ranges inside [0, n_pixels).
inline void convolve_spectra(const double* flux, const double* ivar, index_t n_spectra,
                             index_t n_pixels, const double* kernels, index_t kernel_stride,
                             index_t n_taps, const std::int64_t* segments, index_t n_segments,
                             double min_weight, int n_threads, double* flux_out,
                             double* ivar_out) {
  const int threads = resolve_threads(n_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (index_t s = 0; s < n_spectra; ++s)
    convolve_one(flux + s * n_pixels, ivar + s * n_pixels, kernels + s * kernel_stride, n_taps,
                 segments, n_segments, min_weight, flux_out + s * n_pixels,
                 ivar_out + s * n_pixels, n_pixels);
}

}  // namespace starlabel
