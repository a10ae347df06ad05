"""fit_spectra benchmarks: labels + RV + a 3-segment continuum with a dense Payne network,
fast (1 and 2 threads) against the NumPy reference on the same spectra.

``--size small`` (default): a 25 -> 32 -> 32 -> 600 network, 4 spectra;
``--size survey``: the issue's 25 -> 300 -> 300 -> 7214 network on APOGEE's grid, 100 spectra
(the reference on 2 of them). Every benchmark checks fast == reference (tolerances below).

    python -m pytest benchmarks/test_fit_spectra.py --size survey --benchmark-columns=median
"""

import numpy as np
import pytest

import starlabel
from starlabel import PayneModel, datasets
from starlabel.preprocess import doppler_factor

SIZES = {
    "small": dict(hidden=(32, 32), n_pixels=600, n_spectra=4, ref_spectra=2),
    "survey": dict(hidden=(300, 300), n_pixels=7214, n_spectra=100, ref_spectra=2),
}
N_LABELS = 25


@pytest.fixture(scope="module")
def problem(request):
    settings = SIZES[request.config.getoption("--size")]
    n_pixels = settings["n_pixels"]
    wave = datasets.apogee_wavelength(n_pixels) if n_pixels != 7214 else None
    if wave is None:
        # APOGEE-like: three log-linear chips with gaps
        step = 6e-6
        chips = [(15168.13, 2920), (15881.4, 2400), (16499.5, 1894)]
        wave = np.concatenate([10 ** (np.log10(lo) + step * np.arange(n)) for lo, n in chips])
    rng = np.random.default_rng(0)
    sizes = (N_LABELS,) + settings["hidden"] + (n_pixels,)
    model = PayneModel([f"L{i}" for i in range(N_LABELS)], hidden=settings["hidden"],
                       dtype="float32", wavelength=wave)
    weights = [(rng.normal(size=(o, i)) / np.sqrt(i) * (0.05 if o == n_pixels else 1.0))
               .astype(np.float32) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rng.normal(0, 0.1, o).astype(np.float32) for o in sizes[1:]]
    biases[-1] += 1.0
    model._set_network(weights, biases, np.zeros(N_LABELS), np.ones(N_LABELS))
    n = settings["n_spectra"]
    labels = rng.uniform(0.3, 0.7, (n, N_LABELS))
    rv = rng.uniform(-300, 300, n)
    base = model.predict(labels).astype(np.float64)
    flux = np.array([np.interp(wave / doppler_factor(v), wave, f) for v, f in zip(rv, base)])
    flux *= 1 + 0.05 * np.sin(wave / 300.0)
    flux += rng.normal(size=flux.shape) / 100.0
    ivar = np.full_like(flux, 1e4)
    gaps = np.flatnonzero(np.diff(wave) > 10 * np.diff(wave)[0])
    edges = np.r_[wave[0], wave[gaps + 1]]
    ends = np.r_[wave[gaps], wave[-1]]
    segments = list(zip(edges, ends))
    return dict(settings, model=model, wave=wave, flux=flux, ivar=ivar, segments=segments)


def fit(problem, backend, rows, n_threads=None):
    return starlabel.fit_spectra(problem["model"], problem["flux"][rows], problem["ivar"][rows],
                                 problem["wave"], continuum_order=2, segments=problem["segments"],
                                 rv_range=(-400, 400), initial=np.full(N_LABELS, 0.5),
                                 backend=backend, n_threads=n_threads)


@pytest.fixture(scope="module")
def reference_fit(problem):
    return fit(problem, "reference", slice(0, problem["ref_spectra"]))


def test_fit_reference(timed, problem):
    rows = slice(0, problem["ref_spectra"])
    _, t = timed(lambda: fit(problem, "reference", rows), rounds=1)
    if t is not None:
        print(f"\nreference: {t / problem['ref_spectra'] * 1e3:.1f} ms per spectrum")


@pytest.mark.parametrize("n_threads", [1, 2])
def test_fit_fast(timed, problem, reference_fit, n_threads):
    rows = slice(0, problem["n_spectra"])
    res, t = timed(lambda: fit(problem, "fast", rows, n_threads), rounds=1)
    if t is not None:
        print(f"\nfast, {n_threads} thread(s): {problem['n_spectra'] / t:.1f} spectra/s")
    k = problem["ref_spectra"]
    # the same LM on the same float64 arithmetic up to summation order (the float32 network is
    # converted to float64 for the fit): results agree far inside the error bars
    np.testing.assert_allclose(res.chi2[:k], reference_fit.chi2, rtol=1e-7)
    np.testing.assert_allclose(res.rv[:k], reference_fit.rv, atol=1e-4 * reference_fit.rv_error.min())
    np.testing.assert_allclose(res.labels[:k], reference_fit.labels,
                               atol=1e-4 * reference_fit.errors.min())
