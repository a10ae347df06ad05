"""``starlabel demo``: The Cannon and The Payne on the built-in synthetic survey.

Both models learn from the same training stars and fit the same held-out spectra:

- the Cannon from noisy observed-like spectra (S/N 100), as it is used on a survey;
- the Payne from noiseless spectra of the same stars, as The Payne learns from a grid of
  model atmospheres, and then fits the noisy held-out spectra with ``fit_spectra``.

Both calibrate their label errors on other held-out stars (``calibrate_errors``). It prints
label accuracy against the truth per label and model, with the pulls of the calibrated and
the formal errors, and the throughput of the compiled core against the NumPy reference (the
reference timed on a subset: it is slow).
"""

import copy
import os
import sys
import time

import numpy as np

# The Payne half: a small network trained hard (Adam, cosine decay) keeps the demo near a
# minute on 2 cores; The Payne's own 300x300 network with RAdam at 1e-4 needs hours.
PAYNE_HIDDEN = (64, 64)
PAYNE_LEARNING_RATE = 3e-3
PAYNE_BATCH_SIZE = 64
N_REF_PIXELS = 500        # Cannon reference training: pixels timed
N_REF_FIT = 50            # Cannon reference test step: spectra timed
N_REF_PAYNE_EPOCHS = 1    # Payne reference training: epochs timed (on all stars and pixels)
N_REF_PAYNE_FIT = 10      # Payne reference fit: spectra timed
N_PAYNE_FIT = 200         # the Payne fits ~50x slower per spectrum than the Cannon's test step
N_CALIBRATION = 500       # held-out stars that calibrate both models' label errors


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - start


def run_demo(n_train=1000, n_test=500, n_pixels=7514, *, seed=0, payne_epochs=100,
             plot_dir=None, n_threads=None, reporter=None, file=None):
    """Run the demo, printing to ``file`` (stdout); returns a dict of the results.

    The dict holds the surveys (``train``, ``test``), the models (``cannon``, ``payne``),
    their fits of the test spectra (``cannon_fit``, ``payne_fit``), ``timings`` (seconds per
    item, keyed by (model, backend, step)) and ``figures`` (paths written).
    """
    from . import CannonModel, PayneModel, fit_spectra, show_config
    from .cli import Reporter
    from .datasets import synthetic_survey

    out = sys.stdout if file is None else file
    reporter = reporter or Reporter(quiet=True)
    say = lambda *parts: print(*parts, file=out)  # noqa: E731

    show_config(file=out)
    say(f"\nSynthetic survey: {n_train} training + {N_CALIBRATION} calibration + {n_test} test "
        f"stars, {n_pixels} pixels, S/N 100")
    with reporter.step("generating the synthetic survey"):
        train = synthetic_survey(n_train, n_pixels=n_pixels, seed=seed)
        # Same seed and size: the same stars (labels depend only on both), without noise.
        grid = synthetic_survey(n_train, n_pixels=n_pixels, seed=seed, snr=None)
        test = synthetic_survey(n_test, n_pixels=n_pixels, seed=seed + 1)
        calibration = synthetic_survey(N_CALIBRATION, n_pixels=n_pixels, seed=seed + 2)
    timings = {}

    # -- The Cannon ------------------------------------------------------------------------
    n_ref_pixels = min(n_pixels, N_REF_PIXELS)
    cannon = CannonModel(train.label_names, wavelength=train.wavelength)
    with reporter.step("training the Cannon (fast)"):
        _, seconds = _timed(cannon.train, train.labels, train.flux, train.ivar,
                            n_threads=n_threads)
    timings["Cannon", "fast", "train"] = seconds / n_pixels
    reference = CannonModel(train.label_names, backend="reference")
    with reporter.step(f"training the Cannon (reference, {n_ref_pixels} pixels)"):
        _, seconds = _timed(reference.train, train.labels, train.flux[:, :n_ref_pixels],
                            train.ivar[:, :n_ref_pixels])
    timings["Cannon", "reference", "train"] = seconds / n_ref_pixels
    with reporter.step(f"calibrating the Cannon's errors on {N_CALIBRATION} held-out stars"):
        cannon.calibrate_errors(calibration.labels, calibration.flux, calibration.ivar,
                                n_threads=n_threads)

    with reporter.step(f"fitting {n_test} spectra with the Cannon (fast)"):
        cannon_fit, seconds = _timed(cannon.fit_labels, test.flux, test.ivar, n_threads=n_threads)
    timings["Cannon", "fast", "fit"] = seconds / n_test
    n_ref = min(n_test, N_REF_FIT)
    same_model = copy.copy(cannon)  # the same trained model through the other backend
    same_model.backend = "reference"
    with reporter.step(f"fitting {n_ref} spectra with the Cannon (reference)"):
        cannon_ref, seconds = _timed(same_model.fit_labels, test.flux[:n_ref], test.ivar[:n_ref])
    timings["Cannon", "reference", "fit"] = seconds / n_ref

    # -- The Payne -------------------------------------------------------------------------
    payne = PayneModel(train.label_names, hidden=PAYNE_HIDDEN, wavelength=train.wavelength)
    options = dict(batch_size=PAYNE_BATCH_SIZE, optimizer="adam",
                   learning_rate=PAYNE_LEARNING_RATE, lr_schedule="cosine", seed=seed)
    _, seconds = _timed(payne.train, grid.labels, grid.flux, epochs=payne_epochs,
                        progress=reporter.bars, n_threads=n_threads, **options)
    timings["Payne", "fast", "train"] = seconds / payne_epochs
    payne_ref = PayneModel(train.label_names, hidden=PAYNE_HIDDEN, backend="reference")
    with reporter.step(f"training the Payne (reference, {N_REF_PAYNE_EPOCHS} epoch)"):
        _, seconds = _timed(payne_ref.train, grid.labels, grid.flux, epochs=N_REF_PAYNE_EPOCHS,
                            **options)
    timings["Payne", "reference", "train"] = seconds / N_REF_PAYNE_EPOCHS

    # The test spectra are in the rest frame and continuum normalised: labels only.
    fit_options = dict(fit_rv=False, continuum_order=None)
    with reporter.step(f"calibrating the Payne's errors on {N_CALIBRATION} held-out stars"):
        payne.calibrate_errors(calibration.labels, calibration.flux, calibration.ivar,
                               n_threads=n_threads, **fit_options)
    n_payne = min(n_test, N_PAYNE_FIT)
    with reporter.step(f"fitting {n_payne} spectra with the Payne (fast)"):
        payne_fit, seconds = _timed(fit_spectra, payne, test.flux[:n_payne], test.ivar[:n_payne],
                                    n_threads=n_threads, **fit_options)
    timings["Payne", "fast", "fit"] = seconds / n_payne
    n_ref_payne = min(n_test, N_REF_PAYNE_FIT)
    with reporter.step(f"fitting {n_ref_payne} spectra with the Payne (reference)"):
        payne_ref_fit, seconds = _timed(fit_spectra, payne, test.flux[:n_ref_payne],
                                        test.ivar[:n_ref_payne], backend="reference",
                                        **fit_options)
    timings["Payne", "reference", "fit"] = seconds / n_ref_payne

    # -- report ----------------------------------------------------------------------------
    fits = {"Cannon": cannon_fit, "Payne": payne_fit}
    say(f"\nLabel accuracy on {n_test} held-out spectra (estimate - truth; fast backend):")
    say(f"  {'model':7s} {'label':8s} {'spectra':>7s} {'bias':>10s} {'scatter':>10s} "
        f"{'median error':>13s} {'pull std':>9s} {'formal pull std':>16s}")
    for model_name, result in fits.items():
        delta = result.labels - test.labels[:len(result)]
        pull = delta / result.errors
        formal = np.sqrt(np.diagonal(result.formal_covariance, axis1=1, axis2=2))
        formal_pull = delta / formal[:, :len(result.label_names)]
        for a, name in enumerate(result.label_names):
            say(f"  {model_name:7s} {name:8s} {len(result):7d} {delta[:, a].mean():10.4g} "
                f"{delta[:, a].std():10.4g} {np.median(result.errors[:, a]):13.4g} "
                f"{pull[:, a].std():9.3f} {formal_pull[:, a].std():16.3f}")
    say("  converged: " + ", ".join(f"{m} {int(r.converged.sum())}/{len(r)}"
                                    for m, r in fits.items()))
    say("  (formal: the noise only; the errors add each model's own misfit, calibrated on "
        f"{N_CALIBRATION} other held-out stars by calibrate_errors)")
    for model_name, ref, fast, n in (("Cannon", cannon_ref, cannon_fit, n_ref),
                                     ("Payne", payne_ref_fit, payne_fit, n_ref_payne)):
        diff = np.max(np.abs(ref.labels - fast.labels[:n]) / fast.errors[:n])
        say(f"  {model_name} fast vs reference labels: max difference {diff:.2g} sigma "
            f"on {n} spectra")

    say("\nThroughput (fast vs NumPy reference; reference timed on a subset, per item):")
    units = {"train": {"Cannon": "pixel", "Payne": "epoch"}, "fit": "spectrum"}
    for model_name in ("Cannon", "Payne"):
        for step in ("train", "fit"):
            unit = units[step] if step == "fit" else units[step][model_name]
            f = timings[model_name, "fast", step]
            r = timings[model_name, "reference", step]
            say(f"  {model_name:7s} {step:5s}: fast {_ms(f):>11s}/{unit:8s} reference "
                f"{_ms(r):>11s}/{unit:8s} speed-up {r / f:7.1f}x")
    history = payne.history
    say(f"  (Payne {PAYNE_HIDDEN[0]}x{PAYNE_HIDDEN[1]} network, {payne_epochs} epochs, final "
        f"validation loss {history['validation_loss'][-1]:.3g}; Cannon reference on "
        f"{n_ref_pixels} pixels)")

    figures = []
    if plot_dir is not None:
        with reporter.step("writing figures"):
            figures = _write_figures(plot_dir, test, cannon, cannon_fit, payne, payne_fit)
        say(f"\nFigures: {', '.join(figures)}")
    return {"train": train, "test": test, "cannon": cannon, "payne": payne,
            "cannon_fit": cannon_fit, "payne_fit": payne_fit, "timings": timings,
            "figures": figures}


def _ms(seconds):
    return f"{seconds * 1e3:.3f} ms"


def _write_figures(folder, test, cannon, cannon_fit, payne, payne_fit):
    """The PNGs of ``--plot``: one-to-one per model, a spectrum with both fits' models on it,
    the Payne's loss history and the Cannon's coefficients. Returns the paths."""
    from . import plots

    os.makedirs(folder, exist_ok=True)
    # the star of median reduced chi2: a typical fit, neither the best nor an outlier
    star = int(np.argsort(cannon_fit.reduced_chi2)[len(cannon_fit) // 2])
    model_flux = cannon.predict(cannon_fit.labels[star:star + 1])[0]
    truth = ", ".join(f"{n} {v:.4g}" for n, v in zip(test.label_names, test.labels[star]))
    figures = {
        "one_to_one_cannon.png": plots.one_to_one(test.labels, cannon_fit.labels,
                                                  cannon_fit.label_names, errors=cannon_fit.errors),
        "one_to_one_payne.png": plots.one_to_one(test.labels[:len(payne_fit)], payne_fit.labels,
                                                 payne_fit.label_names, errors=payne_fit.errors),
        "spectrum_fit.png": plots.spectrum_fit(
            test.wavelength, test.flux[star], model_flux, ivar=test.ivar[star],
            title=f"test star {star} (truth: {truth}), Cannon fit"),
        "payne_loss.png": plots.loss_history(payne.history),
        "cannon_coefficients.png": plots.cannon_coefficients(cannon, wavelength=test.wavelength),
    }
    paths = []
    for name, figure in figures.items():
        path = os.path.join(folder, name)
        figure.savefig(path)
        paths.append(path)
    return paths
