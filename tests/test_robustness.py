"""Numerical robustness and damaged files.

What each hard case gives (the contract these tests pin down):

- Cannon training, ill-conditioned pixels: collinear labels or a label constant over the
  training set make the normal equations singular -> PixelStatus.SINGULAR (NaN theta, inf s2)
  from the kernel (CannonModel.train refuses a constant label up front with ValueError);
  exactly as many usable stars as terms -> an exact fit, s2 = 0; fewer -> TOO_FEW_STARS.
- Label fits where the spectrum does not depend on a label (a singular Jacobian): the label
  stays at its starting value, the others are fitted as usual, and its error is not finite.
- Networks whose activations overflow (huge weights or inputs): outputs are inf/NaN, no
  exception, the same non-finite pattern from both backends, and a fit through such a model
  reports FitStatus.NON_FINITE.
- Model files truncated, corrupted, from a newer format version, or with inconsistent arrays:
  ValueError naming the file (missing: FileNotFoundError). Writing is atomic: a failure
  mid-write (or a killed process) never leaves a partial file at the target path.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import starlabel
from starlabel import CannonModel, FitStatus, LabelRegressor, PayneModel, PixelStatus, fast, reference
from starlabel.vectorizer import PolynomialVectorizer

BACKENDS = pytest.mark.parametrize("backend", [fast, reference], ids=["fast", "reference"])


def exps(n_labels, order):
    return PolynomialVectorizer([f"L{i}" for i in range(n_labels)], order).exponents


# -- ill-conditioned Cannon pixels ---------------------------------------------------------------

@BACKENDS
def test_collinear_labels_make_pixels_singular(backend):
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, 50)
    x = np.column_stack([a, 2 * a])      # the second label is the first one, rescaled
    flux = 1 + 0.1 * a[:, None] + rng.normal(0, 0.01, (50, 3))
    theta, s2, status = backend.cannon_train(exps(2, 2), x, flux, np.full((50, 3), 1e4))
    assert np.all(status == PixelStatus.SINGULAR)
    assert np.all(np.isnan(theta)) and np.all(np.isinf(s2))


@BACKENDS
def test_a_constant_label_makes_pixels_singular(backend):
    rng = np.random.default_rng(1)
    x = np.column_stack([rng.uniform(-1, 1, 40), np.full(40, 0.3)])
    flux = 1 + rng.normal(0, 0.01, (40, 2))
    _, _, status = backend.cannon_train(exps(2, 1), x, flux, np.full((40, 2), 1e4))
    assert np.all(status == PixelStatus.SINGULAR)
    with pytest.raises(ValueError, match="constant"):
        CannonModel(["A", "B"], order=1, backend="fast" if backend is fast else "reference").train(
            x, flux, np.full((40, 2), 1e4))


@BACKENDS
def test_cubic_model_with_few_stars(backend):
    """Order 3 in 2 labels has 10 terms: 10 usable stars fit exactly, 9 are too few."""
    rng = np.random.default_rng(2)
    e = exps(2, 3)
    x = rng.uniform(-1, 1, (10, 2))
    flux = 1 + 0.1 * rng.normal(size=(10, 2))
    ivar = np.full((10, 2), 1e4)
    ivar[0, 1] = 0.0                       # pixel 1 has only 9 usable stars
    theta, s2, status = backend.cannon_train(e, x, flux, ivar)
    assert list(status) == [PixelStatus.OK, PixelStatus.TOO_FEW_STARS]
    assert s2[0] == 0.0 and np.isinf(s2[1])
    v = np.column_stack([np.prod(x ** k, axis=1) for k in e])
    np.testing.assert_allclose(v @ theta[0], flux[:, 0], atol=1e-8)   # interpolates the stars


def test_ill_conditioned_pixels_agree_between_backends():
    """Labels clustered to 1e-4 of their range: a nearly singular quadratic Gram matrix;
    both backends either train it to the same theta or both call it singular."""
    rng = np.random.default_rng(3)
    x = 1e-4 * rng.uniform(-1, 1, (60, 2)) + 0.5
    flux = 1 + 0.1 * rng.normal(size=(60, 4))
    ivar = np.full(flux.shape, 1e4)
    f = fast.cannon_train(exps(2, 2), x, flux, ivar)
    r = reference.cannon_train(exps(2, 2), x, flux, ivar)
    np.testing.assert_array_equal(f[2], r[2])


# -- LM with a singular Jacobian -------------------------------------------------------------------

@BACKENDS
def test_fit_with_a_label_the_spectrum_ignores(backend):
    rng = np.random.default_rng(4)
    e = exps(2, 2)
    theta = np.zeros((30, e.shape[0]))
    theta[:, 0] = 1.0
    theta[:, 1] = rng.normal(0, 0.1, 30)          # L0 only
    theta[:, 3] = rng.normal(0, 0.05, 30)         # L0^2
    truth = np.array([[0.3, 0.0]])
    flux = fast.cannon_predict(e, theta, truth)
    ivar = np.full(flux.shape, 1e6)
    start = np.array([0.0, 0.7])
    sol = backend.cannon_fit(e, theta, np.zeros(30), flux, ivar, start)
    assert sol.status[0] in (FitStatus.CONVERGED, FitStatus.MAX_ITER)
    assert abs(sol.x[0, 0] - 0.3) < 1e-6           # the label the spectrum sees is fitted
    assert sol.x[0, 1] == 0.7                       # the other stays where it started
    assert not np.isfinite(sol.covariance[0, 1, 1])  # and has no finite error


# -- Cannon fits whose chi2 overflows -------------------------------------------------------------

@pytest.mark.parametrize("objective", ["polynomial", "per_pixel"])
def test_cannon_fit_with_non_finite_chi2_at_every_start(monkeypatch, objective):
    """Flux of 1e200 where ivar > 0, or every start at 1e120, overflow chi2 at every start:
    that spectrum is NON_FINITE (without a warning, which the suite turns into an error) in
    both backends, and the other spectra of the call fit as they do alone."""
    for backend in (fast, reference):
        monkeypatch.setattr(backend.cannon, "use_polynomial_form",
                            lambda *_: objective == "polynomial")
    rng = np.random.default_rng(6)
    e = exps(3, 2)
    x = rng.uniform(-1, 1, (60, 3))
    flux = 1 + x @ rng.normal(0, 0.1, (3, 30)) + (x**2) @ rng.normal(0, 0.03, (3, 30))
    flux += rng.normal(0, 0.01, flux.shape)
    ivar = np.full(flux.shape, 1e4)
    theta, s2, _ = fast.cannon_train(e, x, flux, ivar)
    flux, ivar = flux[:4].copy(), ivar[:4]
    starts = np.tile(rng.uniform(-1, 1, (3, 3)), (4, 1, 1))
    flux[1, 2] = 1e200        # spectrum 1: one absurd pixel
    starts[2] = 1e120         # spectrum 2: every start absurd
    starts[3, 0] = 1e120      # spectrum 3: one absurd start among good ones
    expected = [FitStatus.CONVERGED, FitStatus.NON_FINITE, FitStatus.NON_FINITE,
                FitStatus.CONVERGED]
    solutions = []
    for backend in (fast, reference):
        sol = backend.cannon_fit(e, theta, s2, flux, ivar, starts)
        assert list(sol.status) == expected
        assert not np.any(np.isfinite(sol.chi2[1:3])) and np.all(sol.n_iter[1:3] == 0)
        assert np.all(np.isnan(sol.covariance[1:3]))
        for i in (0, 3):   # the good spectra fit exactly as they do alone
            alone = backend.cannon_fit(e, theta, s2, flux[[i]], ivar[[i]], starts[[i]])
            for field_all, field_alone in zip(sol, alone):
                np.testing.assert_array_equal(field_all[i], field_alone[0])
        solutions.append(sol)
    a, b = solutions
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_array_equal(a.x[1:3], b.x[1:3])    # both stay at the same start
    np.testing.assert_allclose(a.x, b.x, rtol=0, atol=1e-9)


@pytest.mark.parametrize("backend", ["fast", "reference"])
def test_cannon_model_reports_non_finite_fits(survey, backend):
    """Through CannonModel.fit_labels, in physical units: the same statuses in both backends."""
    model = CannonModel(survey.label_names).train(survey.labels, survey.flux, survey.ivar)
    model.backend = backend
    flux, ivar = survey.flux[:3].copy(), survey.ivar[:3]
    flux[0, 7] = 1e200
    initial = np.tile(model.initial_labels, (3, 1, 1))
    initial[2] = 1e120
    result = model.fit_labels(flux, ivar, initial=initial)
    assert list(result.status) == [FitStatus.NON_FINITE, FitStatus.CONVERGED, FitStatus.NON_FINITE]
    assert np.isinf(result.chi2[0]) and not np.isfinite(result.chi2[2])
    assert np.all(np.isnan(result.covariance[[0, 2]]))
    assert np.all(np.isfinite(result.labels[1])) and np.isfinite(result.chi2[1])


# -- overflowing networks --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("activation", ["leaky_relu", "sigmoid", "tanh", "softplus", "silu"])
def test_overflowing_activations_give_non_finite_outputs_not_errors(dtype, activation):
    huge = np.finfo(dtype).max / 2   # bounded activations saturate; the sum of 4 still overflows
    w = [np.full((4, 2), huge, dtype), np.full((3, 4), huge, dtype)]
    b = [np.zeros(4, dtype), np.zeros(3, dtype)]
    x = np.array([[1.0, 1.0], [-1.0, -1.0], [1e-30, 0.0]])
    out_f, jac_f = fast.mlp_forward(w, b, x, activation=activation, jacobian=True)
    with np.errstate(all="ignore"):
        out_r, jac_r = reference.mlp_forward(w, b, x, activation=activation, jacobian=True)
    assert out_f.dtype == dtype and not np.all(np.isfinite(out_f))
    np.testing.assert_array_equal(np.isfinite(out_f), np.isfinite(out_r))
    np.testing.assert_array_equal(out_f[~np.isfinite(out_f)], out_r[~np.isfinite(out_r)])


def test_fit_through_an_overflowing_network_reports_non_finite():
    rng = np.random.default_rng(5)
    wave = np.linspace(15000, 15100, 50)
    w = [rng.normal(size=(8, 2)) * 1e300, rng.normal(size=(50, 8)) * 1e300]
    emulator = {"kind": "mlp", "weights": w, "biases": [np.zeros(8), np.zeros(50)],
                "activation": "tanh", "slope": 0.01}
    layout = {"model_wavelength": wave, "wavelength": wave, "segment_index": np.zeros(50, np.int32),
              "segment_coord": np.linspace(-1, 1, 50), "n_segments": 1, "n_coef": 0, "fit_rv": False}
    flux, ivar = np.ones((1, 50)), np.full((1, 50), 1e4)
    sol = fast.spectrum_fit(emulator, layout, flux, ivar, np.zeros(2))
    assert sol.status[0] == FitStatus.NON_FINITE
    with np.errstate(all="ignore"):
        ref = reference.spectrum_fit(emulator, layout, flux, ivar, np.zeros(2))
    assert ref.status[0] == FitStatus.NON_FINITE


# -- damaged model files -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(survey):
    cannon = CannonModel(survey.label_names, order=2).train(survey.labels, survey.flux, survey.ivar)
    payne = PayneModel(survey.label_names, hidden=(8,)).train(survey.labels, survey.flux, epochs=2)
    regressor = LabelRegressor(survey.label_names, hidden=(8,)).train(
        survey.flux, survey.labels, survey.ivar, epochs=2)
    return {"cannon": cannon, "payne": payne, "regressor": regressor}


def damaged_copies(good, tmp_path):
    """Truncated at several points, and with bytes flipped inside an array's data."""
    data = good.read_bytes()
    out = {}
    for fraction in (0.0, 0.1, 0.5, 0.99):
        path = tmp_path / f"truncated_{fraction}.npz"
        path.write_bytes(data[: int(len(data) * fraction)])
        out[f"truncated {fraction}"] = path
    flipped = bytearray(data)
    middle = len(flipped) // 2
    flipped[middle:middle + 8] = bytes(b ^ 0xFF for b in flipped[middle:middle + 8])
    path = tmp_path / "flipped.npz"
    path.write_bytes(bytes(flipped))
    out["flipped bytes"] = path
    return out


@pytest.mark.parametrize("kind", ["cannon", "payne", "regressor"])
def test_damaged_model_files_raise_clear_errors(models, kind, tmp_path):
    model = models[kind]
    good = tmp_path / "good.npz"
    model.write(good)
    cls = type(model)
    for case, path in damaged_copies(good, tmp_path).items():
        with pytest.raises(ValueError, match=str(path.name)):
            cls.read(path)
    with np.load(good) as data:
        arrays = dict(data)
    newer = tmp_path / "newer.npz"
    np.savez(newer, **{**arrays, "format_version": np.int64(2)})
    with pytest.raises(ValueError, match="newer starlabel"):
        cls.read(newer)
    other = {"cannon": "payne", "payne": "cannon", "regressor": "cannon"}[kind]
    wrong = tmp_path / "wrong_kind.npz"
    np.savez(wrong, **{**arrays, "format": np.array(f"starlabel.{other}")})
    with pytest.raises(ValueError, match=f"expected a starlabel.{ {'regressor': 'label_regressor'}.get(kind, kind)} file"):
        cls.read(wrong)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{**arrays, "label_names": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="pickled.npz"):
        cls.read(pickled)


@pytest.mark.parametrize("kind", ["payne", "regressor"])
@pytest.mark.parametrize("n_layers", [0, -1, 10**12, 3])
def test_network_model_files_with_a_wrong_layer_count(models, kind, n_layers, tmp_path):
    good = tmp_path / "good.npz"
    models[kind].write(good)
    with np.load(good) as data:
        arrays = dict(data)
    bad = tmp_path / "layers.npz"
    np.savez(bad, **{**arrays, "n_layers": np.int64(n_layers)})
    start = time.perf_counter()
    with pytest.raises(ValueError, match="layers.npz"):
        type(models[kind]).read(bad)
    assert time.perf_counter() - start < 5   # a corrupt count must not build huge tables


PAYNE_CASES = {
    "x_min wrong length": (dict(x_min=np.zeros(2)), "x_min has shape"),
    "x_max below x_min": (dict(x_max=-np.ones(3)), "x_max must exceed x_min"),
    "NaN scaling": (dict(x_min=np.array([0.0, np.nan, 0.0])), "x_min contains NaN"),
    "NaN weight": (dict(w_array_0=np.full((6, 3), np.nan, np.float32)), "contains NaN"),
    "1-D weights": (dict(w_array_0=np.zeros(6, np.float32)), "weights\\[0\\] must have 2 dimension"),
    "bias too long": (dict(b_array_1=np.zeros(11, np.float32)), "biases\\[1\\] must have shape"),
    "2-D bias": (dict(b_array_0=np.zeros((6, 1), np.float32)), "biases\\[0\\] must have 1 dimension"),
    "string weights": (dict(w_array_1=np.full((10, 6), "a")), "w_array_1|weights\\[1\\]|float"),
    "empty layer": (dict(w_array_0=np.zeros((0, 3), np.float32), b_array_0=np.zeros(0, np.float32)),
                    "empty"),
}


@pytest.mark.parametrize("case", PAYNE_CASES, ids=list(PAYNE_CASES))
def test_payne_published_layout_with_inconsistent_arrays(case, tmp_path):
    rng = np.random.default_rng(0)
    arrays = dict(w_array_0=rng.normal(size=(6, 3)).astype(np.float32), b_array_0=np.zeros(6, np.float32),
                  w_array_1=rng.normal(size=(10, 6)).astype(np.float32), b_array_1=np.zeros(10, np.float32),
                  x_min=np.zeros(3), x_max=np.ones(3))
    changes, message = PAYNE_CASES[case]
    path = tmp_path / "net.npz"
    np.savez(path, **{**arrays, **changes})
    with pytest.raises(ValueError, match=message):
        starlabel.read_payne_npz(path)


def test_payne_published_layout_damaged_files(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "good.npz"
    np.savez(good, w_array_0=rng.normal(size=(6, 3)).astype(np.float32), b_array_0=np.zeros(6, np.float32),
             w_array_1=rng.normal(size=(10, 6)).astype(np.float32), b_array_1=np.zeros(10, np.float32),
             x_min=np.zeros(3), x_max=np.ones(3))
    starlabel.read_payne_npz(good)
    for case, path in damaged_copies(good, tmp_path).items():
        with pytest.raises(ValueError, match=path.name):
            starlabel.read_payne_npz(path)


# -- atomic writes -------------------------------------------------------------------------------------

def writers(models):
    return {
        "CannonModel.write": models["cannon"].write,
        "PayneModel.write": models["payne"].write,
        "LabelRegressor.write": models["regressor"].write,
        "write_payne_npz": lambda path: starlabel.write_payne_npz(models["payne"], path),
    }


class Unwritable(np.ndarray):
    """An array whose serialisation fails part-way through a file."""

    def tobytes(self, *args, **kwargs):
        raise OSError("disk full (simulated)")

    def tofile(self, *args, **kwargs):
        raise OSError("disk full (simulated)")


@pytest.mark.parametrize("name", ["CannonModel.write", "PayneModel.write", "LabelRegressor.write",
                                  "write_payne_npz"])
def test_a_failing_write_leaves_the_old_file(models, name, tmp_path, monkeypatch):
    write = writers(models)[name]
    path = tmp_path / "model.npz"
    write(path)
    before = path.read_bytes()
    real_write = np.lib.format.write_array
    calls = []

    def failing_write_array(fp, array, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:   # some arrays are already in the file
            raise OSError("disk full (simulated)")
        return real_write(fp, array, *args, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write_array)
    with pytest.raises(OSError, match="disk full"):
        write(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["model.npz"]   # no temporary left behind


def test_a_killed_writer_never_leaves_a_partial_model(tmp_path):
    """SIGKILL a process that rewrites a large model in a loop: the file at the target path is
    always a complete, readable model (a hidden temporary may remain beside it)."""
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent("""
        import sys
        import numpy as np
        from starlabel import CannonModel
        rng = np.random.default_rng(0)
        labels = rng.uniform(0, 1, (40, 2))
        flux = 1 + 0.1 * rng.normal(size=(40, 20000))
        model = CannonModel(["A", "B"], order=2).train(labels, flux, np.full(flux.shape, 1e4))
        model.write(sys.argv[1])
        print("ready", flush=True)
        while True:
            model.write(sys.argv[1])
    """))
    target = tmp_path / "model.npz"
    for delay in (0.05, 0.13, 0.31):
        with subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE,
                              text=True) as proc:
            try:
                assert proc.stdout.readline().strip() == "ready"
                time.sleep(delay)
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        model = CannonModel.read(target)
        assert model.theta.shape == (20000, 6)
        for leftover in tmp_path.glob(".starlabel-*"):
            leftover.unlink()


@pytest.mark.parametrize("name", ["CannonModel.write", "write_payne_npz"])
def test_written_files_get_the_usual_permissions(models, name, tmp_path):
    """The temporary file behind an atomic write must not leave the model private (0600)."""
    path = tmp_path / "model.npz"
    old = os.umask(0o022)
    try:
        writers(models)[name](path)
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


# -- absurd but well-typed arguments ------------------------------------------------------------------

@BACKENDS
def test_absurd_exponents_are_rejected(backend):
    """The compiled polynomial tabulates every power up to the largest exponent."""
    e = np.array([[0], [2**31 - 1]], dtype=np.int32)
    with pytest.raises(ValueError, match="exponents must be <= 64"):
        backend.cannon_predict(e, np.ones((3, 2)), np.zeros((1, 1)))
    from starlabel._core import core
    with pytest.raises(ValueError, match="exponents must be <= 64"):
        core.cannon_predict(e, np.ones((2, 3)), np.zeros((1, 1)), False, 1)


def test_corrupt_chi2_polynomial_tables_are_rejected():
    """The core indexes with the chi2 polynomial's tables: every index is checked first."""
    from starlabel._chi2_polynomial import chi2_polynomial
    from starlabel._core import core
    exps = PolynomialVectorizer(["A", "B"], 2).exponents
    rng = np.random.default_rng(0)
    theta_t = np.ascontiguousarray(rng.normal(size=(3, 6)).T)
    flux, ivar = 1 + 0.1 * rng.normal(size=(2, 3)), np.full((2, 3), 100.0)
    tables = chi2_polynomial(exps)[1:]

    def fit(polynomial):
        return core.cannon_fit(exps, theta_t, np.zeros(3), flux, ivar, np.zeros((2, 1, 2)), None,
                               None, 5, polynomial, 1)

    fit(tables)
    names = ["parent", "pair_monomial", "grad_basis", "grad_entries", "hess_basis", "hess_entries"]
    for i, name in enumerate(names):
        for bad in (-2, 10**6):
            corrupt = [t.copy() for t in tables]
            corrupt[i].reshape(-1)[-1 if "entries" not in name else -2] = bad
            with pytest.raises(ValueError, match=name):
                fit(tuple(corrupt))
    with pytest.raises(ValueError, match="polynomial must be"):
        fit(tables[:5])


@BACKENDS
def test_window_wider_than_any_spectrum(backend):
    flux = np.random.default_rng(0).normal(size=(2, 30))
    ivar = np.ones_like(flux)
    out = backend.running_quantile(flux, ivar, window=2**62 + 1, quantile=0.5)
    np.testing.assert_allclose(out, np.broadcast_to(np.median(flux, axis=1)[:, None], flux.shape))
