"""The Cannon (Ness et al. 2015; Casey et al. 2016): a data-driven model of spectra.

Every pixel's flux is a polynomial in the labels, ``f = theta . v(labels)``, with an
intrinsic scatter ``s2`` per pixel. Training learns theta and s2 from stars with known
labels; ``fit_labels`` infers labels of new spectra.
"""

import copy
from typing import NamedTuple

import numpy as np

from . import _validation as check
from . import fast, reference
from .error_floor import DEFAULT_NEIGHBORS, ErrorFloor, calibration_stars
from .model_io import read_model_file, write_model_file
from .result import FitResult, lowest_chi2
from .status import PixelStatus
from .vectorizer import PolynomialVectorizer

BACKENDS = {"fast": fast, "reference": reference}
N_DEFAULT_STARTS = 9  # Casey et al. (2016) started each fit from 9 points
DEFAULT_STRENGTHS = (0.0, 1.0, 10.0, 100.0, 1e3, 1e4)  # Casey et al. (2016) adopted 1e3


class RegularizationScan(NamedTuple):
    """Held-out cost of models trained at several L1 strengths (``choose_regularization``).

    strengths (n_strengths,) ascending; cost (n_strengths,) summed over the pixels trained at
    every strength; pixel_cost (n_strengths, n_pixels), NaN where a pixel was not trained;
    n_pixels_compared; best: the strength of lowest cost.
    """

    strengths: np.ndarray
    cost: np.ndarray
    pixel_cost: np.ndarray
    n_pixels_compared: int
    best: float


class CannonModel:
    """A Cannon model.

    Parameters
    ----------
    label_names : sequence of str (n_labels)
    order : int, 1, 2 (default) or 3: full polynomial with all cross terms
    terms : sequence of str, optional: explicit non-constant terms (``"TEFF^2"``,
        ``"TEFF*LOGG"``); overrides ``order``
    regularization : float >= 0, L1 strength on the non-constant coefficients; the per-pixel
        objective is ``sum w r^2 - sum ln w + regularization * sum |theta|`` (thecannon's)
    censors : dict {label name: bool array (n_pixels,)}, optional: where each label's terms
        may be non-zero; elsewhere they are fixed at zero
    offsets, scales : (n_labels,), optional: label scaling; by default learned in ``train``
        (mean and 2.5-97.5 percentile range)
    wavelength : (n_pixels,), optional, Angstrom; stored with the model
    backend : "fast" (compiled) or "reference" (NumPy)
    """

    def __init__(self, label_names, order=2, *, terms=None, regularization=0.0, censors=None,
                 offsets=None, scales=None, wavelength=None, backend="fast"):
        self.vectorizer = PolynomialVectorizer(label_names, order, terms, offsets, scales)
        self.regularization = check.nonnegative_float("regularization", regularization)
        self.censors = self._check_censors(censors)
        self.wavelength = None if wavelength is None else _wavelength_array(wavelength)
        self.backend = check.choice("backend", backend, BACKENDS)
        self.theta = self.s2 = self.pixel_status = None
        self.initial_labels = self.training_range = self.error_floor = None

    # -- structure ---------------------------------------------------------------------

    @property
    def label_names(self):
        return self.vectorizer.label_names

    @property
    def term_names(self):
        return self.vectorizer.term_names

    @property
    def is_trained(self):
        return self.theta is not None

    @property
    def n_pixels(self):
        return None if self.theta is None else self.theta.shape[0]

    def _check_censors(self, censors):
        if censors is None:
            return None
        if not isinstance(censors, dict):
            raise TypeError("censors must be a dict {label name: bool array (n_pixels,)}")
        out = {}
        for name, mask in censors.items():
            if name not in self.label_names:
                raise ValueError(f"censors: {name!r} is not one of {list(self.label_names)}")
            mask = np.asarray(mask)
            if mask.dtype != bool or mask.ndim != 1:
                raise ValueError(f"censors[{name!r}] must be a 1-D bool array (n_pixels,)")
            out[name] = mask
        return out

    def term_mask(self, n_pixels):
        """(n_pixels, n_terms) bool: where each term may be non-zero under the censors."""
        if not self.censors:
            return None
        mask = np.ones((n_pixels, self.vectorizer.n_terms), bool)
        for name, allowed in self.censors.items():
            if allowed.shape != (n_pixels,):
                raise ValueError(f"censors[{name!r}] has {allowed.size} pixels, flux has {n_pixels}")
            uses_label = self.vectorizer.exponents[:, self.label_names.index(name)] > 0
            mask[:, uses_label] &= allowed[:, None]
        return mask

    def _require_trained(self):
        if not self.is_trained:
            raise RuntimeError("the model is not trained: call train() or CannonModel.read()")

    # -- training ----------------------------------------------------------------------

    def train(self, labels, flux, ivar, *, n_threads=None):
        """Learn theta and s2 at every pixel from stars with known labels.

        labels (n_stars, n_labels) physical units; flux, ivar (n_stars, n_pixels).
        Pixels that cannot be trained get a status in ``pixel_status`` (PixelStatus), NaN
        theta and infinite s2, and are ignored when fitting labels.
        """
        labels = check.labels(labels, len(self.label_names))
        flux, ivar = check.spectra(flux, ivar)
        if labels.shape[0] != flux.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} stars but flux has {flux.shape[0]}")
        if labels.shape[0] < self.vectorizer.n_terms:
            raise ValueError(f"labels: {labels.shape[0]} training stars are fewer than the "
                             f"{self.vectorizer.n_terms} terms of the model")
        if self.wavelength is not None and self.wavelength.size != flux.shape[1]:
            raise ValueError(f"flux has {flux.shape[1]} pixels but wavelength has {self.wavelength.size}")
        self.vectorizer.fit_scaling(labels)
        x = self.vectorizer.scale(labels)
        self.theta, self.s2, self.pixel_status = BACKENDS[self.backend].cannon_train(
            self.vectorizer.exponents, x, flux, ivar, regularization=self.regularization,
            term_mask=self.term_mask(flux.shape[1]), n_threads=n_threads)
        self.initial_labels = _spread_points(labels, N_DEFAULT_STARTS)
        self.training_range = (labels.min(axis=0), labels.max(axis=0))
        self.error_floor = None  # a calibration belongs to the model it was made for
        return self

    def choose_regularization(self, labels, flux, ivar, strengths=DEFAULT_STRENGTHS, *,
                              validation=None, validation_fraction=0.25, seed=0,
                              n_threads=None):
        """Score L1 strengths by how well models trained at each predict held-out stars.

        For every strength, a copy of this model (same terms, censors, scaling and backend)
        is trained on the training stars. It is scored on the validation stars at their known
        labels by the negative log-likelihood of their spectra,
        ``sum [w (flux - model)^2 - ln w]``, ``w = 1 / (1/ivar + s2)``, over stars with
        ivar > 0: training's per-pixel objective, out of sample and without the penalty (the
        validation of Casey et al. 2016). This model is not changed; to use the result::

            model.regularization = scan.best
            model.train(labels, flux, ivar)

        The best strength is that of a training set the size of the training part; the
        penalty weighs relatively less on more stars.

        Parameters
        ----------
        labels (n_stars, n_labels) physical units; flux, ivar (n_stars, n_pixels)
        strengths : (n_strengths,) distinct values >= 0
        validation : (labels, flux, ivar) of held-out stars, or None to hold out
            ``validation_fraction`` of the given stars: the first
            ``round(validation_fraction * n_stars)`` of
            ``numpy.random.default_rng(seed).permutation(n_stars)``

        Returns
        -------
        RegularizationScan
        """
        labels = check.labels(labels, len(self.label_names))
        flux, ivar = check.spectra(flux, ivar)
        strengths = _strengths(strengths)
        if validation is None:
            held_out, keep = check.validation_split(np.random.default_rng(seed),
                                                    labels.shape[0], validation_fraction)
            if held_out.size == 0:
                raise ValueError("validation_fraction holds out no stars to validate on")
            validation = labels[held_out], flux[held_out], ivar[held_out]
            labels, flux, ivar = labels[keep], flux[keep], ivar[keep]
        val_labels, val_flux, val_ivar = _validation_stars(validation, labels.shape[1],
                                                           flux.shape[1])
        if labels.shape[0] < self.vectorizer.n_terms:
            raise ValueError(f"{labels.shape[0]} training stars (after holding out the "
                             f"validation stars) are fewer than the {self.vectorizer.n_terms} "
                             f"terms of the model")
        trial = copy.deepcopy(self)
        pixel_cost = np.empty((strengths.size, flux.shape[1]))
        for row, strength in zip(pixel_cost, strengths):
            trial.regularization = strength
            trial.train(labels, flux, ivar, n_threads=n_threads)
            row[:] = _held_out_cost(trial, val_labels, val_flux, val_ivar, n_threads)
        compared = np.all(np.isfinite(pixel_cost), axis=0)
        if not compared.any():
            raise ValueError("no pixel was trained at every strength: nothing to compare")
        cost = pixel_cost[:, compared].sum(axis=1)
        return RegularizationScan(strengths, cost, pixel_cost, int(compared.sum()),
                                  float(strengths[np.argmin(cost)]))

    # -- prediction --------------------------------------------------------------------

    def predict(self, labels, *, n_threads=None):
        """Model flux (n_stars, n_pixels) for physical labels (n_stars, n_labels)."""
        self._require_trained()
        x = self.vectorizer.scale(check.labels(labels, len(self.label_names)))
        return BACKENDS[self.backend].cannon_predict(self.vectorizer.exponents, self.theta, x,
                                                     n_threads=n_threads)

    def jacobian(self, labels, *, n_threads=None):
        """d flux / d label (n_stars, n_pixels, n_labels), physical units."""
        self._require_trained()
        x = self.vectorizer.scale(check.labels(labels, len(self.label_names)))
        _, jac = BACKENDS[self.backend].cannon_predict(self.vectorizer.exponents, self.theta, x,
                                                       jacobian=True, n_threads=n_threads)
        return jac / self.vectorizer.scales

    # -- the test step -----------------------------------------------------------------

    def fit_labels(self, flux, ivar, *, initial=None, bounds=None, every_start=False,
                   max_iter=100, n_threads=None, **spectrum_options):
        """Infer labels of spectra by Levenberg-Marquardt with weights 1 / (1/ivar + s2).

        Parameters
        ----------
        flux, ivar : (n_spectra, n_pixels) or (n_pixels,)
        initial : physical starting labels, (n_labels,), (n_starts, n_labels) or
            (n_spectra, n_starts, n_labels); default: 9 points spread over the training set.
            chi2 is evaluated at every start and LM runs from the best.
        bounds : None, "training" (the training set's range) or (lower, upper) arrays
        every_start : run LM from every start and keep the fit of lowest chi2 (slower by the
            number of starts)
        max_iter : int, LM trial steps per spectrum
        spectrum_options : options of ``starlabel.fit_spectra`` (``wavelength``, ``fit_rv``,
            ``rv_range``, ``continuum_order``, ``segments``, ``broadening``, ``mask``, ...).
            Without them the spectra are rest-frame and normalized, and the fit is the
            compiled test step (chi2 as a polynomial in the labels); with any, the fit is
            ``fit_spectra(self, flux, ivar, ...)`` with its defaults for the rest (the RV is
            fitted unless ``fit_rv=False``), and returns a SpectrumFitResult.

        Returns
        -------
        FitResult (labels, covariance, chi2, reduced_chi2, n_iter, status per spectrum)
        """
        if spectrum_options:
            from .fitting import fit_spectra

            wavelength = spectrum_options.pop("wavelength", None)
            return fit_spectra(self, flux, ivar, wavelength, initial=initial, bounds=bounds,
                               every_start=every_start, max_iter=max_iter,
                               n_threads=n_threads, **spectrum_options)
        self._require_trained()
        every_start = check.flag("every_start", every_start)
        # flux, ivar and the shape of initial are checked once, by the backend
        initial = self.initial_labels if initial is None else initial
        ndim = np.ndim(initial)
        initial = self.vectorizer.scale(
            check.as_float_array("initial", initial, ndim if ndim in (1, 2, 3) else 3))
        starts = [initial]
        if every_start and initial.ndim > 1:  # one fit per start
            starts = [initial[:, j:j + 1] if initial.ndim == 3 else initial[j]
                      for j in range(initial.shape[-2])]
        lower, upper = self._scaled_bounds(bounds)
        sol = lowest_chi2([BACKENDS[self.backend].cannon_fit(
            self.vectorizer.exponents, self.theta, self.s2, flux, ivar, start, lower=lower,
            upper=upper, max_iter=max_iter, n_threads=n_threads) for start in starts])
        scales = self.vectorizer.scales
        labels = self.vectorizer.unscale(sol.x)
        return FitResult(self.label_names, labels,
                         sol.covariance * scales[:, None] * scales[None, :], sol.chi2,
                         sol.n_used, sol.n_iter, sol.status,
                         None if self.error_floor is None else self.error_floor(labels))

    def calibrate_errors(self, labels, flux, ivar, *, n_neighbors=DEFAULT_NEIGHBORS,
                         n_threads=None):
        """Measure on held-out stars the label error the model's own misfit adds.

        The formal errors (``FitResult.formal_covariance``) hold the spectra's noise and the
        per-pixel scatter s2 only; where the polynomial cannot follow the spectra, the labels
        scatter more. This fits stars of known labels that were not used in training and
        keeps, per star, ``(fit - true)^2 - formal error^2`` as an ``ErrorFloor``. Later fits
        (``fit_labels``, ``fit_spectra``) add to the covariance's diagonal the mean of that
        excess over the ``n_neighbors`` calibration stars nearest in fitted labels (scaled as
        the model scales them), where it is > 0. ``write`` keeps the calibration; ``train``
        clears it. Calibrate at the S/N of the spectra to be fitted or higher: the excess is
        the model's, not the noise's, but noisy calibration stars measure it less well.

        labels (n_stars, n_labels) physical units; flux, ivar (n_stars, n_pixels); at least
        ``n_neighbors`` fits must converge (a few hundred stars or more: the floor at a star
        is a mean over its neighbours).
        Returns self.
        """
        self._require_trained()
        labels, flux, ivar = calibration_stars(labels, flux, ivar, len(self.label_names),
                                               n_neighbors)
        fit = self.fit_labels(flux, ivar, n_threads=n_threads)
        self.error_floor = ErrorFloor.from_fits(fit, labels, self.vectorizer.scales, n_neighbors)
        return self

    def _scaled_bounds(self, bounds):
        if bounds is None:
            return None, None
        if isinstance(bounds, str):
            check.choice("bounds", bounds, {"training"})
            lower, upper = self.training_range
        else:
            try:
                lower, upper = bounds
            except (TypeError, ValueError):
                raise TypeError("bounds must be None, 'training' or a (lower, upper) pair") from None
        lower, upper = check.box(lower, upper, len(self.label_names))
        scale = self.vectorizer.scale
        return (None if lower is None else scale(lower)), (None if upper is None else scale(upper))

    # -- persistence -------------------------------------------------------------------

    def write(self, path):
        """Write the trained model to a versioned, pickle-free ``.npz`` file (atomically)."""
        self._require_trained()
        arrays = {
            "label_names": np.array(self.label_names),
            "exponents": self.vectorizer.exponents,
            "offsets": self.vectorizer.offsets,
            "scales": self.vectorizer.scales,
            "theta": self.theta,
            "s2": self.s2,
            "pixel_status": self.pixel_status,
            "initial_labels": self.initial_labels,
            "training_min": self.training_range[0],
            "training_max": self.training_range[1],
            "regularization": np.float64(self.regularization),
            "order": np.int64(self.vectorizer.order),
        }
        if self.error_floor is not None:
            arrays.update(self.error_floor.arrays())
        if self.wavelength is not None:
            arrays["wavelength"] = self.wavelength
        if self.censors:
            arrays["censor_labels"] = np.array(list(self.censors))
            arrays["censor_masks"] = np.array(list(self.censors.values()))
        write_model_file(path, "cannon", arrays)

    @classmethod
    def read(cls, path, *, backend="fast"):
        """Read a model written by ``write``."""
        arrays = read_model_file(path, "cannon", required=(
            "label_names", "exponents", "offsets", "scales", "theta", "s2", "pixel_status",
            "initial_labels", "training_min", "training_max", "regularization", "order"))
        names = [str(n) for n in arrays["label_names"]]
        try:
            model = cls(names, backend=backend, regularization=float(arrays["regularization"]),
                        wavelength=arrays.get("wavelength"))
            model.vectorizer = PolynomialVectorizer(
                names, terms=_term_names(names, arrays["exponents"]),
                offsets=arrays["offsets"], scales=arrays["scales"])
            if "censor_labels" in arrays:
                model.censors = model._check_censors(
                    dict(zip((str(n) for n in arrays["censor_labels"]), arrays["censor_masks"])))
            theta = check.theta(arrays["theta"], model.vectorizer.n_terms)
            s2 = check.scatter(arrays["s2"], theta.shape[0])
            status = np.asarray(arrays["pixel_status"], dtype=np.int8)
            initial = check.labels(arrays["initial_labels"], len(names), name="initial_labels")
            box = tuple(check.labels(arrays[k], len(names), name=k)[0]
                        for k in ("training_min", "training_max"))
            if status.shape != s2.shape or np.any((status < 0) | (status > max(PixelStatus))):
                raise ValueError("pixel_status is inconsistent with theta")
            floor = ErrorFloor.from_arrays(arrays, model.vectorizer.scales)
            if floor is not None and floor.labels.shape[1] != len(names):
                raise ValueError("the error calibration does not match the labels")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a consistent Cannon model file ({exc})") from None
        model.vectorizer.order = int(arrays["order"])
        model.theta, model.s2, model.pixel_status = theta, s2, status
        model.initial_labels, model.training_range = initial, box
        model.error_floor = floor
        return model

    def __repr__(self):
        state = f"{self.n_pixels} pixels" if self.is_trained else "untrained"
        return (f"CannonModel({list(self.label_names)}, {self.vectorizer.n_terms} terms, "
                f"regularization={self.regularization}, backend={self.backend!r}, {state})")


def _term_names(label_names, exponents):
    """Non-constant term names for an exponent table (the inverse of the vectorizer's parser)."""
    exponents = check.exponents(exponents)
    if exponents.shape[1] != len(label_names):
        raise ValueError("exponents do not match label_names")
    names = []
    for row in exponents[1:]:
        names.append("*".join(n if e == 1 else f"{n}^{e}" for n, e in zip(label_names, row) if e))
    return names


def _strengths(strengths):
    strengths = check.as_float_array("strengths", strengths, 1)
    if not np.all(np.isfinite(strengths) & (strengths >= 0)):
        raise ValueError("strengths must be finite and >= 0")
    if np.unique(strengths).size != strengths.size:
        raise ValueError("strengths must be distinct")
    return np.sort(strengths)


def _validation_stars(validation, n_labels, n_pixels):
    try:
        labels, flux, ivar = validation
    except (TypeError, ValueError):
        raise TypeError("validation must be a (labels, flux, ivar) triple or None") from None
    labels = check.labels(labels, n_labels, name="validation labels")
    try:
        flux, ivar = check.spectra(flux, ivar, n_pixels)
    except ValueError as exc:
        raise ValueError(f"validation: {exc}") from None
    if flux.shape[0] != labels.shape[0]:
        raise ValueError(f"validation labels has {labels.shape[0]} stars but validation flux "
                         f"has {flux.shape[0]}")
    return labels, flux, ivar


def _held_out_cost(model, labels, flux, ivar, n_threads):
    """(n_pixels,) sum over stars with ivar > 0 of ``w r^2 - ln w``; NaN at untrained pixels.

    Pixels that hit an iteration limit (NOT_CONVERGED) are scored: fits use them.
    """
    used = ivar > 0
    variance = 1.0 / np.where(used, ivar, 1.0) + model.s2
    residual = flux - model.predict(labels, n_threads=n_threads)
    cost = np.where(used, residual**2 / variance + np.log(variance), 0.0).sum(axis=0)
    untrained = (PixelStatus.TOO_FEW_STARS, PixelStatus.SINGULAR)
    cost[np.isin(model.pixel_status, untrained)] = np.nan
    return cost


def _wavelength_array(wavelength):
    if hasattr(wavelength, "unit"):  # astropy Quantity
        wavelength = wavelength.to_value("Angstrom")
    return check.finite_array("wavelength", wavelength, 1)


def _spread_points(labels, n_points):
    """The training mean and training stars spread along the first label: default starts."""
    order = np.argsort(labels[:, 0], kind="stable")
    picks = order[np.linspace(0, len(order) - 1, n_points - 1).round().astype(int)]
    return np.vstack([labels.mean(axis=0), labels[picks]])
