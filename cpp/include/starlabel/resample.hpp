// Flux-conserving resampling of spectra onto a new wavelength grid, with ivar propagation.
// Header-only, no Python. Raw pointers + sizes in, caller-provided outputs out.
//
// Every pixel is a bin [lo, hi] in wavelength (bins increasing and non-overlapping; gaps
// between bins allowed). An output pixel's flux is the overlap-weighted mean of the good
// (ivar > 0) input pixels it covers, so the integral of flux over wavelength is conserved:
//   f_j = sum_i o_ij f_i / sum_i o_ij,   var_j = sum_i o_ij^2 var_i / (sum_i o_ij)^2,
// with o_ij the overlap length of input bin i and output bin j (good pixels only). An output
// pixel whose good input covers less than `min_coverage` of its width gets ivar = 0 and
// NaN flux. Work is split by spectrum; each spectrum is summed in one fixed order, so the
// result does not depend on the thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "starlabel/common.hpp"

namespace starlabel {

struct ResampleGrid {
  const double* lo;   // lower pixel edges
  const double* hi;   // upper pixel edges
  index_t n;          // pixels
};

// Relative slack on the coverage test: overlaps are sums of differences of edges, exact to a
// few ulp, so a fully covered pixel can fall short of its width by ~1e-15 relative.
constexpr double RESAMPLE_COVERAGE_SLACK = 1e-9;

inline void resample_one(const ResampleGrid& in, const double* flux, const double* ivar,
                         const ResampleGrid& out, double min_coverage, double* flux_out,
                         double* ivar_out) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  index_t i = 0;
  for (index_t j = 0; j < out.n; ++j) {
    const double left = out.lo[j], right = out.hi[j];
    while (i < in.n && in.hi[i] <= left) ++i;
    double good = 0.0, sum_f = 0.0, sum_v = 0.0;
    for (index_t k = i; k < in.n && in.lo[k] < right; ++k) {
      const double overlap = std::min(in.hi[k], right) - std::max(in.lo[k], left);
      if (!(overlap > 0.0) || !(ivar[k] > 0.0)) continue;
      good += overlap;
      sum_f += overlap * flux[k];
      sum_v += overlap * overlap / ivar[k];
    }
    const double need = min_coverage * (right - left) * (1.0 - RESAMPLE_COVERAGE_SLACK);
    if (good > 0.0 && good >= need && sum_v > 0.0) {
      flux_out[j] = sum_f / good;
      ivar_out[j] = good * good / sum_v;
    } else {
      flux_out[j] = nan;
      ivar_out[j] = 0.0;
    }
  }
}

// flux, ivar: (n_spectra, n_in). Input edges: (n_wave_rows, n_in) with n_wave_rows 1 (one
// grid for all) or n_spectra (a grid per spectrum): wave_stride is 0 or n_in.
// flux_out, ivar_out: (n_spectra, out.n).
inline void resample_spectra(const double* in_lo, const double* in_hi, index_t wave_stride,
                             index_t n_in, const double* flux, const double* ivar,
                             index_t n_spectra, const ResampleGrid& out, double min_coverage,
                             int n_threads, double* flux_out, double* ivar_out) {
  const int threads = resolve_threads(n_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (index_t s = 0; s < n_spectra; ++s) {
    const ResampleGrid in{in_lo + s * wave_stride, in_hi + s * wave_stride, n_in};
    resample_one(in, flux + s * n_in, ivar + s * n_in, out, min_coverage, flux_out + s * out.n,
                 ivar_out + s * out.n);
  }
}

}  // namespace starlabel
