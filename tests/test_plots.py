"""starlabel.plots: what each figure shows (numbers, points, labels, legends), bad input, saving."""

import copy
import re
import sys

import numpy as np
import pytest

matplotlib = pytest.importorskip("matplotlib", reason="plots need matplotlib (the plot extra)")
matplotlib.use("Agg")  # no display on CI; also keeps SyntheticGap.plot's pyplot figure headless

import starlabel  # noqa: E402
from starlabel import plots  # noqa: E402
from starlabel.datasets import synthetic_survey  # noqa: E402


@pytest.fixture(scope="module")
def train():
    return synthetic_survey(200, n_pixels=300, seed=0)


@pytest.fixture(scope="module")
def test_set():
    return synthetic_survey(60, n_pixels=300, seed=1, bad_pixel_fraction=0.02)


@pytest.fixture(scope="module")
def cannon(train):
    return starlabel.CannonModel(train.label_names, order=2,
                                 wavelength=train.wavelength).train(train.labels, train.flux,
                                                                    train.ivar)


@pytest.fixture(scope="module")
def fit(cannon, test_set):
    return cannon.fit_labels(test_set.flux, test_set.ivar)


@pytest.fixture(scope="module")
def payne(train):
    return starlabel.PayneModel(train.label_names, hidden=(8, 8)).train(
        train.labels, train.flux, epochs=3, batch_size=64, learning_rate=1e-3)


@pytest.fixture(scope="module")
def gap(train, test_set):
    return starlabel.synthetic_gap(train.flux[:80], test_set.flux, synthetic_ivar=train.ivar[:80],
                                   observed_ivar=test_set.ivar)


def _legend_texts(ax):
    legend = ax.get_legend()
    assert legend is not None, "the axes has no legend"
    return [t.get_text() for t in legend.get_texts()]


def _finite(values):
    values = np.asarray(values, dtype=float)
    return values[np.isfinite(values)]


def _saves(fig, tmp_path):
    path = tmp_path / "x.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_names_the_extra(monkeypatch, fit, test_set):
    # None in sys.modules makes the import fail as if matplotlib were not installed
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=re.escape('pip install "starlabel[plot]"')):
        plots.one_to_one(test_set.labels, fit.labels, test_set.label_names)


# -- one_to_one ---------------------------------------------------------------------------

def test_one_to_one_writes_bias_and_scatter(fit, test_set, tmp_path):
    truth, estimate = test_set.labels, fit.labels
    fig = plots.one_to_one(truth, estimate, test_set.label_names, errors=fit.errors)
    n_labels = len(test_set.label_names)
    assert len(fig.axes) == 2 * n_labels  # a residual panel under each label
    expected_units = {"TEFF": "K", "LOGG": "dex", "FE_H": "dex"}
    for j, name in enumerate(test_set.label_names):
        ax, res_ax = fig.axes[2 * j], fig.axes[2 * j + 1]
        unit = expected_units[name]
        text = "\n".join(t.get_text() for t in ax.texts)
        bias = float(re.search(rf"bias = ([+-]?[\d.]+) {unit}", text).group(1))
        scatter = float(re.search(rf"scatter = ([\d.]+) {unit}", text).group(1))
        diff = estimate[:, j] - truth[:, j]
        # three significant digits are written
        assert bias == pytest.approx(diff.mean(), rel=5e-3, abs=1e-12)
        assert scatter == pytest.approx(diff.std(), rel=5e-3)
        assert f"N = {truth.shape[0]}" in text
        points = ax.collections[-1].get_offsets()
        np.testing.assert_allclose(points, np.column_stack([truth[:, j], estimate[:, j]]))
        one_line = [line for line in ax.lines if line.get_label() == "1:1"][0]
        np.testing.assert_allclose(one_line.get_xdata(), one_line.get_ydata())
        assert _legend_texts(ax) == ["stars", "1:1"]
        assert f"[{unit}]" in ax.get_ylabel() and f"[{unit}]" in res_ax.get_xlabel()
        assert f"[{unit}]" in res_ax.get_ylabel()
        np.testing.assert_allclose(res_ax.collections[-1].get_offsets()[:, 1], diff)
        # the error bars: one segment per star
        assert len(ax.collections[0].get_segments()) == truth.shape[0]
    _saves(fig, tmp_path)


def test_one_to_one_failed_fits_units_and_no_residuals(fit, test_set):
    estimate = fit.labels.copy()
    estimate[[3, 7], 1] = np.nan
    fig = plots.one_to_one(test_set.labels, estimate, test_set.label_names,
                           units={"TEFF": "kelvin"}, residuals=False)
    assert len(fig.axes) == 3
    assert "[kelvin]" in fig.axes[0].get_xlabel()
    text = fig.axes[1].texts[0].get_text()
    assert "N = 58 (2 failed, not shown)" in text
    good = np.isfinite(estimate[:, 1])
    diff = estimate[good, 1] - test_set.labels[good, 1]
    scatter = float(re.search(r"scatter = ([\d.]+) dex", text).group(1))
    assert scatter == pytest.approx(diff.std(), rel=5e-3)
    assert len(fig.axes[1].collections[-1].get_offsets()) == 58
    fig = plots.one_to_one(test_set.labels, estimate, test_set.label_names,
                           units=["K", "", "dex"], residuals=False)
    assert fig.axes[1].get_xlabel() == "true $\\log g$"


@pytest.mark.parametrize("change, error, match", [
    (dict(estimate=np.zeros((60, 2))), ValueError, "estimate must have the shape of truth"),
    (dict(label_names=["TEFF", "LOGG"]), ValueError, "label_names"),
    (dict(label_names="TEFF"), TypeError, "label_names"),
    (dict(errors=-np.ones((60, 3))), ValueError, "errors contains negative"),
    (dict(errors=np.ones((60, 2))), ValueError, "errors must have the shape"),
    (dict(units={"VSINI": "km/s"}), ValueError, "units"),
    (dict(units=["K"]), ValueError, "units has 1 entries"),
    (dict(truth=np.full((60, 3), np.nan)), ValueError, "truth contains NaN"),
    (dict(truth=np.zeros(60)), ValueError, "truth must have 2"),
])
def test_one_to_one_bad_input(fit, test_set, change, error, match):
    args = dict(truth=test_set.labels, estimate=fit.labels, label_names=test_set.label_names)
    args.update(change)
    kwargs = {k: args.pop(k) for k in ("errors", "units") if k in args}
    with pytest.raises(error, match=match):
        plots.one_to_one(args["truth"], args["estimate"], args["label_names"], **kwargs)


# -- spectrum_fit ---------------------------------------------------------------------------

def test_spectrum_fit_draws_data_model_and_sigma_residuals(cannon, fit, test_set, tmp_path):
    wavelength, flux, ivar = test_set.wavelength, test_set.flux[0], test_set.ivar[0]
    model = cannon.predict(fit.labels[:1])[0]
    mask = np.zeros(wavelength.size, bool)
    mask[100:120] = True
    fig = plots.spectrum_fit(wavelength, flux, model, ivar=ivar, mask=mask, title="star 0")
    top, bottom = fig.axes
    fitted = (ivar > 0) & ~mask
    assert (ivar == 0).any() and np.isnan(flux[ivar == 0]).all()  # hidden, not drawn as NaN gaps
    data, left_out, model_line = top.lines
    np.testing.assert_allclose(_finite(data.get_ydata()), flux[fitted])
    np.testing.assert_allclose(_finite(left_out.get_ydata()), flux[(ivar > 0) & mask])
    np.testing.assert_allclose(_finite(model_line.get_ydata()), model)
    residual = bottom.lines[-1]
    np.testing.assert_allclose(_finite(residual.get_ydata()),
                               ((flux - model) * np.sqrt(ivar))[fitted])
    np.testing.assert_allclose(_finite(residual.get_xdata()), wavelength)
    assert _legend_texts(top) == ["data", "masked (not fitted)", "best-fit model"]
    assert bottom.get_xlabel() == "wavelength [Å]"
    assert "σ" in bottom.get_ylabel() and top.get_ylabel()
    assert top.get_title(loc="left") == "star 0"
    # lines are broken at the two chip gaps of the APOGEE-like grid
    assert np.isnan(residual.get_xdata()).sum() == 2
    _saves(fig, tmp_path)


def test_spectrum_fit_without_ivar(test_set):
    flux = test_set.flux[0]
    model = np.ones_like(flux)
    fig = plots.spectrum_fit(test_set.wavelength, flux, model)
    top, bottom = fig.axes
    assert bottom.get_ylabel() == "data − model"
    np.testing.assert_allclose(_finite(bottom.lines[-1].get_ydata()), _finite(flux - 1.0))
    assert _legend_texts(top) == ["data", "best-fit model"]


@pytest.mark.parametrize("change, error, match", [
    (dict(model_flux=np.ones(299)), ValueError, "model_flux must have shape"),
    (dict(flux=np.ones((2, 300))), ValueError, "flux must have 1"),
    (dict(ivar=-np.ones(300)), ValueError, "ivar contains negative"),
    (dict(ivar=np.ones(10)), ValueError, "ivar must have shape"),
    (dict(mask=np.zeros(300)), TypeError, "mask must be boolean"),
    (dict(mask=np.zeros(10, bool)), ValueError, "mask must have shape"),
    (dict(wavelength=np.full(300, np.nan)), ValueError, "wavelength contains NaN"),
    (dict(title=3), TypeError, "title"),
])
def test_spectrum_fit_bad_input(test_set, change, error, match):
    args = dict(wavelength=test_set.wavelength, flux=np.ones(300), model_flux=np.ones(300))
    args.update(change)
    positional = [args.pop(k) for k in ("wavelength", "flux", "model_flux")]
    with pytest.raises(error, match=match):
        plots.spectrum_fit(*positional, **args)


# -- loss_history ---------------------------------------------------------------------------

def test_loss_history_from_payne(payne, tmp_path):
    history = payne.history
    fig = plots.loss_history(history)
    (ax,) = fig.axes
    train, val = ax.lines[0], ax.lines[1]
    np.testing.assert_allclose(train.get_xdata(), [1, 2, 3])
    np.testing.assert_allclose(train.get_ydata(), history["train_loss"])
    np.testing.assert_allclose(val.get_ydata(), history["validation_loss"])
    best = history["best_epoch"]
    star = ax.lines[-1]
    assert star.get_marker() == "*"
    assert star.get_xdata()[0] == best + 1
    assert star.get_ydata()[0] == pytest.approx(history["validation_loss"][best])
    texts = _legend_texts(ax)
    assert texts[:2] == ["training", "validation"] and f"epoch {best + 1}" in texts[2]
    assert ax.get_yscale() == "log"
    assert ax.get_xlabel() == "epoch" and "loss" in ax.get_ylabel()
    # the model itself is accepted too
    np.testing.assert_allclose(plots.loss_history(payne).axes[0].lines[0].get_ydata(),
                               history["train_loss"])
    _saves(fig, tmp_path)


def test_loss_history_without_validation():
    history = {"train_loss": [1.0, 0.5, 0.7], "validation_loss": [None] * 3, "best_epoch": 1}
    (ax,) = plots.loss_history(history).axes
    texts = _legend_texts(ax)
    assert texts == ["training", "kept: epoch 2 (training 0.5)"]


@pytest.mark.parametrize("history, error, match", [
    ([0.1, 0.2], TypeError, "history must be a dict"),
    ({"train_loss": [0.1]}, ValueError, "missing"),
    ({"train_loss": [0.1, 0.2], "validation_loss": [0.1]}, ValueError, "validation_loss"),
    ({"train_loss": [], "validation_loss": []}, ValueError, "train_loss.*empty"),
    ({"train_loss": [0.1], "validation_loss": [0.1], "best_epoch": 4}, ValueError, "best_epoch"),
])
def test_loss_history_bad_input(history, error, match):
    with pytest.raises(error, match=match):
        plots.loss_history(history)


def test_loss_history_untrained_model():
    with pytest.raises(ValueError, match="not trained"):
        plots.loss_history(starlabel.PayneModel(["TEFF", "LOGG"]))


# -- cannon_coefficients ----------------------------------------------------------------------

def test_cannon_coefficients_default_terms(cannon, tmp_path):
    fig = plots.cannon_coefficients(cannon)
    axes = fig.axes
    linear = ["1", "TEFF", "LOGG", "FE_H"]
    assert len(axes) == len(linear) + 1
    for ax, term in zip(axes, linear):
        k = cannon.term_names.index(term)
        np.testing.assert_allclose(_finite(ax.lines[0].get_ydata()), cannon.theta[:, k])
        assert ax.get_ylabel().startswith("θ")
        assert term == "1" or term in ax.get_ylabel()
    np.testing.assert_allclose(_finite(axes[-1].lines[0].get_ydata()), np.sqrt(cannon.s2))
    assert "√s²" in axes[-1].get_ylabel()
    assert axes[-1].get_xlabel() == "wavelength [Å]"
    np.testing.assert_allclose(_finite(axes[-1].lines[0].get_xdata()), cannon.wavelength)
    _saves(fig, tmp_path)


def test_cannon_coefficients_terms_pixels_and_bad_pixels(cannon):
    model = copy.copy(cannon)
    model.wavelength = None
    model.theta = cannon.theta.copy()
    model.s2 = cannon.s2.copy()
    model.theta[5] = np.nan
    model.s2[5] = np.inf
    fig = plots.cannon_coefficients(model, terms=["TEFF^2", 0])
    assert len(fig.axes) == 3
    assert "TEFF^2" in fig.axes[0].get_ylabel()
    assert fig.axes[-1].get_xlabel() == "pixel"
    for ax in fig.axes:
        y = ax.lines[0].get_ydata()
        assert y.size == model.theta.shape[0] and np.isnan(y[5])  # untrainable pixel left blank


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(terms=["TEFF^3"]), ValueError, "terms: 'TEFF\\^3' is not a term"),
    (dict(terms=[]), ValueError, "terms is empty"),
    (dict(terms=[99]), ValueError, "out of range"),
    (dict(terms=[1.5]), TypeError, "terms"),
    (dict(wavelength=np.arange(10.0)), ValueError, "wavelength has 10 pixels"),
])
def test_cannon_coefficients_bad_input(cannon, kwargs, error, match):
    with pytest.raises(error, match=match):
        plots.cannon_coefficients(cannon, **kwargs)


def test_cannon_coefficients_untrained_or_not_a_model():
    with pytest.raises(ValueError, match="model is not trained"):
        plots.cannon_coefficients(starlabel.CannonModel(["TEFF", "LOGG"]))
    with pytest.raises(TypeError, match="model must be a CannonModel"):
        plots.cannon_coefficients(object())


# -- gap_embedding --------------------------------------------------------------------------

def test_gap_embedding_and_synthetic_gap_plot_agree(gap, tmp_path):
    fig = plots.gap_embedding(gap)
    (ax,) = fig.axes
    synthetic, observed = ax.collections
    np.testing.assert_allclose(synthetic.get_offsets(), gap.synthetic[:, :2])
    np.testing.assert_allclose(observed.get_offsets(), gap.observed[:, :2])
    assert _legend_texts(ax) == ["synthetic (80)", "observed (60)"]
    assert "PC1" in ax.get_xlabel() and "% of variance" in ax.get_xlabel()
    assert "PC2" in ax.get_ylabel()
    assert "distance" in ax.get_title()
    _saves(fig, tmp_path)
    # SyntheticGap.plot draws the same on an axes it is given (one implementation)
    other = matplotlib.figure.Figure().subplots()
    assert gap.plot(other) is other
    np.testing.assert_allclose(other.collections[0].get_offsets(), gap.synthetic[:, :2])
    assert other.get_title() == ax.get_title() and other.get_xlabel() == ax.get_xlabel()
    assert _legend_texts(other) == _legend_texts(ax)
    plt = pytest.importorskip("matplotlib.pyplot")
    drawn = gap.plot()  # without an axes: a new pyplot figure, as before
    try:
        np.testing.assert_allclose(drawn.collections[1].get_offsets(), gap.observed[:, :2])
    finally:
        plt.close(drawn.figure)


def test_gap_embedding_bad_input(gap):
    with pytest.raises(TypeError, match="gap must be a SyntheticGap"):
        plots.gap_embedding(gap.synthetic)
    flat = copy.copy(gap)
    flat.synthetic, flat.observed = gap.synthetic[:, :1], gap.observed[:, :1]
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        plots.gap_embedding(flat)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        flat.plot()
