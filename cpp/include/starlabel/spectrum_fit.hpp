// Fitting observed spectra with an emulator: labels, radial velocity and a multiplicative
// Chebyshev continuum per wavelength segment, for many spectra at once.
//
// The observed model of spectrum n at observed pixel p is
//     m_p = C_s(p)(t_p) * F( lambda_p / D(v) ),      D(v) = sqrt((1 + v/c) / (1 - v/c)),
// where F is the emulator's flux on its own (rest-frame) wavelength grid, linearly
// interpolated at the rest wavelength of the observed pixel (the relativistic Doppler factor
// D maps rest to observed wavelength), and C_s = sum_k c_{s,k} T_k(t) is a Chebyshev series
// in the pixel's coordinate t in [-1, 1] across its segment s (e.g. one APOGEE chip).
// Parameters, in this order: the emulator's scaled labels x (n_labels), v in km/s (when
// fitted), the Gaussian broadening sigma and the rotation v sin i in km/s (each when
// fitted), then the continuum coefficients segment by segment (n_segments * n_coef).
// The Jacobian follows by the chain rule:
//   dm/dx_a   = C * interp(dF/dx_a)
//   dm/dv     = C * F'(w) * w * d ln w / dv,   w = lambda / D(v),  d ln w / dv = -1 / (c (1 - beta^2))
//   dm/dc_s,k = T_k(t) * F(w)   on segment s's pixels
// with F' the slope of the linear interpolant (piecewise constant in w).
// Optionally F (and dF/dx) is first broadened on the model grid by a kernel per spectrum
// (Gaussian and rotational broadening in model pixels): a linear operator, so the chain rule
// above is unchanged. The kernel is fixed (built by the front end), or it has fitted parts:
// K = g(sigma) (*) r(vsini) (*) f, g a Gaussian of width sigma (km/s), r the rotational
// profile of v sin i (km/s, linear limb darkening), f the fixed rest, each part a delta when
// it is neither fitted nor given; then, for q = sigma or vsini,
//   dm/dq = C * interp(dK/dq (*) F)   (the renormalized convolution's derivative).
//
// The emulator is anything with
//   index_t n_labels, n_pixels;
//   void spectra(const double* x, index_t n, double* flux, double* jac) const;
//        x (n, n_labels), flux (n, n_pixels), jac (n, n_pixels, n_labels) or null
// (the adapters in bind_fit.cpp call the batched kernels with one thread: the fit's own
// OpenMP loop owns the threads), and optionally
//   struct Memory;   kept by each thread's workspace from call to call
//   void spectra(const double* x, const index_t* keys, index_t n, double* flux, Memory&,
//                EitherPrecision<double>* jac, bool defer) const;
//        the same with each Jacobian returned as a pointer (n,) to (n_pixels, n_labels), in
//        double or float32 (jac null: none), and keys[i] the spectrum that x[i] belongs to:
//        an MLP updates that spectrum's last Jacobian where it can, and reuses the spectrum
//        of its last trial step (jacobian_memory.hpp); with defer, a row of a Jacobian is
//        valid only once complete() has been called for it:
//   void complete(Memory&, index_t row0, index_t row1, index_t* ready) const;
//        completes rows [row0, row1] of the last call's Jacobians; ready (2,): the run of
//        valid rows around them
// All parameter vectors of an LM batch go through the emulator together, so an MLP's
// Jacobian is matrix-matrix work.
// ShiftedSpectrumModel is a per-pixel spectrum model for PixelObjective / fit_lm (lm.hpp).
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "common.hpp"
#include "lm.hpp"

namespace starlabel {

constexpr double SPEED_OF_LIGHT_KMS = 299792.458;

// Where the observed pixels sit relative to the model grid, and which parameters are free.
struct FitLayout {
  const double* model_wave;     // (n_model,) increasing, Angstrom, rest frame
  index_t n_model;
  const double* obs_wave;       // (n_obs,) Angstrom, observed frame
  index_t n_obs;
  const std::int32_t* segment;  // (n_obs,) continuum segment of each pixel; -1: none (C = 1)
  const double* coord;          // (n_obs,) the pixel's Chebyshev coordinate in [-1, 1]
  index_t n_segments;
  index_t n_coef;               // continuum coefficients per segment; 0: no continuum
  bool fit_rv;
  index_t n_labels;
  // Broadening on the model grid (optional): kernels (n_kernel_rows, n_taps), n_taps odd and
  // centred, row r used for spectrum r (kernel_stride n_taps) or one row for all (stride 0);
  // kernel_segments (n_kernel_segments, 2) [start, stop) runs of the model grid that are
  // uniform in log(wavelength): a kernel never reaches across a gap, and is renormalized
  // where it is cut at a run's end.
  const double* kernels = nullptr;
  index_t n_taps = 0, kernel_stride = 0;
  const std::int64_t* kernel_segments = nullptr;
  index_t n_kernel_segments = 0;
  // Fitted broadening (parameters after rv: sigma, then vsini), velocity_step km/s per model
  // pixel; sigma_half / vsini_half taps each side of the Gaussian / rotational profile (enough
  // for the largest value allowed); limb_darkening the rotational profile's coefficient.
  bool fit_sigma = false, fit_vsini = false;
  double velocity_step = 0.0, limb_darkening = 0.0;
  index_t sigma_half = 0, vsini_half = 0;

  bool fits_broadening() const { return fit_sigma || fit_vsini; }
  bool broadens() const { return kernels != nullptr || fits_broadening(); }
  index_t n_params() const {
    return n_labels + (fit_rv ? 1 : 0) + (fit_sigma ? 1 : 0) + (fit_vsini ? 1 : 0) +
           n_segments * n_coef;
  }
  index_t rv_index() const { return n_labels; }
  index_t sigma_index() const { return n_labels + (fit_rv ? 1 : 0); }
  index_t vsini_index() const { return sigma_index() + (fit_sigma ? 1 : 0); }
  index_t coef_index() const { return vsini_index() + (fit_vsini ? 1 : 0); }
};

namespace spectrum_detail {

// Linear interpolation of the model grid at rest wavelength w: F = f[i0] + t (f[i1] - f[i0]).
// Outside the grid the end value is held (i0 == i1, zero slope), so chi2 stays continuous in
// v; the front end gives zero weight to pixels that fall outside or into a gap of the grid.
struct Interp {
  index_t i0, i1;
  double t, inv_dw;  // inv_dw = 1 / (w[i1] - w[i0]), 0 when i0 == i1
};

// hint: the previous call's interval end (0 to start). Consecutive observed pixels fall in
// the same or a following interval, so the search walks on from there, a few intervals at
// most (a pixel past a chip gap would walk thousands); otherwise it bisects.
inline Interp locate(const double* grid, index_t n, double w, index_t& hint) {
  constexpr index_t max_walk = 8;
  index_t hi = hint;
  if (hi > 0 && hi < n && grid[hi - 1] <= w) {
    const index_t stop = std::min(n, hi + max_walk);
    while (hi < stop && grid[hi] <= w) ++hi;
    if (hi == stop) hi = std::upper_bound(grid + hi, grid + n, w) - grid;
  } else {
    hi = std::upper_bound(grid, grid + n, w) - grid;
  }
  hint = hi;
  if (hi == 0) return {0, 0, 0.0, 0.0};
  if (hi == n) return {n - 1, n - 1, 0.0, 0.0};
  const double dw = grid[hi] - grid[hi - 1];
  return {hi - 1, hi, (w - grid[hi - 1]) / dw, 1.0 / dw};
}

// Whether the observed pixels are the model grid's own (as for APOGEE spectra and The Payne's
// networks): shift_block_onto_own_grid then interpolates.
inline bool on_own_grid(const FitLayout& lay) {
  return lay.n_obs == lay.n_model &&
         std::equal(lay.obs_wave, lay.obs_wave + lay.n_obs, lay.model_wave);
}

// The offset c of a velocity on a grid observed at its own pixels (obs == grid, n >= 2):
// on a log-uniform grid every pixel p falls in the interval [p + c, p + c + 1], but next to
// chip gaps and the grid's ends (and everywhere on a grid that is not log-uniform).
inline index_t own_grid_offset(const double* grid, index_t n, const double* obs,
                               double inv_doppler) {
  index_t hint = 0;
  return n >= 2 ? locate(grid, n, obs[n / 2] * inv_doppler, hint).i0 - n / 2 : 0;
}

// Linear interpolation of `model` (on grid, n) at the rest wavelengths obs[p] * inv_doppler
// of the grid's own pixels p in [p0, p1), into out (p1 - p0,), for the offset c of
// own_grid_offset: the pass reads contiguous runs and vectorizes. Pixels where the offset is
// wrong are flagged in missed (p1 - p0,) and redone by locate(), so every value is
// locate()'s interpolation, bit for bit.
inline void shift_block_onto_own_grid(const double* grid, index_t n, const double* obs,
                                      const double* model, double inv_doppler, index_t c,
                                      index_t p0, index_t p1, char* missed, double* out) {
  // p + c and p + c + 1 inside the grid
  const index_t lo = std::clamp<index_t>(-c, p0, p1), hi = std::clamp<index_t>(n - 1 - c, lo, p1);
  std::int64_t n_missed = 0;
#pragma omp simd reduction(+ : n_missed)
  for (index_t p = lo; p < hi; ++p) {
    const index_t i = p + c;
    const double w = obs[p] * inv_doppler, g0 = grid[i], g1 = grid[i + 1];
    const double t = (w - g0) / (g1 - g0);  // as locate() computes it
    out[p - p0] = model[i] + t * (model[i + 1] - model[i]);
    const int miss = !((g0 <= w) & (w < g1));  // no branch: the loop vectorizes
    missed[p - p0] = static_cast<char>(miss);
    n_missed += miss;
  }
  index_t hint = 0;
  auto redo = [&](index_t p) {
    const Interp in = locate(grid, n, obs[p] * inv_doppler, hint);
    out[p - p0] = model[in.i0] + in.t * (model[in.i1] - model[in.i0]);
  };
  for (index_t p = p0; p < lo; ++p) redo(p);
  for (const char* q = missed + (lo - p0); n_missed > 0; ++q, --n_missed) {
    q = static_cast<const char*>(std::memchr(q, 1, missed + (hi - p0) - q));
    redo(p0 + (q - missed));
  }
  for (index_t p = hi; p < p1; ++p) redo(p);
}

// Chebyshev polynomials T_0..T_{n-1} at t.
inline void chebyshev(double t, index_t n, double* out) {
  if (n > 0) out[0] = 1.0;
  if (n > 1) out[1] = t;
  for (index_t k = 2; k < n; ++k) out[k] = 2.0 * t * out[k - 1] - out[k - 2];
}

// T_k(t_p) for every observed pixel: (n_obs, n_coef).
inline std::vector<double> chebyshev_table(const FitLayout& lay) {
  std::vector<double> table(lay.n_obs * lay.n_coef);
  for (index_t p = 0; p < lay.n_obs; ++p)
    chebyshev(lay.coord[p], lay.n_coef, table.data() + p * lay.n_coef);
  return table;
}

// Broaden every column of values (n_model, n_cols) row-major (double, or float32 for a
// Jacobian kept in float32) with a centred kernel of n_taps
// (odd) along the model grid, within each kernel segment (see FitLayout):
// out_j = sum_t K_t v_i / sum_t K_t over the taps with i = j + t - n_taps / 2 inside j's
// segment. With dkernel (dK/dq, q a fitted kernel width) and n_cols == 1 also its derivative
// dout_j = (sum_t dK_t v_i - out_j sum_t dK_t) / sum_t K_t.
template <class V>
void broaden_columns(const FitLayout& lay, const double* kernel, index_t n_taps, const V* values,
                     index_t n_cols, double* out, const double* dkernel = nullptr,
                     double* dout = nullptr) {
  const index_t centre = n_taps / 2;
  for (index_t g = 0; g < lay.n_kernel_segments; ++g) {
    const index_t start = lay.kernel_segments[2 * g], stop = lay.kernel_segments[2 * g + 1];
    for (index_t j = start; j < stop; ++j) {
      const index_t t0 = std::max<index_t>(0, start - (j - centre));
      const index_t t1 = std::min<index_t>(n_taps, stop - (j - centre));
      double* o = out + j * n_cols;
      std::fill(o, o + n_cols, 0.0);
      double weight = 0.0, dweight = 0.0, dsum = 0.0;
      for (index_t t = t0; t < t1; ++t) {
        const double k = kernel[t];
        const V* v = values + (j + t - centre) * n_cols;
        weight += k;
        for (index_t c = 0; c < n_cols; ++c) o[c] += k * v[c];
        if (dkernel) {
          dweight += dkernel[t];
          dsum += dkernel[t] * v[0];
        }
      }
      for (index_t c = 0; c < n_cols; ++c) o[c] /= weight;
      if (dkernel) dout[j] = (dsum - o[0] * dweight) / weight;
    }
  }
}

// The Gaussian of sigma / step pixels sampled at offsets -half..half, normalized to sum 1,
// and its derivative in sigma (km/s); below 1e-3 pixel a delta with zero derivative.
//   g, dg (2 half + 1)
inline void gaussian_profile(double sigma, double step, index_t half, double* g, double* dg) {
  const index_t n = 2 * half + 1;
  std::fill(g, g + n, 0.0);
  std::fill(dg, dg + n, 0.0);
  const double s = sigma / step;
  if (!(s >= 1e-3)) {
    g[half] = 1.0;
    return;
  }
  double total = 0.0, moment = 0.0;
  for (index_t t = -half; t <= half; ++t) total += g[t + half] = std::exp(-0.5 * (t / s) * (t / s));
  for (index_t t = -half; t <= half; ++t) {
    g[t + half] /= total;
    moment += g[t + half] * double(t) * double(t);
  }
  // d g_t / d sigma = g_t (t^2 - sum_u g_u u^2) / s^3 / step
  for (index_t t = -half; t <= half; ++t)
    dg[t + half] = g[t + half] * (double(t) * t - moment) / (s * s * s) / step;
}

// The rotational profile of v sin i (km/s) with linear limb darkening eps,
//   P(x) = 2 (1 - eps) sqrt(1 - x^2) + (pi eps / 2) (1 - x^2),   x = dv / vsini in [-1, 1],
// integrated exactly over each pixel (offsets t -+ 1/2 times step / vsini, through its
// primitive), normalized to sum 1, and its derivative in vsini: the pixel's bounds
// x = a step / vsini move with dx / dvsini = -x / vsini, so d/dvsini of the integral is
// -(x_hi P(x_hi) - x_lo P(x_lo)) / vsini. Below 1e-3 pixel a delta with zero derivative.
//   r, dr (2 half + 1)
inline void rotation_profile(double vsini, double step, index_t half, double eps, double* r,
                             double* dr) {
  const index_t n = 2 * half + 1;
  std::fill(r, r + n, 0.0);
  std::fill(dr, dr + n, 0.0);
  if (!(vsini / step >= 1e-3)) {
    r[half] = 1.0;
    return;
  }
  constexpr double pi = 3.14159265358979323846;
  auto primitive = [eps](double x) {  // integral of P from -1 to x
    x = std::clamp(x, -1.0, 1.0);
    const double circle = 0.5 * (x * std::sqrt(1.0 - x * x) + std::asin(x)) + 0.25 * pi;
    const double parabola = x - x * x * x / 3.0 + 2.0 / 3.0;
    return 2.0 * (1.0 - eps) * circle + 0.5 * pi * eps * parabola;
  };
  auto profile = [eps](double x) {
    if (!(std::abs(x) < 1.0)) return 0.0;
    return 2.0 * (1.0 - eps) * std::sqrt(1.0 - x * x) + 0.5 * pi * eps * (1.0 - x * x);
  };
  const double scale = step / vsini;
  double total = 0.0, dtotal = 0.0;
  for (index_t t = -half; t <= half; ++t) {
    const double lo = (t - 0.5) * scale, hi = (t + 0.5) * scale;
    total += r[t + half] = primitive(hi) - primitive(lo);
    dtotal += dr[t + half] = -(hi * profile(hi) - lo * profile(lo)) / vsini;
  }
  for (index_t i = 0; i < n; ++i) {
    r[i] /= total;
    dr[i] = (dr[i] - r[i] * dtotal) / total;
  }
}

// out (n_a + n_b - 1) = a (*) b, the full discrete convolution.
inline void convolve_full(const double* a, index_t n_a, const double* b, index_t n_b, double* out) {
  std::fill(out, out + n_a + n_b - 1, 0.0);
  for (index_t i = 0; i < n_a; ++i)
    for (index_t j = 0; j < n_b; ++j) out[i + j] += a[i] * b[j];
}

// One spectrum's kernel with fitted parts, K = g(sigma) (*) r(vsini) (*) fixed, and its
// derivatives in the fitted widths (see FitLayout; a part not fitted is a delta).
struct FittedKernel {
  std::vector<double> kernel, dsigma, dvsini;  // (n_taps,) each
  std::vector<double> g, dg, r, dr, part;      // scratch

  // fixed (n_fixed taps) or null; returns n_taps
  index_t build(const FitLayout& lay, const double* fixed, index_t n_fixed, double sigma,
                double vsini) {
    const double delta[1] = {1.0};
    if (!fixed) {
      fixed = delta;
      n_fixed = 1;
    }
    const index_t n_g = lay.fit_sigma ? 2 * lay.sigma_half + 1 : 1;
    const index_t n_r = lay.fit_vsini ? 2 * lay.vsini_half + 1 : 1;
    g.assign(n_g, 1.0);
    dg.assign(n_g, 0.0);
    r.assign(n_r, 1.0);
    dr.assign(n_r, 0.0);
    if (lay.fit_sigma) gaussian_profile(sigma, lay.velocity_step, lay.sigma_half, g.data(), dg.data());
    if (lay.fit_vsini)
      rotation_profile(vsini, lay.velocity_step, lay.vsini_half, lay.limb_darkening, r.data(), dr.data());
    const index_t n_part = n_g + n_r - 1, n_taps = n_part + n_fixed - 1;
    part.resize(n_part);
    auto chain = [&](const double* a, const double* b, std::vector<double>& out) {
      out.resize(n_taps);
      convolve_full(a, n_g, b, n_r, part.data());
      convolve_full(part.data(), n_part, fixed, n_fixed, out.data());
    };
    chain(g.data(), r.data(), kernel);
    if (lay.fit_sigma) chain(dg.data(), r.data(), dsigma);
    if (lay.fit_vsini) chain(g.data(), dr.data(), dvsini);
    return n_taps;
  }
};

// rest wavelength / observed wavelength = 1 / D(v), and d ln(rest wavelength) / dv.
inline void doppler(double v, double& inv_doppler, double& dlnw_dv) {
  const double beta = v / SPEED_OF_LIGHT_KMS;
  if (!(std::abs(beta) < 1.0)) {  // unphysical: make the model non-finite, never crash
    inv_doppler = dlnw_dv = std::numeric_limits<double>::quiet_NaN();
    return;
  }
  inv_doppler = std::sqrt((1.0 - beta) / (1.0 + beta));
  dlnw_dv = -1.0 / (SPEED_OF_LIGHT_KMS * (1.0 - beta * beta));
}

// The emulator's Memory, or nothing
template <class E, class = void>
struct MemoryOf {
  struct type {};
  static constexpr bool remembers = false;
};
template <class E>
struct MemoryOf<E, std::void_t<typename E::Memory>> {
  using type = typename E::Memory;
  static constexpr bool remembers = true;
};

}  // namespace spectrum_detail

template <class Emulator>
struct ShiftedSpectrumModel {
  const Emulator& emulator;
  FitLayout layout;
  index_t n_pixels;            // observed pixels (PixelObjective reads this)
  std::vector<double> cheb;    // (n_obs, n_coef) T_k at each pixel's segment coordinate
  bool own_grid;               // the observed pixels are the model grid's

  struct State {
    const double* flux = nullptr;  // the emulator on the model grid (n_model,), in the workspace
    EitherPrecision<double> jac;   // (n_model, n_labels) or null
    const double* dflux_dsigma = nullptr;  // (n_model,) when sigma is fitted
    const double* dflux_dvsini = nullptr;  // (n_model,) when vsini is fitted
    const double* coef = nullptr;  // continuum coefficients inside the parameter vector
    double inv_doppler = 1.0, dlnw_dv = 0.0;
    index_t offset = 0;  // own_grid_offset of the velocity, on the model's own grid
    // the emulator's memory when rows of jac must be completed before they are read
    typename spectrum_detail::MemoryOf<Emulator>::type* memory = nullptr;
  };
  // LM alternates between all of a batch's trial steps and the accepted ones: the buffers only
  // grow, and are never zeroed (every value is written before it is read; zeroing was tens of
  // MB per step)
  struct Workspace {
    // (n, n_labels), (n, n_model), (n, n_model, n_labels)
    GrowingBuffer<double> labels, flux, jac;
    GrowingBuffer<double> broad_flux, broad_jac;  // the same, broadened
    GrowingBuffer<double> dflux_dsigma, dflux_dvsini;  // (n, n_model) each, when fitted
    spectrum_detail::FittedKernel fitted;             // one item's kernel
    typename spectrum_detail::MemoryOf<Emulator>::type memory;
    std::vector<EitherPrecision<double>> jac_of;  // (n,) each item's (n_model, n_labels)
  };

  ShiftedSpectrumModel(const Emulator& emu, const FitLayout& lay)
      : emulator(emu), layout(lay), n_pixels(lay.n_obs), cheb(spectrum_detail::chebyshev_table(lay)),
        own_grid(spectrum_detail::on_own_grid(lay)) {}

  index_t n_params() const { return layout.n_params(); }

  void prepare(const std::vector<const double*>& xs, const std::vector<index_t>& rows,
               bool with_jacobian, Workspace& ws, std::vector<State>& states) const {
    const index_t n = static_cast<index_t>(xs.size()), L = layout.n_labels, M = layout.n_model;
    double* labels = ws.labels.at_least(n * L);
    double* emulated_flux = ws.flux.at_least(n * M);
    for (index_t i = 0; i < n; ++i) std::copy_n(xs[i], L, labels + i * L);
    std::vector<EitherPrecision<double>>& jac_of = ws.jac_of;
    jac_of.assign(n, {});
    // broadening reads whole Jacobians: no deferred updates then
    const bool defer = with_jacobian && !layout.broadens();
    if constexpr (spectrum_detail::MemoryOf<Emulator>::remembers) {
      emulator.spectra(labels, rows.data(), n, emulated_flux, ws.memory,
                       with_jacobian ? jac_of.data() : nullptr, defer);
    } else {
      double* emulated_jac = with_jacobian ? ws.jac.at_least(n * M * L) : nullptr;
      emulator.spectra(labels, n, emulated_flux, emulated_jac);
      for (index_t i = 0; i < n && with_jacobian; ++i)
        jac_of[i].values = emulated_jac + i * M * L;
    }
    const double* flux = emulated_flux;
    double* dflux_dsigma = nullptr;
    double* dflux_dvsini = nullptr;
    if (with_jacobian && layout.fit_sigma) dflux_dsigma = ws.dflux_dsigma.at_least(n * M);
    if (with_jacobian && layout.fit_vsini) dflux_dvsini = ws.dflux_dvsini.at_least(n * M);
    if (layout.broadens()) {
      double* broad_flux = ws.broad_flux.at_least(n * M);
      double* broad_jac = with_jacobian ? ws.broad_jac.at_least(n * M * L) : nullptr;
      for (index_t i = 0; i < n; ++i) {
        const double* kernel = layout.kernels ? layout.kernels + rows[i] * layout.kernel_stride : nullptr;
        index_t n_taps = layout.n_taps;
        if (layout.fits_broadening()) {
          n_taps = ws.fitted.build(layout, kernel, layout.n_taps,
                                   layout.fit_sigma ? xs[i][layout.sigma_index()] : 0.0,
                                   layout.fit_vsini ? xs[i][layout.vsini_index()] : 0.0);
          kernel = ws.fitted.kernel.data();
        }
        double* broad = broad_flux + i * M;
        spectrum_detail::broaden_columns(layout, kernel, n_taps, flux + i * M, 1, broad);
        if (!with_jacobian) continue;
        if (jac_of[i].values_f32)
          spectrum_detail::broaden_columns(layout, kernel, n_taps, jac_of[i].values_f32, L,
                                           broad_jac + i * M * L);
        else
          spectrum_detail::broaden_columns(layout, kernel, n_taps, jac_of[i].values, L,
                                           broad_jac + i * M * L);
        jac_of[i] = {broad_jac + i * M * L, nullptr};
        // each width's derivative: one more pass over the flux column (recomputes `broad`)
        if (layout.fit_sigma)
          spectrum_detail::broaden_columns(layout, kernel, n_taps, flux + i * M, 1, broad,
                                           ws.fitted.dsigma.data(), dflux_dsigma + i * M);
        if (layout.fit_vsini)
          spectrum_detail::broaden_columns(layout, kernel, n_taps, flux + i * M, 1, broad,
                                           ws.fitted.dvsini.data(), dflux_dvsini + i * M);
      }
      flux = broad_flux;
    }
    states.resize(n);
    for (index_t i = 0; i < n; ++i) {
      State& state = states[i];
      state.flux = flux + i * M;
      state.jac = jac_of[i];
      state.dflux_dsigma = dflux_dsigma ? dflux_dsigma + i * M : nullptr;
      state.dflux_dvsini = dflux_dvsini ? dflux_dvsini + i * M : nullptr;
      spectrum_detail::doppler(layout.fit_rv ? xs[i][layout.rv_index()] : 0.0, state.inv_doppler,
                               state.dlnw_dv);
      if (own_grid)
        state.offset = spectrum_detail::own_grid_offset(layout.model_wave, layout.n_model,
                                                        layout.obs_wave, state.inv_doppler);
      state.coef = xs[i] + layout.coef_index();  // xs outlive the evaluation (lm.hpp keeps them)
      if constexpr (spectrum_detail::MemoryOf<Emulator>::remembers)
        state.memory = defer ? &ws.memory : nullptr;
    }
  }

  // The emulator's Jacobian is (n_model, n_labels) per spectrum, so a pixel's interpolated
  // row is written contiguously.
  static constexpr bool jacobian_by_pixel = true;

  // Every parameter but the continuum coefficients of segments without a pixel in [p0, p1)
  // (all of those from the block's first to its last segment: segments are runs of pixels)
  index_t block_columns(index_t p0, index_t p1, index_t* columns) const {
    const index_t c0 = layout.coef_index(), K = layout.n_coef;
    index_t first = layout.n_segments, last = -1;
    for (index_t p = p0; p < p1 && K > 0; ++p) {
      const index_t s = layout.segment[p];
      if (s < 0) continue;
      first = std::min(first, s);
      last = std::max(last, s);
    }
    index_t n = 0;
    for (index_t a = 0; a < c0; ++a) columns[n++] = a;
    for (index_t a = c0 + first * K; a < c0 + (last + 1) * K; ++a) columns[n++] = a;
    return n;
  }

  // The continuum at observed pixel p: sum_k c_k T_k over its segment's coefficients (1
  // outside every segment).
  double continuum(const State& state, index_t p) const {
    const index_t K = layout.n_coef;
    const std::int32_t s = layout.segment[p];
    if (K == 0 || s < 0) return 1.0;
    const double* c = state.coef + s * K;
    const double* t = cheb.data() + p * K;
    double cont = 0.0;
    for (index_t k = 0; k < K; ++k) cont += c[k] * t[k];
    return cont;
  }

  // flux_out (p1 - p0,), jac_out (p1 - p0, n_params) row-major or null.
  void evaluate(const State& state, index_t p0, index_t p1, double* flux_out, double* jac_out) const {
    const index_t nb = p1 - p0, L = layout.n_labels, K = layout.n_coef;
    const index_t np = n_params(), c0 = layout.coef_index();
    const double* f = state.flux;
    // the spectrum alone (LM's trial steps) on the model's own pixels: the interpolation
    // vectorized, then the continuum; the same values as the pass below
    if (!jac_out && own_grid) {
      constexpr index_t chunk = 256;
      char missed[chunk];
      for (index_t q0 = p0; q0 < p1; q0 += chunk)
        spectrum_detail::shift_block_onto_own_grid(
            layout.model_wave, layout.n_model, layout.obs_wave, f, state.inv_doppler,
            state.offset, q0, std::min(q0 + chunk, p1), missed, flux_out + (q0 - p0));
      if (K > 0)
        for (index_t j = 0; j < nb; ++j) flux_out[j] = continuum(state, p0 + j) * flux_out[j];
      return;
    }
    index_t hint = 0;
    // model rows [ready[0], ready[1]) of the Jacobian are valid (completed on demand)
    index_t ready[2] = {0, state.memory ? 0 : layout.n_model};
    for (index_t j = 0; j < nb; ++j) {
      const index_t p = p0 + j;
      const double w = layout.obs_wave[p] * state.inv_doppler;
      const spectrum_detail::Interp in =
          spectrum_detail::locate(layout.model_wave, layout.n_model, w, hint);
      if constexpr (spectrum_detail::MemoryOf<Emulator>::remembers)
        if (jac_out && (in.i0 < ready[0] || in.i1 >= ready[1]))
          emulator.complete(*state.memory, in.i0, in.i1, ready);
      const double model = f[in.i0] + in.t * (f[in.i1] - f[in.i0]);
      const std::int32_t s = layout.segment[p];
      const double* t = cheb.data() + p * K;
      const double cont = continuum(state, p);
      flux_out[j] = cont * model;
      if (!jac_out) continue;
      double* row = jac_out + j * np;
      auto interpolate = [&](const auto* jm) {  // in double whatever jm holds
        const auto* j0 = jm + in.i0 * L;
        const auto* j1 = jm + in.i1 * L;
        for (index_t a = 0; a < L; ++a) {
          const double at0 = j0[a], at1 = j1[a];
          row[a] = cont * (at0 + in.t * (at1 - at0));
        }
      };
      if (state.jac.values_f32)
        interpolate(state.jac.values_f32);
      else
        interpolate(state.jac.values);
      if (layout.fit_rv) {
        const double slope = (f[in.i1] - f[in.i0]) * in.inv_dw;
        row[layout.rv_index()] = cont * slope * w * state.dlnw_dv;
      }
      if (layout.fit_sigma) {
        const double* d = state.dflux_dsigma;
        row[layout.sigma_index()] = cont * (d[in.i0] + in.t * (d[in.i1] - d[in.i0]));
      }
      if (layout.fit_vsini) {
        const double* d = state.dflux_dvsini;
        row[layout.vsini_index()] = cont * (d[in.i0] + in.t * (d[in.i1] - d[in.i0]));
      }
      std::fill(row + c0, row + np, 0.0);  // the continuum parameters come last
      if (K > 0 && s >= 0)
        for (index_t k = 0; k < K; ++k) row[c0 + s * K + k] = t[k] * model;
    }
  }
};

// The observed model (and its Jacobian) for n parameter vectors; for tests and for returning
// best-fit spectra.
//   params    (n, n_params)
//   flux_out  (n, n_obs)
//   jac_out   (n, n_obs, n_params) or null
template <class Emulator>
void spectrum_model_evaluate(const ShiftedSpectrumModel<Emulator>& model, const double* params,
                             index_t n, double* flux_out, double* jac_out, int n_threads,
                             Interrupt* interrupt = nullptr) {
  evaluate_spectra(model, params, n, flux_out, jac_out, n_threads, interrupt);
}

namespace spectrum_detail {

// Linear interpolation of `model` (on the model grid) at every observed pixel's rest
// wavelength obs_wave * inv_doppler.
inline void shift_onto_pixels(const FitLayout& lay, const double* model, double inv_doppler,
                              double* shifted) {
  index_t hint = 0;
  for (index_t p = 0; p < lay.n_obs; ++p) {
    const Interp in = locate(lay.model_wave, lay.n_model, lay.obs_wave[p] * inv_doppler, hint);
    shifted[p] = model[in.i0] + in.t * (model[in.i1] - model[in.i0]);
  }
}

// The same when the observed pixels are the model grid's own (on_own_grid):
// shift_block_onto_own_grid over every pixel.
//   missed (n_obs,) scratch
inline void shift_onto_own_grid(const FitLayout& lay, const double* model, double inv_doppler,
                                char* missed, double* shifted) {
  const index_t n = lay.n_model;
  const index_t c = own_grid_offset(lay.model_wave, n, lay.obs_wave, inv_doppler);
  shift_block_onto_own_grid(lay.model_wave, n, lay.obs_wave, model, inv_doppler, c, 0, n, missed,
                            shifted);
}

// The continuum solve of the RV grid for one spectrum, with every velocity-independent factor
// taken out of the pixel loop. For a template m (interpolated onto the observed pixels) and
// per segment s the normal equations of flux ~ sum_k c_k T_k(t) m are
//   A_kl = sum_p w m^2 T_k T_l,   b_k = sum_p w f m T_k        (p in segment s)
// so with the tables u = (w f T_k ; w T_k T_l) fixed per spectrum each velocity costs one
// dot product per entry over each run of consecutive pixels of one segment (vectorized),
// and chi2 = sum_p w f^2 - 2 c.b + c.A c needs no pass over the residuals. Pixels outside
// every segment (group S) have the continuum 1: c = (1, 0, ...).
class ContinuumSolver {
 public:
  // cheb (n_obs, n_coef); flux, weight (n_obs,) of the spectrum
  void reset(const FitLayout& lay, const double* cheb, const double* flux, const double* weight) {
    K_ = lay.n_coef;
    S_ = lay.n_segments;
    n_obs_ = lay.n_obs;
    n_terms_ = K_ + K_ * (K_ + 1) / 2;
    table_.assign(n_terms_ * n_obs_, 0.0);
    base_.assign(S_ + 1, 0.0);
    counts_.assign(S_ + 1, 0);
    runs_.clear();
    for (index_t p = 0; p < n_obs_; ++p) {
      const index_t g = lay.segment[p] < 0 ? S_ : lay.segment[p];
      if (runs_.empty() || runs_.back().group != g) runs_.push_back({p, p, g});
      runs_.back().stop = p + 1;
      if (!(weight[p] > 0.0)) continue;  // zeros in the table (flux may be NaN there)
      const double w = weight[p], wf = w * flux[p];
      const double* t = cheb + p * K_;
      index_t j = 0;
      for (index_t k = 0; k < K_; ++k) table_[(j++) * n_obs_ + p] = wf * t[k];
      for (index_t k = 0; k < K_; ++k)
        for (index_t l = 0; l <= k; ++l) table_[(j++) * n_obs_ + p] = w * t[k] * t[l];
      base_[g] += wf * flux[p];
      ++counts_[g];
    }
  }

  // The continuum coefficients (n_segments * n_coef) into coef_out[v] and chi2 into
  // chi2_out[v] for each of V templates m[v] (n_obs,). A segment with fewer used pixels than
  // coefficients, or singular normal equations, keeps the flat continuum (1, 0, ..., 0). Each
  // template's results are the same, bit for bit, for any V: the pass over the pixels reads
  // the table (~0.5 MB, from L2) once for all V, and that reading bounds the pass.
  template <int V>
  void solve(const double* const* m, double* const* coef_out, double* chi2_out) {
    sums_.assign(V * (S_ + 1) * n_terms_, 0.0);
    const index_t stride = (S_ + 1) * n_terms_;  // between the templates' sums
    for (const Run& run : runs_) {
      double* sum = sums_.data() + run.group * n_terms_;
      switch (K_) {  // continuum orders 0-3 in one pass over the pixels
        case 1: add_sums<1, V>(m, run, sum, stride); break;
        case 2: add_sums<2, V>(m, run, sum, stride); break;
        case 3: add_sums<3, V>(m, run, sum, stride); break;
        case 4: add_sums<4, V>(m, run, sum, stride); break;
        default:
          for (int v = 0; v < V; ++v) add_sums_any(m[v], run, sum + v * stride);
      }
    }
    for (int v = 0; v < V; ++v) chi2_out[v] = finish(sums_.data() + v * stride, coef_out[v]);
  }

 private:
  // coefficients and chi2 from one template's sums (S + 1, n_terms)
  double finish(const double* sums, double* coef_out) {
    double chi2 = 0.0;
    a_.resize(K_, K_);
    c_.resize(K_);
    for (index_t g = 0; g <= S_; ++g) {
      const double* sum = sums + g * n_terms_;
      const Eigen::Map<const Eigen::VectorXd> b(sum, K_);
      for (index_t k = 0, j = K_; k < K_; ++k)
        for (index_t l = 0; l <= k; ++l, ++j) a_(k, l) = a_(l, k) = sum[j];
      c_.setZero();
      if (K_ > 0) c_[0] = 1.0;
      if (g < S_ && counts_[g] >= K_) {
        llt_.compute(a_);
        if (llt_.info() == Eigen::Success) {
          solution_ = llt_.solve(b);
          if (solution_.allFinite()) c_ = solution_;
        }
      }
      if (g < S_) std::copy_n(c_.data(), K_, coef_out + g * K_);
      if (counts_[g] > 0) {
        ac_.noalias() = a_ * c_;
        chi2 += base_[g] - 2.0 * c_.dot(b) + c_.dot(ac_);
      }
    }
    return std::max(chi2, 0.0);  // the sums cancel to rounding for a perfect fit
  }

  struct Run {
    index_t start, stop, group;
  };
  index_t K_ = 0, S_ = 0, n_obs_ = 0, n_terms_ = 0;
  std::vector<double> table_;   // (n_terms, n_obs): w f T_k, then w T_k T_l (l <= k)
  std::vector<double> base_;    // (S + 1,) sum of w f^2 per group
  std::vector<index_t> counts_; // (S + 1,) used pixels per group
  std::vector<Run> runs_;       // maximal runs of consecutive pixels of one group
  std::vector<double> squared_, sums_;

  // sum[j] += the dot product of table row j with m (j < K) or m^2 over the run's pixels: one
  // pass, 8 pixels at a time, with an accumulator per row, so that the FMAs do not wait on
  // each other as they did in one dot product per row (the RV grid of a 7214-pixel spectrum
  // in 3 segments with order 2, 387 velocities: 4.7 instead of 6.9 ms on one thread); for
  // each of V templates m[v], into sum + v stride, in the same order as for one alone
  template <int K, int V>
  void add_sums(const double* const* m, const Run& run, double* sum, index_t stride) const {
    constexpr int n_terms = K + K * (K + 1) / 2;
    using Lanes = Eigen::Array<double, 8, 1>;
    Lanes acc[V][n_terms];
    for (auto& per_template : acc)
      for (Lanes& a : per_template) a.setZero();
    index_t p = run.start;
    for (; p + 8 <= run.stop; p += 8) {
      Lanes mv[V], m2[V];
      for (int v = 0; v < V; ++v) {
        mv[v] = Eigen::Map<const Lanes>(m[v] + p);
        m2[v] = mv[v] * mv[v];
      }
      for (int j = 0; j < n_terms; ++j) {
        const Lanes row = Eigen::Map<const Lanes>(table_.data() + j * n_obs_ + p);
        for (int v = 0; v < V; ++v) acc[v][j] += (j < K ? mv[v] : m2[v]) * row;
      }
    }
    for (int v = 0; v < V; ++v)
      for (int j = 0; j < n_terms; ++j) {
        double tail = 0.0;
        for (index_t q = p; q < run.stop; ++q)
          tail += (j < K ? m[v][q] : m[v][q] * m[v][q]) * table_[j * n_obs_ + q];
        sum[v * stride + j] += acc[v][j].sum() + tail;
      }
  }
  void add_sums_any(const double* m, const Run& run, double* sum) {
    using Vec = Eigen::Map<const Eigen::VectorXd>;
    const index_t n = run.stop - run.start;
    squared_.resize(n);
    for (index_t p = 0; p < n; ++p) squared_[p] = m[run.start + p] * m[run.start + p];
    const Vec mv(m + run.start, n), m2(squared_.data(), n);
    for (index_t j = 0; j < n_terms_; ++j)
      sum[j] += (j < K_ ? mv : m2).dot(Vec(table_.data() + j * n_obs_ + run.start, n));
  }
  // scratch of solve, kept so that no velocity allocates: one group's A, its coefficients
  Eigen::MatrixXd a_;
  Eigen::VectorXd c_, solution_, ac_;
  Eigen::LLT<Eigen::MatrixXd> llt_;
};

}  // namespace spectrum_detail

// Global radial-velocity search by a chi2 grid: for each spectrum and each of its templates
// (the emulator at a starting point, on the model grid), shift the template to every trial
// velocity, interpolate it onto the observed pixels, solve the continuum coefficients
// linearly (when n_coef > 0) and record chi2. Used before LM so that large velocities are
// found: LM alone only finds the nearest local minimum (spectral lines are a few km/s wide).
//   templates  (n_spectra, n_templates, n_model)
//   flux, weight (n_spectra, n_obs)  weight == 0 ignores a pixel
//   velocities (n_v,) km/s
//   chi2_out   (n_spectra, n_templates, n_v)
//   best_out   (n_spectra, n_templates)  index of the first minimum over finite chi2 (-1: none)
//   coef_out   (n_spectra, n_templates, n_segments * n_coef) continuum at the best velocity
//   interrupt  (or null) stops the remaining items once it fires (outputs incomplete)
// Work is split by (spectrum, template); each item's sums run in one fixed order, so the
// result does not depend on the thread count.
inline void rv_chi2_grid(const FitLayout& lay, const double* templates, index_t n_spectra,
                         index_t n_templates, const double* flux, const double* weight,
                         const double* velocities, index_t n_v, double* chi2_out,
                         std::int64_t* best_out, double* coef_out, int n_threads,
                         Interrupt* interrupt = nullptr) {
  const index_t n_items = n_spectra * n_templates, n_obs = lay.n_obs;
  const index_t n_cc = lay.n_segments * lay.n_coef;
  const std::vector<double> cheb = spectrum_detail::chebyshev_table(lay);
  const bool same_grid = spectrum_detail::on_own_grid(lay);
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(resolve_threads(n_threads))
  {
    std::vector<double> shifted(2 * n_obs), coef(2 * std::max<index_t>(n_cc, 1));
    double* const shifted_at[2] = {shifted.data(), shifted.data() + n_obs};
    double* const coef_at[2] = {coef.data(), coef.data() + std::max<index_t>(n_cc, 1)};
    std::vector<char> missed(same_grid ? n_obs : 0);
    spectrum_detail::ContinuumSolver solver;
#pragma omp for schedule(dynamic, 1)
    for (index_t item = 0; item < n_items; ++item) {
      if (failed || interrupted(interrupt)) continue;
      try {
        const index_t s = item / n_templates;
        const double* tmpl = templates + item * lay.n_model;
        const double* f = flux + s * n_obs;
        const double* w = weight + s * n_obs;
        // the template at velocity v onto the observed pixels
        auto shift = [&](double v, double* out) {
          double inv_doppler, dlnw_dv;
          spectrum_detail::doppler(v, inv_doppler, dlnw_dv);
          using namespace spectrum_detail;
          if (same_grid)
            shift_onto_own_grid(lay, tmpl, inv_doppler, missed.data(), out);
          else
            shift_onto_pixels(lay, tmpl, inv_doppler, out);
        };
        // chi2 of the template at velocities k (and k + 1 when pair: the continuum solve
        // takes both in one pass), continuum coefficients into coef_at
        auto chi2_at = [&](index_t k, bool pair, double* chi2) {
          shift(velocities[k], shifted_at[0]);
          if (lay.n_coef == 0) {
            chi2[0] = 0.0;
            for (index_t p = 0; p < n_obs; ++p) {
              if (!(w[p] > 0.0)) continue;
              const double r = f[p] - shifted_at[0][p];
              chi2[0] += w[p] * r * r;
            }
          } else if (pair) {
            shift(velocities[k + 1], shifted_at[1]);
            solver.solve<2>(shifted_at, coef_at, chi2);
          } else {
            solver.solve<1>(shifted_at, coef_at, chi2);
          }
        };
        if (lay.n_coef > 0) solver.reset(lay, cheb.data(), f, w);
        std::int64_t best = -1;
        double best_chi2 = std::numeric_limits<double>::infinity();
        for (index_t k = 0; k < n_v;) {
          const bool pair = lay.n_coef > 0 && k + 1 < n_v;
          double chi2[2];
          chi2_at(k, pair, chi2);
          for (int u = 0; u <= int(pair); ++u, ++k) {
            chi2_out[item * n_v + k] = chi2[u];
            if (std::isfinite(chi2[u]) && chi2[u] < best_chi2) {
              best_chi2 = chi2[u];
              best = k;
            }
          }
        }
        best_out[item] = best;
        double* co = coef_out + item * n_cc;
        if (best >= 0) {
          double chi2;
          chi2_at(best, false, &chi2);
          std::copy_n(coef.data(), n_cc, co);
        } else {
          for (index_t sg = 0; sg < lay.n_segments; ++sg)
            for (index_t k = 0; k < lay.n_coef; ++k) co[sg * lay.n_coef + k] = k == 0 ? 1.0 : 0.0;
        }
      } catch (...) {
        failed = true;
      }
    }
  }
  if (failed) throw std::bad_alloc();
}

}  // namespace starlabel
