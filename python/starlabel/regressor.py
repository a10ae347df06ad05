"""Spectrum -> labels: a dense MLP regressor (Bailer-Jones et al. 1997; StarNet-style MLPs).

``LabelRegressor`` is the inverse direction of ``PayneModel`` on the same engine: the
network's inputs are the pixels of a spectrum, its outputs the labels. Flux is standardized
per pixel with the training set's mean and standard deviation (pixels with ``ivar == 0`` are
replaced by the training mean, i.e. a network input of 0), labels are standardized with
their training mean and standard deviation, and training runs the same mini-batch loop as
``PayneModel.train`` (optimizers, schedules, validation, best weights, early stopping).

Its predictions are useful on their own and as starting points for label fitting::

    start = regressor.predict(flux, ivar)[:, None, :]       # (n_spectra, 1, n_labels)
    starlabel.fit_spectra(payne, flux, ivar, initial=start)
    cannon.fit_labels(flux, ivar, initial=start)
"""

import numpy as np

from . import _validation as check
from .model_io import read_model_file, write_model_file
from .payne import (BACKENDS, _architecture, _init_network, _network_arrays,
                    _network_from_arrays, _train_network, _training_options)


class LabelRegressor:
    """A dense MLP from spectra (n_pixels inputs) to labels (n_labels outputs).

    Parameters
    ----------
    label_names : sequence of str
    hidden : widths of the hidden layers
    activation : "leaky_relu" (slope 0.01), "relu", "sigmoid", "tanh", "softplus" or "silu";
        the output layer is linear
    dtype : "float32" (default) or "float64"
    backend : "fast" (compiled) or "reference" (NumPy)
    slope : leaky ReLU's negative-side slope

    After training: ``flux_mean``, ``flux_scale`` (n_pixels,) the input standardization
    (``flux_scale`` = 1 / std, 0 for pixels constant or never observed in training, which the
    network then ignores), ``label_mean``, ``label_std`` (n_labels,), ``weights``, ``biases``
    and ``history`` (as ``PayneModel.history``).
    """

    def __init__(self, label_names, hidden=(300, 300), activation="leaky_relu", dtype="float32",
                 backend="fast", *, slope=0.01):
        names = [str(n) for n in label_names]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"label_names must be non-empty without duplicates, got {names}")
        self.label_names = names
        self.hidden, self.activation, self.slope, self.dtype = _architecture(
            hidden, activation, slope, dtype)
        self.backend = check.choice("backend", backend, BACKENDS)
        self.weights = self.biases = None
        self.flux_mean = self.flux_scale = None
        self.label_mean = self.label_std = None
        self.history = None

    @property
    def n_labels(self):
        return len(self.label_names)

    @property
    def n_pixels(self):
        return None if self.flux_mean is None else self.flux_mean.size

    @property
    def is_trained(self):
        return self.weights is not None

    def _require_trained(self):
        if not self.is_trained:
            raise RuntimeError("the regressor is not trained: call train() or read a model file")

    # -- scaling -------------------------------------------------------------------------

    def _inputs(self, flux, ivar, n_pixels=None):
        """Checked (flux, good) with good = ivar > 0 (None: every pixel), flux 2-D float64."""
        if ivar is None:
            ndim = np.ndim(flux) if np.ndim(flux) in (1, 2) else 2
            flux = np.atleast_2d(check.as_float_array("flux", flux, ndim))
            if not np.all(np.isfinite(flux)):
                raise ValueError("flux contains NaN or inf (pass ivar with ivar == 0 to mark "
                                 "missing pixels)")
            good = None
        else:
            flux, ivar = check.spectra(flux, ivar)
            good = ivar > 0
        if n_pixels is not None and flux.shape[1] != n_pixels:
            raise ValueError(f"flux has {flux.shape[1]} pixels, the regressor has {n_pixels}")
        return flux, good

    def scale_flux(self, flux, good=None):
        """Network inputs: (flux - flux_mean) * flux_scale, 0 where ``good`` is False."""
        if good is not None:
            flux = np.where(good, flux, self.flux_mean)
        return np.ascontiguousarray((flux - self.flux_mean) * self.flux_scale, dtype=self.dtype)

    def scale_labels(self, labels):
        return (labels - self.label_mean) / self.label_std

    def unscale_labels(self, y):
        return np.asarray(y, dtype=np.float64) * self.label_std + self.label_mean

    # -- training ------------------------------------------------------------------------

    def train(self, flux, labels, ivar=None, *, validation=None, validation_fraction=0.1,
              epochs=100, batch_size=128, optimizer="adam", learning_rate=1e-3,
              lr_schedule="constant", weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, loss="l2",
              label_weights=None, patience=None, seed=0, progress=False, n_threads=None):
        """Train on spectra with known labels (all mini-batch work in the backend).

        Parameters
        ----------
        flux : (n_stars, n_pixels); may be NaN where ivar == 0
        labels : (n_stars, n_labels) physical
        ivar : (n_stars, n_pixels) or None (every pixel observed); only ivar == 0 matters
            (the pixel is missing: it does not enter the flux statistics and is fed to the
            network as the training mean)
        validation : (flux, labels) or (flux, labels, ivar), or None to hold out
            ``validation_fraction`` of the stars (seeded; 0 trains on everything)
        label_weights : (n_labels,) >= 0, weights of the labels in the loss (which is
            computed on standardized labels)

        The other options are ``PayneModel.train``'s (defaults here: Adam, learning rate
        1e-3, batch 128, L2 loss). The flux and label statistics come from the training rows
        only. The weights of the best validation epoch are kept; ``history`` as PayneModel's.
        """
        flux, good = self._inputs(flux, ivar)
        labels = check.labels(labels, self.n_labels)
        if labels.shape[0] != flux.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} stars but flux has {flux.shape[0]}")
        options = _training_options(epochs=epochs, batch_size=batch_size, optimizer=optimizer,
                                    loss=loss, learning_rate=learning_rate,
                                    lr_schedule=lr_schedule, patience=patience,
                                    n_threads=n_threads)
        if label_weights is not None:
            label_weights = check.finite_array("label_weights", label_weights, 1)
            if label_weights.shape != (self.n_labels,):
                raise ValueError(f"label_weights must have shape ({self.n_labels},), got "
                                 f"{label_weights.shape}")
            if np.any(label_weights < 0):
                raise ValueError("label_weights must be >= 0")
            label_weights = np.ascontiguousarray(label_weights, dtype=self.dtype)
        if good is None:
            good = np.ones(flux.shape, dtype=bool)
        rng = np.random.default_rng(seed)

        if validation is None:
            val, keep = check.validation_split(rng, labels.shape[0], validation_fraction)
            val_flux, val_labels, val_good = flux[val], labels[val], good[val]
            flux, labels, good = flux[keep], labels[keep], good[keep]
        else:
            if not isinstance(validation, (tuple, list)) or len(validation) not in (2, 3):
                raise TypeError("validation must be a (flux, labels) or (flux, labels, ivar) "
                                "tuple, or None")
            val_flux, val_good = self._inputs(validation[0],
                                              validation[2] if len(validation) == 3 else None,
                                              n_pixels=flux.shape[1])
            val_labels = check.labels(validation[1], self.n_labels, name="validation labels")
            if val_labels.shape[0] != val_flux.shape[0]:
                raise ValueError(f"validation labels has {val_labels.shape[0]} stars but "
                                 f"validation flux has {val_flux.shape[0]}")

        label_mean, label_std = labels.mean(axis=0), labels.std(axis=0)
        constant = [n for n, s in zip(self.label_names, label_std) if not s > 0]
        if constant:
            raise ValueError(f"labels {constant} are constant in the training set: cannot scale")
        n_good = good.sum(axis=0)
        flux_mean = np.where(good, flux, 0.0).sum(axis=0) / np.maximum(n_good, 1)
        flux_std = np.sqrt((np.where(good, flux - flux_mean, 0.0) ** 2).sum(axis=0)
                           / np.maximum(n_good, 1))
        usable = (n_good > 0) & (flux_std > 0)
        if not np.any(usable):
            raise ValueError("no pixel varies across the observed training flux: nothing to "
                             "learn from")
        self.flux_mean = flux_mean
        self.flux_scale = np.where(usable, 1.0 / np.where(usable, flux_std, 1.0), 0.0)
        self.label_mean, self.label_std = label_mean, label_std

        sizes = (flux.shape[1],) + self.hidden + (self.n_labels,)
        weights, biases = _init_network(sizes, self.dtype, rng.integers(2**63))
        x = self.scale_flux(flux, good)
        y = np.ascontiguousarray(self.scale_labels(labels), dtype=self.dtype)
        x_val = self.scale_flux(val_flux, val_good)
        y_val = self.scale_labels(val_labels)
        best, self.history = _train_network(
            BACKENDS[self.backend], weights, biases, x, y, x_val, y_val, rng=rng,
            lr_schedule=lr_schedule, weight_decay=weight_decay, betas=betas, eps=eps,
            output_weights=label_weights, progress=progress, activation=self.activation,
            slope=self.slope, **options)
        self.weights, self.biases = best
        return self

    # -- prediction ----------------------------------------------------------------------

    def predict(self, flux, ivar=None, *, n_threads=None):
        """Physical labels (n_stars, n_labels), float64, of spectra (n_stars, n_pixels).

        Pixels with ``ivar == 0`` (their flux may be NaN) are fed as the training mean.
        A 1-D flux is one spectrum.
        """
        self._require_trained()
        flux, good = self._inputs(flux, ivar, n_pixels=self.n_pixels)
        y = BACKENDS[self.backend].mlp_forward(self.weights, self.biases,
                                               self.scale_flux(flux, good),
                                               activation=self.activation, slope=self.slope,
                                               n_threads=n_threads)
        return self.unscale_labels(y)

    # -- persistence ---------------------------------------------------------------------

    def write(self, path):
        """Write the regressor to a versioned, pickle-free ``.npz`` file (atomically)."""
        self._require_trained()
        arrays = {"label_names": np.array(self.label_names), "activation": np.array(self.activation),
                  "slope": np.float64(self.slope), "dtype": np.array(self.dtype.name),
                  "flux_mean": self.flux_mean, "flux_scale": self.flux_scale,
                  "label_mean": self.label_mean, "label_std": self.label_std,
                  **_network_arrays(self.weights, self.biases)}
        write_model_file(path, "label_regressor", arrays)

    @classmethod
    def read(cls, path, *, backend="fast"):
        """Read a regressor written by ``write``."""
        arrays = read_model_file(path, "label_regressor", required=(
            "label_names", "activation", "slope", "dtype", "flux_mean", "flux_scale",
            "label_mean", "label_std", "n_layers"))
        try:
            weights, biases = _network_from_arrays(arrays)
            model = cls([str(n) for n in arrays["label_names"]],
                        hidden=tuple(w.shape[0] for w in weights[:-1]),
                        activation=str(arrays["activation"]), slope=float(arrays["slope"]),
                        dtype=str(arrays["dtype"]), backend=backend)
            n_pixels = weights[0].shape[1]
            if weights[-1].shape[0] != model.n_labels:
                raise ValueError(f"the network has {weights[-1].shape[0]} outputs for "
                                 f"{model.n_labels} labels")
            stats = {}
            for name, size in (("flux_mean", n_pixels), ("flux_scale", n_pixels),
                               ("label_mean", model.n_labels), ("label_std", model.n_labels)):
                stats[name] = check.finite_array(name, arrays[name], 1)
                if stats[name].size != size:
                    raise ValueError(f"{name} has {stats[name].size} values, expected {size}")
            if np.any(stats["label_std"] <= 0) or np.any(stats["flux_scale"] < 0):
                raise ValueError("label_std must be > 0 and flux_scale >= 0")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a consistent label regressor file ({exc})") from None
        model.weights = [np.ascontiguousarray(w, dtype=model.dtype) for w in weights]
        model.biases = [np.ascontiguousarray(b, dtype=model.dtype) for b in biases]
        for name, value in stats.items():
            setattr(model, name, value)
        return model

    def __repr__(self):
        state = f"{self.n_pixels} pixels" if self.is_trained else "untrained"
        return (f"LabelRegressor({self.label_names}, hidden={self.hidden}, "
                f"activation={self.activation!r}, dtype={self.dtype.name!r}, "
                f"backend={self.backend!r}, {state})")

