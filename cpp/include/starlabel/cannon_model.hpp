// The Cannon's spectral model f(x) = theta . v(x) as a "spectrum model" for the LM driver,
// and the batched prediction kernel built on it.
#pragma once

#include <algorithm>
#include <atomic>
#include <new>
#include <vector>

#include "common.hpp"
#include "polynomial.hpp"

namespace starlabel {

// A trained Cannon, read-only, shared by all threads.
//
//   poly     the label polynomial (n_terms terms in n_labels scaled labels)
//   theta_t  (n_terms, n_pixels) row-major: theta transposed, so that every inner loop runs
//            over contiguous pixels and vectorizes
//
// The LM driver calls prepare() once per parameter vector, then evaluate() on consecutive
// pixel blocks; a block of theta_t stays in cache while all spectra of a batch use it.
struct CannonSpectrumModel {
  const Polynomial& poly;
  const double* theta_t;
  index_t n_pixels;

  struct State {
    std::vector<double> terms, deriv, powers;
    std::vector<index_t> offsets;
  };

  index_t n_params() const { return poly.n_labels; }

  void prepare(const double* x, State& state, bool with_jacobian) const {
    state.terms.resize(poly.n_terms);
    state.deriv.resize(poly.n_deriv());
    poly.evaluate(x, state.terms.data(), with_jacobian ? state.deriv.data() : nullptr,
                  state.powers, state.offsets);
  }

  // Model flux and Jacobian on pixels [p0, p1).
  //   flux_out  (p1 - p0,)
  //   jac_out   (n_params, p1 - p0) row-major, d flux / d x_a; skipped when null
  void evaluate(const State& state, index_t p0, index_t p1, double* flux_out, double* jac_out) const {
    const index_t nb = p1 - p0;
    std::fill(flux_out, flux_out + nb, 0.0);
    for (index_t k = 0; k < poly.n_terms; ++k) {
      const double v = state.terms[k];
      const double* row = theta_t + k * n_pixels + p0;
      for (index_t i = 0; i < nb; ++i) flux_out[i] += v * row[i];
    }
    if (jac_out == nullptr) return;
    std::fill(jac_out, jac_out + poly.n_labels * nb, 0.0);
    for (index_t d = 0; d < poly.n_deriv(); ++d) {
      const double dv = state.deriv[d];
      const double* row = theta_t + poly.deriv_term[d] * n_pixels + p0;
      double* out = jac_out + poly.deriv_label[d] * nb;
      for (index_t i = 0; i < nb; ++i) out[i] += dv * row[i];
    }
  }
};

// Model spectra (and optionally their Jacobians) for many label vectors.
//
//   x          (n_stars, n_labels)            scaled labels
//   flux_out   (n_stars, n_pixels)            model flux
//   jac_out    (n_stars, n_pixels, n_labels)  d flux / d x, or null
// Work is split by star, so results do not depend on the number of threads.
inline void cannon_predict(const CannonSpectrumModel& model, const double* x, index_t n_stars,
                           double* flux_out, double* jac_out, int n_threads) {
  const index_t n_labels = model.n_params(), n_pixels = model.n_pixels;
  constexpr index_t block = 512;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(resolve_threads(n_threads))
  {
    CannonSpectrumModel::State state;
    std::vector<double> jac_block;
#pragma omp for schedule(static)
    for (index_t s = 0; s < n_stars; ++s) {
      if (failed) continue;
      try {  // an exception must not leave an OpenMP loop body
        jac_block.resize(n_labels * block);
        model.prepare(x + s * n_labels, state, jac_out != nullptr);
        for (index_t p0 = 0; p0 < n_pixels; p0 += block) {
          const index_t p1 = std::min(p0 + block, n_pixels), nb = p1 - p0;
          model.evaluate(state, p0, p1, flux_out + s * n_pixels + p0,
                         jac_out ? jac_block.data() : nullptr);
          if (!jac_out) continue;
          double* out = jac_out + (s * n_pixels + p0) * n_labels;
          for (index_t i = 0; i < nb; ++i)
            for (index_t a = 0; a < n_labels; ++a) out[i * n_labels + a] = jac_block[a * nb + i];
        }
      } catch (...) {
        failed = true;
      }
    }
  }
  if (failed) throw std::bad_alloc();
}

}  // namespace starlabel
