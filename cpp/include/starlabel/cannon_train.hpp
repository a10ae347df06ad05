// Training The Cannon: per pixel, the maximum-likelihood coefficients theta and intrinsic
// scatter s2 >= 0 under  flux_n ~ N(theta . v_n, 1/ivar_n + s2),  optionally with an L1
// penalty on theta (Casey et al. 2016) and censoring (terms forced to zero per pixel).
//
// Each pixel minimises  sum_n [w_n r_n^2 - ln w_n] + regularization * sum_k'|theta_k|
// with w_n = 1 / (1/ivar_n + s2), r_n = flux_n - theta . v_n, k' the penalized terms.
//
// Where the time goes: the Gram matrices G = sum_n w_n v_n v_n^T of all pixels. Every entry
// of v v^T is a monomial of the labels and many entries share one monomial, so the kernel
// forms the weighted moments of the distinct monomials for a block of pixels with one
// matrix product (pixels x stars) . (stars x monomials) and gathers each Gram from them.
//
// s2: by the envelope theorem the derivative of the profile objective in s2 needs only the
// residuals at theta(s2):  g(s2) = sum_n (w_n^2 r_n^2 - w_n)  (g > 0: the objective still
// falls as s2 grows). Its exact derivative is
//   g'(s2) = sum_n (w_n^2 - 2 w_n^3 r_n^2) + 2 c^T G_A^{-1} c,   c = sum_n w_n^2 r_n v_n,
// over the active terms A, so a bracketed Newton iteration (on (noise + s2)^2 g, which is
// nearly linear) finds the root to full precision in a handful of Gram evaluations;
// s2 = 0 when g(0) <= 0.
//
// The profile objective need not be convex in s2: a few very precise stars can hold a local
// minimum at s2 = 0 while the many imprecise ones give a lower one further out (ivar spanning
// decades within a pixel). So every local minimum found is checked against an upper bound of
// the objective above it (ProfileCheck), and the search restarts where that bound is lower.
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <new>
#include <thread>
#include <vector>

#include "common.hpp"
#include "gemm.hpp"

namespace starlabel {

struct CannonTrainingSet {
  const double* design;            // (n_stars, n_terms) row-major: v_n
  const double* monomials;         // (n_stars, n_monomials) row-major: distinct products v_i v_j
  const std::int64_t* gram_index;  // (n_terms, n_terms): (v v^T)_ij is monomial gram_index[i, j]
  const std::uint8_t* penalized;   // (n_terms,): 1 where the L1 penalty applies
  const std::uint8_t* term_mask;   // (n_pixels, n_terms) or null: 0 forces theta = 0 (censoring)
  const double* flux;              // (n_stars, n_pixels)
  const double* ivar;              // (n_stars, n_pixels), 0 ignores a pixel (flux may be NaN)
  index_t n_stars, n_pixels, n_terms, n_monomials;
};

struct TrainOptions {
  double regularization = 0.0;
  double s2_rtol = 1e-12;      // relative precision of s2
  int s2_max_iter = 100;
  int s2_max_restarts = 3;     // searches restarted from a lower value above a local minimum
  double l1_tol = 1e-12;       // coordinate descent stops when no scaled coefficient moves more
  int l1_max_sweeps = 20000;
  double rcond_min = 1e-13;    // reciprocal condition number below which a pixel is singular
  index_t pixel_block = 256;
};

namespace detail {

using RowMatrixT = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// Gram matrix of the terms `terms` of one pixel, gathered from its moments, with Jacobi
// scaling (d_k = 1/sqrt(G_kk)) because high-order terms make the raw matrix badly scaled.
struct ScaledGram {
  Eigen::MatrixXd g;   // D G D (unit diagonal)
  Eigen::VectorXd d;
  Eigen::LLT<Eigen::MatrixXd> llt;

  void build(const double* moments, const std::int64_t* gram_index, index_t n_terms,
             const std::vector<index_t>& terms) {
    const index_t n = static_cast<index_t>(terms.size());
    g.resize(n, n);
    d.resize(n);
    for (index_t i = 0; i < n; ++i) {
      const double gii = moments[gram_index[terms[i] * n_terms + terms[i]]];
      d[i] = gii > 0.0 ? 1.0 / std::sqrt(gii) : 0.0;
    }
    for (index_t i = 0; i < n; ++i)
      for (index_t j = 0; j < n; ++j)
        g(i, j) = moments[gram_index[terms[i] * n_terms + terms[j]]] * d[i] * d[j];
  }

  bool factor(double rcond_min) {
    if (g.rows() == 0) return true;
    if ((d.array() == 0.0).any()) return false;
    llt.compute(g);
    // A NaN or inf anywhere in the (symmetric) lower triangle of g reaches a later diagonal
    // entry of the factor, so checking that diagonal replaces a check of all of g (Eigen's
    // allFinite on a 171 x 171 Gram was ~5% of 17-label training).
    return llt.info() == Eigen::Success && llt.matrixLLT().diagonal().allFinite() &&
           (conditioned_above(rcond_min) || llt.rcond() >= rcond_min);
  }

  // Whether the reciprocal 1-norm condition number of g is provably >= rcond_min, from the
  // factor L: ||g^-1||_1 <= ||L^-1||_inf ||L^-1||_1, and |L^-1| <= M(L)^-1 entrywise for the
  // comparison matrix M(L) (|L_ii| on the diagonal, -|L_ij| below), whose inverse is >= 0,
  // so ||L^-1||_inf <= max(M(L)^-1 e) and ||L^-1||_1 <= max(M(L)^-T e): two triangular
  // solves. Eigen's estimate of ||g^-1||_1 is a lower bound of it, so where this holds the
  // estimate passes too, and rcond() need not run: its solves were ~12% of a 17-label pass
  // at fixed s2. On the 17-label survey this bound is 3.8e-12 (true rcond 6.6e-5); where it
  // is too loose, rcond() decides as before.
  bool conditioned_above(double rcond_min) const {
    const index_t n = g.rows();
    const auto& l = llt.matrixLLT();  // L in the lower triangle, column-major
    Eigen::VectorXd y = Eigen::VectorXd::Ones(n), z(n);
    for (index_t j = 0; j < n; ++j) {  // M(L) y = e, by columns
      y[j] /= l(j, j);
      y.tail(n - j - 1) += y[j] * l.col(j).tail(n - j - 1).cwiseAbs();
    }
    for (index_t i = n - 1; i >= 0; --i)  // M(L)^T z = e
      z[i] = (1.0 + l.col(i).tail(n - i - 1).cwiseAbs().dot(z.tail(n - i - 1))) / l(i, i);
    const double g_norm = g.cwiseAbs().colwise().sum().maxCoeff();
    return g_norm * y.maxCoeff() * z.maxCoeff() * rcond_min <= 1.0;
  }

  // x = G^{-1} b (unscaled), for b and x over `terms`.
  Eigen::VectorXd solve(const Eigen::VectorXd& b) const {
    if (g.rows() == 0) return Eigen::VectorXd();
    return d.asDiagonal() * llt.solve(d.asDiagonal() * b);
  }
};

// Lasso by cyclic coordinate descent on the scaled Gram:
//   minimise u^T G u - 2 b^T u + regularization * sum_k penalized_k d_k |u_k|,  theta = d u.
// `theta` holds the warm start on entry and the solution on exit (over `terms`).
// A single pixel can take ~10^4 sweeps, so the interrupt is checked between sweeps too.
inline bool solve_lasso(const ScaledGram& gram, const Eigen::VectorXd& b, const std::uint8_t* penalized,
                        const std::vector<index_t>& terms, double regularization,
                        const TrainOptions& opt, Eigen::VectorXd& theta,
                        Interrupt* interrupt = nullptr) {
  const index_t n = gram.g.rows();
  Eigen::VectorXd bs = gram.d.cwiseProduct(b);
  Eigen::VectorXd u(n);
  for (index_t k = 0; k < n; ++k) u[k] = gram.d[k] > 0.0 ? theta[k] / gram.d[k] : 0.0;
  Eigen::VectorXd q = gram.g * u;  // kept equal to G u
  for (int sweep = 0; sweep < opt.l1_max_sweeps; ++sweep) {
    if (sweep % 64 == 63 && interrupted(interrupt)) break;
    double largest_move = 0.0, largest_u = 0.0;
    for (index_t k = 0; k < n; ++k) {
      const double rho = bs[k] - (q[k] - u[k]);  // G_kk = 1 after scaling
      const double half_penalty = penalized[terms[k]] ? 0.5 * regularization * gram.d[k] : 0.0;
      const double u_new = rho > half_penalty ? rho - half_penalty
                         : rho < -half_penalty ? rho + half_penalty : 0.0;
      const double move = u_new - u[k];
      if (move != 0.0) {
        q += move * gram.g.col(k);
        u[k] = u_new;
      }
      largest_move = std::max(largest_move, std::abs(move));
      largest_u = std::max(largest_u, std::abs(u_new));
    }
    if (largest_move <= opt.l1_tol * std::max(1.0, largest_u)) {
      theta = gram.d.cwiseProduct(u);
      return true;
    }
  }
  theta = gram.d.cwiseProduct(u);
  return false;
}

// Is there a lower value of the profile objective F above a local minimum s2_found?
// Holding theta at theta(s2_found) gives an upper bound of F that is F itself at s2_found:
//   F(s) - F(s2_found) <= G(s) - F(s2_found) = sum_n [(w_n(s) - w_n(s2_found)) r_n^2 + ln t_n],
//   t_n = w_n(s2_found) / w_n(s) = (1 + ivar_n s) / (1 + ivar_n s2_found) >= 1  (s > s2_found).
// It is evaluated on a grid from the largest r_n^2 (above which every term of G grows) down in
// factors of 4, and can only prove that a lower value exists, never that none does. The logs
// are taken of products of 8 ratios 1/t_n <= 1 (only underflow can spoil a product, and then
// the ratios are logged one by one).
struct ProfileCheck {
  static constexpr int n_grid = 12;
  static constexpr double tolerance = 1e-8;  // per star: a bound must be below -tolerance * n_used
  Eigen::ArrayXd one_found, wr2_found, inv_ratio;

  // The grid s2 with the most negative bound, or NaN when no bound is below -tolerance.
  //   ivar, resid (n_stars,): a pixel's ivar (0 ignores a star) and residuals at s2_found
  double lower_point(const double* ivar, const double* resid, index_t n_stars, double s2_found) {
    const Eigen::Map<const Eigen::ArrayXd> iv(ivar, n_stars), r(resid, n_stars);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    const double top = (iv > 0.0).select(r.square(), 0.0).maxCoeff();
    if (!(top > 0.0 && top < std::numeric_limits<double>::infinity())) return nan;
    one_found = 1.0 + iv * s2_found;
    wr2_found = iv * r.square() / one_found;
    const index_t n8 = n_stars / 8;
    double lowest = -tolerance * static_cast<double>((iv > 0.0).count()), s2_lower = nan;
    for (int k = 0; k < n_grid; ++k) {
      const double s2 = s2_found + std::ldexp(top, -2 * k);
      inv_ratio = one_found / (1.0 + iv * s2);  // 1 / t_n = w_n(s) / w_n(s2_found)
      // ln t >= 1 - 1/t gives a lower bound of the bound without logs: most grid points
      // (all of them in a survey's pixels) stop here
      if (((wr2_found - 1.0) * (inv_ratio - 1.0)).sum() >= lowest) continue;
      const Eigen::Map<const Eigen::ArrayXXd> q(inv_ratio.data(), n8, 8);
      double log_sum = -(q.col(0) * q.col(1) * q.col(2) * q.col(3) * q.col(4) * q.col(5) *
                         q.col(6) * q.col(7)).log().sum() -
                       inv_ratio.tail(n_stars - 8 * n8).log().sum();
      if (!std::isfinite(log_sum)) log_sum = -inv_ratio.log().sum();
      const double bound = (wr2_found * (inv_ratio - 1.0)).sum() + log_sum;
      if (bound < lowest) {
        lowest = bound;
        s2_lower = s2;
      }
    }
    return s2_lower;
  }
};

// F(s2) = sum_n [w_n r_n^2 - ln w_n] + regularization * sum_k' |theta_k| at theta = theta(s2).
inline double profile_value(const double* ivar, const double* resid, index_t n_stars, double s2,
                            const Eigen::VectorXd& theta, const std::vector<index_t>& terms,
                            const std::uint8_t* penalized, double regularization) {
  double value = 0.0;
  for (index_t n = 0; n < n_stars; ++n)
    if (ivar[n] > 0.0)
      value += ivar[n] / (1.0 + ivar[n] * s2) * resid[n] * resid[n] + std::log1p(ivar[n] * s2) -
               std::log(ivar[n]);
  for (std::size_t i = 0; i < terms.size(); ++i)
    if (penalized[terms[i]]) value += regularization * std::abs(theta[i]);
  return value;
}

// Where one pixel stands in the search for its s2.
struct PixelSearch {
  index_t pixel = 0;                 // index within the block
  double s2 = 0.0, lo = 0.0, hi = std::numeric_limits<double>::infinity(), guess = 0.0;
  double noise = 0.0;                // typical noise variance 1/mean(ivar): Newton's scale
  int n_eval = 0;
  bool done = false;
  std::int8_t status = PIXEL_OK;
  std::vector<index_t> free_terms;   // terms not censored at this pixel
  Eigen::VectorXd theta;             // over free_terms

  // After ProfileCheck found a lower value at s2 above the local minimum `best_*`:
  //   RESTART  s2 is that point; its g says on which side of it a lower minimum lies;
  //   SEEK     F(hi) < F(floor) and g(hi) < 0, so F falls somewhere in (floor, hi): bisect
  //            for a point with g > 0, which with hi brackets a lower minimum.
  enum Phase : std::int8_t { SEARCH, RESTART, SEEK } phase = SEARCH;
  int restarts = 0;
  double floor = 0.0, f_hi = 0.0;
  double best_s2 = 0.0, best_f = 0.0;
  Eigen::VectorXd best_theta;

  void keep_best() {
    s2 = best_s2;
    theta = best_theta;
    done = true;
  }

  // The search fails with `failure`; during a restart the minimum found stands instead.
  void stop(std::int8_t failure) {
    if (restarts > 0) {
      keep_best();
    } else {
      status = failure;
      done = true;
    }
  }
};

}  // namespace detail

// Train every pixel.
//   fixed_s2   (n_pixels,) or null: use these s2 instead of optimizing them
//   theta_out  (n_pixels, n_terms)   NaN where status != PIXEL_OK
//   s2_out     (n_pixels,)           +inf where status is TOO_FEW_STARS or SINGULAR
//   status_out (n_pixels,)           PixelStatus
// Pixels are processed in fixed blocks, so results do not depend on the number of threads.
// interrupt (or null): when it fires, remaining work is skipped and the outputs are incomplete.
inline void train_cannon(const CannonTrainingSet& data, const double* fixed_s2,
                         const TrainOptions& opt, int n_threads, double* theta_out, double* s2_out,
                         std::int8_t* status_out, Interrupt* interrupt = nullptr) {
  using detail::RowMatrixT;
  const index_t N = data.n_stars, P = data.n_pixels, K = data.n_terms, M = data.n_monomials;
  const index_t n_blocks = (P + opt.pixel_block - 1) / opt.pixel_block;
  const bool lasso = opt.regularization > 0.0;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const Eigen::Map<const RowMatrixT> design(data.design, N, K);
  std::atomic<bool> failed{false};
  std::atomic<index_t> blocks_left{n_blocks};
  // The moments of every block and s2 step are products with the same monomials, the left
  // operand of Eigen's kernel (moments^T = monomials^T w): packed once here, not by every
  // product (that repacking was 8% of a 17-label pass). Costs a copy of the monomials.
  PackedMatrix<double, Eigen::ColMajor> packed_monomials;
  packed_monomials.reset(M, N, M, opt.pixel_block);

#pragma omp parallel num_threads(resolve_threads(n_threads))
  {
  packed_monomials.pack(data.monomials, M);
  // Per-thread storage for the block's matrices, allocated once: allocating them per block
  // and per s2 step (the moments alone are pixels x monomials, 12 MB at 17 labels) made the
  // kernel fault in fresh pages, ~6% of 17-label training.
  using ColMap = Eigen::Map<Eigen::MatrixXd>;
  using RowMap = Eigen::Map<RowMatrixT>;
  const index_t most = std::min(opt.pixel_block, P);
  std::vector<double> flux_store, ivar_store, w_store, wflux_store, resid_store, w2resid_store,
      moments_store, rhs_store, coef_store, c_store;
  detail::ProfileCheck check;
#pragma omp for schedule(dynamic, 1) nowait
  for (index_t block = 0; block < n_blocks; ++block) {
    struct Done {  // counted however the block ends
      std::atomic<index_t>& left;
      ~Done() { --left; }
    } done{blocks_left};
    if (failed || interrupted(interrupt)) continue;
    try {  // an exception must not leave an OpenMP loop body
      const index_t p0 = block * opt.pixel_block, p1 = std::min(p0 + opt.pixel_block, P);
      const index_t nb = p1 - p0;

      // This block's flux and ivar, one contiguous column per pixel; flux of ignored
      // pixels set to 0 so that it never reaches the arithmetic as NaN.
      for (auto* store : {&flux_store, &ivar_store, &w_store, &wflux_store, &resid_store,
                          &w2resid_store})
        store->resize(N * most);
      moments_store.resize(most * M);
      for (auto* store : {&rhs_store, &coef_store, &c_store}) store->resize(most * K);
      ColMap flux(flux_store.data(), N, nb), ivar(ivar_store.data(), N, nb);
      for (index_t n = 0; n < N; ++n)
        for (index_t j = 0; j < nb; ++j) {
          const double iv = data.ivar[n * P + p0 + j];
          ivar(n, j) = iv;
          flux(n, j) = iv > 0.0 ? data.flux[n * P + p0 + j] : 0.0;
        }

      std::vector<detail::PixelSearch> search(nb);
      for (index_t j = 0; j < nb; ++j) {
        detail::PixelSearch& ps = search[j];
        ps.pixel = j;
        for (index_t k = 0; k < K; ++k)
          if (!data.term_mask || data.term_mask[(p0 + j) * K + k]) ps.free_terms.push_back(k);
        ps.theta = Eigen::VectorXd::Zero(static_cast<index_t>(ps.free_terms.size()));
        const index_t n_used = (ivar.col(j).array() > 0.0).count();
        if (n_used < static_cast<index_t>(ps.free_terms.size())) {
          ps.status = PIXEL_TOO_FEW_STARS;
          ps.done = true;
        }
        ps.s2 = fixed_s2 ? fixed_s2[p0 + j] : 0.0;
      }

      std::vector<detail::PixelSearch*> live;
      detail::ScaledGram gram;
      while (!interrupted(interrupt)) {
        live.clear();
        for (auto& ps : search)
          if (!ps.done) live.push_back(&ps);
        if (live.empty()) break;
        const index_t na = static_cast<index_t>(live.size());

        ColMap w(w_store.data(), N, na), wflux(wflux_store.data(), N, na);
        ColMap resid(resid_store.data(), N, na), w2resid(w2resid_store.data(), N, na);
        RowMap moments(moments_store.data(), na, M), rhs(rhs_store.data(), na, K);
        RowMap coef(coef_store.data(), na, K), c(c_store.data(), na, K);
        for (index_t j = 0; j < na; ++j) {
          const index_t pj = live[j]->pixel;
          const double s2 = live[j]->s2;
          for (index_t n = 0; n < N; ++n) {
            const double iv = ivar(n, pj);
            w(n, j) = iv > 0.0 ? iv / (1.0 + iv * s2) : 0.0;
            wflux(n, j) = w(n, j) * flux(n, pj);
          }
        }
        moments.setZero();
        packed_monomials.add_product(moments.data(), M, w.data(), N, na, 0);  // (na, M)
        assign_product(rhs, wflux.transpose(), design);      // (na, K)

        // theta at the current s2
        coef.setZero();
        std::vector<char> solved(na, 0);
        for (index_t j = 0; j < na; ++j) {
          detail::PixelSearch& ps = *live[j];
          gram.build(moments.row(j).data(), data.gram_index, K, ps.free_terms);
          Eigen::VectorXd b(ps.free_terms.size());
          for (std::size_t i = 0; i < ps.free_terms.size(); ++i) b[i] = rhs(j, ps.free_terms[i]);
          if (lasso) {
            solved[j] = (gram.d.array() > 0.0).all() && gram.g.allFinite();
            if (solved[j] && !detail::solve_lasso(gram, b, data.penalized, ps.free_terms,
                                                  opt.regularization, opt, ps.theta, interrupt))
              ps.status = PIXEL_NOT_CONVERGED;
          } else {
            solved[j] = gram.factor(opt.rcond_min);
            if (solved[j]) ps.theta = gram.solve(b);
          }
          for (std::size_t i = 0; i < ps.free_terms.size(); ++i) coef(j, ps.free_terms[i]) = ps.theta[i];
        }

        // residuals, g(s2) and g'(s2): only the search for s2 needs them
        if (!fixed_s2) {
          for (index_t j = 0; j < na; ++j) resid.col(j) = flux.col(live[j]->pixel);
          resid.noalias() -= design * coef.transpose();
          w2resid = w.cwiseProduct(w).cwiseProduct(resid);
          c.noalias() = w2resid.transpose() * design;     // (na, K)
        }

        for (index_t j = 0; j < na; ++j) {
          detail::PixelSearch& ps = *live[j];
          ++ps.n_eval;
          if (!solved[j] || !ps.theta.allFinite()) {
            ps.stop(PIXEL_SINGULAR);
            continue;
          }
          if (ps.restarts > 0 && ps.status == PIXEL_NOT_CONVERGED) {  // L1 failed on the way:
            ps.status = PIXEL_OK;                                     // the minimum found stands
            ps.keep_best();
            continue;
          }
          if (fixed_s2 || ps.status != PIXEL_OK) {
            ps.done = true;
            continue;
          }
          const double* pixel_ivar = &ivar(0, ps.pixel);
          double g = 0.0, gp = 0.0, sum_r2 = 0.0, sum_ivar = 0.0;
          index_t n_used = 0;
          for (index_t n = 0; n < N; ++n) {
            const double wn = w(n, j), r = resid(n, j);
            g += wn * wn * r * r - wn;
            gp += wn * wn - 2.0 * wn * wn * wn * r * r;
            if (pixel_ivar[n] > 0.0) {
              sum_r2 += r * r;
              sum_ivar += pixel_ivar[n];
              ++n_used;
            }
          }
          if (!std::isfinite(g)) {  // w r^2 overflows (absurd flux scales): no usable likelihood
            ps.stop(PIXEL_SINGULAR);
            continue;
          }
          const auto profile_here = [&] {
            return detail::profile_value(pixel_ivar, &resid(0, j), N, ps.s2, ps.theta,
                                         ps.free_terms, data.penalized, opt.regularization);
          };
          const double f = ps.restarts > 0 ? profile_here() : nan;  // F: once minima compete
          // A local minimum at ps.s2: keep it (or the better earlier one), or restart above it.
          const auto finish = [&] {
            if (ps.restarts > 0 && !(f < ps.best_f)) {
              ps.keep_best();
              return;
            }
            if (ps.restarts < opt.s2_max_restarts) {
              const double s2_lower = check.lower_point(pixel_ivar, &resid(0, j), N, ps.s2);
              if (!std::isnan(s2_lower)) {
                ps.best_f = ps.restarts > 0 ? f : profile_here();
                ps.best_s2 = ps.s2;
                ps.best_theta = ps.theta;
                ++ps.restarts;
                ps.phase = detail::PixelSearch::RESTART;
                ps.s2 = s2_lower;
                return;
              }
            }
            ps.done = true;
          };
          if (ps.n_eval == 1) {  // at s2 = 0
            ps.noise = static_cast<double>(n_used) / sum_ivar;
            if (g <= 0.0) {
              finish();
              continue;
            }
            ps.guess = sum_r2 / static_cast<double>(n_used);
            if (!std::isfinite(ps.guess)) {  // as above: no finite bracket for s2
              ps.status = PIXEL_SINGULAR;
              ps.done = true;
              continue;
            }
          } else if (g == 0.0) {
            finish();
            continue;
          } else if (ps.phase == detail::PixelSearch::SEARCH) {
            (g > 0.0 ? ps.lo : ps.hi) = ps.s2;
          } else if (g > 0.0) {  // a lower minimum lies above: bracket it as usual
            ps.lo = ps.s2;
            if (ps.phase == detail::PixelSearch::RESTART)
              ps.hi = std::numeric_limits<double>::infinity();
            ps.phase = detail::PixelSearch::SEARCH;
          } else {  // g < 0 at RESTART or SEEK: bisect (floor, hi) for a point with g > 0
            if (ps.phase == detail::PixelSearch::RESTART) {
              ps.floor = ps.best_s2;
              ps.hi = ps.s2;
              ps.f_hi = f;
              ps.phase = detail::PixelSearch::SEEK;
            } else if (f > ps.f_hi) {
              ps.floor = ps.s2;
            } else {
              ps.hi = ps.s2;
              ps.f_hi = f;
            }
            if (ps.hi - ps.floor <= opt.s2_rtol * ps.hi || ps.n_eval >= opt.s2_max_iter) {
              ps.keep_best();
            } else {
              ps.s2 = 0.5 * (ps.floor + ps.hi);
            }
            continue;
          }
          // The envelope term 2 c^T G_A^{-1} c over the active terms, needed only for a Newton
          // step: most pixels end at s2 = 0 above, without this second Gram factorization.
          std::vector<index_t> active;
          for (std::size_t i = 0; i < ps.free_terms.size(); ++i)
            if (!lasso || ps.theta[i] != 0.0) active.push_back(ps.free_terms[i]);
          gram.build(moments.row(j).data(), data.gram_index, K, active);
          if (gram.factor(0.0)) {
            Eigen::VectorXd ca(active.size());
            for (std::size_t i = 0; i < active.size(); ++i) ca[i] = c(j, active[i]);
            gp += 2.0 * ca.dot(gram.solve(ca));
          } else {
            gp = nan;
          }
          // Newton on G(s2) = u^2 g(s2), u = noise + s2, which has the same root: for equal
          // noise variances G is linear in s2 (one step to the root), so it converges in a
          // few steps where Newton on g itself crawls from s2 = 0.
          const double u = ps.noise + ps.s2;
          const double dG = 2.0 * u * g + u * u * gp;
          const double newton = (dG < 0.0 && std::isfinite(dG)) ? ps.s2 - u * u * g / dG : nan;
          // Newton's own step decides convergence, before the bracket's safeguard: at the
          // root the step is rounding and can land on (or just past) the end of the bracket
          // that this very evaluation set, and bisecting instead crawled back to the root
          // (a 17-label pixel took 41 evaluations, each a pass over its whole block).
          if (std::abs(newton - ps.s2) <= opt.s2_rtol * std::max(newton, ps.s2)) {
            finish();
            continue;
          }
          double next = newton;
          if (std::isfinite(ps.hi)) {
            if (!(next > ps.lo && next < ps.hi)) next = 0.5 * (ps.lo + ps.hi);
          } else if (!(next > ps.lo)) {
            next = ps.lo > 0.0 ? 4.0 * ps.lo : ps.guess;
          }
          if (std::abs(next - ps.s2) <= opt.s2_rtol * std::max(next, ps.s2) ||
              (std::isfinite(ps.hi) && ps.hi - ps.lo <= opt.s2_rtol * ps.hi)) {
            finish();
          } else if (ps.n_eval >= opt.s2_max_iter) {
            ps.stop(PIXEL_NOT_CONVERGED);
          } else {
            ps.s2 = next;
          }
        }
      }

      for (const auto& ps : search) {
        const index_t p = p0 + ps.pixel;
        status_out[p] = ps.status;
        double* theta_row = theta_out + p * K;
        const bool usable = ps.status == PIXEL_OK || ps.status == PIXEL_NOT_CONVERGED;
        std::fill(theta_row, theta_row + K, usable ? 0.0 : nan);
        if (usable)
          for (std::size_t i = 0; i < ps.free_terms.size(); ++i) theta_row[ps.free_terms[i]] = ps.theta[i];
        s2_out[p] = usable ? ps.s2 : std::numeric_limits<double>::infinity();
      }
    } catch (...) {
      failed = true;
    }
  }
  // Only the calling thread can poll, and with dynamic scheduling it may run out of blocks
  // while another thread is still in a long one: it keeps polling until every block is done.
  if (interrupt)
    while (blocks_left > 0 && !interrupt->check())
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (failed) throw std::bad_alloc();
}

}  // namespace starlabel
