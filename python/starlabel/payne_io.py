"""Network arrays in and out: argument checks shared by both MLP backends, and the readers and
writers of The Payne's and BinSpec's published ``.npz`` layouts.

The checks live here so that ``starlabel.fast`` and ``starlabel.reference`` raise the same
exception with the same message for the same bad input.
"""

import os
import re
import zipfile

import numpy as np

from . import _validation as check
from .model_io import atomic_savez

#: Hidden-layer activations and their codes in the compiled core (``mlp.hpp``).
ACTIVATIONS = {"leaky_relu": 0, "relu": 1, "sigmoid": 2, "tanh": 3, "softplus": 4, "silu": 5}
LOSSES = {"l1": 0, "l2": 1}
OPTIMIZERS = {"adam": 0, "adamw": 1, "radam": 2}
DTYPES = {"float32": np.float32, "float64": np.float64}

#: Label names of the two BinSpec networks (see the_payne/SOURCE.md), by label count.
BINSPEC_LABELS = {5: ["TEFF", "LOGG", "FE_H", "MG_FE", "VMACRO"],
                  4: ["TEFF", "LOGG", "FE_H", "MG_FE"]}


# -- argument checks ------------------------------------------------------------------------

def _float_dtype(name, array):
    if array.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must have dtype float32 or float64, got {array.dtype}")
    return array.dtype


def network(weights, biases, *, writable=False, finite=True):
    """Check an MLP's weights (out x in) and biases; returns (weights, biases, dtype).

    With ``writable`` the arrays are updated in place by training, so they must already be
    C-contiguous, writeable and of one float dtype (nothing is converted); otherwise they are
    returned as C-contiguous arrays of the first weight's dtype. ``finite=False`` leaves out
    the check for NaN and inf, a pass over every parameter, for a caller that learns from the
    compiled forward pass whether it needs one.
    """
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError("weights and biases must be lists of arrays (one per layer)")
    if len(weights) == 0:
        raise ValueError("weights must hold at least one layer")
    if len(weights) != len(biases):
        raise ValueError(f"weights has {len(weights)} layers but biases has {len(biases)}")
    first = np.asarray(weights[0])
    dtype = _float_dtype("weights[0]", first)
    out_w, out_b = [], []
    n_in = None
    for layer, (w, b) in enumerate(zip(weights, biases)):
        for name, value, ndim in ((f"weights[{layer}]", w, 2), (f"biases[{layer}]", b, 1)):
            array = np.asarray(value)
            if array.dtype != dtype:
                raise TypeError(f"{name} has dtype {array.dtype}, weights[0] has {dtype}: "
                                "all layers must share one dtype")
            if array.ndim != ndim:
                raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
            if array.size == 0:
                raise ValueError(f"{name} is empty (shape {array.shape})")
            if writable and (not array.flags.c_contiguous or not array.flags.writeable
                             or not isinstance(value, np.ndarray)):
                raise TypeError(f"{name} must be a writeable C-contiguous array (trained in place)")
            if finite and not np.all(np.isfinite(array)):
                raise ValueError(f"{name} contains NaN or inf")
        w = w if writable else np.ascontiguousarray(w)
        b = b if writable else np.ascontiguousarray(b)
        if n_in is not None and w.shape[1] != n_in:
            raise ValueError(f"weights[{layer}] has {w.shape[1]} inputs but layer {layer - 1} "
                             f"has {n_in} outputs (weights are stored out x in)")
        if b.shape != (w.shape[0],):
            raise ValueError(f"biases[{layer}] must have shape ({w.shape[0]},), got {b.shape}")
        n_in = w.shape[0]
        out_w.append(w)
        out_b.append(b)
    return out_w, out_b, dtype


def activation(name, slope):
    """(code, slope) of an activation name; slope is leaky ReLU's negative-side slope."""
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    try:
        slope = float(slope)
    except (TypeError, ValueError):
        raise TypeError(f"slope must be a number, got {type(slope).__name__}") from None
    if not np.isfinite(slope):
        raise ValueError(f"slope must be finite, got {slope}")
    return ACTIVATIONS[name], slope


def inputs(value, n_in, dtype, name="x"):
    """Finite (n_rows, n_in) array of ``dtype``; a 1-D vector is one row."""
    array = check.labels(value, n_in, name=name)
    return np.ascontiguousarray(array, dtype=dtype)


def targets(value, n_rows, n_out, dtype, name="target"):
    # checked in the network's dtype: no float64 copy of a large training set, and a value
    # that overflows the conversion is caught
    with np.errstate(over="ignore"):
        array = check.finite_array(name, value, 2, dtype)
    if array.shape != (n_rows, n_out):
        raise ValueError(f"{name} must have shape ({n_rows}, {n_out}), got {array.shape}")
    return array


def pixel_weights(value, n_out, dtype):
    if value is None:
        return None
    array = check.finite_array("pixel_weights", value, 1)
    if array.shape != (n_out,):
        raise ValueError(f"pixel_weights must have shape ({n_out},), got {array.shape}")
    if np.any(array < 0):
        raise ValueError("pixel_weights must be >= 0")
    return np.ascontiguousarray(array, dtype=dtype)


def loss_name(value):
    return check.choice("loss", value, LOSSES)


def threads(n_threads):
    if n_threads is not None:
        check.thread_count(n_threads)


def new_optimizer_state(weights, biases):
    """Zero moments shaped like the parameters, and step 0: the ``state`` of mlp_train_epoch."""
    return {"step": 0,
            "m_weights": [np.zeros_like(w) for w in weights],
            "m_biases": [np.zeros_like(b) for b in biases],
            "v_weights": [np.zeros_like(w) for w in weights],
            "v_biases": [np.zeros_like(b) for b in biases]}


def optimizer_state(state, weights, biases):
    """Check an optimizer state against the network (arrays updated in place)."""
    if not isinstance(state, dict):
        raise TypeError("state must be a dict made by new_optimizer_state()")
    for key in ("step", "m_weights", "m_biases", "v_weights", "v_biases"):
        if key not in state:
            raise ValueError(f"state lacks {key!r}; make it with new_optimizer_state()")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"state['step'] must be an int >= 0, got {step!r}")
    for key, like in (("m_weights", weights), ("v_weights", weights), ("m_biases", biases),
                      ("v_biases", biases)):
        arrays = state[key]
        if not isinstance(arrays, list) or len(arrays) != len(like):
            raise ValueError(f"state[{key!r}] must be a list of {len(like)} arrays")
        for i, (a, p) in enumerate(zip(arrays, like)):
            if (not isinstance(a, np.ndarray) or a.shape != p.shape or a.dtype != p.dtype
                    or not a.flags.c_contiguous or not a.flags.writeable):
                raise ValueError(f"state[{key!r}][{i}] must be a writeable C-contiguous "
                                 f"{p.dtype} array of shape {p.shape}")
    return int(step)


def train_epoch_arguments(weights, biases, state, x, target, order, batch_size, learning_rate,
                          optimizer, betas, eps, weight_decay, activation_name, slope, loss,
                          weights_per_pixel, n_threads):
    """Check mlp_train_epoch's arguments (both backends); returns them converted."""
    threads(n_threads)
    weights, biases, dtype = network(weights, biases, writable=True)
    step = optimizer_state(state, weights, biases)
    act, slope = activation(activation_name, slope)
    x = inputs(x, weights[0].shape[1], dtype)
    target = targets(target, x.shape[0], weights[-1].shape[0], dtype)
    n = x.shape[0]
    order = np.asarray(order)
    if not np.issubdtype(order.dtype, np.integer):
        raise TypeError(f"order must hold integers, got dtype {order.dtype}")
    if order.shape != (n,) or not np.array_equal(np.sort(order), np.arange(n)):
        raise ValueError(f"order must be a permutation of range({n})")
    order = np.ascontiguousarray(order, dtype=np.int64)
    batch_size = check.positive_int("batch_size", batch_size)
    n_batches = -(-n // batch_size)
    lr = check.finite_array("learning_rate", np.atleast_1d(np.asarray(learning_rate, dtype=float)), 1)
    if lr.size == 1:
        lr = np.full(n_batches, lr[0])
    if lr.shape != (n_batches,) or np.any(lr < 0):
        raise ValueError(f"learning_rate must be a number >= 0 or one per batch ({n_batches})")
    optimizer = check.choice("optimizer", optimizer, OPTIMIZERS)
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise TypeError("betas must be a pair of numbers") from None
    if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
        raise ValueError(f"betas must lie in [0, 1), got {(beta1, beta2)}")
    eps = check.nonnegative_float("eps", eps)
    weight_decay = check.nonnegative_float("weight_decay", weight_decay)
    loss = loss_name(loss)
    weights_per_pixel = pixel_weights(weights_per_pixel, weights[-1].shape[0], dtype)
    return (weights, biases, step, x, target, order, batch_size, lr, optimizer, (beta1, beta2),
            eps, weight_decay, act, slope, loss, weights_per_pixel)


PERPIXEL_KEYS = ("w0", "b0", "w1", "b1", "w2", "b2")


def perpixel_network(w0, b0, w1, b1, w2=None, b2=None):
    """Check a per-pixel network; returns ({name: array}, dtype), arrays C-contiguous.

    w0 (n_pixels, n_hidden, n_labels), b0 and w1 (n_pixels, n_hidden), b1 (n_pixels,); the
    paper-era outer sigmoid's w2 and b2 (n_pixels,) both given, or both None (BinSpec).
    """
    w0 = np.asarray(w0)
    dtype = _float_dtype("w0", w0)
    if (w2 is None) != (b2 is None):
        raise ValueError("give both w2 and b2 (the outer sigmoid), or neither")
    n_pixels = w0.shape[0] if w0.ndim == 3 else None
    n_hidden = w0.shape[1] if w0.ndim == 3 else None
    shapes = {"w0": None, "b0": (n_pixels, n_hidden), "w1": (n_pixels, n_hidden),
              "b1": (n_pixels,), "w2": (n_pixels,), "b2": (n_pixels,)}
    net = {}
    for name, value in zip(PERPIXEL_KEYS, (w0, b0, w1, b1, w2, b2)):
        if value is None:
            net[name] = None
            continue
        array = np.asarray(value)
        ndim = 3 if name == "w0" else len(shapes[name])
        if array.dtype != dtype:
            raise TypeError(f"{name} has dtype {array.dtype}, w0 has {dtype}")
        if array.ndim != ndim or array.size == 0:
            raise ValueError(f"{name} must be a non-empty {ndim}-D array, got shape {array.shape}")
        if shapes[name] is not None and array.shape != shapes[name]:
            raise ValueError(f"{name} must have shape {shapes[name]} to match w0 {w0.shape}, "
                             f"got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or inf")
        net[name] = np.ascontiguousarray(array)
    return net, dtype


# -- published file layouts ----------------------------------------------------------------

def _load_npz(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no network file at {path}")
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable .npz network file ({exc})") from None


def _scaling(arrays, path, n_labels):
    out = []
    for key in ("x_min", "x_max"):
        if key not in arrays:
            raise ValueError(f"{path}: network file lacks {key!r}")
        value = np.asarray(arrays[key], dtype=np.float64)
        if value.shape != (n_labels,):
            raise ValueError(f"{path}: {key} has shape {value.shape}, the network has {n_labels} "
                             "labels")
        if not np.all(np.isfinite(value)):
            raise ValueError(f"{path}: {key} contains NaN or inf")
        out.append(value)
    if np.any(out[1] <= out[0]):
        raise ValueError(f"{path}: x_max must exceed x_min for every label")
    return out


def _names(label_names, n_labels, path, default=None):
    if label_names is None:
        return list(default) if default else [f"label_{i}" for i in range(n_labels)]
    names = [str(n) for n in label_names]
    if len(names) != n_labels:
        raise ValueError(f"label_names has {len(names)} names but {path} has {n_labels} labels")
    return names


def read_payne_npz(path, *, label_names=None, wavelength=None, dtype=None, backend="fast"):
    """Read a network in The Payne's published layout as a PayneModel.

    The file holds ``w_array_0..n`` (out x in), ``b_array_0..n``, ``x_min`` and ``x_max``;
    hidden layers are leaky ReLU with slope 0.01 and the last layer is linear (The Payne's
    ``NN_normalized_spectra.npz``). ``dtype`` defaults to the file's (float32 for The Payne).
    Mismatched or missing arrays raise ValueError naming the key.
    """
    from .payne import PayneModel

    arrays = _load_npz(path)
    if "w_array_0" in arrays and np.ndim(arrays["w_array_0"]) == 3:
        raise ValueError(f"{path}: w_array_0 is 3-D, a per-pixel (BinSpec) network: use "
                         "read_binspec_npz")
    weights, biases = [], []
    layer = 0
    while f"w_array_{layer}" in arrays:
        if f"b_array_{layer}" not in arrays:
            raise ValueError(f"{path}: network file has w_array_{layer} but lacks b_array_{layer}")
        weights.append(np.asarray(arrays[f"w_array_{layer}"]))
        biases.append(np.asarray(arrays[f"b_array_{layer}"]))
        layer += 1
    if not weights:
        raise ValueError(f"{path}: network file lacks 'w_array_0' (not The Payne's layout)")
    file_dtype = weights[0].dtype if weights[0].dtype in (np.float32, np.float64) else np.float32
    dtype = np.dtype(file_dtype if dtype is None else DTYPES.get(str(dtype), dtype))
    try:
        weights, biases, _ = network([np.asarray(w, dtype=dtype) for w in weights],
                                     [np.asarray(b, dtype=dtype) for b in biases])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: inconsistent network arrays ({exc}; weights[l] and "
                         "biases[l] are w_array_l and b_array_l)") from None
    n_labels = weights[0].shape[1]
    x_min, x_max = _scaling(arrays, path, n_labels)
    model = PayneModel(_names(label_names, n_labels, path),
                       hidden=tuple(w.shape[0] for w in weights[:-1]), activation="leaky_relu",
                       slope=0.01, dtype=np.dtype(dtype).name, backend=backend,
                       wavelength=wavelength)
    model._set_network(weights, biases, x_min, x_max)
    return model


def write_payne_npz(model, path):
    """Write a model in the published layout its code reads: a PayneModel as The Payne's
    (``w_array_0..n``, ``b_array_0..n``, out x in), a PerPixelPayneModel as BinSpec's or the
    paper-era Payne's (``read_binspec_npz``), both with ``x_min`` and ``x_max``.

    The dense layout records no activation: only leaky ReLU with slope 0.01 can be written.
    """
    from .payne import PerPixelPayneModel

    model._require_trained()
    if isinstance(model, PerPixelPayneModel):
        layers = [(model.w0, model.b0), (model.w1, model.b1)]
        if model.w2 is not None:
            layers.append((model.w2, model.b2))
    else:
        if model.activation != "leaky_relu" or model.slope != 0.01:
            raise ValueError("The Payne's layout implies leaky ReLU with slope 0.01; this model "
                             f"uses {model.activation!r} (slope {model.slope}): use "
                             "model.write() instead")
        layers = list(zip(model.weights, model.biases))
    arrays = {}
    for layer, (w, b) in enumerate(layers):
        arrays[f"w_array_{layer}"] = w
        arrays[f"b_array_{layer}"] = b
    arrays["x_min"], arrays["x_max"] = model.x_min, model.x_max
    atomic_savez(path, arrays)


def read_binspec_npz(path, *, label_names=None, wavelength=None, dtype=None, backend="fast"):
    """Read a per-pixel network as a PerPixelPayneModel: BinSpec's (El-Badry et al. 2018),
    or the Payne paper era's (Ting et al. 2019), which adds an outer sigmoid.

    Keys ``w_array_0`` (n_pixels, n_hidden, n_labels), ``b_array_0`` (n_pixels, n_hidden),
    ``w_array_1`` (n_pixels, n_hidden), ``b_array_1`` (n_pixels,), ``x_min``, ``x_max``, and
    for the paper era ``w_array_2`` and ``b_array_2`` (n_pixels,):
    ``flux = w_array_2 * sigmoid(inner) + b_array_2`` with ``inner`` BinSpec's output.
    The model's output is the network's raw output (for BinSpec's absolute-flux network that
    is 10^6 x the surface flux H_nu).
    """
    from .payne import PerPixelPayneModel

    arrays = _load_npz(path)
    keys = ("w_array_0", "b_array_0", "w_array_1", "b_array_1", "w_array_2", "b_array_2")
    for key in keys[:4]:
        if key not in arrays:
            raise ValueError(f"{path}: network file lacks {key!r} (not a per-pixel layout)")
    if ("w_array_2" in arrays) != ("b_array_2" in arrays):
        raise ValueError(f"{path}: network file has one of w_array_2 and b_array_2, not both")
    if np.ndim(arrays["w_array_0"]) != 3:
        raise ValueError(f"{path}: w_array_0 must be 3-D (n_pixels, n_hidden, n_labels) in a "
                         f"per-pixel layout, got shape {np.shape(arrays['w_array_0'])}; a dense "
                         "Payne network is read by read_payne_npz")
    file_dtype = arrays["w_array_0"].dtype
    dtype = np.dtype(file_dtype if dtype is None else DTYPES.get(str(dtype), dtype))
    try:
        net, _ = perpixel_network(*(np.asarray(arrays[k], dtype=dtype) if k in arrays else None
                                    for k in keys))
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        for new, old in zip(keys, PERPIXEL_KEYS):
            msg = re.sub(rf"\b{old}\b", new, msg)
        raise ValueError(f"{path}: inconsistent network arrays ({msg})") from None
    n_labels = net["w0"].shape[2]
    x_min, x_max = _scaling(arrays, path, n_labels)
    names = _names(label_names, n_labels, path, BINSPEC_LABELS.get(n_labels))
    return PerPixelPayneModel(names, **net, x_min=x_min, x_max=x_max, wavelength=wavelength,
                              backend=backend)
