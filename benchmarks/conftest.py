"""Benchmark fixtures: ``--size small`` (CI smoke test, default) or ``--size survey`` (the issue's sizes).

Data sets and trained models are built once per session and shared by the benchmarks.
"""

import io
import os
import time
import types

import numpy as np
import pytest
import starlabel
from starlabel import CannonModel, PolynomialVectorizer, datasets

#: seconds to wait before a timing: longer than OpenBLAS's spin after a call
BLAS_SPIN_WAIT = 0.3

# Sizes of each run. Subsets (None = everything; keys 3 and 17 are label counts):
# ref_pixels / ref_spectra / ref_l1_pixels: what the slow NumPy reference runs on;
# thread_pixels / thread_spectra: what the 1-thread runs use; l1_pixels: the fast L1 training;
# n_calibration: held-out stars that calibrate the test step's errors.
# Times on a pixel subset are scaled per pixel to the full problem by the report.
SIZES = {
    "small": dict(n_train=300, n_test=20, n_calibration=60, n_pixels=96, snr=100.0,
                  ref_pixels={3: 8, 17: 4}, l1_pixels=None, ref_l1_pixels=2,
                  thread_pixels={3: None, 17: None}, thread_spectra=None,
                  ref_spectra={3: 5, 17: 2}, gram_block=64, rounds={3: 3, 17: 1}),
    "survey": dict(n_train=1600, n_test=1000, n_calibration=1000, n_pixels=8575, snr=100.0,
                   ref_pixels={3: 256, 17: 12}, l1_pixels=2048, ref_l1_pixels=3,
                   thread_pixels={3: None, 17: 1024}, thread_spectra=200,
                   ref_spectra={3: 40, 17: 4}, gram_block=64, rounds={3: 3, 17: 1}),
}
# The compiled core this session loaded (its file may be reinstalled while the run goes on).
CORE_FILE = {"file": starlabel._core.core.__file__,
             "mtime": os.path.getmtime(starlabel._core.core.__file__)}


def pytest_addoption(parser):
    group = parser.getgroup("starlabel benchmarks")
    group.addoption("--size", choices=sorted(SIZES), default="small",
                    help="problem sizes: small (smoke test, default) or survey (the issue's sizes)")
    group.addoption("--rounds", type=int, default=None,
                    help="rounds of every timed Cannon benchmark (default: 3 for 3 labels, "
                         "1 for 17 labels)")
    group.addoption("--peer-python", action="append", default=[], metavar="NAME=PYTHON",
                    help="interpreter of a peer's venv, e.g. annieslasso=/tmp/peer-annieslasso/"
                         "bin/python (repeatable; or STARLABEL_PEER_ANNIESLASSO / "
                         "STARLABEL_PEER_THECANNON); peers without one are skipped")
    group.addoption("--peer-train-pixels", type=int, default=None, metavar="N",
                    help="train the peers on N spread pixels only (timing scaled per pixel; "
                         "their own-model test step is then skipped)")


@pytest.fixture(scope="session")
def numpy_matmuls():
    """``make(weights, x)`` gives ``run()``: NumPy's float32 matmuls of an MLP forward pass's
    shapes (no bias, no activation), the yardstick of the machine's limit for that batch."""
    def make(weights, x):
        weights_t = [np.ascontiguousarray(w.T) for w in weights]

        def run():
            a = x
            for w in weights_t:
                a = a @ w
            return a
        return run
    return make


@pytest.fixture(scope="session")
def random_payne():
    """A factory of fit_spectra test problems: ``make(hidden, n_pixels, n_spectra)`` gives a
    float32 PayneModel of 25 labels with random weights (The Payne's architecture) on an
    APOGEE-like grid of three log-linear chips, and noisy spectra from it at random labels and
    RVs (+-300 km/s), S/N 100: dict(model, wave, segments, labels, rv, flux, ivar)."""
    from starlabel import PayneModel
    from starlabel.preprocess import doppler_factor

    def make(hidden, n_pixels, n_spectra, seed=0):
        n_labels = 25
        # APOGEE's three chips (2920, 2400 and 1894 of its 7214 pixels), scaled to n_pixels
        ends = np.round(n_pixels * np.cumsum([2920, 2400, 1894]) / 7214).astype(int)
        chips = np.split(np.arange(n_pixels), ends[:-1])
        starts = (15168.13, 15881.4, 16499.5)
        wave = np.concatenate([10 ** (np.log10(lo) + 6e-6 * np.arange(c.size))
                               for lo, c in zip(starts, chips)])
        rng = np.random.default_rng(seed)
        sizes = (n_labels,) + tuple(hidden) + (n_pixels,)
        model = PayneModel([f"L{i}" for i in range(n_labels)], hidden=hidden, dtype="float32",
                           wavelength=wave)
        weights = [(rng.normal(size=(o, i)) / np.sqrt(i) * (0.05 if o == n_pixels else 1.0))
                   .astype(np.float32) for i, o in zip(sizes[:-1], sizes[1:])]
        biases = [rng.normal(0, 0.1, o).astype(np.float32) for o in sizes[1:]]
        biases[-1] += 1.0
        model._set_network(weights, biases, np.zeros(n_labels), np.ones(n_labels))
        labels = rng.uniform(0.3, 0.7, (n_spectra, n_labels))
        rv = rng.uniform(-300, 300, n_spectra)
        base = model.predict(labels).astype(np.float64)
        flux = np.array([np.interp(wave / doppler_factor(v), wave, f) for v, f in zip(rv, base)])
        flux *= 1 + 0.05 * np.sin(wave / 300.0)
        flux += rng.normal(size=flux.shape) / 100.0
        segments = [(wave[c[0]], wave[c[-1]]) for c in chips]
        return dict(model=model, wave=wave, segments=segments, labels=labels, rv=rv, flux=flux,
                    ivar=np.full_like(flux, 1e4))

    return make


@pytest.fixture(scope="session")
def size(request):
    """The chosen size as a namespace (``size.name``, ``size.n_train``, ...)."""
    name = request.config.getoption("--size")
    settings = dict(SIZES[name], name=name)
    rounds = request.config.getoption("--rounds")
    if rounds is not None:
        settings["rounds"] = {k: rounds for k in settings["rounds"]}
    return types.SimpleNamespace(**settings)


class Problem:
    """One Cannon problem: training, test and calibration surveys with the first ``n_labels``
    labels.

    ``model`` (the fast, fully trained model) and ``fit`` (its test-step result) are filled in
    by the benchmarks that time them, or computed on first use when those were deselected.
    """

    def __init__(self, n_labels, size):
        self.n_labels = n_labels
        self.names = datasets.SUPPORTED_LABELS[:n_labels]
        kwargs = dict(label_names=self.names, n_pixels=size.n_pixels, snr=size.snr)
        self.train = datasets.synthetic_survey(size.n_train, seed=1, **kwargs)
        self.test = datasets.synthetic_survey(size.n_test, seed=2, **kwargs)
        self.calibration = datasets.synthetic_survey(size.n_calibration, seed=3, **kwargs)
        self.n_pixels = size.n_pixels
        self.description = f"{n_labels} labels, {size.n_train} stars x {size.n_pixels} px"
        self._model = self._fit = None
        self.l1 = None     # (pixels, model) of the fast L1 training
        self.times = {}    # (area, n_threads) -> fast median time per full problem / spectrum

    def new_model(self, **kwargs):
        return CannonModel(self.names, order=2, **kwargs)

    @property
    def model(self):
        if self._model is None:
            self._model = self.new_model().train(self.train.labels, self.train.flux,
                                                 self.train.ivar)
        return self._model

    @model.setter
    def model(self, value):
        self._model = value

    @property
    def fit(self):
        if self._fit is None:
            self._fit = self.model.fit_labels(self.test.flux, self.test.ivar)
        return self._fit

    @fit.setter
    def fit(self, value):
        self._fit = value

    @property
    def exponents(self):
        return PolynomialVectorizer(self.names, order=2).exponents

    @property
    def n_monomials(self):
        """Distinct entries of v v^T: monomials of degree <= 4 in n_labels variables."""
        exponents = self.exponents
        return len({tuple(a + b) for a in exponents for b in exponents})


class Problems(dict):
    """``problems[n_labels]``: a Problem built on first use, then shared."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def __missing__(self, n_labels):
        self[n_labels] = Problem(n_labels, self.size)
        return self[n_labels]


@pytest.fixture(scope="session")
def problems(size):
    return Problems(size)


def subset(n_total, n):
    """n indices spread evenly over range(n_total) (all of them when n is None)."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total - 1, n).round().astype(int)


@pytest.fixture(scope="session")
def spread():
    return subset


@pytest.fixture
def timed(benchmark):
    """``timed(fn, rounds)``: benchmark fn; returns (result, median seconds).

    rounds=None lets pytest-benchmark calibrate (for short calls); otherwise exactly that many
    timed rounds of one call each. The median is None under ``--benchmark-disable`` (fn then
    runs once, untimed).
    """
    def run(fn, rounds=None):
        # OpenBLAS's threads spin for ~0.1 s after each NumPy product (a test's reference
        # check, say); on 2 vCPUs they would take half of the machine from the next timing
        time.sleep(BLAS_SPIN_WAIT)
        if rounds is None:
            result = benchmark(fn)
        else:
            result = benchmark.pedantic(fn, rounds=rounds, iterations=1)
        stats = getattr(benchmark, "stats", None)
        return result, (None if stats is None else stats.stats.median)

    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record starlabel's build, the BLAS threads and OPENBLAS_CORETYPE in the JSON."""
    text = io.StringIO()
    starlabel.show_config(file=text)
    machine_info["starlabel_config"] = text.getvalue()
    machine_info["starlabel_core"] = CORE_FILE
    machine_info["OPENBLAS_CORETYPE"] = os.environ.get("OPENBLAS_CORETYPE")
    machine_info["benchmark_size"] = config.getoption("--size")
    machine_info["load_average_1_5_15_min"] = os.getloadavg()  # at the end of the run
    try:
        from threadpoolctl import threadpool_info
        machine_info["threadpools"] = threadpool_info()
    except ImportError:
        pass
