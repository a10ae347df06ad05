"""The Payne (Ting et al. 2019): a neural-network emulator of spectra, labels -> MLP -> flux.

``PayneModel`` scales labels to [-0.5, 0.5] with the training set's minimum and maximum
(``x_min``, ``x_max``, as The Payne does), trains a dense MLP with mini-batches in the
compiled core, and predicts spectra and their Jacobians in physical label units.
``PerPixelPayneModel`` wraps the per-pixel networks of BinSpec and of the Payne paper era
with the same ``predict`` / ``jacobian`` interface.
"""

import math
import warnings

import numpy as np

from . import _validation as check
from . import fast, payne_io, reference
from .error_floor import DEFAULT_NEIGHBORS, ErrorFloor, calibration_stars
from .model_io import read_model_file, write_model_file

BACKENDS = {"fast": fast, "reference": reference}
LR_SCHEDULES = ("constant", "cosine")


class OutsideTrainingRangeWarning(UserWarning):
    """Labels lie outside the box the emulator was trained on (allowed; extrapolation)."""


class _Emulator:
    """What every spectrum emulator shares: label scaling, range reports, predict/jacobian."""

    label_names = ()
    x_min = x_max = None
    wavelength = None
    backend = "fast"
    error_floor = None  # an ErrorFloor once calibrate_errors has run

    @property
    def n_labels(self):
        return len(self.label_names)

    @property
    def is_trained(self):
        return self.x_min is not None

    def _require_trained(self):
        if not self.is_trained:
            raise RuntimeError("the model is not trained: call train() or read a model file")

    def scale(self, labels):
        """Physical labels -> network inputs in [-0.5, 0.5] over the training box."""
        return (labels - self.x_min) / (self.x_max - self.x_min) - 0.5

    def unscale(self, x):
        return (x + 0.5) * (self.x_max - self.x_min) + self.x_min

    def _scaled(self, labels, warn):
        self._require_trained()
        labels = check.labels(labels, self.n_labels)
        if warn:
            outside = (labels < self.x_min) | (labels > self.x_max)
            if np.any(outside):
                names = [n for n, o in zip(self.label_names, outside.any(axis=0)) if o]
                warnings.warn(f"{int(outside.any(axis=1).sum())} of {len(labels)} label vectors "
                              f"lie outside the training range in {names}: extrapolating",
                              OutsideTrainingRangeWarning, stacklevel=3)
        return self.scale(labels)

    def _write_file(self, path, kind, arrays):
        """A model file of ``kind``: ``arrays`` plus the label names, scaling, wavelength and
        error calibration."""
        arrays = {"label_names": np.array(self.label_names), "x_min": self.x_min,
                  "x_max": self.x_max, **arrays}
        if self.wavelength is not None:
            arrays["wavelength"] = self.wavelength
        if self.error_floor is not None:
            arrays.update(self.error_floor.arrays())
        write_model_file(path, kind, arrays)

    def _read_error_floor(self, arrays):
        floor = ErrorFloor.from_arrays(arrays, self.x_max - self.x_min)
        if floor is not None and floor.labels.shape[1] != self.n_labels:
            raise ValueError("the error calibration does not match the labels")
        self.error_floor = floor

    def calibrate_errors(self, labels, flux, ivar, wavelength=None, *,
                         n_neighbors=DEFAULT_NEIGHBORS, **fit_options):
        """Measure on held-out stars the label error the emulator's own misfit adds.

        As ``CannonModel.calibrate_errors``: stars of known labels (not used in training) are
        fitted, here by ``fit_spectra(self, flux, ivar, wavelength, **fit_options)`` (give the
        options the survey will be fitted with), and later ``fit_spectra`` calls add to each
        label's variance the mean excess ``(fit - true)^2 - formal error^2`` of the
        ``n_neighbors`` calibration stars nearest in fitted labels, where it is > 0. ``write``
        keeps the calibration; ``train`` clears it.

        labels (n_stars, n_labels) physical units; flux, ivar (n_stars, n_pixels). Returns self.
        """
        from .fitting import fit_spectra

        self._require_trained()
        labels, flux, ivar = calibration_stars(labels, flux, ivar, self.n_labels, n_neighbors)
        fit = fit_spectra(self, flux, ivar, wavelength, **fit_options)
        self.error_floor = ErrorFloor.from_fits(fit, labels, self.x_max - self.x_min, n_neighbors)
        return self

    def predict(self, labels, *, warn=True, n_threads=None):
        """Model flux (n_stars, n_pixels) for physical labels (n_stars, n_labels).

        Labels outside the training box are allowed and reported by an
        OutsideTrainingRangeWarning (``warn=False`` silences it).
        """
        return self._forward(self._scaled(labels, warn), False, n_threads)

    def jacobian(self, labels, *, warn=True, n_threads=None):
        """d flux / d label (n_stars, n_pixels, n_labels) in physical label units."""
        _, jac = self._forward(self._scaled(labels, warn), True, n_threads)
        return jac / (self.x_max - self.x_min).astype(jac.dtype)

    def predict_with_jacobian(self, labels, *, warn=True, n_threads=None):
        """(flux, jacobian) in one pass, physical label units."""
        flux, jac = self._forward(self._scaled(labels, warn), True, n_threads)
        return flux, jac / (self.x_max - self.x_min).astype(jac.dtype)

    def fit_labels(self, flux, ivar, wavelength=None, **options):
        """Fit labels (and RV, continuum) of observed spectra: ``starlabel.fit_spectra(self, ...)``."""
        from .fitting import fit_spectra

        return fit_spectra(self, flux, ivar, wavelength, **options)


class PayneModel(_Emulator):
    """A dense-MLP spectrum emulator (The Payne).

    Parameters
    ----------
    label_names : sequence of str
    hidden : widths of the hidden layers (The Payne: (300, 300))
    activation : "leaky_relu" (The Payne, slope 0.01), "relu", "sigmoid", "tanh",
        "softplus" or "silu"; the output layer is linear
    dtype : "float32" (default, as The Payne) or "float64"
    backend : "fast" (compiled) or "reference" (NumPy)
    slope : leaky ReLU's negative-side slope
    wavelength : (n_pixels,) Angstrom, optional; stored with the model
    """

    def __init__(self, label_names, hidden=(300, 300), activation="leaky_relu", dtype="float32",
                 backend="fast", *, slope=0.01, wavelength=None):
        names = [str(n) for n in label_names]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"label_names must be non-empty without duplicates, got {names}")
        self.label_names = names
        self.hidden, self.activation, self.slope, self.dtype = _architecture(
            hidden, activation, slope, dtype)
        self.backend = check.choice("backend", backend, BACKENDS)
        self.wavelength = None if wavelength is None else _wavelength_array(wavelength)
        self.weights = self.biases = None
        self.x_min = self.x_max = None
        self.history = None

    @property
    def n_pixels(self):
        return None if self.weights is None else self.weights[-1].shape[0]

    def _set_network(self, weights, biases, x_min, x_max):
        self.weights = [np.ascontiguousarray(w, dtype=self.dtype) for w in weights]
        self.biases = [np.ascontiguousarray(b, dtype=self.dtype) for b in biases]
        self.x_min = np.asarray(x_min, dtype=np.float64)
        self.x_max = np.asarray(x_max, dtype=np.float64)

    def _forward(self, x, jacobian, n_threads):
        return BACKENDS[self.backend].mlp_forward(self.weights, self.biases, x,
                                                  activation=self.activation, slope=self.slope,
                                                  jacobian=jacobian, n_threads=n_threads)

    def initialize(self, n_pixels, seed=0):
        """Random weights as PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        sizes = (self.n_labels,) + self.hidden + (check.positive_int("n_pixels", n_pixels),)
        return _init_network(sizes, self.dtype, seed)

    # -- training ------------------------------------------------------------------------

    def train(self, labels, flux, *, validation=None, validation_fraction=0.1, epochs=100,
              batch_size=512, optimizer="radam", learning_rate=1e-4, lr_schedule="constant",
              weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, loss="l1", pixel_weights=None,
              patience=None, seed=0, progress=False, n_threads=None):
        """Train the emulator on spectra with known labels (all mini-batch work in the backend).

        Parameters
        ----------
        labels : (n_stars, n_labels) physical; x_min / x_max are set from them
        flux : (n_stars, n_pixels) finite
        validation : (labels, flux) pair, or None to hold out ``validation_fraction`` of the
            stars (seeded; 0 trains on everything without validation)
        epochs, batch_size : ints (The Payne: batch 512)
        optimizer : "radam" (The Payne), "adam" or "adamw"
        learning_rate : float (The Payne: 1e-4)
        lr_schedule : "constant", "cosine" (per step, to 0 at the end) or a callable
            ``epoch -> factor`` multiplying learning_rate
        weight_decay : L2 for adam/radam, decoupled for adamw
        loss : "l1" (The Payne) or "l2", optionally weighted by ``pixel_weights`` (n_pixels,)
        patience : stop after this many epochs without a better validation loss (None: never)
        seed : seeds the initial weights, the validation split and every epoch's shuffle
        progress : show a tqdm progress bar (needs tqdm)

        The weights of the best validation epoch are kept. ``history`` gets per-epoch
        ``train_loss``, ``validation_loss``, ``learning_rate`` and ``best_epoch``.
        """
        labels = check.labels(labels, self.n_labels)
        flux = check.finite_array("flux", flux, 2)
        if labels.shape[0] != flux.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} stars but flux has {flux.shape[0]}")
        if self.wavelength is not None and self.wavelength.size != flux.shape[1]:
            raise ValueError(f"flux has {flux.shape[1]} pixels but wavelength has {self.wavelength.size}")
        options = _training_options(epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                                    loss=loss, learning_rate=learning_rate,
                                    lr_schedule=lr_schedule, patience=patience,
                                    n_threads=n_threads)
        rng = np.random.default_rng(seed)

        if validation is None:
            val, keep = check.validation_split(rng, labels.shape[0], validation_fraction)
            val_labels, val_flux = labels[val], flux[val]
            labels, flux = labels[keep], flux[keep]
        else:
            try:
                val_labels, val_flux = validation
            except (TypeError, ValueError):
                raise TypeError("validation must be a (labels, flux) pair or None") from None
            val_labels = check.labels(val_labels, self.n_labels, name="validation labels")
            val_flux = check.finite_array("validation flux", val_flux, 2)
            if val_flux.shape != (val_labels.shape[0], flux.shape[1]):
                raise ValueError(f"validation flux must have shape ({val_labels.shape[0]}, "
                                 f"{flux.shape[1]}), got {val_flux.shape}")

        x_min, x_max = labels.min(axis=0), labels.max(axis=0)
        constant = [n for n, lo, hi in zip(self.label_names, x_min, x_max) if not hi > lo]
        if constant:
            raise ValueError(f"labels {constant} are constant in the training set: cannot scale")
        self.x_min, self.x_max = x_min, x_max
        weights, biases = self.initialize(flux.shape[1], seed=rng.integers(2**63))
        x = np.ascontiguousarray(self.scale(labels), dtype=self.dtype)
        y = np.ascontiguousarray(flux, dtype=self.dtype)
        x_val = np.ascontiguousarray(self.scale(val_labels), dtype=self.dtype)
        if pixel_weights is not None:
            pixel_weights = payne_io.pixel_weights(pixel_weights, flux.shape[1], self.dtype)
        best, self.history = _train_network(
            BACKENDS[self.backend], weights, biases, x, y, x_val, val_flux, rng=rng,
            lr_schedule=lr_schedule, weight_decay=weight_decay, betas=betas, eps=eps,
            output_weights=pixel_weights, progress=progress, activation=self.activation,
            slope=self.slope, **options)
        self._set_network(*best, x_min, x_max)
        self.error_floor = None  # a calibration belongs to the network it was made for
        return self

    # -- persistence ---------------------------------------------------------------------

    def write(self, path):
        """Write the model to a versioned, pickle-free ``.npz`` file (atomically)."""
        self._require_trained()
        self._write_file(path, "payne", {
            "activation": np.array(self.activation), "slope": np.float64(self.slope),
            "dtype": np.array(self.dtype.name), **_network_arrays(self.weights, self.biases)})

    @classmethod
    def read(cls, path, *, backend="fast"):
        """Read a model written by ``write``."""
        arrays = read_model_file(path, "payne", required=(
            "label_names", "x_min", "x_max", "activation", "slope", "dtype", "n_layers"))
        try:
            weights, biases = _network_from_arrays(arrays)
            model = cls([str(n) for n in arrays["label_names"]],
                        hidden=tuple(w.shape[0] for w in weights[:-1]),
                        activation=str(arrays["activation"]), slope=float(arrays["slope"]),
                        dtype=str(arrays["dtype"]), backend=backend,
                        wavelength=arrays.get("wavelength"))
            if weights[0].shape[1] != model.n_labels:
                raise ValueError("weights_0 does not match the number of labels")
            x_min = check.labels(arrays["x_min"], model.n_labels, name="x_min")[0]
            x_max = check.labels(arrays["x_max"], model.n_labels, name="x_max")[0]
            model._set_network(weights, biases, x_min, x_max)
            model._read_error_floor(arrays)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a consistent Payne model file ({exc})") from None
        return model

    def __repr__(self):
        state = f"{self.n_pixels} pixels" if self.is_trained else "untrained"
        return (f"PayneModel({self.label_names}, hidden={self.hidden}, "
                f"activation={self.activation!r}, dtype={self.dtype.name!r}, "
                f"backend={self.backend!r}, {state})")


class PerPixelPayneModel(_Emulator):
    """Per-pixel sigmoid networks, x the labels scaled to [-0.5, 0.5] by x_min / x_max:
    BinSpec's (El-Badry et al. 2018), ``flux_p = w1[p] . sigmoid(w0[p] x + b0[p]) + b1[p]``,
    and, with ``w2``, ``b2`` (n_pixels,), the Payne paper era's (Ting et al. 2019), which
    puts that through one more sigmoid: ``flux_p = w2[p] sigmoid(BinSpec's flux_p) + b2[p]``.
    Made by ``starlabel.read_binspec_npz``; ``write`` / ``read`` keep it in starlabel's own
    file format.
    """

    def __init__(self, label_names, w0, b0, w1, b1, x_min, x_max, *, w2=None, b2=None,
                 wavelength=None, backend="fast"):
        self.label_names = [str(n) for n in label_names]
        net, self.dtype = payne_io.perpixel_network(w0, b0, w1, b1, w2, b2)
        self.w0, self.b0, self.w1, self.b1, self.w2, self.b2 = (net[k] for k in
                                                                 payne_io.PERPIXEL_KEYS)
        if self.w0.shape[2] != len(self.label_names):
            raise ValueError(f"w0 has {self.w0.shape[2]} labels, label_names {len(self.label_names)}")
        self.x_min = check.labels(x_min, self.n_labels, name="x_min")[0]
        self.x_max = check.labels(x_max, self.n_labels, name="x_max")[0]
        self.backend = check.choice("backend", backend, BACKENDS)
        self.wavelength = None if wavelength is None else _wavelength_array(wavelength)
        if self.wavelength is not None and self.wavelength.size != self.n_pixels:
            raise ValueError(f"wavelength has {self.wavelength.size} pixels, the network "
                             f"{self.n_pixels}")

    @property
    def n_pixels(self):
        return self.w0.shape[0]

    @property
    def network(self):
        """{"w0", "b0", "w1", "b1", "w2", "b2"}: the arrays (w2, b2 None for BinSpec's)."""
        return {k: getattr(self, k) for k in payne_io.PERPIXEL_KEYS}

    def _forward(self, x, jacobian, n_threads):
        return BACKENDS[self.backend].perpixel_forward(x=x, jacobian=jacobian,
                                                       n_threads=n_threads, **self.network)

    def write(self, path):
        """Write the model to a versioned, pickle-free ``.npz`` file (atomically)."""
        self._write_file(path, "perpixel",
                         {k: v for k, v in self.network.items() if v is not None})

    @classmethod
    def read(cls, path, *, backend="fast"):
        """Read a model written by ``write``."""
        arrays = read_model_file(path, "perpixel", required=(
            "label_names", "x_min", "x_max", "w0", "b0", "w1", "b1"))
        try:
            model = cls([str(n) for n in arrays["label_names"]],
                        **{k: arrays.get(k) for k in payne_io.PERPIXEL_KEYS},
                        x_min=arrays["x_min"], x_max=arrays["x_max"],
                        wavelength=arrays.get("wavelength"), backend=backend)
            model._read_error_floor(arrays)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a consistent per-pixel network file ({exc})") from None
        return model

    def __repr__(self):
        family = "BinSpec" if self.w2 is None else "paper-era Payne"
        return (f"PerPixelPayneModel({self.label_names}, {self.n_pixels} pixels, "
                f"{self.w0.shape[1]} hidden units, {family}, backend={self.backend!r})")


def _architecture(hidden, activation, slope, dtype):
    """Checked (hidden, activation, slope, dtype) of a dense network model."""
    try:
        hidden = tuple(check.positive_int("hidden", h) for h in hidden)
    except TypeError:
        raise TypeError("hidden must be a sequence of positive ints") from None
    payne_io.activation(activation, slope)
    dtype = np.dtype(check.choice("dtype", str(np.dtype(dtype).name)
                                  if not isinstance(dtype, str) else dtype, payne_io.DTYPES))
    return hidden, activation, float(slope), dtype


def _init_network(sizes, dtype, seed):
    """Dense layers sizes[0] -> ... -> sizes[-1] initialised as PyTorch's default:
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights (out x in) and biases."""
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / math.sqrt(n_in)
        weights.append(rng.uniform(-bound, bound, (n_out, n_in)).astype(dtype))
        biases.append(rng.uniform(-bound, bound, n_out).astype(dtype))
    return weights, biases


def _training_options(*, epochs, batch_size, optimizer, loss, learning_rate, lr_schedule,
                      patience, n_threads):
    """Check the training options shared by every network model; returns the checked ones
    that ``_train_network`` takes as keywords."""
    epochs = check.positive_int("epochs", epochs)
    batch_size = check.positive_int("batch_size", batch_size)
    check.choice("optimizer", optimizer, payne_io.OPTIMIZERS)
    payne_io.loss_name(loss)
    learning_rate = check.nonnegative_float("learning_rate", learning_rate)
    if not callable(lr_schedule):
        check.choice("lr_schedule", lr_schedule, set(LR_SCHEDULES))
    if patience is not None:
        patience = check.positive_int("patience", patience)
    if n_threads is not None:
        check.thread_count(n_threads)
    return dict(epochs=epochs, batch_size=batch_size, optimizer=optimizer, loss=loss,
                learning_rate=learning_rate, patience=patience, n_threads=n_threads)


def _train_network(backend, weights, biases, x, y, x_val, y_val, *, rng, epochs, batch_size,
                   optimizer, learning_rate, lr_schedule, weight_decay, betas, eps, loss,
                   output_weights, patience, progress, activation, slope, n_threads):
    """The mini-batch training loop shared by PayneModel and LabelRegressor.

    Trains ``weights`` / ``biases`` (updated in place) on inputs x and targets y (already
    scaled, in the network's dtype) one epoch per backend call, scoring (x_val, y_val) after
    every epoch. Returns ((best weights, best biases), history): the weights of the best
    validation epoch (of the best training epoch without validation rows).
    """
    state = backend.new_optimizer_state(weights, biases)
    n_batches = -(-x.shape[0] // batch_size)
    total_steps = epochs * n_batches
    history = {"train_loss": [], "validation_loss": [], "learning_rate": [], "best_epoch": None}
    best = (np.inf, None)
    bar = _progress(epochs, progress)
    stale = 0
    try:
        for epoch in range(epochs):
            if callable(lr_schedule):
                lr = np.full(n_batches, learning_rate * float(lr_schedule(epoch)))
            elif lr_schedule == "cosine":
                steps = epoch * n_batches + np.arange(n_batches)
                lr = learning_rate * 0.5 * (1 + np.cos(np.pi * steps / total_steps))
            else:
                lr = np.full(n_batches, learning_rate)
            order = rng.permutation(x.shape[0])
            batch_losses = backend.mlp_train_epoch(
                weights, biases, state, x, y, order, batch_size=batch_size,
                learning_rate=lr, optimizer=optimizer, betas=betas, eps=eps,
                weight_decay=weight_decay, activation=activation, slope=slope,
                loss=loss, pixel_weights=output_weights, n_threads=n_threads)
            sizes = np.minimum(batch_size, x.shape[0] - batch_size * np.arange(n_batches))
            train_loss = float(np.sum(batch_losses * sizes) / x.shape[0])
            history["train_loss"].append(train_loss)
            history["learning_rate"].append(float(lr[0]))
            if x_val.shape[0]:
                pred = backend.mlp_forward(weights, biases, x_val, activation=activation,
                                           slope=slope, n_threads=n_threads)
                val_loss = _loss(pred, y_val, output_weights, loss)
            else:
                val_loss = train_loss
            history["validation_loss"].append(val_loss if x_val.shape[0] else None)
            if val_loss < best[0]:
                best = (val_loss, ([w.copy() for w in weights], [b.copy() for b in biases]))
                history["best_epoch"] = epoch
                stale = 0
            else:
                stale += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(train=f"{train_loss:.3g}", validation=f"{val_loss:.3g}")
            if patience is not None and stale >= patience:
                break
    finally:
        if bar is not None:
            bar.close()
    if best[1] is None:  # every loss was NaN: keep the last weights
        best = (None, (weights, biases))
    return best[1], history


def _network_arrays(weights, biases):
    """Layer arrays for a model file: n_layers, weights_<l>, biases_<l>."""
    arrays = {"n_layers": np.int64(len(weights))}
    for layer, (w, b) in enumerate(zip(weights, biases)):
        arrays[f"weights_{layer}"], arrays[f"biases_{layer}"] = w, b
    return arrays


def _network_from_arrays(arrays):
    """(weights, biases) checked from a model file's n_layers, weights_<l>, biases_<l>."""
    n_layers = int(arrays["n_layers"])
    if not 1 <= n_layers <= len(arrays):   # a corrupt count must not build a huge key list
        raise ValueError(f"n_layers is {n_layers}, the file holds {len(arrays)} arrays")
    keys = [f"{k}_{i}" for i in range(n_layers) for k in ("weights", "biases")]
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise ValueError(f"lacks {missing}")
    weights = [arrays[f"weights_{i}"] for i in range(n_layers)]
    biases = [arrays[f"biases_{i}"] for i in range(n_layers)]
    weights, biases, _ = payne_io.network(weights, biases)
    return weights, biases


def _loss(pred, target, pixel_weights, loss):
    r = pred.astype(np.float64) - target
    w = 1.0 if pixel_weights is None else pixel_weights.astype(np.float64)
    return float(np.mean(w * (np.abs(r) if loss == "l1" else r * r)))


def _progress(epochs, progress):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress=True needs tqdm (pip install tqdm); "
                          "or pass progress=False") from None
    return tqdm(total=epochs, unit="epoch")


def _wavelength_array(wavelength):
    if hasattr(wavelength, "unit"):  # astropy Quantity
        wavelength = wavelength.to_value("Angstrom")
    return check.finite_array("wavelength", wavelength, 1)
