"""Cannon benchmarks: training, L1 training, the test step, label accuracy, the matmul limit.

Every benchmark also checks a result: the fast core against the NumPy reference on the same
pixels / spectra (tolerances below), or 1 thread against 2 threads. Timings and metrics go to
``benchmark.extra_info`` in the shape ``benchmarks/report.py`` reads:
area, problem, backend, n_threads, scale (median x scale = time per full problem or per
spectrum), measured_on, load_1min (the machine is shared: load average after the run), metrics.
"""

import copy
import os
import time

import numpy as np
import pytest
import starlabel
from starlabel import FitStatus, PixelStatus

LABELS = [3, 17]
THREADS = [2, 1]         # the full problem runs on 2 threads, 1 thread on size.thread_* subsets
L1_STRENGTH = 1e3
# fast vs reference tolerances
THETA_RTOL, THETA_ATOL = 1e-7, 1e-9          # training: theta
S2_RTOL, S2_ATOL = 1e-6, 1e-12               # training: s2
OBJECTIVE_RTOL = 1e-8                        # L1: fast objective <= reference objective (1 + tol)
LABEL_TOL_SIGMA = 1e-6                       # test step: |fast - reference| / fast error
THREADS_RTOL, THREADS_ATOL = 1e-8, 1e-11     # 1 thread on a subset vs 2 threads on all pixels
#                                              (the pixel set changes the last bits)


def record(benchmark, area, problem, backend, n_threads, *, scale=1.0, measured_on=None,
           **metrics):
    benchmark.extra_info.update(area=area, problem=problem.description, backend=backend,
                                n_threads=n_threads, scale=scale, measured_on=measured_on,
                                load_1min=os.getloadavg()[0], metrics=metrics)


def pixel_columns(survey, pixels):
    """(flux, ivar) of these pixels as C-contiguous copies, made before any timing: indexing
    the second axis gives Fortran-ordered arrays, which the package would copy again inside
    the timed call (17 labels: 0.1 s, and 0.5 s in a process's first call)."""
    return (np.ascontiguousarray(survey.flux[:, pixels]),
            np.ascontiguousarray(survey.ivar[:, pixels]))


def per_full(median, scale):
    return None if median is None else median * scale


def status_counts(codes, enum):
    return {enum(c).name: int(n) for c, n in zip(*np.unique(codes, return_counts=True))}


# -- training --------------------------------------------------------------------------------

@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n_labels", LABELS)
def test_train_fast(timed, benchmark, problems, size, spread, n_labels, n_threads):
    """Fast training of all pixels on 2 threads; 1 thread on size.thread_pixels (scaled per pixel)."""
    p = problems[n_labels]
    pixels = spread(p.n_pixels, None if n_threads == 2 else size.thread_pixels[n_labels])
    model = p.new_model(backend="fast")
    flux, ivar = pixel_columns(p.train, pixels)
    model, t = timed(lambda: model.train(p.train.labels, flux, ivar, n_threads=n_threads),
                     size.rounds[n_labels])
    if n_threads == 2:
        p.model = model
    else:  # the same pixels trained on 2 threads
        np.testing.assert_allclose(model.theta, p.model.theta[pixels], rtol=THREADS_RTOL,
                                   atol=THREADS_ATOL)
        np.testing.assert_allclose(model.s2, p.model.s2[pixels], rtol=THREADS_RTOL,
                                   atol=THREADS_ATOL**2)
    assert np.all(model.pixel_status == PixelStatus.OK), status_counts(model.pixel_status, PixelStatus)

    scale = p.n_pixels / len(pixels)
    total = per_full(t, scale)
    p.times["train", n_threads] = total
    gemm_gflop = 2 * p.n_pixels * p.train.flux.shape[0] * p.n_monomials / 1e9
    record(benchmark, "train", p, "fast", n_threads, scale=scale,
           measured_on=f"{len(pixels)} px", n_terms=len(p.exponents), n_monomials=p.n_monomials,
           one_gemm_gflop=gemm_gflop,
           gemm_lower_bound_gflops=None if total is None else gemm_gflop / total,
           pixel_status=status_counts(model.pixel_status, PixelStatus))


@pytest.mark.parametrize("n_labels", LABELS)
def test_train_reference(timed, benchmark, problems, size, spread, n_labels):
    """NumPy reference on size.ref_pixels pixels (scaled per pixel) == the fast model there."""
    p = problems[n_labels]
    pixels = spread(p.n_pixels, size.ref_pixels[n_labels])
    model = p.new_model(backend="reference")
    flux, ivar = pixel_columns(p.train, pixels)
    model, t = timed(lambda: model.train(p.train.labels, flux, ivar), size.rounds[n_labels])
    fast = p.model
    np.testing.assert_array_equal(model.pixel_status, fast.pixel_status[pixels])
    np.testing.assert_allclose(model.theta, fast.theta[pixels], rtol=THETA_RTOL, atol=THETA_ATOL)
    np.testing.assert_allclose(model.s2, fast.s2[pixels], rtol=S2_RTOL, atol=S2_ATOL)

    scale = p.n_pixels / len(pixels)
    total, fast_total = per_full(t, scale), p.times.get(("train", 2))
    record(benchmark, "train", p, "reference", 1, scale=scale, measured_on=f"{len(pixels)} px",
           max_abs_dtheta=float(np.abs(model.theta - fast.theta[pixels]).max()),
           max_abs_ds2=float(np.abs(model.s2 - fast.s2[pixels]).max()),
           ratio_reference_to_fast=None if None in (total, fast_total) else total / fast_total)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n_labels", LABELS)
def test_train_at_fixed_s2(timed, benchmark, problems, size, spread, n_labels, n_threads):
    """One pass of the Gram / normal-equation work: training at the trained model's s2.

    At a given s2 every pixel needs exactly one moment GEMM, one right-hand side and one
    Cholesky solve: one pass of what the maximum-likelihood training repeats per s2 iteration
    (for the pixels still searching, which also need residuals). Must give the trained theta.

    Timed after one untimed call, as NumPy's matmul is timed warm (a process's first call also
    pays for memory it touches for the first time); that first call's time is recorded too.
    """
    p = problems[n_labels]
    pixels = spread(p.n_pixels, None if n_threads == 2 else size.thread_pixels[n_labels])
    x = p.model.vectorizer.scale(p.train.labels)
    (flux, ivar), s2 = pixel_columns(p.train, pixels), p.model.s2[pixels]

    def run():
        return starlabel.fast.cannon_train(p.exponents, x, flux, ivar, s2=s2, n_threads=n_threads)

    start = time.perf_counter()
    run()
    first_call = time.perf_counter() - start
    (theta, _, status), t = timed(run, size.rounds[n_labels])
    assert np.all(status == PixelStatus.OK)
    np.testing.assert_allclose(theta, p.model.theta[pixels], rtol=THREADS_RTOL, atol=THREADS_ATOL)

    n_stars, n_terms = p.train.flux.shape[0], len(p.exponents)
    scale = p.n_pixels / len(pixels)
    record(benchmark, "train_fixed_s2", p, "fast", n_threads, scale=scale,
           measured_on=f"{len(pixels)} px", first_call_s=first_call * scale,
           one_gemm_gflop=2 * p.n_pixels * n_stars * p.n_monomials / 1e9,
           # + the right-hand sides and the Cholesky factorizations
           pass_gflop=(2 * p.n_pixels * n_stars * (p.n_monomials + n_terms)
                       + p.n_pixels * n_terms**3 / 3) / 1e9)


# -- L1-regularized training -----------------------------------------------------------------

def l1_objective(vectorizer, theta, s2, labels, flux, ivar):
    """Per pixel: sum w r^2 - sum ln w + L1_STRENGTH * sum |theta[1:]|, w = 1 / (1/ivar + s2)."""
    resid = flux - starlabel.fast.cannon_predict(vectorizer.exponents, theta, vectorizer.scale(labels))
    used = ivar > 0
    w = np.where(used, ivar / (1.0 + ivar * s2), 1.0)
    return (np.where(used, w * resid**2 - np.log(w), 0.0).sum(axis=0)
            + L1_STRENGTH * np.abs(theta[:, 1:]).sum(axis=1))


def test_train_l1_fast(timed, benchmark, problems, size, spread):
    """Fast L1 training (strength 1e3, 17 labels) on size.l1_pixels (all on the survey size)."""
    p = problems[17]
    pixels = spread(p.n_pixels, size.l1_pixels)
    model = p.new_model(backend="fast", regularization=L1_STRENGTH)
    flux, ivar = pixel_columns(p.train, pixels)
    model, t = timed(lambda: model.train(p.train.labels, flux, ivar), size.rounds[17])
    p.l1 = pixels, model
    assert np.all(np.isin(model.pixel_status, [PixelStatus.OK, PixelStatus.NOT_CONVERGED]))
    assert np.all(np.isfinite(model.theta))

    scale = p.n_pixels / len(pixels)
    p.times["l1", 2] = per_full(t, scale)
    penalized = model.theta[:, 1:]
    record(benchmark, "l1", p, "fast", 2, scale=scale, measured_on=f"{len(pixels)} px",
           strength=L1_STRENGTH, zero_fraction=float(np.mean(penalized == 0)),
           pixel_status=status_counts(model.pixel_status, PixelStatus))


def test_train_l1_reference(timed, benchmark, problems, size, spread):
    """NumPy reference L1 on size.ref_l1_pixels of the fast run: the fast objective is no worse."""
    p = problems[17]
    if p.l1 is None:  # the fast L1 benchmark was deselected: train just these pixels
        pixels = spread(p.n_pixels, size.ref_l1_pixels)
        p.l1 = pixels, p.new_model(regularization=L1_STRENGTH).train(
            p.train.labels, p.train.flux[:, pixels], p.train.ivar[:, pixels])
    l1_pixels, fast = p.l1
    pick = spread(len(l1_pixels), size.ref_l1_pixels)
    pixels = l1_pixels[pick]
    flux, ivar = pixel_columns(p.train, pixels)
    model = p.new_model(backend="reference", regularization=L1_STRENGTH)
    model, t = timed(lambda: model.train(p.train.labels, flux, ivar), size.rounds[17])

    objective_fast = l1_objective(fast.vectorizer, fast.theta[pick], fast.s2[pick],
                                  p.train.labels, flux, ivar)
    objective_ref = l1_objective(model.vectorizer, model.theta, model.s2, p.train.labels, flux, ivar)
    excess = (objective_fast - objective_ref) / np.abs(objective_ref)
    assert np.all(excess <= OBJECTIVE_RTOL), excess

    scale = p.n_pixels / len(pixels)
    total, fast_total = per_full(t, scale), p.times.get(("l1", 2))
    record(benchmark, "l1", p, "reference", 1, scale=scale, measured_on=f"{len(pixels)} px",
           objective_fast=objective_fast.tolist(), objective_reference=objective_ref.tolist(),
           max_objective_excess=float(excess.max()),
           max_abs_dtheta=float(np.abs(model.theta - fast.theta[pick]).max()),
           ratio_reference_to_fast=None if None in (total, fast_total) else total / fast_total)


# -- the test step -----------------------------------------------------------------------------

def accuracy(names, labels, errors, truth):
    """RMS of fitted - true labels and std of the pulls (fitted - true) / error, per label."""
    diff = labels - truth
    rms = np.sqrt(np.mean(diff**2, axis=0))
    pull = np.std(diff / errors, axis=0)
    return {"rms": dict(zip(names, rms.tolist())), "pull_std": dict(zip(names, pull.tolist()))}


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n_labels", LABELS)
def test_fit_fast(timed, benchmark, problems, size, spread, n_labels, n_threads):
    """fit_labels (9 starts, LM) of the test spectra, per spectrum; 1 thread on size.thread_spectra."""
    p = problems[n_labels]
    spectra = spread(len(p.test.flux), None if n_threads == 2 else size.thread_spectra)
    model = p.model
    flux, ivar = p.test.flux[spectra], p.test.ivar[spectra]  # copies: not timed
    # A model's first fit builds its chi2-polynomial tables (cached; 0.1-0.3 s at 17 labels):
    # a cost per model, not per spectrum, so one spectrum is fitted first and timed apart.
    start = time.perf_counter()
    model.fit_labels(flux[:1], ivar[:1], n_threads=n_threads)
    first_call = time.perf_counter() - start
    result, t = timed(lambda: model.fit_labels(flux, ivar, n_threads=n_threads),
                      size.rounds[n_labels])
    if n_threads == 2:
        p.fit = result
    else:
        np.testing.assert_allclose(result.labels, p.fit.labels[spectra], rtol=THREADS_RTOL,
                                   atol=THREADS_ATOL)
    assert np.all(np.isfinite(result.labels)) and np.all(np.isfinite(result.errors))

    scale = 1.0 / len(spectra)
    p.times["fit", n_threads] = per_full(t, scale)
    record(benchmark, "fit", p, "fast", n_threads, scale=scale,
           measured_on=f"{len(spectra)} spectra", n_spectra=len(spectra),
           first_call_seconds=first_call,
           converged_fraction=float(np.mean(result.status == FitStatus.CONVERGED)),
           fit_status=status_counts(result.status, FitStatus),
           median_n_iter=float(np.median(result.n_iter)),
           median_reduced_chi2=float(np.median(result.reduced_chi2)),
           **accuracy(p.names, result.labels, result.errors, p.test.labels[spectra]))


@pytest.mark.parametrize("n_labels", LABELS)
def test_fit_reference(timed, benchmark, problems, size, spread, n_labels):
    """NumPy reference fit_labels on size.ref_spectra spectra (same model) == fast, per spectrum."""
    p = problems[n_labels]
    spectra = spread(len(p.test.flux), size.ref_spectra[n_labels])
    model = copy.copy(p.model)
    model.backend = "reference"
    flux, ivar = p.test.flux[spectra], p.test.ivar[spectra]
    result, t = timed(lambda: model.fit_labels(flux, ivar), size.rounds[n_labels])
    fast = p.fit
    np.testing.assert_array_equal(result.status, fast.status[spectra])
    deviation = np.abs(result.labels - fast.labels[spectra]) / fast.errors[spectra]
    converged = result.status == FitStatus.CONVERGED
    assert np.all(deviation[converged] <= LABEL_TOL_SIGMA), deviation.max(axis=1)

    scale = 1.0 / len(spectra)
    total, fast_total = per_full(t, scale), p.times.get(("fit", 2))
    truth = p.test.labels[spectra]
    record(benchmark, "fit", p, "reference", 1, scale=scale,
           measured_on=f"{len(spectra)} spectra", n_spectra=len(spectra),
           max_deviation_sigma=float(deviation.max()),
           ratio_reference_to_fast=None if None in (total, fast_total) else total / fast_total,
           reference_on_subset=accuracy(p.names, result.labels, result.errors, truth),
           fast_on_subset=accuracy(p.names, fast.labels[spectra], fast.errors[spectra], truth))


@pytest.mark.parametrize("n_labels", LABELS)
def test_calibrate_errors(timed, benchmark, problems, size, n_labels):
    """calibrate_errors on held-out stars (seed 3), then the test step's errors, per star."""
    p = problems[n_labels]
    stars = p.calibration
    model = copy.copy(p.model)
    model, _ = timed(lambda: model.calibrate_errors(stars.labels, stars.flux, stars.ivar), 1)
    result = model.fit_labels(p.test.flux, p.test.ivar)
    # the floor changes the errors only: the same labels, errors >= the formal ones
    np.testing.assert_array_equal(result.labels, p.fit.labels)
    np.testing.assert_array_equal(result.formal_covariance, p.fit.covariance)
    assert np.all(result.errors >= p.fit.errors)

    record(benchmark, "calibrate", p, "fast", 2, scale=1.0 / len(stars.labels),
           measured_on=f"{len(stars.labels)} stars", n_calibration=len(stars.labels),
           n_neighbors=model.error_floor.n_neighbors, n_spectra=len(result),
           median_floor=dict(zip(p.names, np.median(result.error_floor, axis=0).tolist())),
           **accuracy(p.names, result.labels, result.errors, p.test.labels))


# -- the machine limit -------------------------------------------------------------------------

@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("n_labels", LABELS)
def test_matmul_limit(timed, benchmark, problems, size, n_labels, n_threads):
    """NumPy float64 GEMM on the Cannon's moment shape (pixel block x stars) @ (stars x monomials)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    p = problems[n_labels]
    rng = np.random.default_rng(0)
    a = rng.random((size.gram_block, size.n_train))
    b = rng.random((size.n_train, p.n_monomials))
    with threadpoolctl.threadpool_limits(n_threads, user_api="blas"):
        product, t = timed(lambda: a @ b)
    np.testing.assert_allclose(product[-1], np.einsum("s,sm->m", a[-1], b), rtol=1e-12)

    flop = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    record(benchmark, "matmul", p, "numpy", n_threads, shape=f"({a.shape[0]} x {a.shape[1]}) @ "
           f"({b.shape[0]} x {b.shape[1]})", gflop=flop / 1e9,
           gflops=None if t is None else flop / t / 1e9,
           openblas_coretype=os.environ.get("OPENBLAS_CORETYPE"),
           blas=[{k: pool.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                 for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"])
