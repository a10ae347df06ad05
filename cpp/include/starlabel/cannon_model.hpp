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

  // The Jacobian is a sum over theta's rows, each a run of pixels: written label by label.
  static constexpr bool jacobian_by_pixel = false;

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
// costs O(n_terms^2 n_labels), independent of the number of pixels. Cheaper when n_terms is
// small.
// chi2 and theta^T W r come from one exact residual pass at an anchor v0 (chi2_0,
// g0 = theta^T W r0) and, at v = v0 + dv, from the exact expansion
//   chi2 = chi2_0 - 2 g0.dv + dv^T A dv,   theta^T W r = g0 - A dv.
// Its terms are of the size of chi2_0, so it keeps all but ~log10(chi2_0 / chi2) digits;
// the anchor moves (another residual pass) once chi2 falls below chi2_0 / 1000, so at least
// ~12 digits remain. Expanding around v = 0 instead (chi2 = c - 2 b.v + v^T A v with
// c = f^T W f) loses ~log10(c / chi2) ~ 2 log10(S/N) digits: that form only ranks the
// starting points, before any anchor exists.
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
    RowMatrix weights, clean_flux, weighted_flux;  // (batch, n_pixels)
    RowMatrix theta_pairs;  // (pairs, pixels) products of theta rows on a block of pixels
    std::vector<index_t> pair_k, pair_l;  // pair r is (k, l), l <= k
    // per spectrum: the anchor (terms v0, exact chi2_0 and g0 = theta^T W r0), if set
    std::vector<char> anchored;
    std::vector<Eigen::VectorXd> anchor_terms, anchor_theta_wr;
    std::vector<double> anchor_chi2;
    Eigen::VectorXd terms, dv, a_product, theta_wr, resid, wresid;
    Eigen::MatrixXd deriv, a_deriv;
    std::vector<double> deriv_values, powers;
    std::vector<index_t> offsets;
  };

  index_t n_params() const { return poly.n_labels; }
  index_t n_spectra() const { return n_spectra_total; }

  static constexpr index_t product_rows = 16;

  void begin_batch(index_t s0, index_t s1, Batch& batch) const {
    const index_t K = poly.n_terms, nbatch = s1 - s0, n_pairs = K * (K + 1) / 2;
    const Eigen::Map<const RowMatrix> theta_map(theta_t, K, n_pixels);
    batch.n_used.assign(nbatch, 0);
    batch.anchored.assign(nbatch, 0);
    batch.anchor_terms.resize(nbatch);
    batch.anchor_theta_wr.resize(nbatch);
    batch.anchor_chi2.assign(nbatch, 0.0);
    // The matrix products below run on whole groups of product_rows spectra, the rows past
    // the batch zero: how Eigen's kernels sum a row depends on the row count, and a spectrum's
    // result must not depend on how many others share its batch (a survey fitted in pieces
    // equals the survey fitted whole).
    const index_t rows = (nbatch + product_rows - 1) / product_rows * product_rows;
    batch.weights.setZero(rows, n_pixels);
    batch.clean_flux.resize(rows, n_pixels);
    batch.weighted_flux.setZero(rows, n_pixels);
    for (index_t i = 0; i < nbatch; ++i) {
      const double* f = flux + (s0 + i) * n_pixels;
      const double* iv = ivar + (s0 + i) * n_pixels;
      const double* extra = s2;  // local pointers: no reload per pixel
      double* weight = batch.weights.row(i).data();
      double* clean_flux = batch.clean_flux.row(i).data();
      double* weighted_flux = batch.weighted_flux.row(i).data();
      double used = 0.0;  // counted in double (exact below 2^53): an integer count keeps GCC scalar
#pragma omp simd reduction(+ : used)
      for (index_t p = 0; p < n_pixels; ++p) {
        const double inverse_variance = iv[p];
        const double w =
            inverse_variance > 0.0 ? inverse_variance / (1.0 + inverse_variance * extra[p]) : 0.0;
        const double clean = w > 0.0 ? f[p] : 0.0;  // ignored pixels may hold NaN
        weight[p] = w;
        clean_flux[p] = clean;
        weighted_flux[p] = w * clean;
        used += w > 0.0 ? 1.0 : 0.0;
      }
      batch.n_used[i] = static_cast<std::int64_t>(used);
    }
    // A for all spectra of the batch by matrix products: (rows, block) weights times the
    // (block, chunk) products theta_k theta_l (l <= k) of a chunk of pairs (k, l), for every
    // block of pixels. The products are formed once per batch, one cache-sized piece
    // (<= 512 KB) at a time; the output chunk (rows, chunk) stays in cache over the pixels.
    constexpr index_t block = 256, pair_chunk = 256;
    batch.pair_k.resize(n_pairs);
    batch.pair_l.resize(n_pairs);
    for (index_t k = 0, r = 0; k < K; ++k)
      for (index_t l = 0; l <= k; ++l, ++r) {
        batch.pair_k[r] = k;
        batch.pair_l[r] = l;
      }
    RowMatrix& pairs = batch.theta_pairs;
    pairs.resize(std::min(pair_chunk, n_pairs), block);
    RowMatrix a_pairs(rows, n_pairs);
    for (index_t r0 = 0; r0 < n_pairs; r0 += pair_chunk) {
      const index_t nr = std::min(pair_chunk, n_pairs - r0);
      auto a_chunk = a_pairs.middleCols(r0, nr);
      a_chunk.setZero();
      for (index_t p0 = 0; p0 < n_pixels; p0 += block) {
        const index_t nb = std::min(block, n_pixels - p0);
        for (index_t r = 0; r < nr; ++r)
          pairs.row(r).head(nb) = theta_map.row(batch.pair_k[r0 + r]).segment(p0, nb).cwiseProduct(
              theta_map.row(batch.pair_l[r0 + r]).segment(p0, nb));
        a_chunk.noalias() +=
            batch.weights.middleCols(p0, nb) * pairs.topLeftCorner(nr, nb).transpose();
      }
    }
    const RowMatrix b_all = batch.weighted_flux * theta_map.transpose();  // (rows, K)
    batch.a.resize(nbatch);
    batch.b.resize(nbatch);
    batch.c.resize(nbatch);
    for (index_t i = 0; i < nbatch; ++i) {
      Eigen::MatrixXd& a = batch.a[i];
      a.resize(K, K);
      for (index_t k = 0, r = 0; k < K; ++k)
        for (index_t l = 0; l <= k; ++l, ++r) a(k, l) = a(l, k) = a_pairs(i, r);
      batch.b[i] = b_all.row(i).transpose();
      batch.c[i] = batch.weighted_flux.row(i).dot(batch.clean_flux.row(i));
    }
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
      if (!batch.anchored[id] && !with_jacobian) {  // ranking starting points
        batch.a_product.noalias() = a * batch.terms;
        out[i].chi2 = batch.c[id] - 2.0 * batch.b[id].dot(batch.terms) +
                      batch.terms.dot(batch.a_product);
        continue;
      }
      bool exact = !batch.anchored[id];
      if (!exact) {
        batch.dv = batch.terms - batch.anchor_terms[id];
        batch.a_product.noalias() = a * batch.dv;
        out[i].chi2 = batch.anchor_chi2[id] - 2.0 * batch.anchor_theta_wr[id].dot(batch.dv) +
                      batch.dv.dot(batch.a_product);
        batch.theta_wr = batch.anchor_theta_wr[id] - batch.a_product;
        exact = !(out[i].chi2 >= 1e-3 * batch.anchor_chi2[id]);  // also when NaN
      }
      if (exact) {
        // residuals, chi2 and theta^T W r in one sweep over theta: both products use a block
        // of theta while it is in cache (theta of a 17-label model is 12 MB)
        constexpr index_t sweep = 512;
        const Eigen::Map<const RowMatrix> theta_map(theta_t, K, n_pixels);
        batch.theta_wr.setZero(K);
        batch.resid.resize(sweep);
        batch.wresid.resize(sweep);
        double chi2 = 0.0;
        for (index_t p0 = 0; p0 < n_pixels; p0 += sweep) {
          const index_t nb = std::min(sweep, n_pixels - p0);
          const auto theta_block = theta_map.middleCols(p0, nb);
          auto resid = batch.resid.head(nb);
          auto wresid = batch.wresid.head(nb);
          resid.noalias() = batch.clean_flux.row(id).segment(p0, nb).transpose() -
                            theta_block.transpose() * batch.terms;
          wresid = batch.weights.row(id).segment(p0, nb).transpose().cwiseProduct(resid);
          chi2 += wresid.dot(resid);
          batch.theta_wr.noalias() += theta_block * wresid;
        }
        out[i].chi2 = chi2;
        batch.anchored[id] = 1;
        batch.anchor_terms[id] = batch.terms;
        batch.anchor_theta_wr[id] = batch.theta_wr;
        batch.anchor_chi2[id] = out[i].chi2;
      }
      if (!with_jacobian) continue;
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
