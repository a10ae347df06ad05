"""LabelRegressor (spectra -> labels on the MLP engine): recovery on held-out synthetic spectra,
starting points for label fitting, backend parity, persistence and bad input."""

import numpy as np
import pytest

import starlabel
from starlabel import CannonModel, LabelRegressor
from starlabel.datasets import synthetic_survey
from starlabel.reference.lm import FTOL

N_PIXELS = 500


@pytest.fixture(scope="module")
def surveys():
    kw = dict(n_pixels=N_PIXELS, snr=100.0, bad_pixel_fraction=0.02)
    return synthetic_survey(2000, seed=1, **kw), synthetic_survey(200, seed=2, **kw)


@pytest.fixture(scope="module")
def regressor(surveys):
    train, _ = surveys
    model = LabelRegressor(train.label_names, hidden=(64, 64))
    return model.train(train.flux, train.labels, train.ivar, epochs=100, batch_size=64,
                       learning_rate=1e-3, lr_schedule="cosine", seed=0)


def test_recovers_labels_of_held_out_spectra(surveys, regressor):
    """Stated result: a 500 -> 64 -> 64 -> 3 float32 regressor trained for 100 epochs (Adam,
    lr 1e-3 cosine, L2 on standardized labels, 10% validation split, best epoch kept) on 2000
    synthetic stars at S/N 100 with 2% missing pixels recovers 200 held-out stars (same S/N
    and missing fraction) with median |error| 42 K in TEFF, 0.082 dex in LOGG and 0.0185 dex
    in FE_H (95th percentiles 154 K, 0.30 dex, 0.067 dex). Bounds: ~1.5x the measured
    medians (bit-reproducible for one build; the margin covers other ISA levels)."""
    _, test = surveys
    labels = regressor.predict(test.flux, test.ivar)
    assert labels.shape == (200, 3) and labels.dtype == np.float64
    err = np.abs(labels - test.labels)
    np.testing.assert_array_less(np.median(err, axis=0), [65.0, 0.125, 0.028])
    np.testing.assert_array_less(np.percentile(err, 95, axis=0), [240.0, 0.45, 0.10])
    history = regressor.history
    assert len(history["train_loss"]) == 100 and history["best_epoch"] is not None
    assert history["validation_loss"][history["best_epoch"]] == min(history["validation_loss"])
    # one spectrum as a 1-D array, and ivar == 0 pixels whose flux is NaN
    one = regressor.predict(test.flux[0], test.ivar[0])
    assert one.shape == (1, 3) and np.all(np.isfinite(one))
    np.testing.assert_allclose(one[0], labels[0], rtol=1e-5)  # float32; batch 1 sums in another order


def test_missing_pixels_are_fed_as_the_training_mean(surveys, regressor):
    _, test = surveys
    flux, ivar = test.flux[:5].copy(), test.ivar[:5].copy()
    ivar[:, 10:20], flux[:, 10:20] = 0.0, np.nan
    filled = np.where(ivar > 0, flux, regressor.flux_mean)
    np.testing.assert_array_equal(regressor.predict(flux, ivar),
                                  regressor.predict(filled, np.ones_like(filled)))
    np.testing.assert_array_equal(regressor.predict(filled), regressor.predict(filled, np.ones_like(filled)))


def test_predictions_start_label_fits(surveys, regressor):
    """The regressor as the source of starting points: a Cannon fitted from them (through
    CannonModel.fit_labels and through fit_spectra) converges, with one start instead of the
    default nine, to labels better than the regressor's (measured median |error| 27 K, 0.049,
    0.011 dex against the regressor's 42 K, 0.082, 0.018) and as good as the default fit's."""
    train, test = surveys
    cannon = CannonModel(train.label_names, order=2).train(train.labels, train.flux, train.ivar)
    start = regressor.predict(test.flux, test.ivar)[:, None, :]     # (n_spectra, 1, n_labels)
    # bounds="training" is fit_spectra's default; fit_labels' default is unbounded
    from_start = cannon.fit_labels(test.flux, test.ivar, initial=start, bounds="training")
    default = cannon.fit_labels(test.flux, test.ivar, bounds="training")
    fitted = starlabel.fit_spectra(cannon, test.flux, test.ivar, train.wavelength, fit_rv=False,
                                   initial=start)
    assert np.all(from_start.status == starlabel.FitStatus.CONVERGED)
    err = {name: np.median(np.abs(labels - test.labels), axis=0)
           for name, labels in (("regressor", start[:, 0]), ("cannon", from_start.labels),
                                ("default", default.labels), ("fit_spectra", fitted.labels))}
    assert np.all(err["cannon"] <= err["regressor"])
    np.testing.assert_allclose(err["cannon"], err["default"], rtol=0.05)
    # the same minimum from the same start (Newton steps on the chi2 polynomial against
    # Gauss-Newton steps on the pixels): each LM stops within sqrt(FTOL * chi2) sigma of it
    bound = 2 * np.sqrt(FTOL * from_start.chi2)[:, None] * from_start.errors
    assert np.all(np.abs(fitted.labels - from_start.labels) <= bound)


def test_backends_train_identically_for_a_few_epochs(surveys):
    train, test = surveys
    models = [LabelRegressor(train.label_names, hidden=(16,), backend=b, dtype="float64").train(
        train.flux[:120], train.labels[:120], train.ivar[:120], epochs=3, batch_size=32, seed=3)
        for b in ("fast", "reference")]
    # float64, 12 Adam steps on the same batches: the backends differ only in summation order
    # (measured max weight difference 2e-16; see test_mlp_parity); 1e-10 leaves room for
    # other ISA levels without hiding a real difference (one wrong step moves weights ~1e-3)
    for a, b in zip(models[0].weights + models[0].biases, models[1].weights + models[1].biases):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
    np.testing.assert_allclose(models[0].history["validation_loss"],
                               models[1].history["validation_loss"], rtol=1e-9)
    np.testing.assert_allclose(models[0].predict(test.flux, test.ivar),
                               models[1].predict(test.flux, test.ivar), rtol=1e-9)


def test_write_read_round_trip(surveys, regressor, tmp_path):
    _, test = surveys
    path = tmp_path / "regressor.npz"
    regressor.write(path)
    expected = regressor.predict(test.flux, test.ivar)
    for backend in ("fast", "reference"):
        again = LabelRegressor.read(path, backend=backend)
        assert again.label_names == regressor.label_names and again.hidden == (64, 64)
        assert again.dtype == np.float32 and again.n_pixels == N_PIXELS
        np.testing.assert_array_equal(again.flux_scale, regressor.flux_scale)
        # same build: fast is bit-identical; reference (NumPy float32 matmul, other summation
        # order over 500 inputs) measured 7e-7 of the unit-variance outputs (~6 ulp); bound 1e-5
        if backend == "fast":
            np.testing.assert_array_equal(again.predict(test.flux, test.ivar), expected)
        else:
            diff = np.abs(again.predict(test.flux, test.ivar) - expected).max(0)
            np.testing.assert_array_less(diff, 1e-5 * regressor.label_std)
    with pytest.raises(ValueError, match="found format .starlabel.label_regressor."):
        starlabel.PayneModel.read(path)
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    np.savez(tmp_path / "bad.npz", **dict(arrays, flux_mean=arrays["flux_mean"][:-1]))
    with pytest.raises(ValueError, match="flux_mean has 499 values"):
        LabelRegressor.read(tmp_path / "bad.npz")


def test_bad_input(surveys, regressor):
    train, _ = surveys
    flux, labels, ivar = train.flux[:50], train.labels[:50], train.ivar[:50]
    fresh = LabelRegressor(train.label_names, hidden=(4,))
    with pytest.raises(RuntimeError, match="not trained"):
        fresh.predict(flux, ivar)
    with pytest.raises(RuntimeError, match="not trained"):
        fresh.write("never.npz")
    with pytest.raises(ValueError, match="labels has 49 stars but flux has 50"):
        fresh.train(flux, labels[:49], ivar)
    with pytest.raises(ValueError, match="labels must have 3 columns"):
        fresh.train(flux, labels[:, :2], ivar)
    with pytest.raises(ValueError, match="flux and ivar must have the same shape"):
        fresh.train(flux, labels, ivar[:, :-1])
    bad = np.where(ivar > 0, flux, 1.0)
    bad[3, 7] = np.nan
    with pytest.raises(ValueError, match="flux is NaN or inf where ivar > 0"):
        fresh.train(bad, labels, ivar)
    with pytest.raises(ValueError, match="flux contains NaN"):
        fresh.train(flux, labels)  # NaN at missing pixels and no ivar to mark them
    with pytest.raises(ValueError, match="ivar contains negative"):
        fresh.train(flux, labels, -ivar)
    with pytest.raises(ValueError, match="labels contains NaN"):
        fresh.train(flux, np.where(labels > 0, np.nan, labels), ivar)
    with pytest.raises(ValueError, match=r"\['FE_H'\] are constant"):
        fresh.train(flux, np.column_stack([labels[:, :2], np.zeros(50)]), ivar)
    with pytest.raises(TypeError, match="validation must be"):
        fresh.train(flux, labels, ivar, validation=flux)
    with pytest.raises(ValueError, match="label_weights must have shape"):
        fresh.train(flux, labels, ivar, label_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fresh.train(flux, labels, ivar, optimizer="sgd")
    with pytest.raises(ValueError, match="flux has 499 pixels, the regressor has 500"):
        regressor.predict(flux[:, 1:], ivar[:, 1:])
    with pytest.raises(ValueError, match="flux is NaN or inf where ivar > 0"):
        regressor.predict(bad, ivar)
    with pytest.raises(ValueError, match="activation must be one of"):
        LabelRegressor(["A"], activation="gelu")
    with pytest.raises(ValueError, match="backend must be one of"):
        LabelRegressor(["A"], backend="gpu")
