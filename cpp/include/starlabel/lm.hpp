// A generic, batched Levenberg-Marquardt fitter for many spectra at once.
//
// The fitter sees a spectrum only through an Objective, which gives chi2 and the
// Gauss-Newton normal equations (J^T W J, J^T W r) at a parameter vector:
//   index_t n_params() const;
//   index_t n_spectra() const;
//   struct Batch;                      per-thread scratch and per-batch precomputations
//   void begin_batch(index_t s0, index_t s1, Batch&) const;   spectra [s0, s1)
//        a thread reuses one Batch for all its batches: begin_batch and evaluate must set
//        whatever they read (buffers keep their capacity from batch to batch)
//   void evaluate(Batch&, const std::vector<index_t>& ids, const std::vector<const double*>& xs,
//                 bool with_jacobian, std::vector<NormalEquations>& out) const;
//        chi2 (and normal equations) of spectrum s0 + ids[i] at parameters xs[i]
//
// and, optionally, when its normal equations only approximate J^T W J (the Cannon's chi2
// polynomial gives Newton's Hessian):
//   void finish(Batch&, ids, xs, std::vector<NormalEquations>& out) const;
//        chi2 and the Gauss-Newton normal equations at the solutions, for the outputs
// PixelObjective below builds one from any per-pixel spectrum model (see its comment);
// a model with cheaper closed forms (the Cannon's chi2 polynomial) supplies its own.
// Spectra are fitted in fixed batches; within a batch all spectra advance in lock step.
// Each spectrum's arithmetic depends only on its own data, so results do not depend on the
// number of threads.
#pragma once

#include <Eigen/Cholesky>
#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "common.hpp"
#include "normal_matrix.hpp"

namespace starlabel {

struct LMOptions {
  int max_iter = 100;          // trial steps per spectrum
  double ftol = 1e-8;          // converged when a Gauss-Newton step would lower chi2 by <= ftol * chi2
  double xtol = 1e-10;         // ... or moves no parameter by more than xtol
  double lambda_init = 1e-3;   // initial Marquardt damping
  double lambda_max = 1e10;    // damping beyond which no decrease is possible: converged
  index_t batch = 16;          // spectra advanced together by one thread
  // Judge trial steps on chi2 alone and form the normal equations only for accepted ones:
  // for models whose Jacobian costs far more than their spectrum (emulators).
  bool jacobian_after_accept = false;
};

// Caller-provided outputs, one row per spectrum.
struct LMOutputs {
  double* params;          // (n_spectra, n_params)
  double* covariance;      // (n_spectra, n_params, n_params)  inverse of J^T W J at the solution
  double* chi2;            // (n_spectra,)
  std::int64_t* n_used;    // (n_spectra,)  pixels with non-zero weight
  std::int32_t* n_iter;    // (n_spectra,)
  std::int8_t* status;     // (n_spectra,)  FitStatus
};

namespace detail {

// chi2 and the normal equations of one parameter vector.
struct NormalEquations {
  double chi2 = 0.0;
  std::int64_t n_used = 0;
  Eigen::MatrixXd hess;   // J^T W J   (n_params, n_params)
  Eigen::VectorXd grad;   // J^T W r   (n_params,)
};

}  // namespace detail

using detail::NormalEquations;

namespace detail {
// Whether a Model can evaluate many parameter vectors at once (see evaluate_many in
// CannonSpectrumModel); PixelObjective then uses it instead of one evaluate() per vector.
template <class M, class = void>
struct evaluates_many : std::false_type {};
template <class M>
struct evaluates_many<M, std::void_t<typename M::ManyScratch>> : std::true_type {};
struct NoScratch {};
template <class O, class = void>
struct has_finish : std::false_type {};
template <class O>
struct has_finish<O, std::void_t<decltype(&O::finish)>> : std::true_type {};
template <class M, bool many>
struct ManyScratchOf {
  using type = NoScratch;
};
template <class M>
struct ManyScratchOf<M, true> {
  using type = typename M::ManyScratch;
};
}  // namespace detail

// The objective of a per-pixel spectrum model:
//   index_t n_params() const;  index_t n_pixels;  struct State;  struct Workspace;
//   void prepare(const std::vector<const double*>& xs, const std::vector<index_t>& rows,
//                bool with_jacobian, Workspace&, std::vector<State>& states) const;
//        everything per parameter vector that does not depend on the pixel, for all the
//        vectors at once (an emulator runs them as one batch); rows[i] is the spectrum (or
//        output row) that xs[i] belongs to; states[i] may point into the workspace until
//        the next prepare()
//   void evaluate(const State&, index_t p0, index_t p1, double* flux_out, double* jac_out) const;
//        flux_out (p1 - p0,), jac_out or null: (p1 - p0, n_params) row-major when
//        jacobian_by_pixel, else (n_params, p1 - p0) row-major
//   static constexpr bool jacobian_by_pixel;  the layout its evaluate() writes fastest
// and, by pixel,
//   index_t block_columns(index_t p0, index_t p1, index_t* columns) const;
//        the parameters (ascending, into columns (n_params,)) whose Jacobian column may be
//        non-zero on pixels [p0, p1), and how many: J^T W J sums only those (a pixel of one
//        continuum segment has no derivative in the others' coefficients)
// Every evaluation sweeps the pixels block by block and all spectra of a batch use a block
// while it is in cache.
//   flux, ivar      (n_spectra, n_pixels)  ivar == 0 ignores a pixel (its flux may be NaN)
//   extra_variance  (n_pixels,) or null    added to 1/ivar (the Cannon's intrinsic scatter s2)
template <class Model>
struct PixelObjective {
  const Model& model;
  const double* flux;
  const double* ivar;
  const double* extra_variance;
  index_t n_spectra_total;
  index_t pixel_block = 256;

  using Vector = Eigen::Map<const Eigen::VectorXd>;
  using RowMatrix =
      Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;

  static constexpr bool many = detail::evaluates_many<Model>::value;
  struct Batch {
    index_t s0 = 0;
    // (batch, n_pixels) square root of the effective inverse variance: residuals and
    // Jacobian rows are weighted by it, so that J^T W J is one product of sqrt(W) J with
    // itself (NormalMatrix, or Eigen's rank-k update) rather than n_params^2 / 2 separate
    // dot products
    std::vector<double> sqrt_weights;
    std::vector<typename Model::State> states;
    typename Model::Workspace workspace;
    std::vector<index_t> rows;
    std::vector<double> model_flux, wresid, jac, wjac;
    // by pixel: per item, [J r]^T W [J r] over the upper triangle, (n_params + 1) square
    std::vector<Eigen::MatrixXd> extended;
    std::vector<index_t> columns;  // a pixel block's columns that may be non-zero
    std::vector<index_t> runs;     // ... as runs of consecutive ones
    Eigen::MatrixXd block_sum;     // their part of [J r]^T W [J r] on the block
    typename detail::ManyScratchOf<Model, many>::type scratch;
  };

  index_t n_params() const { return model.n_params(); }
  index_t n_spectra() const { return n_spectra_total; }

  index_t block_columns(index_t p0, index_t p1, index_t* columns) const {
    if constexpr (Model::jacobian_by_pixel) {
      return model.block_columns(p0, p1, columns);
    } else {
      (void)p0, (void)p1, (void)columns;
      return model.n_params();
    }
  }

  void begin_batch(index_t s0, index_t s1, Batch& batch) const {
    const index_t n_pixels = model.n_pixels;
    batch.s0 = s0;
    batch.sqrt_weights.resize((s1 - s0) * n_pixels);
    const std::vector<double> no_extra(extra_variance ? 0 : n_pixels, 0.0);
    const double* extra = extra_variance ? extra_variance : no_extra.data();
    for (index_t s = s0; s < s1; ++s) {
      const double* iv = ivar + s * n_pixels;  // local pointers: vectorized, no reload
      double* sqrt_weight = batch.sqrt_weights.data() + (s - s0) * n_pixels;
#pragma omp simd
      for (index_t p = 0; p < n_pixels; ++p)
        sqrt_weight[p] = iv[p] > 0.0 ? std::sqrt(iv[p] / (1.0 + iv[p] * extra[p])) : 0.0;
    }
  }

  void evaluate(Batch& batch, const std::vector<index_t>& ids, const std::vector<const double*>& xs,
                bool with_jacobian, std::vector<NormalEquations>& out) const {
    const index_t n_items = static_cast<index_t>(ids.size());
    const index_t np = model.n_params(), n_pixels = model.n_pixels;
    batch.rows.resize(n_items);
    for (index_t i = 0; i < n_items; ++i) batch.rows[i] = batch.s0 + ids[i];
    model.prepare(xs, batch.rows, with_jacobian, batch.workspace, batch.states);
    out.resize(n_items);
    for (index_t i = 0; i < n_items; ++i) {
      out[i].chi2 = 0.0;
      out[i].n_used = 0;
      out[i].hess.setZero(np, np);
      out[i].grad.setZero(np);
    }
    const index_t per_item = many ? n_items : 1;  // evaluate_many fills every item at once
    batch.model_flux.resize(per_item * pixel_block);
    if (with_jacobian) batch.jac.resize(per_item * np * pixel_block);
    batch.wresid.resize(pixel_block);
    // by pixel, the rows of sqrt(W) [J r] are padded for NormalMatrix (at most this long)
    const index_t ld_wjac = Model::jacobian_by_pixel ? NormalMatrix::padded(np + 1) : np;
    if (Model::jacobian_by_pixel && with_jacobian) {
      batch.extended.resize(n_items);
      for (Eigen::MatrixXd& e : batch.extended) e.setZero(np + 1, np + 1);
    }
    if (batch.wjac.size() != std::size_t(ld_wjac * pixel_block))
      batch.wjac.assign(ld_wjac * pixel_block, 0.0);
    double* wjac = batch.wjac.data();
    // item i's weighted residuals on pixels [p0, p0 + nb) into batch.wresid, added to its chi2
    auto residuals = [&](index_t i, index_t p0, index_t nb, const double* model_flux) {
      const double* f = flux + (batch.s0 + ids[i]) * n_pixels + p0;
      const double* sqrt_weight = batch.sqrt_weights.data() + ids[i] * n_pixels + p0;
      // Every value is read and computed, then selected: with the reads inside the condition
      // GCC vectorizes them as masked loads that merge through a stack slot (NaN flux at
      // unused pixels is dropped by the selection either way).
      std::int64_t used = 0;
      for (index_t j = 0; j < nb; ++j) {
        const double sw = sqrt_weight[j], r = sw * (f[j] - model_flux[j]);
        batch.wresid[j] = sw > 0.0 ? r : 0.0;
        used += sw > 0.0;
      }
      out[i].chi2 += Vector(batch.wresid.data(), nb).squaredNorm();
      out[i].n_used += used;
    };
    // The spectra alone (LM's trial steps): item by item, so that each one's flux, weights and
    // model spectrum stream in order (block by block, the jump from item to item missed the
    // cache at every block); each item's sums in the same order as below
    if (!with_jacobian && !many) {
      for (index_t i = 0; i < n_items; ++i)
        for (index_t p0 = 0; p0 < n_pixels; p0 += pixel_block) {
          const index_t nb = std::min(pixel_block, n_pixels - p0);
          model.evaluate(batch.states[i], p0, p0 + nb, batch.model_flux.data(), nullptr);
          residuals(i, p0, nb, batch.model_flux.data());
        }
      return;
    }
    for (index_t p0 = 0; p0 < n_pixels; p0 += pixel_block) {
      const index_t p1 = std::min(p0 + pixel_block, n_pixels), nb = p1 - p0;
      // by pixel: the block's columns, as runs {from, to, length} of J's columns into wjac's
      index_t n_cols = np;
      std::vector<index_t>& runs = batch.runs;
      runs.clear();
      if (Model::jacobian_by_pixel && with_jacobian) {
        batch.columns.resize(np);
        n_cols = block_columns(p0, p1, batch.columns.data());
        const index_t* col = batch.columns.data();
        for (index_t q = 0; q < n_cols; ++q) {
          if (q > 0 && col[q] == col[q - 1] + 1)
            ++runs.back();
          else
            runs.insert(runs.end(), {col[q], q, 1});
        }
      }
      if constexpr (many)
        model.evaluate_many(batch.states, n_items, p0, p1, batch.scratch, batch.model_flux.data(),
                            with_jacobian ? batch.jac.data() : nullptr);
      for (index_t i = 0; i < n_items; ++i) {
        const index_t slot = many ? i : 0;
        const double* model_flux = batch.model_flux.data() + slot * nb;
        double* jac = batch.jac.data() + slot * np * nb;
        if constexpr (!many)
          model.evaluate(batch.states[i], p0, p1, batch.model_flux.data(), with_jacobian ? jac : nullptr);
        residuals(i, p0, nb, model_flux);
        if (!with_jacobian) continue;
        const double* sqrt_weight = batch.sqrt_weights.data() + ids[i] * n_pixels + p0;
        const Vector wresid(batch.wresid.data(), nb);
        // Zero-weight pixels may hold non-finite model derivatives (untrained pixels): drop them.
        if constexpr (Model::jacobian_by_pixel) {  // jac (nb, np), wjac (nb, ld) row-major
          // the block's columns, then the weighted residual as one more column: J^T W r comes
          // with J^T W J, in its last column, instead of from a separate pass over sqrt(W) J
          const index_t ld = NormalMatrix::padded(n_cols + 1);
          for (index_t j = 0; j < nb; ++j) {
            const double sw = sqrt_weight[j];
            double* w = wjac + j * ld;
            for (std::size_t u = 0; u < runs.size(); u += 3) {
              const double* from = jac + j * np + runs[u];
              double* to = w + runs[u + 1];
              for (index_t a = 0; a < runs[u + 2]; ++a) {
                const double v = from[a] * sw;  // read whatever sw is (see residuals)
                to[a] = sw > 0.0 ? v : 0.0;
              }
            }
            w[n_cols] = batch.wresid[j];
            std::fill(w + n_cols + 1, w + ld, 0.0);
          }
          // summed from zero, then added: each entry is the block's one sum, added to the total
          batch.block_sum.setZero(n_cols + 1, n_cols + 1);
          NormalMatrix::add_upper(wjac, nb, n_cols + 1, batch.block_sum.data(), n_cols + 1);
          Eigen::MatrixXd& e = batch.extended[i];
          const index_t* col = batch.columns.data();
          for (index_t r = 0; r <= n_cols; ++r)
            for (index_t q = 0; q <= r; ++q)
              e(q < n_cols ? col[q] : np, r < n_cols ? col[r] : np) += batch.block_sum(q, r);
        } else {  // (np, nb) row-major
          for (index_t a = 0; a < np; ++a)
            for (index_t j = 0; j < nb; ++j) {
              const double v = jac[a * nb + j] * sqrt_weight[j];  // (see residuals)
              wjac[a * nb + j] = sqrt_weight[j] > 0.0 ? v : 0.0;
            }
          const RowMatrix wj(wjac, np, nb);
          out[i].grad.noalias() += wj * wresid;
          out[i].hess.template selfadjointView<Eigen::Upper>().rankUpdate(wj);
        }
      }
    }
    for (index_t i = 0; i < n_items && with_jacobian; ++i) {
      if constexpr (Model::jacobian_by_pixel) {
        out[i].hess = batch.extended[i].topLeftCorner(np, np);
        out[i].grad = batch.extended[i].col(np).head(np);
      }
      out[i].hess.template triangularView<Eigen::StrictlyLower>() = out[i].hess.transpose();
    }
  }
};

// A per-pixel model's spectra (and Jacobians) for many parameter vectors, for predictions
// and best-fit spectra. Work is split in fixed groups of parameter vectors (prepared
// together), so results do not depend on the number of threads.
//   params    (n, n_params)
//   flux_out  (n, n_pixels)
//   jac_out   (n, n_pixels, n_params) or null
template <class Model>
void evaluate_spectra(const Model& model, const double* params, index_t n, double* flux_out,
                      double* jac_out, int n_threads, Interrupt* interrupt = nullptr) {
  const index_t np = model.n_params(), n_pixels = model.n_pixels;
  constexpr index_t block = 256, group = 16;
  const index_t n_groups = (n + group - 1) / group;
  std::atomic<bool> failed{false};
#pragma omp parallel num_threads(resolve_threads(n_threads))
  {
    std::vector<typename Model::State> states;
    typename Model::Workspace workspace;
    std::vector<const double*> xs;
    std::vector<index_t> rows;
    std::vector<double> jac_block;
#pragma omp for schedule(static)
    for (index_t g = 0; g < n_groups; ++g) {
      if (failed || interrupted(interrupt)) continue;
      try {  // an exception must not leave an OpenMP loop body
        const index_t i0 = g * group, i1 = std::min(i0 + group, n);
        if (!Model::jacobian_by_pixel) jac_block.resize(np * block);
        xs.clear();
        rows.clear();
        for (index_t i = i0; i < i1; ++i) {
          xs.push_back(params + i * np);
          rows.push_back(i);
        }
        model.prepare(xs, rows, jac_out != nullptr, workspace, states);
        for (index_t i = i0; i < i1; ++i)
          for (index_t p0 = 0; p0 < n_pixels; p0 += block) {
            const index_t p1 = std::min(p0 + block, n_pixels), nb = p1 - p0;
            double* out = jac_out ? jac_out + (i * n_pixels + p0) * np : nullptr;
            if constexpr (Model::jacobian_by_pixel) {  // already the output's layout
              model.evaluate(states[i - i0], p0, p1, flux_out + i * n_pixels + p0, out);
              continue;
            }
            model.evaluate(states[i - i0], p0, p1, flux_out + i * n_pixels + p0,
                           out ? jac_block.data() : nullptr);
            if (!out) continue;
            for (index_t j = 0; j < nb; ++j)
              for (index_t a = 0; a < np; ++a) out[j * np + a] = jac_block[a * nb + j];
          }
      } catch (...) {
        failed = true;
      }
    }
  }
  if (failed) throw std::bad_alloc();
}

namespace detail {

// Inverse of a symmetric positive-definite matrix with Jacobi scaling; NaN if singular.
inline Eigen::MatrixXd inverse_spd(const Eigen::MatrixXd& h) {
  const index_t n = h.rows();
  Eigen::VectorXd d(n);
  for (index_t a = 0; a < n; ++a) d[a] = h(a, a) > 0.0 ? 1.0 / std::sqrt(h(a, a)) : 0.0;
  Eigen::LLT<Eigen::MatrixXd> llt(d.asDiagonal() * h * d.asDiagonal());
  if (llt.info() != Eigen::Success || (d.array() == 0.0).any())
    return Eigen::MatrixXd::Constant(n, n, std::numeric_limits<double>::quiet_NaN());
  const Eigen::MatrixXd inv = llt.solve(Eigen::MatrixXd::Identity(n, n));
  return d.asDiagonal() * inv * d.asDiagonal();
}

}  // namespace detail

// Fit every spectrum of an Objective by Levenberg-Marquardt.
//
//   initial          (n_spectra, n_starts, n_params)  starting points; chi2 is evaluated at
//                    each and LM starts from the best one
//   lower, upper     (n_params,) or null    box bounds; a parameter on a bound with its gradient
//                                           pointing outward is held, and trial steps are
//                                           projected onto the box
//   out              see LMOutputs
// Per spectrum: Marquardt damping (H + lambda diag H) delta = J^T W r with Nielsen's update
// of lambda (Nielsen 1999; Madsen, Nielsen & Tingleff 2004): an accepted step scales it by
// max(1/3, 1 - (2 rho - 1)^3), rho = actual / predicted chi2 decrease, successive rejected
// ones by 2, 4, 8, ... It ends a slow crawl along a curved valley sooner than dividing and
// multiplying by 10 (25-label emulator fits: median 47 -> 30 trial steps). Converged when
// the Newton decrement g^T H^-1 g (the decrease an undamped step would bring) or an accepted
// step's chi2 decrease is <= ftol * chi2 (the second ends the crawl along the kinks of a
// ReLU network, where the decrement never gets small), or a step moves no parameter by more
// than xtol, or lambda exceeds lambda_max (no decrease is possible).
//   interrupt (or null): once it fires, batches not yet finished stop and the outputs are
//   incomplete (the caller discards them)
template <class Objective>
void fit_lm(const Objective& objective, const double* initial, index_t n_starts,
            const double* lower, const double* upper, const LMOptions& opt, int n_threads,
            const LMOutputs& out, Interrupt* interrupt = nullptr) {
  const index_t np = objective.n_params(), n_spectra = objective.n_spectra();
  const index_t n_batches = (n_spectra + opt.batch - 1) / opt.batch;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::atomic<bool> failed{false};

#pragma omp parallel num_threads(resolve_threads(n_threads))
  {
    // One Batch per thread, kept from batch to batch: a Cannon batch's buffers are ~150 MB at
    // 17 labels, fresh pages to fault in for every batch where freed memory goes straight back
    // to the system (Dask workers: MALLOC_TRIM_THRESHOLD_).
    typename Objective::Batch scratch;
#pragma omp for schedule(dynamic, 1)
    for (index_t batch = 0; batch < n_batches; ++batch) {
      if (failed || interrupted(interrupt)) continue;
      try {  // an exception must not leave an OpenMP loop body
        const index_t s0 = batch * opt.batch, s1 = std::min(s0 + opt.batch, n_spectra);
        const index_t nbatch = s1 - s0;
        objective.begin_batch(s0, s1, scratch);
        std::vector<detail::NormalEquations> evals, trials, evals_new;
        std::vector<index_t> ids;
        std::vector<const double*> xs;

        auto clamp_into = [&](double* x) {
          for (index_t a = 0; a < np; ++a) {
            if (lower) x[a] = std::max(x[a], lower[a]);
            if (upper) x[a] = std::min(x[a], upper[a]);
          }
        };

        // Starting point: the lowest finite chi2 among the starts.
        std::vector<double> x(nbatch * np), x_trial(nbatch * np);
        std::vector<double> starts(initial + s0 * n_starts * np, initial + s1 * n_starts * np);
        for (index_t i = 0; i < nbatch * n_starts; ++i) clamp_into(starts.data() + i * np);
        std::vector<index_t> best(nbatch, 0);
        if (n_starts > 1) {
          for (index_t i = 0; i < nbatch; ++i)
            for (index_t j = 0; j < n_starts; ++j) {
              ids.push_back(i);
              xs.push_back(starts.data() + (i * n_starts + j) * np);
            }
          objective.evaluate(scratch, ids, xs, false, evals);
          for (index_t i = 0; i < nbatch; ++i) {
            double best_chi2 = std::numeric_limits<double>::infinity();
            for (index_t j = 0; j < n_starts; ++j) {
              const double c = evals[i * n_starts + j].chi2;
              if (std::isfinite(c) && c < best_chi2) {
                best_chi2 = c;
                best[i] = j;
              }
            }
          }
        }
        for (index_t i = 0; i < nbatch; ++i)
          std::copy_n(starts.data() + (i * n_starts + best[i]) * np, np, x.data() + i * np);

        ids.clear();
        xs.clear();
        for (index_t i = 0; i < nbatch; ++i) {
          ids.push_back(i);
          xs.push_back(x.data() + i * np);
        }
        objective.evaluate(scratch, ids, xs, true, evals);

        std::vector<double> lambda(nbatch, opt.lambda_init), nu(nbatch, 2.0), predicted(nbatch, 0.0);
        std::vector<std::int32_t> n_iter(nbatch, 0);
        std::vector<std::int8_t> status(nbatch, FIT_CONVERGED);
        std::vector<char> active(nbatch, 0);
        for (index_t i = 0; i < nbatch; ++i) {
          if (evals[i].n_used < np) status[i] = FIT_NO_PIXELS;
          else if (!std::isfinite(evals[i].chi2) || !evals[i].hess.allFinite()) status[i] = FIT_NON_FINITE;
          else active[i] = evals[i].chi2 > 0.0;  // a perfect fit needs no step
        }

        std::vector<index_t> trial_slot, accepted, accepted_ids;
        std::vector<const double*> accepted_xs;
        // a batch of emulator fits can take seconds: look for an interrupt every iteration
        while (std::find(active.begin(), active.end(), 1) != active.end() &&
               !interrupted(interrupt)) {
          ids.clear();
          xs.clear();
          trial_slot.clear();
          for (index_t i = 0; i < nbatch; ++i) {
            if (!active[i]) continue;
            const detail::NormalEquations& e = evals[i];
            // A parameter on a bound whose gradient points out of the box is held there: its
            // row and column leave the step's system (else clipping stalls the fit).
            Eigen::MatrixXd hess = e.hess;
            Eigen::VectorXd grad = e.grad;
            const double* xi = x.data() + i * np;
            for (index_t a = 0; a < np; ++a) {
              const bool held = (lower && xi[a] <= lower[a] && grad[a] < 0.0) ||
                                (upper && xi[a] >= upper[a] && grad[a] > 0.0);
              if (!held) continue;
              hess.row(a).setZero();
              hess.col(a).setZero();
              hess(a, a) = 1.0;
              grad[a] = 0.0;
            }
            // Converged when even the undamped Gauss-Newton step (the Newton decrement
            // g^T H^-1 g) would lower chi2 by no more than ftol * chi2. Deciding this before
            // stepping keeps the decision away from rounding in a tiny chi2 difference.
            const double decrement = grad.dot(detail::inverse_spd(hess) * grad);
            if (decrement <= opt.ftol * e.chi2) {
              active[i] = 0;
              continue;
            }
            const double max_diag = e.hess.diagonal().maxCoeff();
            Eigen::MatrixXd damped = hess;
            for (index_t a = 0; a < np; ++a)
              damped(a, a) += lambda[i] * std::max(hess(a, a), 1e-12 * max_diag);
            Eigen::LLT<Eigen::MatrixXd> llt(damped);
            Eigen::VectorXd step = Eigen::VectorXd::Zero(np);
            if (llt.info() == Eigen::Success) step = llt.solve(grad);
            double* xt = x_trial.data() + i * np;
            for (index_t a = 0; a < np; ++a) xt[a] = x[i * np + a] + step[a];
            clamp_into(xt);
            // chi2 decrease the linear model predicts for the (clamped) step
            for (index_t a = 0; a < np; ++a) step[a] = xt[a] - x[i * np + a];
            predicted[i] = 2.0 * grad.dot(step) - step.dot(hess * step);
            ++n_iter[i];
            ids.push_back(i);
            xs.push_back(xt);
            trial_slot.push_back(i);
          }
          objective.evaluate(scratch, ids, xs, !opt.jacobian_after_accept, trials);
          if (opt.jacobian_after_accept) {
            accepted.clear();
            accepted_ids.clear();
            accepted_xs.clear();
            for (std::size_t t = 0; t < trial_slot.size(); ++t)
              if (std::isfinite(trials[t].chi2) && trials[t].chi2 < evals[trial_slot[t]].chi2) {
                accepted.push_back(static_cast<index_t>(t));
                accepted_ids.push_back(ids[t]);
                accepted_xs.push_back(xs[t]);
              }
            objective.evaluate(scratch, accepted_ids, accepted_xs, true, evals_new);
            for (std::size_t k = 0; k < accepted.size(); ++k) std::swap(trials[accepted[k]], evals_new[k]);
          }
          for (std::size_t t = 0; t < trial_slot.size(); ++t) {
            const index_t i = trial_slot[t];
            detail::NormalEquations& trial = trials[t];
            if (std::isfinite(trial.chi2) && trial.chi2 < evals[i].chi2 && trial.hess.allFinite()) {
              double moved = 0.0;
              for (index_t a = 0; a < np; ++a)
                moved = std::max(moved, std::abs(x_trial[i * np + a] - x[i * np + a]));
              const double decrease = evals[i].chi2 - trial.chi2;
              std::copy_n(x_trial.data() + i * np, np, x.data() + i * np);
              std::swap(evals[i], trial);
              // Nielsen's update: shrink the damping by how well the linear model predicted
              // the decrease (gain ratio rho); grow it geometrically over successive rejections
              const double rho = predicted[i] > 0.0 ? decrease / predicted[i] : 0.0;
              const double r = 2.0 * rho - 1.0;
              lambda[i] = std::max(lambda[i] * std::max(1.0 / 3.0, 1.0 - r * r * r), 1e-12);
              nu[i] = 2.0;
              if (decrease <= opt.ftol * evals[i].chi2 || moved <= opt.xtol) active[i] = 0;
            } else {
              lambda[i] *= nu[i];
              nu[i] *= 2.0;
              if (lambda[i] > opt.lambda_max) active[i] = 0;
            }
            if (active[i] && n_iter[i] >= opt.max_iter) {
              active[i] = 0;
              status[i] = FIT_MAX_ITER;
            }
          }
        }

        if constexpr (detail::has_finish<Objective>::value) {
          ids.clear();
          xs.clear();
          for (index_t i = 0; i < nbatch; ++i)
            if (status[i] == FIT_CONVERGED || status[i] == FIT_MAX_ITER) {
              ids.push_back(i);
              xs.push_back(x.data() + i * np);
            }
          objective.finish(scratch, ids, xs, evals_new);
          for (std::size_t k = 0; k < ids.size(); ++k) std::swap(evals[ids[k]], evals_new[k]);
        }
        for (index_t i = 0; i < nbatch; ++i) {
          const index_t s = s0 + i;
          std::copy_n(x.data() + i * np, np, out.params + s * np);
          out.chi2[s] = evals[i].chi2;
          out.n_used[s] = evals[i].n_used;
          out.n_iter[s] = n_iter[i];
          out.status[s] = status[i];
          double* cov = out.covariance + s * np * np;
          if (status[i] == FIT_CONVERGED || status[i] == FIT_MAX_ITER) {
            Eigen::Map<Eigen::MatrixXd>(cov, np, np) = detail::inverse_spd(evals[i].hess);
          } else {
            std::fill(cov, cov + np * np, nan);
          }
        }
      } catch (...) {
        failed = true;
      }
    }
  }
  if (failed) throw std::bad_alloc();
}

}  // namespace starlabel
