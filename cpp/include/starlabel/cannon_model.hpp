// The Cannon's spectral model f(x) = theta . v(x) as a "spectrum model" for the LM driver,
// and the batched prediction kernel built on it.
#pragma once

#include <algorithm>
#include <vector>

#include <Eigen/Core>

#include "common.hpp"
#include "lm.hpp"
#include "polynomial.hpp"

namespace starlabel {

// A trained Cannon, read-only, shared by all threads.
//
//   poly     the label polynomial (n_terms terms in n_labels scaled labels)
//   theta_t  (n_terms, n_pixels) row-major: theta transposed, so that every inner loop runs
//            over contiguous pixels and vectorizes
//
// The LM driver calls prepare() for a set of parameter vectors, then evaluate() on
// consecutive pixel blocks; a block of theta_t stays in cache while all spectra of a batch use it.
struct CannonSpectrumModel {
  using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using Strided = Eigen::OuterStride<>;

  const Polynomial& poly;
  const double* theta_t;
  index_t n_pixels;
  // For evaluate_many: per label a, the derivative entries d with deriv_label[d] == a and a
  // contiguous copy of their theta_t rows (filled by gather_by_label()).
  std::vector<std::vector<index_t>> label_derivs;
  std::vector<RowMatrix> theta_by_label;

  struct State {
    std::vector<double> terms, deriv, powers;
    std::vector<index_t> offsets;
  };

  // Scratch of evaluate_many, one per thread.
  struct ManyScratch {
    RowMatrix terms, deriv;
  };

  void gather_by_label() {
    label_derivs.assign(poly.n_labels, {});
    for (index_t d = 0; d < poly.n_deriv(); ++d) label_derivs[poly.deriv_label[d]].push_back(d);
    theta_by_label.resize(poly.n_labels);
    for (index_t a = 0; a < poly.n_labels; ++a) {
      const auto& ds = label_derivs[a];
      theta_by_label[a].resize(static_cast<index_t>(ds.size()), n_pixels);
      for (std::size_t r = 0; r < ds.size(); ++r)
        theta_by_label[a].row(r) =
            Eigen::Map<const Eigen::RowVectorXd>(theta_t + poly.deriv_term[ds[r]] * n_pixels, n_pixels);
    }
  }

  // Flux (and Jacobians) of many parameter vectors on pixels [p0, p1) as matrix products:
  // terms (n, n_terms) . theta_t block, and per label the derivative values times the
  // gathered theta rows of the terms containing that label. Each block of theta is read once
  // for all n spectra instead of once per spectrum.
  //   flux_out (n, p1 - p0); jac_out (n, n_params, p1 - p0) or null
  void evaluate_many(const std::vector<State>& states, index_t n, index_t p0, index_t p1,
                     ManyScratch& scratch, double* flux_out, double* jac_out) const {
    const index_t K = poly.n_terms, nb = p1 - p0, np = poly.n_labels;
    scratch.terms.resize(n, K);
    for (index_t i = 0; i < n; ++i)
      scratch.terms.row(i) = Eigen::Map<const Eigen::RowVectorXd>(states[i].terms.data(), K);
    const Eigen::Map<const RowMatrix, 0, Strided> theta_block(theta_t + p0, K, nb, Strided(n_pixels));
    Eigen::Map<RowMatrix>(flux_out, n, nb).noalias() = scratch.terms * theta_block;
    if (jac_out == nullptr) return;
    for (index_t a = 0; a < np; ++a) {
      const auto& ds = label_derivs[a];
      const index_t m = static_cast<index_t>(ds.size());
      Eigen::Map<RowMatrix, 0, Strided> jac_a(jac_out + a * nb, n, nb, Strided(np * nb));
      if (m == 0) {
        jac_a.setZero();
        continue;
      }
      scratch.deriv.resize(n, m);
      for (index_t i = 0; i < n; ++i)
        for (index_t r = 0; r < m; ++r) scratch.deriv(i, r) = states[i].deriv[ds[r]];
      const Eigen::Map<const RowMatrix, 0, Strided> rows(theta_by_label[a].data() + p0, m, nb,
                                                         Strided(n_pixels));
      jac_a.noalias() = scratch.deriv * rows;
    }
  }

  index_t n_params() const { return poly.n_labels; }

  struct Workspace {};

  void prepare(const std::vector<const double*>& xs, const std::vector<index_t>& /*rows*/,
               bool with_jacobian, Workspace&, std::vector<State>& states) const {
    states.resize(xs.size());
    for (std::size_t i = 0; i < xs.size(); ++i) {
      State& state = states[i];
      state.terms.resize(poly.n_terms);
      state.deriv.resize(poly.n_deriv());
      poly.evaluate(xs[i], state.terms.data(), with_jacobian ? state.deriv.data() : nullptr,
                    state.powers, state.offsets);
    }
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
//   x          (n_stars, n_labels)            scaled labels
//   flux_out   (n_stars, n_pixels)            model flux
//   jac_out    (n_stars, n_pixels, n_labels)  d flux / d x, or null
inline void cannon_predict(const CannonSpectrumModel& model, const double* x, index_t n_stars,
                           double* flux_out, double* jac_out, int n_threads) {
  evaluate_spectra(model, x, n_stars, flux_out, jac_out, n_threads);
}

// The Cannon's normal equations through its Gram matrix. With A = theta^T W theta
// (n_terms, n_terms) and D = dv/dx (n_terms, n_labels), J^T W J = D^T A D and
// J^T W r = D^T theta^T W r: the per-pixel sums of PixelObjective<CannonSpectrumModel>
// regrouped, so after A is formed once per spectrum (n_pixels * n_terms^2 / 2) an evaluation
// costs one pass over theta (residuals and theta^T W r, 2 n_pixels n_terms) instead of the
// per-pixel Jacobian and its outer products. Cheaper when n_terms is small.
// Screening starting points needs chi2 only, taken from the quadratic form
// chi2 = v^T A v - 2 b^T v + c (b = theta^T W f, c = f^T W f), which loses digits to
// cancellation (~log10(c / chi2)) but only ranks the starts; every chi2 the fit acts on
// comes from the residuals.
//
//   theta_t  (n_terms, n_pixels) row-major (theta transposed, so products run along pixels),
//            finite (0 at untrained pixels, whose s2 is inf)
//   flux, ivar (n_spectra, n_pixels); s2 (n_pixels,)
struct CannonQuadraticObjective {
  const Polynomial& poly;
  const double* theta_t;
  const double* flux;
  const double* ivar;
  const double* s2;
  index_t n_pixels, n_spectra_total;

  using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  struct Batch {
    std::vector<Eigen::MatrixXd> a;
    std::vector<Eigen::VectorXd> b;
    std::vector<double> c;
    std::vector<std::int64_t> n_used;
    RowMatrix weights, clean_flux;  // (batch, n_pixels)
    RowMatrix scaled_theta_t;        // a block of theta_t * diag(w)
    Eigen::VectorXd terms, a_terms, theta_wr, resid, wresid;
    Eigen::MatrixXd deriv, a_deriv;
    std::vector<double> deriv_values, powers;
    std::vector<index_t> offsets;
  };

  index_t n_params() const { return poly.n_labels; }
  index_t n_spectra() const { return n_spectra_total; }

  void begin_batch(index_t s0, index_t s1, Batch& batch) const {
    const index_t K = poly.n_terms, nbatch = s1 - s0;
    const Eigen::Map<const RowMatrix> theta_map(theta_t, K, n_pixels);
    batch.a.assign(nbatch, Eigen::MatrixXd::Zero(K, K));
    batch.b.assign(nbatch, Eigen::VectorXd::Zero(K));
    batch.c.assign(nbatch, 0.0);
    batch.n_used.assign(nbatch, 0);
    batch.weights.resize(nbatch, n_pixels);
    batch.clean_flux.resize(nbatch, n_pixels);
    for (index_t i = 0; i < nbatch; ++i) {
      const double* f = flux + (s0 + i) * n_pixels;
      const double* iv = ivar + (s0 + i) * n_pixels;
      for (index_t p = 0; p < n_pixels; ++p) {
        const double w = iv[p] > 0.0 ? iv[p] / (1.0 + iv[p] * s2[p]) : 0.0;
        batch.weights(i, p) = w;
        batch.clean_flux(i, p) = w > 0.0 ? f[p] : 0.0;  // ignored pixels may hold NaN
        batch.n_used[i] += w > 0.0;
      }
    }
    // A, b, c by dot products along pixels, one cache-sized block of theta at a time for all
    // spectra of the batch: for outputs this small a GEMM or rank update spends its time
    // packing theta, and Eigen's dot() is vectorized where a plain loop reduction is not
    // (no -ffast-math).
    constexpr index_t block = 512;
    batch.scaled_theta_t.resize(K, block);
    for (index_t p0 = 0; p0 < n_pixels; p0 += block) {
      const index_t nb = std::min(block, n_pixels - p0);
      const auto theta_block = theta_map.middleCols(p0, nb);
      for (index_t i = 0; i < nbatch; ++i) {
        const auto w = batch.weights.row(i).segment(p0, nb);
        const auto f = batch.clean_flux.row(i).segment(p0, nb);
        auto scaled = batch.scaled_theta_t.leftCols(nb);
        scaled.noalias() = theta_block * w.asDiagonal();
        batch.c[i] += w.cwiseProduct(f).dot(f);
        for (index_t k = 0; k < K; ++k) {
          batch.b[i][k] += scaled.row(k).dot(f);
          for (index_t l = 0; l <= k; ++l) batch.a[i](k, l) += scaled.row(k).dot(theta_block.row(l));
        }
      }
    }
    for (index_t i = 0; i < nbatch; ++i)
      batch.a[i].triangularView<Eigen::StrictlyUpper>() = batch.a[i].transpose();
  }

  void evaluate(Batch& batch, const std::vector<index_t>& ids, const std::vector<const double*>& xs,
                bool with_jacobian, std::vector<NormalEquations>& out) const {
    const index_t K = poly.n_terms, L = poly.n_labels;
    out.resize(ids.size());
    batch.terms.resize(K);
    batch.theta_wr.resize(K);
    batch.deriv_values.resize(poly.n_deriv());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const index_t id = ids[i];
      const Eigen::MatrixXd& a = batch.a[id];
      poly.evaluate(xs[i], batch.terms.data(), with_jacobian ? batch.deriv_values.data() : nullptr,
                    batch.powers, batch.offsets);
      out[i].n_used = batch.n_used[id];
      if (!with_jacobian) {  // ranking starting points: the quadratic form is enough
        batch.a_terms.noalias() = a * batch.terms;
        out[i].chi2 = batch.c[id] - 2.0 * batch.b[id].dot(batch.terms) + batch.terms.dot(batch.a_terms);
        continue;
      }
      // residuals, chi2 and theta^T W r: two matrix-vector products over theta
      const Eigen::Map<const RowMatrix> theta_map(theta_t, K, n_pixels);
      batch.resid.noalias() = batch.clean_flux.row(id).transpose() - theta_map.transpose() * batch.terms;
      batch.wresid = batch.weights.row(id).transpose().cwiseProduct(batch.resid);
      out[i].chi2 = batch.wresid.dot(batch.resid);
      batch.theta_wr.noalias() = theta_map * batch.wresid;
      batch.deriv.setZero(K, L);
      for (index_t d = 0; d < poly.n_deriv(); ++d)
        batch.deriv(poly.deriv_term[d], poly.deriv_label[d]) = batch.deriv_values[d];
      out[i].grad.noalias() = batch.deriv.transpose() * batch.theta_wr;
      batch.a_deriv.noalias() = a * batch.deriv;
      out[i].hess.noalias() = batch.deriv.transpose() * batch.a_deriv;
    }
  }
};

}  // namespace starlabel
