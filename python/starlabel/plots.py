"""Diagnostic plots: label accuracy, spectrum fits, emulator training, Cannon coefficients and
the synthetic gap. Needs matplotlib (``pip install "starlabel[plot]"``).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so none is kept
alive by pyplot's figure registry (a CLI or a loop can make hundreds without leaking). Save it
with ``fig.savefig("x.png")``; in Jupyter, returning it from a cell displays it.
"""

import numpy as np

from . import _validation as check

__all__ = ["one_to_one", "spectrum_fit", "loss_history", "cannon_coefficients", "gap_embedding"]

_INSTALL_HINT = 'plotting needs matplotlib: pip install "starlabel[plot]"'
_DPI = 120            # PNG resolution: figure sizes below are in inches at this dpi
_WIDE = 11.0          # inches, for plots against wavelength (thousands of pixels)
_GAP_FACTOR = 5.0     # a wavelength step this many times the median one is a chip gap


def _matplotlib():
    """The Figure class; raises the install hint when matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    return Figure


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(_INSTALL_HINT) from None
    return plt


def _figure(width, height):
    return _matplotlib()(figsize=(width, height), dpi=_DPI, layout="constrained")


def _number(value, sign=False):
    """Three significant digits, but whole numbers kept whole (1234 K, not 1.23e+03 or 1230)."""
    if abs(value) >= 100:
        return f"{value:+.0f}" if sign else f"{value:.0f}"
    return np.format_float_positional(value, precision=3, unique=True, fractional=False,
                                      trim="-", sign=sign)


# -- label names and units ---------------------------------------------------------------

_PRETTY = {"TEFF": r"$T_\mathrm{eff}$", "LOGG": r"$\log g$", "FE_H": "[Fe/H]", "M_H": "[M/H]"}


def _pretty(name):
    """TEFF -> T_eff, MG_FE -> [Mg/Fe]; unknown names are shown as given."""
    key = name.upper()
    if key in _PRETTY:
        return _PRETTY[key]
    for suffix, ref in (("_FE", "Fe"), ("_H", "H"), ("_M", "M")):
        if key.endswith(suffix) and len(key) > len(suffix):
            return f"[{name[:-len(suffix)].capitalize()}/{ref}]"
    return name


def _units(label_names, units):
    """One unit string per label (maybe empty): given ones first, else the results-table units
    (K for Teff, km/s for velocities), else dex."""
    from .io import _unit_for  # the unit table the FITS writer uses, so plots and files agree

    n = len(label_names)
    if units is None:
        given = [None] * n
    elif isinstance(units, dict):
        unknown = set(units) - set(label_names)
        if unknown:
            raise ValueError(f"units: {sorted(unknown)} are not in label_names {list(label_names)}")
        given = [units.get(name) for name in label_names]
    elif isinstance(units, str):
        raise TypeError("units must be a dict {label name: unit} or a sequence of n_labels strings")
    else:
        given = list(units)
        if len(given) != n:
            raise ValueError(f"units has {len(given)} entries, label_names has {n}")
    out = []
    for name, unit in zip(label_names, given):
        if unit is None:
            unit = _unit_for(name) or "dex"
        if not isinstance(unit, str):
            raise TypeError(f"units: the unit of {name!r} must be a string, got {type(unit).__name__}")
        out.append(unit)
    return out


def _with_unit(text, unit):
    return f"{text} [{unit}]" if unit else text


def _label_names(label_names, n_labels):
    if isinstance(label_names, str):
        raise TypeError("label_names must be a sequence of strings, not one string")
    names = list(label_names)
    if len(names) != n_labels or not all(isinstance(n, str) for n in names):
        raise ValueError(f"label_names must be {n_labels} strings (one per column of truth), "
                         f"got {names!r}")
    return names


# -- one-to-one --------------------------------------------------------------------------

def one_to_one(truth, estimate, label_names, *, errors=None, units=None, residuals=True):
    """Estimated against true labels, one panel per label, with the 1:1 line.

    Each panel states the bias (mean of estimate - truth), the scatter (its standard deviation,
    ddof=0) and the number of stars they are computed over: stars whose estimate is NaN or
    inf (failed fits) are left out of both the points and the numbers, and counted on the panel.

    Parameters
    ----------
    truth : (n_stars, n_labels) finite reference labels
    estimate : (n_stars, n_labels) estimated labels (NaN allowed for failed fits)
    label_names : sequence of n_labels str
    errors : (n_stars, n_labels) 1-sigma uncertainties of ``estimate``, >= 0, optional
    units : dict {name: unit} or sequence of n_labels str, optional; by default K for TEFF,
        km/s for velocities, dex otherwise ("" for none)
    residuals : bool, also draw (estimate - truth) against truth below each panel

    Returns
    -------
    matplotlib.figure.Figure, one axes per label (plus one residual axes per label)
    """
    truth = check.finite_array("truth", truth, 2)
    estimate = check.as_float_array("estimate", estimate, 2)
    if estimate.shape != truth.shape:
        raise ValueError(f"estimate must have the shape of truth {truth.shape}, got {estimate.shape}")
    names = _label_names(label_names, truth.shape[1])
    if errors is not None:
        errors = check.as_float_array("errors", errors, 2)
        if errors.shape != truth.shape:
            raise ValueError(f"errors must have the shape of truth {truth.shape}, got {errors.shape}")
        if np.any(errors < 0):
            raise ValueError("errors contains negative values")
    unit_list = _units(names, units)

    n_labels = len(names)
    n_cols = min(n_labels, 4)
    n_rows = -(-n_labels // n_cols)
    rows_per_label = 2 if residuals else 1
    fig = _figure(3.6 * n_cols, (4.4 if residuals else 3.5) * n_rows)
    grid = fig.add_gridspec(rows_per_label * n_rows, n_cols,
                            height_ratios=([3, 1] if residuals else [1]) * n_rows)
    for j, (name, unit) in enumerate(zip(names, unit_list)):
        row, col = divmod(j, n_cols)
        ax = fig.add_subplot(grid[rows_per_label * row, col])
        res_ax = fig.add_subplot(grid[2 * row + 1, col], sharex=ax) if residuals else None
        _one_to_one_panel(ax, res_ax, truth[:, j], estimate[:, j],
                          None if errors is None else errors[:, j], _pretty(name), unit)
    return fig


def _one_to_one_panel(ax, res_ax, truth, estimate, errors, name, unit):
    good = np.isfinite(estimate)
    x, y = truth[good], estimate[good]
    diff = y - x
    if errors is not None:
        ax.errorbar(x, y, yerr=errors[good], fmt="none", ecolor="0.6", elinewidth=0.6, zorder=1)
    ax.scatter(x, y, s=8, alpha=0.7, color="C0", linewidths=0, zorder=2, label="stars")
    both = np.concatenate([truth, y])
    low, high = both.min(), both.max()
    pad = 0.05 * (high - low) if high > low else 0.5 * max(abs(low), 1.0)
    limits = (low - pad, high + pad)
    ax.plot(limits, limits, color="k", lw=0.8, zorder=3, label="1:1")
    ax.set_xlim(limits)
    ax.set_ylim(limits)
    ax.set_aspect("equal", adjustable="box")
    ax.set_ylabel(_with_unit(f"estimated {name}", unit))
    lines = []
    if good.any():
        lines += [f"bias = {_number(diff.mean(), sign=True)} {unit}".rstrip(),
                  f"scatter = {_number(diff.std())} {unit}".rstrip()]
    else:
        lines.append("no finite estimate")
    lines.append(f"N = {int(good.sum())}" + (f" ({int((~good).sum())} failed, not shown)"
                                              if not good.all() else ""))
    ax.text(0.04, 0.96, "\n".join(lines), transform=ax.transAxes, va="top", ha="left",
            fontsize="small", bbox=dict(boxstyle="round", facecolor="white", alpha=0.85,
                                        edgecolor="0.7"), zorder=4)
    ax.legend(loc="lower right", fontsize="small", framealpha=0.85)
    if res_ax is None:
        ax.set_xlabel(_with_unit(f"true {name}", unit))
        return
    ax.tick_params(labelbottom=False)
    res_ax.axhline(0.0, color="k", lw=0.8)
    res_ax.scatter(x, diff, s=6, alpha=0.7, color="C0", linewidths=0)
    if diff.size:
        span = np.max(np.abs(diff))
        res_ax.set_ylim(-1.1 * span if span > 0 else -1, 1.1 * span if span > 0 else 1)
    res_ax.set_xlabel(_with_unit(f"true {name}", unit))
    res_ax.set_ylabel(_with_unit("est. − true", unit), fontsize="small")


# -- a spectrum and its fit ----------------------------------------------------------------

def _break_at_gaps(wavelength, *arrays):
    """Insert a NaN at every chip gap so lines are not drawn across it."""
    step = np.diff(wavelength)
    if wavelength.size < 3 or not np.all(step > 0):
        return (wavelength, *arrays)
    at = np.flatnonzero(step > _GAP_FACTOR * np.median(step)) + 1
    if at.size == 0:
        return (wavelength, *arrays)
    return tuple(np.insert(a, at, np.nan) for a in (wavelength, *arrays))


def spectrum_fit(wavelength, flux, model_flux, *, ivar=None, mask=None, title=None):
    """One spectrum with its best-fit model (top) and the residuals (bottom).

    Parameters
    ----------
    wavelength : (n_pixels,) Angstrom (astropy Quantity accepted)
    flux : (n_pixels,) observed flux; pixels with ivar == 0 are hidden (their flux may be NaN)
    model_flux : (n_pixels,) best-fit model, e.g. ``SpectrumFitResult.model_flux[i]``
    ivar : (n_pixels,) inverse variance, optional; residuals are then (data - model) / sigma
    mask : bool (n_pixels,), optional, True marks a pixel left out of the fit (as
        ``fit_spectra``'s ``mask``): drawn in grey, without a residual
    title : str, optional

    Returns
    -------
    matplotlib.figure.Figure with two axes (spectrum, residuals)
    """
    if hasattr(wavelength, "unit"):
        wavelength = wavelength.to_value("Angstrom")
    wavelength = check.finite_array("wavelength", wavelength, 1)
    n = wavelength.size
    flux = check.as_float_array("flux", flux, 1)
    model_flux = check.as_float_array("model_flux", model_flux, 1)
    for name, array in (("flux", flux), ("model_flux", model_flux)):
        if array.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) like wavelength, got {array.shape}; "
                             "pass one spectrum, e.g. flux[i]")
    if ivar is None:
        shown = np.isfinite(flux)
        sigma = None
    else:
        ivar = check.as_float_array("ivar", ivar, 1)
        if ivar.shape != (n,):
            raise ValueError(f"ivar must have shape ({n},) like wavelength, got {ivar.shape}")
        flux, ivar = (a[0] for a in check.spectra(flux, ivar))
        shown = ivar > 0
        sigma = np.where(shown, 1.0 / np.sqrt(np.where(shown, ivar, 1.0)), np.nan)
    if mask is None:
        mask = np.zeros(n, bool)
    else:
        mask = np.asarray(mask)
        if mask.dtype != bool:
            raise TypeError(f"mask must be boolean (True leaves a pixel out), got dtype {mask.dtype}")
        if mask.shape != (n,):
            raise ValueError(f"mask must have shape ({n},) like wavelength, got {mask.shape}")
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a str, got {type(title).__name__}")

    fitted = shown & ~mask
    data = np.where(fitted, flux, np.nan)
    left_out = np.where(shown & mask, flux, np.nan)
    model = np.where(np.isfinite(model_flux), model_flux, np.nan)
    residual = np.where(fitted, flux - model, np.nan)
    if sigma is not None:
        residual = residual / sigma
    w, data, left_out, model, residual = _break_at_gaps(wavelength, data, left_out, model, residual)

    fig = _figure(_WIDE, 5.2)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot(w, data, color="k", lw=0.6, label="data")
    if mask.any():
        # one shaded collection per panel, however many masked runs there are
        masked = _break_at_gaps(wavelength, mask.astype(float))[1] == 1
        for ax, label in ((top, "masked (not fitted)"), (bottom, None)):
            ax.fill_between(w, 0, 1, where=masked, transform=ax.get_xaxis_transform(),
                            color="0.85", lw=0, step="mid", zorder=0, label=label)
        top.plot(w, left_out, color="0.55", lw=0.6)
    top.plot(w, model, color="C3", lw=0.8, alpha=0.85, label="best-fit model")
    top.set_ylabel("flux (normalized)")
    top.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncols=3, frameon=False,
               borderaxespad=0.2)
    if title:
        top.set_title(title, loc="left")
    bottom.axhline(0.0, color="k", lw=0.6)
    bottom.plot(w, residual, color="C0", lw=0.6)
    finite = residual[np.isfinite(residual)]
    if finite.size:
        rms = float(np.sqrt(np.mean(finite**2)))
        unit = " σ" if sigma is not None else ""
        bottom.text(0.005, 0.95, f"rms = {_number(rms)}{unit}", transform=bottom.transAxes,
                    va="top", ha="left", fontsize="small",
                    bbox=dict(boxstyle="round", facecolor="white", alpha=0.85, edgecolor="0.7"))
    bottom.set_ylabel("(data − model) / σ" if sigma is not None else "data − model")
    bottom.set_xlabel("wavelength [Å]")
    fig.align_ylabels([top, bottom])
    return fig


# -- emulator training -------------------------------------------------------------------

def loss_history(history):
    """Training and validation loss per epoch (log y), with the kept (best) epoch marked.

    Parameters
    ----------
    history : dict from ``PayneModel.history`` / ``LabelRegressor.history`` (``train_loss``
        and ``validation_loss``, lists of n_epochs floats, validation entries None when there
        was no validation set; ``best_epoch``, 0-based), or the trained model itself

    Epochs are numbered from 1 on the plot (``best_epoch`` + 1 is marked).

    Returns
    -------
    matplotlib.figure.Figure with one axes
    """
    if not isinstance(history, dict) and hasattr(history, "history"):
        if history.history is None:
            raise ValueError("history: the model is not trained (its history is None)")
        history = history.history
    if not isinstance(history, dict):
        raise TypeError(f"history must be a dict like PayneModel.history, got {type(history).__name__}")
    missing = {"train_loss", "validation_loss"} - set(history)
    if missing:
        raise ValueError(f"history is missing {sorted(missing)}")
    train = check.as_float_array("history['train_loss']", history["train_loss"], 1)
    raw_val = list(history["validation_loss"])
    if len(raw_val) != train.size:
        raise ValueError(f"history['validation_loss'] has {len(raw_val)} epochs, "
                         f"history['train_loss'] has {train.size}")
    has_val = any(v is not None for v in raw_val)
    val = np.array([np.nan if v is None else v for v in raw_val], dtype=float)
    best = history.get("best_epoch")
    if best is not None and not (0 <= best < train.size):
        raise ValueError(f"history['best_epoch'] = {best} is outside 0..{train.size - 1}")

    epochs = np.arange(1, train.size + 1)
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    marker = "o" if train.size <= 30 else None
    ax.plot(epochs, train, color="C0", marker=marker, ms=3, label="training")
    if has_val:
        ax.plot(epochs, val, color="C1", marker=marker, ms=3, label="validation")
    if best is not None:
        kept = val if has_val else train
        ax.axvline(best + 1, color="0.4", ls=":", lw=1)
        ax.plot([best + 1], [kept[best]], marker="*", ms=12, color="C3", ls="none",
                label=f"kept: epoch {best + 1} ({'validation' if has_val else 'training'} "
                      f"{_number(kept[best])})")
    finite = np.concatenate([train, val])
    finite = finite[np.isfinite(finite)]
    if finite.size and np.all(finite > 0):
        ax.set_yscale("log")
        if finite.max() < 10 * finite.min():
            # within one decade the log axis would label ticks as 9.35x10^-1
            from matplotlib.ticker import ScalarFormatter

            for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                set_formatter(ScalarFormatter(useOffset=False))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (mean over stars and pixels)")
    ax.set_xlim(0.5, train.size + 0.5 + 0.02 * train.size)
    if train.size <= 12:
        ax.set_xticks(epochs)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=3, frameon=False,
              fontsize="small", borderaxespad=0.2, handlelength=1.5, columnspacing=1.2)
    ax.grid(True, which="both", alpha=0.3)
    return fig


# -- Cannon coefficients -----------------------------------------------------------------

def cannon_coefficients(model, *, terms=None, wavelength=None):
    """The Cannon's theta for chosen terms and its intrinsic scatter against wavelength.

    The scatter is drawn as ``s = sqrt(s2)`` (flux units, comparable with the noise); theta
    multiplies the scaled labels ``(label - offset) / scale``. Untrainable pixels (NaN theta,
    infinite s2) are left blank.

    Parameters
    ----------
    model : trained CannonModel (theta (n_pixels, n_terms), s2 (n_pixels,))
    terms : sequence of term names (``model.term_names``, "1" is the constant) or indices;
        default: the constant and the linear terms
    wavelength : (n_pixels,) Angstrom, optional; default ``model.wavelength``, else the
        x axis is the pixel index

    Returns
    -------
    matplotlib.figure.Figure with len(terms) + 1 axes (the last one is s)
    """
    if not (hasattr(model, "theta") and hasattr(model, "term_names") and hasattr(model, "s2")):
        raise TypeError(f"model must be a CannonModel, got {type(model).__name__}")
    if model.theta is None:
        raise ValueError("model is not trained: call model.train() or CannonModel.read() first")
    theta = np.asarray(model.theta, dtype=float)
    s2 = np.asarray(model.s2, dtype=float)
    n_pixels = theta.shape[0]
    names = list(model.term_names)
    index = _term_index(names, model, terms)
    if wavelength is None:
        wavelength = getattr(model, "wavelength", None)
    if wavelength is not None:
        if hasattr(wavelength, "unit"):
            wavelength = wavelength.to_value("Angstrom")
        wavelength = check.finite_array("wavelength", wavelength, 1)
        if wavelength.size != n_pixels:
            raise ValueError(f"wavelength has {wavelength.size} pixels, the model has {n_pixels}")
        x, xlabel = wavelength, "wavelength [Å]"
    else:
        x, xlabel = np.arange(n_pixels, dtype=float), "pixel"

    with np.errstate(invalid="ignore"):
        scatter = np.where(np.isfinite(s2) & (s2 >= 0), np.sqrt(np.abs(s2)), np.nan)
    series = [np.where(np.isfinite(theta[:, k]), theta[:, k], np.nan) for k in index]
    x, *series, scatter = _break_at_gaps(x, *series, scatter)

    n_axes = len(index) + 1
    fig = _figure(_WIDE, 1.1 + 1.35 * n_axes)
    axes = np.atleast_1d(fig.subplots(n_axes, 1, sharex=True))
    for ax, k, y in zip(axes, index, series):
        ax.plot(x, y, color="C0", lw=0.6)
        ax.axhline(0.0, color="0.5", lw=0.5)
        ax.set_ylabel("θ (constant)" if k == 0 else f"θ: {names[k]}", fontsize="small")
    axes[-1].plot(x, scatter, color="C3", lw=0.6)
    axes[-1].set_ylabel("s = √s²\n(flux)", fontsize="small")
    axes[-1].set_xlabel(xlabel)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    fig.suptitle("Cannon coefficients θ (per scaled label) and intrinsic scatter s = √s²",
                 fontsize="medium")
    fig.align_ylabels(axes)
    return fig


def _term_index(names, model, terms):
    if terms is None:
        exponents = getattr(getattr(model, "vectorizer", None), "exponents", None)
        if exponents is None:
            return [0]
        return [k for k, row in enumerate(np.asarray(exponents)) if row.sum() <= 1]
    if isinstance(terms, (str, int, np.integer)):
        terms = [terms]
    index = []
    for term in terms:
        if isinstance(term, str):
            if term not in names:
                raise ValueError(f"terms: {term!r} is not a term of the model; its terms are {names}")
            index.append(names.index(term))
        elif isinstance(term, (int, np.integer)) and not isinstance(term, bool):
            if not -len(names) <= term < len(names):
                raise ValueError(f"terms: index {term} is out of range for {len(names)} terms")
            index.append(int(term) % len(names))
        else:
            raise TypeError(f"terms must hold term names or indices, got {term!r}")
    if not index:
        raise ValueError("terms is empty")
    return index


# -- the synthetic gap ---------------------------------------------------------------------

def gap_embedding(gap):
    """The synthetic and observed spectra of a ``SyntheticGap`` in its first two embedding
    dimensions (``gap.synthetic`` (n_synthetic, >= 2), ``gap.observed`` (n_observed, >= 2)).

    Returns
    -------
    matplotlib.figure.Figure with one axes
    """
    _check_gap(gap)
    fig = _figure(5.6, 5.0)
    _draw_gap(gap, fig.subplots())
    return fig


def _check_gap(gap):
    from .gap import SyntheticGap

    if not isinstance(gap, SyntheticGap):
        raise TypeError(f"gap must be a SyntheticGap (from synthetic_gap), got {type(gap).__name__}")
    if gap.synthetic.ndim != 2 or gap.synthetic.shape[1] < 2:
        raise ValueError("gap: the plot needs an embedding with at least 2 dimensions "
                         "(synthetic_gap(..., n_components=2))")


def _draw_gap(gap, ax):
    """Draw ``gap`` on ``ax``: the one implementation behind gap_embedding and SyntheticGap.plot."""
    ax.scatter(*gap.synthetic[:, :2].T, s=8, alpha=0.6, linewidths=0, color="C0",
               label=f"synthetic ({gap.synthetic.shape[0]})")
    ax.scatter(*gap.observed[:, :2].T, s=8, alpha=0.6, linewidths=0, color="C1",
               label=f"observed ({gap.observed.shape[0]})")
    if gap.method == "pca":
        ratio = np.asarray(gap.explained_variance_ratio)
        for k, setter in enumerate((ax.set_xlabel, ax.set_ylabel)):
            share = f" ({100 * ratio[k]:.1f}% of variance)" if k < ratio.size else ""
            setter(f"PC{k + 1}{share}")
    else:
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
    ax.set_title(f"synthetic gap ({gap.method.upper() if gap.method == 'pca' else 't-SNE'}): "
                 f"Fréchet distance {_number(gap.distance)} (means alone {_number(gap.mean_offset)})",
                 fontsize="medium")
    ax.legend(loc="best", markerscale=2, framealpha=0.9)
    return ax
