// Shared definitions of the starlabel compiled core: status codes and thread counts.
// Header-only, no Python. Every kernel takes raw pointers and sizes and writes into
// caller-provided outputs; per-item failures are reported as status codes.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace starlabel {

using index_t = std::int64_t;

// Outcome of one spectrum's label fit. Mirrored by starlabel.status.FitStatus.
enum FitStatus : std::int8_t {
  FIT_CONVERGED = 0,       // relative chi2 decrease (or step) below tolerance
  FIT_MAX_ITER = 1,        // iteration limit reached before convergence
  FIT_NO_PIXELS = 2,       // fewer usable pixels than free parameters
  FIT_NON_FINITE = 3,      // the model or chi2 is not finite at every starting point
};

// Outcome of training one pixel. Mirrored by starlabel.status.PixelStatus.
enum PixelStatus : std::int8_t {
  PIXEL_OK = 0,
  PIXEL_TOO_FEW_STARS = 1,   // fewer stars with ivar > 0 than free terms
  PIXEL_SINGULAR = 2,        // normal equations singular or too ill-conditioned
  PIXEL_NOT_CONVERGED = 3     // s2 or L1 iterations hit their limit (theta, s2 usable but not final)
};

// Number of threads for a kernel: n_threads <= 0 means the OpenMP default
// (OMP_NUM_THREADS, omp_set_num_threads or threadpoolctl's limit).
inline int resolve_threads(int n_threads) {
#ifdef _OPENMP
  return n_threads > 0 ? n_threads : omp_get_max_threads();
#else
  (void)n_threads;
  return 1;
#endif
}

}  // namespace starlabel
