// The Cannon's spectral model f(x) = theta . v(x) as a "spectrum model" for the LM driver,
// and the batched prediction kernel built on it.
#pragma once

#include <algorithm>
#include <vector>

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <Eigen/Eigenvalues>

#include "common.hpp"
#include "gemm.hpp"
#include "lm.hpp"
#include "polynomial.hpp"

namespace starlabel {

namespace detail {

// Rows x 8 outputs of ordered_product: a points at the first row's depth entries, b and out
// at the first pixel.
template <index_t Rows>
inline void ordered_tile(const double* a, index_t lda, index_t depth, const double* b,
                         index_t ldb, double* out, index_t ldo) {
  double acc[Rows][8] = {};
  for (index_t k = 0; k < depth; ++k) {
    const double* bk = b + k * ldb;
    for (index_t r = 0; r < Rows; ++r) {
      const double ar = a[r * lda + k];
#pragma omp simd
      for (index_t j = 0; j < 8; ++j) acc[r][j] += ar * bk[j];
    }
  }
  for (index_t r = 0; r < Rows; ++r)
    for (index_t j = 0; j < 8; ++j) out[r * ldo + j] = acc[r][j];
}

inline void ordered_rows(const double* a, index_t lda, index_t n, index_t depth,
                         const double* b, index_t ldb, double* out, index_t ldo) {
  index_t i = 0;
  for (; i + 4 <= n; i += 4) ordered_tile<4>(a + i * lda, lda, depth, b, ldb, out + i * ldo, ldo);
  for (; i < n; ++i) ordered_tile<1>(a + i * lda, lda, depth, b, ldb, out + i * ldo, ldo);
}

}  // namespace detail

// out (n, nb) = a (n, depth) . b (depth, nb), all row-major with leading dimensions lda, ldb,
// ldo. Every output element is one multiply-add per k, in order k = 0 .. depth - 1, whatever
// n and the row's position, so a row's result never depends on the other rows (a library
// GEMM's blocking, and so its sums, depends on the shape). Four rows share each load of b,
// and their strips of 8 pixels stay in registers over the whole depth. The last nb % 8
// pixels go through the same 8-wide tiles on a zero-padded copy (pad: scratch): a scalar
// loop would contract a * b + c into a fused multiply-add differently from the vector one.
inline void ordered_product(const double* a, index_t lda, index_t n, index_t depth,
                            const double* b, index_t ldb, index_t nb, double* out, index_t ldo,
                            std::vector<double>& pad) {
  constexpr index_t W = 8;
  index_t q = 0;
  for (; q + W <= nb; q += W) detail::ordered_rows(a, lda, n, depth, b + q, ldb, out + q, ldo);
  const index_t w = nb - q;
  if (w == 0) return;
  pad.assign((depth + n) * W, 0.0);  // depth rows of b's last pixels, then n rows of output
  double* b_pad = pad.data();
  double* out_pad = pad.data() + depth * W;
  for (index_t k = 0; k < depth; ++k) std::copy_n(b + k * ldb + q, w, b_pad + k * W);
  detail::ordered_rows(a, lda, n, depth, b_pad, W, out_pad, W);
  for (index_t i = 0; i < n; ++i) std::copy_n(out_pad + i * W, w, out + i * ldo + q);
}

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
    std::vector<double> pad;
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

  // Flux (and Jacobians) of many parameter vectors on pixels [p0, p1) as products: terms
  // (n, n_terms) . theta_t block, and per label the derivative values times the gathered
  // theta rows of the terms containing that label. Each block of theta is read once for all
  // n spectra instead of once per spectrum. The products are ordered_product's, whose sums
  // do not depend on n: a spectrum's result must not depend on which others are active.
  //   flux_out (n, p1 - p0); jac_out (n, n_params, p1 - p0) or null
  void evaluate_many(const std::vector<State>& states, index_t n, index_t p0, index_t p1,
                     ManyScratch& scratch, double* flux_out, double* jac_out) const {
    const index_t K = poly.n_terms, nb = p1 - p0, np = poly.n_labels;
    scratch.terms.resize(n, K);
    for (index_t i = 0; i < n; ++i)
      scratch.terms.row(i) = Eigen::Map<const Eigen::RowVectorXd>(states[i].terms.data(), K);
    ordered_product(scratch.terms.data(), K, n, K, theta_t + p0, n_pixels, nb, flux_out, nb,
                    scratch.pad);
    if (jac_out == nullptr) return;
    for (index_t a = 0; a < np; ++a) {
      const auto& ds = label_derivs[a];
      const index_t m = static_cast<index_t>(ds.size());
      double* jac_a = jac_out + a * nb;  // rows i at jac_a + i * np * nb
      if (m == 0) {
        for (index_t i = 0; i < n; ++i) std::fill_n(jac_a + i * np * nb, nb, 0.0);
        continue;
      }
      scratch.deriv.resize(n, m);
      for (index_t i = 0; i < n; ++i)
        for (index_t r = 0; r < m; ++r) scratch.deriv(i, r) = states[i].deriv[ds[r]];
      ordered_product(scratch.deriv.data(), m, n, m, theta_by_label[a].data() + p0, n_pixels, nb,
                      jac_a, np * nb, scratch.pad);
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

// Index tables of chi2 as a polynomial in the labels, built by starlabel/_chi2_polynomial.py
// (its docstring has the algebra) and checked by the binding. Row-major int64 arrays:
//   parent        (n_monomials, 2)  (p, a): x^m = x^p * x_a, p < m; row 0 is the constant
//   pair_monomial (n_terms, n_terms) the monomial of v_k v_l; (0, 0) is 0
//   grad_basis    (n_grad_basis,)    monomials whose values the gradient needs
//   grad_entries  (n_grad_entries, 4) (label a, basis column j, monomial m, factor):
//                 d chi2 / dx_a += factor * c_m * x^grad_basis[j]
//   hess_basis, hess_entries         the same for d2 chi2 / dx_a dx_b, row r numbering the
//                 label pairs a <= b in row-major order
struct Chi2PolynomialTables {
  index_t n_monomials = 0, n_grad_basis = 0, n_grad_entries = 0, n_hess_basis = 0,
          n_hess_entries = 0;
  const std::int64_t* parent = nullptr;
  const std::int64_t* pair_monomial = nullptr;
  const std::int64_t* grad_basis = nullptr;
  const std::int64_t* grad_entries = nullptr;
  const std::int64_t* hess_basis = nullptr;
  const std::int64_t* hess_entries = nullptr;
};

// h if its Cholesky factorization succeeds (or it is not finite: the fit reports that),
// else h with its eigenvalues replaced by their magnitudes (at least 1e-12 of the largest):
// a Newton Hessian made into a metric in which the LM step goes downhill.
inline Eigen::MatrixXd positive_definite(const Eigen::MatrixXd& h) {
  if (!h.allFinite()) return h;
  const Eigen::LLT<Eigen::MatrixXd> llt(h);
  if (llt.info() == Eigen::Success) return h;
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eigen(h);
  Eigen::VectorXd values = eigen.eigenvalues().cwiseAbs();
  values = values.cwiseMax(1e-12 * values.maxCoeff());
  return eigen.eigenvectors() * values.asDiagonal() * eigen.eigenvectors().transpose();
}

// Label fits on chi2 as a polynomial in the labels: chi2(x) = sum_m c_m x^m over the
// monomials m of the products v_k v_l (see Chi2PolynomialTables). The coefficients of all
// spectra of a batch come from one matrix product, (spectra, pixels) weights times
// (pixels, monomials) sums of theta_k theta_l, which is 2.5x fewer operations than the Gram
// matrices theta^T W theta (17 labels: 5985 monomials against 14706 pairs) and needs no
// per-spectrum pass. After that an LM step costs O(n_monomials), independent of the pixels:
// chi2 = c . x^m, and its gradient and Hessian are products of two per-spectrum matrices
// (built once from c) with monomial values. The step uses the polynomial's Newton Hessian,
// made positive definite where it is not (positive_definite below); the reported chi2 and
// covariance come from an exact pass over the pixels at the solution (finish()).
// chi2 is a sum of terms of the size of f^T W f, so it keeps ~16 - 2 log10(S/N) digits:
// 12 at S/N 100, far below the LM's stopping threshold ftol = 1e-8.
//
//   theta_t  (n_terms, n_pixels) row-major (theta transposed, so products run along pixels),
//            finite (0 at untrained pixels, whose s2 is inf)
//   flux, ivar (n_spectra, n_pixels); s2 (n_pixels,)
struct CannonPolynomialObjective {
  using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

  const Polynomial& poly;
  const Chi2PolynomialTables& tables;
  const double* theta_t;
  const double* flux;
  const double* ivar;
  const double* s2;
  index_t n_pixels, n_spectra_total;
  // the pairs (k, l), l <= k, grouped by their monomial: pairs [pair_start[m], pair_start[m+1])
  std::vector<index_t> pair_start, pair_k, pair_l;
  // the Hessian entries of the terms themselves: d2 v_term / dx dx at packed row `row` is
  // factor * x^hess_basis[column] (for finish())
  struct TermCurvature {
    index_t row, column, term;
    double factor;
  };
  std::vector<TermCurvature> term_curvature;

  struct Batch {
    index_t s0 = 0;
    std::vector<Eigen::VectorXd> coef;                    // per spectrum (n_monomials,)
    std::vector<RowMatrix> grad_matrix, hess_matrix;      // per spectrum, see evaluate()
    std::vector<std::int64_t> n_used;
    RowMatrix weights, weighted_flux, products, moments;
    Eigen::VectorXd values, basis_values, packed;
    Eigen::MatrixXd hess;
    std::vector<double> powers;
    std::vector<index_t> offsets;
  };

  CannonPolynomialObjective(const Polynomial& poly_in, const Chi2PolynomialTables& tables_in,
                            const double* theta_t_in, const double* flux_in,
                            const double* ivar_in, const double* s2_in, index_t n_pixels_in,
                            index_t n_spectra_in)
      : poly(poly_in), tables(tables_in), theta_t(theta_t_in), flux(flux_in), ivar(ivar_in),
        s2(s2_in), n_pixels(n_pixels_in), n_spectra_total(n_spectra_in) {
    const index_t K = poly.n_terms, M = tables.n_monomials;
    pair_start.assign(M + 1, 0);
    for (index_t k = 0; k < K; ++k)
      for (index_t l = 0; l <= k; ++l) ++pair_start[tables.pair_monomial[k * K + l] + 1];
    for (index_t m = 0; m < M; ++m) pair_start[m + 1] += pair_start[m];
    pair_k.resize(pair_start[M]);
    pair_l.resize(pair_start[M]);
    std::vector<index_t> next(pair_start.begin(), pair_start.end() - 1);
    for (index_t k = 0; k < K; ++k)
      for (index_t l = 0; l <= k; ++l) {
        const index_t r = next[tables.pair_monomial[k * K + l]]++;
        pair_k[r] = k;
        pair_l[r] = l;
      }
    std::vector<index_t> monomial_term(M, -1);  // v_k is the monomial of v_k v_0
    for (index_t k = 0; k < K; ++k) monomial_term[tables.pair_monomial[k * K]] = k;
    for (index_t e = 0; e < tables.n_hess_entries; ++e) {
      const std::int64_t* entry = tables.hess_entries + 4 * e;
      const index_t term = monomial_term[entry[2]];
      if (term >= 0) term_curvature.push_back({entry[0], entry[1], term, static_cast<double>(entry[3])});
    }
  }

  index_t n_params() const { return poly.n_labels; }
  index_t n_spectra() const { return n_spectra_total; }

  static constexpr index_t product_rows = 16;
  // spectra padded to whole groups of product_rows (see begin_batch)
  static index_t padded_rows(index_t n) {
    return (n + product_rows - 1) / product_rows * product_rows;
  }

  void begin_batch(index_t s0, index_t s1, Batch& batch) const {
    batch.s0 = s0;
    const index_t K = poly.n_terms, L = poly.n_labels, M = tables.n_monomials;
    const index_t nbatch = s1 - s0;
    const Eigen::Map<const RowMatrix> theta_map(theta_t, K, n_pixels);
    batch.n_used.assign(nbatch, 0);
    // The matrix products below run on whole groups of product_rows spectra, the rows past
    // the batch zero: how Eigen's kernels sum a row depends on the row count, and a spectrum's
    // result must not depend on how many others share its batch (a survey fitted in pieces
    // equals the survey fitted whole).
    const index_t rows = padded_rows(nbatch);
    batch.weights.setZero(rows, n_pixels);
    batch.weighted_flux.setZero(rows, n_pixels);
    std::vector<double> flux_energy(nbatch);  // f^T W f
    for (index_t i = 0; i < nbatch; ++i) {
      const double* f = flux + (s0 + i) * n_pixels;
      const double* iv = ivar + (s0 + i) * n_pixels;
      const double* extra = s2;  // local pointers: no reload per pixel
      double* weight = batch.weights.row(i).data();
      double* weighted_flux = batch.weighted_flux.row(i).data();
      double used = 0.0, energy = 0.0;  // counted in double (exact below 2^53): an integer count keeps GCC scalar
#pragma omp simd reduction(+ : used, energy)
      for (index_t p = 0; p < n_pixels; ++p) {
        const double inverse_variance = iv[p];
        const double w =
            inverse_variance > 0.0 ? inverse_variance / (1.0 + inverse_variance * extra[p]) : 0.0;
        const double clean = w > 0.0 ? f[p] : 0.0;  // ignored pixels may hold NaN
        weight[p] = w;
        weighted_flux[p] = w * clean;
        energy += w * clean * clean;
        used += w > 0.0 ? 1.0 : 0.0;
      }
      batch.n_used[i] = static_cast<std::int64_t>(used);
      flux_energy[i] = energy;
    }
    // The moments sum_p w_p sum_{(k,l) at m} theta_k theta_l for all spectra of the batch:
    // (rows, block) weights times the (block, chunk) sums of theta-row products of a chunk of
    // monomials, for every block of pixels. The sums are formed once per batch, one
    // cache-sized piece (<= 512 KB) at a time; the output chunk (rows, chunk) stays in cache
    // over the pixels. The sums are the left operand of Eigen's kernel: a chunk that is a
    // multiple of its 24-row AVX-512 panel leaves no partial panel (17 labels, 1000 spectra,
    // 2 threads, alternating: 2.5 -> 2.1-2.3 ms per spectrum against a chunk of 256).
    constexpr index_t block = 256, chunk = 240;
    RowMatrix& products = batch.products;
    products.resize(std::min(chunk, M), block);
    batch.moments.resize(rows, M);
    for (index_t m0 = 0; m0 < M; m0 += chunk) {
      const index_t nm = std::min(chunk, M - m0);
      auto moments = batch.moments.middleCols(m0, nm);
      moments.setZero();
      for (index_t p0 = 0; p0 < n_pixels; p0 += block) {
        const index_t nb = std::min(block, n_pixels - p0);
        for (index_t m = m0; m < m0 + nm; ++m) {
          double* out = products.row(m - m0).data();
          std::fill(out, out + nb, 0.0);
          for (index_t r = pair_start[m]; r < pair_start[m + 1]; ++r) {
            const double* tk = theta_t + pair_k[r] * n_pixels + p0;
            const double* tl = theta_t + pair_l[r] * n_pixels + p0;
            const double twice = pair_k[r] == pair_l[r] ? 1.0 : 2.0;  // v_k v_l and v_l v_k
            for (index_t j = 0; j < nb; ++j) out[j] += twice * tk[j] * tl[j];
          }
        }
        add_product(moments, batch.weights.middleCols(p0, nb),
                    products.topLeftCorner(nm, nb).transpose());
      }
    }
    const RowMatrix b_all = batch.weighted_flux * theta_map.transpose();  // (rows, K)
    const index_t n_pairs = L * (L + 1) / 2;
    batch.coef.resize(nbatch);
    batch.grad_matrix.resize(nbatch);
    batch.hess_matrix.resize(nbatch);
    for (index_t i = 0; i < nbatch; ++i) {
      Eigen::VectorXd& coef = batch.coef[i];
      coef = batch.moments.row(i).transpose();
      for (index_t k = 0; k < K; ++k) coef[tables.pair_monomial[k * K]] -= 2.0 * b_all(i, k);
      coef[0] += flux_energy[i];
      scatter(tables.grad_entries, tables.n_grad_entries, coef, L, tables.n_grad_basis,
              batch.grad_matrix[i]);
      scatter(tables.hess_entries, tables.n_hess_entries, coef, n_pairs, tables.n_hess_basis,
              batch.hess_matrix[i]);
    }
  }

  // out (n_rows, n_columns) with factor * coef[m] added at (row, column) for each entry
  static void scatter(const std::int64_t* entries, index_t n_entries, const Eigen::VectorXd& coef,
                      index_t n_rows, index_t n_columns, RowMatrix& out) {
    out.setZero(n_rows, n_columns);
    for (index_t e = 0; e < n_entries; ++e) {
      const std::int64_t* entry = entries + 4 * e;
      out(entry[0], entry[1]) += static_cast<double>(entry[3]) * coef[entry[2]];
    }
  }

  // chi2 of spectrum s0 + ids[i] at xs[i]; with the Jacobian also grad = -1/2 d chi2 / dx and
  // hess = 1/2 d2 chi2 / dx2 made positive definite (the LM's J^T W r and J^T W J slots)
  void evaluate(Batch& batch, const std::vector<index_t>& ids, const std::vector<const double*>& xs,
                bool with_jacobian, std::vector<NormalEquations>& out) const {
    out.resize(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const index_t id = ids[i];
      monomial_values(xs[i], batch.values);
      out[i].chi2 = batch.coef[id].dot(batch.values);
      out[i].n_used = batch.n_used[id];
      if (!with_jacobian) continue;
      gather(tables.grad_basis, tables.n_grad_basis, batch.values, batch.basis_values);
      out[i].grad.noalias() = -0.5 * (batch.grad_matrix[id] * batch.basis_values);
      half_hessian(batch, id);
      unpack(batch.packed, batch.hess);
      out[i].hess = positive_definite(batch.hess);
    }
  }

  // chi2 and the Gauss-Newton normal equations at the solutions. One sweep over the pixels
  // gives the exact residuals' chi2 and g = theta^T W r; then J^T W r = D^T g and, since
  // 1/2 d2 chi2 / dx_a dx_b = (J^T W J)_ab - sum_k g_k d2 v_k / dx_a dx_b, J^T W J is the
  // polynomial's Hessian plus that sum (a few entries: only terms of degree >= 2 have one).
  void finish(Batch& batch, const std::vector<index_t>& ids, const std::vector<const double*>& xs,
              std::vector<NormalEquations>& out) const {
    const index_t K = poly.n_terms, L = poly.n_labels;
    const index_t n = static_cast<index_t>(ids.size());
    const Eigen::Map<const RowMatrix> theta_map(theta_t, K, n_pixels);
    out.resize(n);
    // all spectra's terms, then residuals, chi2 and g in one sweep over theta by matrix
    // products on blocks of theta while in cache (theta of a 17-label model is 12 MB);
    // zero rows pad the products as in begin_batch
    const index_t rows = padded_rows(n);
    RowMatrix terms = RowMatrix::Zero(rows, K), deriv(n, poly.n_deriv());
    for (index_t i = 0; i < n; ++i)
      poly.evaluate(xs[i], terms.row(i).data(), deriv.row(i).data(), batch.powers, batch.offsets);
    constexpr index_t sweep = 512;
    RowMatrix& resid = batch.products;  // (rows, sweep): model flux in, weighted residual out
    resid.resize(rows, sweep);
    RowMatrix theta_wr = RowMatrix::Zero(rows, K);
    std::vector<double> chi2(n, 0.0);
    for (index_t p0 = 0; p0 < n_pixels; p0 += sweep) {
      const index_t nb = std::min(sweep, n_pixels - p0);
      const auto theta_block = theta_map.middleCols(p0, nb);
      auto block = resid.leftCols(nb);
      block.noalias() = terms * theta_block;
      for (index_t i = 0; i < n; ++i) {
        const double* f = flux + (batch.s0 + ids[i]) * n_pixels + p0;
        const double* weight = batch.weights.row(ids[i]).data() + p0;
        double* r_out = resid.row(i).data();
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (index_t j = 0; j < nb; ++j) {
          const double r = weight[j] > 0.0 ? f[j] - r_out[j] : 0.0;  // ignored pixels may hold NaN
          r_out[j] = weight[j] * r;
          sum += r_out[j] * r;
        }
        chi2[i] += sum;
      }
      theta_wr.noalias() += block * theta_block.transpose();
    }
    for (index_t i = 0; i < n; ++i) {
      const auto g = theta_wr.row(i);
      out[i].chi2 = chi2[i];
      out[i].n_used = batch.n_used[ids[i]];
      out[i].grad.setZero(L);
      for (index_t d = 0; d < poly.n_deriv(); ++d)
        out[i].grad[poly.deriv_label[d]] += deriv(i, d) * g[poly.deriv_term[d]];
      monomial_values(xs[i], batch.values);
      half_hessian(batch, ids[i]);
      for (const TermCurvature& c : term_curvature)
        batch.packed[c.row] += c.factor * g[c.term] * batch.basis_values[c.column];
      unpack(batch.packed, out[i].hess);
    }
  }

 private:
  // values (n_monomials,) = x^m, each monomial its parent times one label
  void monomial_values(const double* x, Eigen::VectorXd& values) const {
    values.resize(tables.n_monomials);
    values[0] = 1.0;
    for (index_t m = 1; m < tables.n_monomials; ++m)
      values[m] = values[tables.parent[2 * m]] * x[tables.parent[2 * m + 1]];
  }

  // batch.packed = 1/2 d2 chi2 / dx_a dx_b (a <= b, row-major) of spectrum `id` at the
  // monomial values in batch.values; batch.basis_values keeps the Hessian basis' values
  void half_hessian(Batch& batch, index_t id) const {
    gather(tables.hess_basis, tables.n_hess_basis, batch.values, batch.basis_values);
    batch.packed.noalias() = 0.5 * (batch.hess_matrix[id] * batch.basis_values);
  }

  // the symmetric (n_labels, n_labels) matrix of a packed upper triangle
  void unpack(const Eigen::VectorXd& packed, Eigen::MatrixXd& out) const {
    const index_t L = poly.n_labels;
    out.resize(L, L);
    for (index_t a = 0, r = 0; a < L; ++a)
      for (index_t b = a; b < L; ++b, ++r) out(a, b) = out(b, a) = packed[r];
  }

  static void gather(const std::int64_t* basis, index_t n, const Eigen::VectorXd& values,
                     Eigen::VectorXd& out) {
    out.resize(n);
    for (index_t j = 0; j < n; ++j) out[j] = values[basis[j]];
  }
};

}  // namespace starlabel
