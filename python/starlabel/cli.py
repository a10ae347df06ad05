"""The ``starlabel`` command line.

    starlabel demo [--plot DIR]                           built-in survey: Cannon and Payne
    starlabel train-cannon SPECTRA... -o MODEL --labels CATALOGUE --label-names TEFF,LOGG,FE_H
    starlabel train-payne  SPECTRA... -o MODEL --labels CATALOGUE --label-names TEFF,LOGG,FE_H
    starlabel fit MODEL SPECTRA... -o OUT.fits [--shard i/N [--merge]] [--scheduler ADDRESS]
    starlabel merge OUT.fits SHARD_FILES...
    starlabel info [MODEL]

SPECTRA are apStar FITS files (one star each, cut to the APOGEE grid), generic 1-D FITS
spectra (resampled onto one grid), or ``.npz`` files holding ``flux`` and ``ivar``
(n_spectra, n_pixels), ``wavelength`` (n_pixels,) and optionally ``labels`` (n_spectra,
n_labels), ``label_names`` and ``ids``. Exit codes: 0 done, 1 error, 2 bad usage.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
import zipfile

import numpy as np

from ._core import core

PROG = "starlabel"
FITS_EXTENSIONS = (".fits", ".fit", ".fits.gz", ".fit.gz")
APSTAR_PREFIXES = ("apstar", "asstar")
SPECTRA_FORMATS = ("auto", "npz", "apstar", "fits")
APOGEE_GRIDS = (7214, 7514, 8575)


class UsageError(Exception):
    """Arguments that parse but do not make sense together: exit code 2."""


# --- progress and messages ---------------------------------------------------------------

class Reporter:
    """Progress bars and status lines on stderr; silent with --quiet or when stderr is not
    a terminal (a log file or a batch job would fill with carriage returns)."""

    def __init__(self, quiet=False, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.bars = not quiet and _isatty(self.stream) and _have_tqdm()

    def bar(self, total, desc, unit="it"):
        """A tqdm bar (or a no-op stand-in) for ``total`` items."""
        if not self.bars:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False,
                    dynamic_ncols=True)

    @contextlib.contextmanager
    def step(self, desc):
        """One opaque call (a single compiled kernel) shown as a bar that fills at the end,
        with its elapsed time."""
        with self.bar(1, desc, unit="step") as bar:
            yield
            bar.update(1)

    def say(self, message):
        """A result line on stdout (kept with --quiet off; these are what the command did)."""
        if not self.quiet:
            print(message)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _have_tqdm():
    import importlib.util

    return importlib.util.find_spec("tqdm") is not None


# --- reading spectra ---------------------------------------------------------------------

@dataclasses.dataclass
class SpectraSet:
    """Spectra gathered from the command line's files.

    flux, ivar : (n_spectra, n_pixels); wavelength : (n_pixels,) Angstrom or None (npz files
    without one); ids : (n_spectra,) str; labels : (n_spectra, n_labels) or None, with
    label_names, from npz files that carry them.
    """

    flux: np.ndarray
    ivar: np.ndarray
    wavelength: np.ndarray
    ids: np.ndarray
    labels: np.ndarray = None
    label_names: tuple = None

    def __len__(self):
        return self.flux.shape[0]


@dataclasses.dataclass
class _Source:
    path: str
    kind: str               # "npz", "apstar" or "fits"
    n_rows: int
    arrays: dict = None     # npz contents


def spectra_kind(path, requested="auto"):
    """'npz', 'apstar' or 'fits' for one input file."""
    if requested != "auto":
        return requested
    name = os.path.basename(path).lower()
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(FITS_EXTENSIONS):
        return "apstar" if name.startswith(APSTAR_PREFIXES) else "fits"
    raise ValueError(f"{path}: cannot tell the spectra format from the name (.npz or .fits); "
                     "pass --spectra-format")


def _load_npz_spectra(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    for key in ("flux", "ivar"):
        if key not in arrays:
            raise ValueError(f"{path}: lacks {key!r} (an .npz of spectra holds flux, ivar, "
                             f"wavelength and optionally labels, label_names, ids; it has "
                             f"{sorted(arrays)})")
    flux = np.atleast_2d(np.asarray(arrays["flux"], dtype=np.float64))
    ivar = np.atleast_2d(np.asarray(arrays["ivar"], dtype=np.float64))
    if flux.ndim != 2 or ivar.shape != flux.shape:
        raise ValueError(f"{path}: flux {flux.shape} and ivar {ivar.shape} must be the same "
                         "(n_spectra, n_pixels)")
    arrays["flux"], arrays["ivar"] = flux, ivar
    if "wavelength" in arrays:
        wave = np.asarray(arrays["wavelength"], dtype=np.float64)
        if wave.shape != (flux.shape[1],):
            raise ValueError(f"{path}: wavelength has shape {wave.shape}, flux has "
                             f"{flux.shape[1]} pixels")
        arrays["wavelength"] = wave
    if "labels" in arrays:
        labels = np.atleast_2d(np.asarray(arrays["labels"], dtype=np.float64))
        if labels.shape[0] != flux.shape[0]:
            raise ValueError(f"{path}: labels has {labels.shape[0]} rows, flux {flux.shape[0]}")
        arrays["labels"] = labels
        if "label_names" in arrays:
            names = tuple(str(n) for n in np.atleast_1d(arrays["label_names"]))
            if len(names) != labels.shape[1]:
                raise ValueError(f"{path}: {len(names)} label_names for {labels.shape[1]} labels")
            arrays["label_names"] = names
    if "ids" in arrays and np.shape(arrays["ids"]) != (flux.shape[0],):
        raise ValueError(f"{path}: ids must have one entry per spectrum")
    return arrays


def inventory(paths, spectra_format="auto"):
    """The inputs and how many spectra each holds (npz files are read; a FITS file is one
    spectrum and is only opened when its rows are wanted)."""
    sources = []
    for path in paths:
        path = os.fspath(path)
        kind = spectra_kind(path, spectra_format)
        if kind == "npz":
            arrays = _load_npz_spectra(path)
            sources.append(_Source(path, kind, arrays["flux"].shape[0], arrays))
        else:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: no such file")
            sources.append(_Source(path, kind, 1))
    return sources


def read_spectra(sources, start=0, stop=None, *, grid=None, apogee_pixels=7514, reporter=None):
    """Spectra ``start:stop`` (counted over all sources in order) as one SpectraSet.

    grid : (n_pixels,) wavelength that generic FITS spectra are resampled onto; None takes
        the first generic FITS file's own grid.
    """
    from . import io

    reporter = reporter or Reporter(quiet=True)
    total = sum(s.n_rows for s in sources)
    stop = total if stop is None else stop
    pieces = []
    offset = 0
    with reporter.bar(stop - start, "reading spectra", "spectrum") as bar:
        for source in sources:
            lo, hi = max(start - offset, 0), min(stop - offset, source.n_rows)
            offset += source.n_rows
            if lo >= hi:
                continue
            if source.kind == "npz":
                a = source.arrays
                ids = (np.asarray(a["ids"]).astype(str)[lo:hi] if "ids" in a else
                       np.array([f"{os.path.basename(source.path)}[{i}]" for i in range(lo, hi)]))
                pieces.append(SpectraSet(a["flux"][lo:hi], a["ivar"][lo:hi], a.get("wavelength"),
                                         ids, None if "labels" not in a else a["labels"][lo:hi],
                                         a.get("label_names")))
            elif source.kind == "apstar":
                one = io.read_apstars([source.path], n_pixels=apogee_pixels)
                name = str(one.meta["objid"][0]).strip() or os.path.basename(source.path)
                pieces.append(SpectraSet(one.flux, one.ivar, one.wavelength[0], np.array([name])))
            else:
                if grid is None:
                    grid = io.read_fits_spectrum(source.path).wavelength[0]
                one = io.read_fits_spectra([source.path], grid)
                meta = io.read_fits_spectrum(source.path).meta
                name = str(meta.get("object") or meta.get("objid") or os.path.basename(source.path))
                pieces.append(SpectraSet(one.flux, one.ivar, grid, np.array([name.strip()])))
            bar.update(hi - lo)
    if not pieces:
        raise ValueError("no spectra selected")
    return _concatenate(pieces, [s.path for s in sources])


def _concatenate(pieces, paths):
    grids = [p.wavelength for p in pieces if p.wavelength is not None]
    wavelength = grids[0] if grids else None
    for p in pieces:
        if p.flux.shape[1] != pieces[0].flux.shape[1]:
            raise ValueError(f"the spectra files have different pixel counts "
                             f"({pieces[0].flux.shape[1]} and {p.flux.shape[1]}): {paths}")
    for g in grids[1:]:
        if not np.allclose(g, wavelength, rtol=1e-10, atol=0):
            raise ValueError("the spectra files are on different wavelength grids; "
                             "resample them onto one grid first")
    have_labels = [p.labels is not None for p in pieces]
    labels = names = None
    if all(have_labels):
        names = pieces[0].label_names
        if any(p.label_names != names or p.labels.shape[1] != pieces[0].labels.shape[1]
               for p in pieces):
            raise ValueError("the .npz files carry different label sets")
        labels = np.concatenate([p.labels for p in pieces])
    return SpectraSet(np.concatenate([p.flux for p in pieces]),
                      np.concatenate([p.ivar for p in pieces]), wavelength,
                      np.concatenate([p.ids for p in pieces]), labels, names)


def read_grid(path):
    """A wavelength grid (n_pixels,) from .npz (key ``wavelength``), .npy or a text file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                if "wavelength" not in data.files:
                    raise ValueError(f"{path}: lacks 'wavelength' (has {data.files})")
                grid = data["wavelength"]
        elif path.endswith(".npy"):
            grid = np.load(path, allow_pickle=False)
        else:
            grid = np.loadtxt(path)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable wavelength grid ({exc})") from None
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2 or np.any(np.diff(grid) <= 0):
        raise ValueError(f"{path}: the wavelength grid must be 1-D and increasing")
    return grid


# --- labels ------------------------------------------------------------------------------

def _names(text):
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, e.g. TEFF,LOGG,FE_H")
    return names


def training_labels(args, spectra):
    """(labels (n_spectra, n_labels), label_names) for training, from --labels or the npz."""
    from . import io

    if args.labels is None:
        if spectra.labels is None:
            raise UsageError("no labels: pass --labels CATALOGUE, or .npz spectra with 'labels'")
        names = spectra.label_names or args.label_names
        if names is None:
            raise UsageError("the .npz files have no label_names: pass --label-names")
        names = tuple(names)
        if args.label_names is not None:
            missing = [n for n in args.label_names if n not in names]
            if missing:
                raise ValueError(f"labels {missing} are not among the .npz label_names "
                                 f"{list(names)}")
            index = [names.index(n) for n in args.label_names]
            return spectra.labels[:, index], tuple(args.label_names)
        return spectra.labels, names
    if args.label_names is None:
        raise UsageError("--labels needs --label-names (e.g. --label-names TEFF,LOGG,FE_H)")
    if args.id_column is None:
        catalogue = io.read_labels(args.labels, args.label_names)
        if len(catalogue.labels) != len(spectra):
            raise ValueError(f"{args.labels}: {len(catalogue.labels)} rows for {len(spectra)} "
                             "spectra; rows are matched in order (or pass --id-column)")
        return catalogue.labels, tuple(args.label_names)
    catalogue = io.read_labels(args.labels, args.label_names, id_column=args.id_column,
                               missing="drop")
    keys = [_text(i) for i in catalogue.ids]
    row = {}
    for k, key in enumerate(keys):
        if key in row:
            raise ValueError(f"{args.labels}: id {key!r} appears twice in {args.id_column}")
        row[key] = k
    unmatched = [i for i in spectra.ids if _text(i) not in row]
    if unmatched:
        raise ValueError(f"{len(unmatched)} spectra have no labels in {args.labels} "
                         f"(first: {unmatched[0]!r}; missing values drop a row)")
    order = [row[_text(i)] for i in spectra.ids]
    return catalogue.labels[order], tuple(args.label_names)


def _text(value):
    """An id as stripped text (FITS tables give bytes, padded with blanks)."""
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("ascii", "replace")
    return str(value).strip()


# --- models ------------------------------------------------------------------------------

def model_kind(path):
    """'cannon', 'payne', 'perpixel' (starlabel files), 'payne-npz' (The Payne's published
    layout) or 'binspec-npz' (per-pixel networks), from the file's contents."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            files = set(data.files)
            fmt = str(data["format"]) if "format" in files else None
            w0_ndim = data["w_array_0"].ndim if "w_array_0" in files else None
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, AttributeError) as exc:
        raise ValueError(f"{path}: not a model file (.npz) ({exc})") from None
    if fmt is not None:
        kind = fmt.removeprefix("starlabel.")
        if kind not in ("cannon", "payne", "perpixel"):
            raise ValueError(f"{path}: a {fmt} file, not a model that fits spectra")
        return kind
    if w0_ndim == 2:
        return "payne-npz"
    if w0_ndim == 3:
        return "binspec-npz"
    raise ValueError(f"{path}: neither a starlabel model file nor a Payne/BinSpec network")


def load_model(path, *, label_names=None, wavelength=None, backend="fast", need_grid=True):
    """(model, kind) from a model file; published networks take label names and grid from
    the arguments (their files record neither)."""
    from . import CannonModel, PayneModel, PerPixelPayneModel, read_binspec_npz, read_payne_npz
    from ._grid import apogee_pixel_index, apogee_wavelength

    kind = model_kind(path)
    if kind == "cannon":
        return CannonModel.read(path, backend=backend), kind
    if kind == "payne":
        return PayneModel.read(path, backend=backend), kind
    if kind == "perpixel":
        return PerPixelPayneModel.read(path, backend=backend), kind
    reader = read_payne_npz if kind == "payne-npz" else read_binspec_npz
    model = reader(path, label_names=label_names, backend=backend)
    if not need_grid and wavelength is None:
        return model, kind
    if wavelength is None and model.n_pixels in APOGEE_GRIDS:
        # The published networks are on APOGEE's grid (The Payne's is the 7214-pixel cut).
        full = apogee_wavelength()
        if model.n_pixels != full.size:
            full = full[apogee_pixel_index(model.n_pixels)]
        wavelength = full
    if wavelength is None:
        raise UsageError(f"{path} records no wavelength grid and has {model.n_pixels} pixels "
                         "(not an APOGEE grid): pass --model-wavelength FILE")
    if wavelength.size != model.n_pixels:
        raise ValueError(f"--model-wavelength has {wavelength.size} pixels, {path} "
                         f"{model.n_pixels}")
    return reader(path, label_names=label_names, wavelength=wavelength, backend=backend), kind


def write_model(model, path, kind, record):
    """``model.write`` plus a record of how it was trained (JSON in ``training_record``,
    loss history for networks), atomically at ``path``."""
    from .model_io import read_model_file, write_model_file

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".starlabel-", suffix=".npz")
    os.close(fd)
    try:
        model.write(tmp)
        arrays = read_model_file(tmp, kind, required=())
        for key in ("format", "format_version", "package_version"):
            arrays.pop(key)
        arrays["training_record"] = np.array(json.dumps(record, default=str))
        history = getattr(model, "history", None)
        if history:
            arrays["history_train_loss"] = np.asarray(history["train_loss"], dtype=np.float64)
            arrays["history_validation_loss"] = np.array(
                [np.nan if v is None else v for v in history["validation_loss"]], dtype=np.float64)
            arrays["history_best_epoch"] = np.int64(-1 if history["best_epoch"] is None
                                                    else history["best_epoch"])
        write_model_file(path, kind, arrays)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def describe_model(path):
    """Lines summarising a model file for ``starlabel info``."""
    kind = model_kind(path)
    with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
        raw = {name: data[name] for name in data.files}
    lines = [f"model {path}"]
    if kind in ("cannon", "payne", "perpixel"):
        lines.append(f"  kind                   : {_KIND_NAMES[kind]} (file format "
                     f"{int(raw['format_version'])}, written by starlabel "
                     f"{raw['package_version']})")
    else:
        lines.append(f"  kind                   : {_KIND_NAMES[kind]} (published layout; records "
                     "no label names or wavelength)")
    model, _ = load_model(path, need_grid=False)
    lines.append(f"  labels                 : {', '.join(model.label_names)}")
    wave = model.wavelength
    span = "" if wave is None else f" ({wave[0]:.2f}-{wave[-1]:.2f} A)"
    lines.append(f"  pixels                 : {model.n_pixels}{span}")
    if kind == "cannon":
        from .status import PixelStatus

        vec = model.vectorizer
        terms = ", ".join(model.term_names)
        lines.append(f"  terms                  : {vec.n_terms} (order {vec.order}): {terms}"
                     if len(terms) < 200 else
                     f"  terms                  : {vec.n_terms} (order {vec.order})")
        counts = {PixelStatus(s).name: int(n) for s, n in
                  zip(*np.unique(model.pixel_status, return_counts=True))}
        lines.append(f"  pixel status           : {counts}")
        lines.append(f"  regularization         : {model.regularization:g}")
        if model.censors:
            lines.append(f"  censored labels        : {', '.join(model.censors)}")
        low, high = model.training_range
    else:
        sizes = [model.n_labels] + list(getattr(model, "hidden", ())) + [model.n_pixels]
        if kind in ("binspec-npz", "perpixel"):
            outer = "" if model.w2 is None else ", then an outer sigmoid (paper-era Payne)"
            lines.append(f"  architecture           : per-pixel, {model.w0.shape[1]} hidden units "
                         f"(sigmoid){outer}")
        else:
            n_params = sum(w.size + b.size for w, b in zip(model.weights, model.biases))
            lines.append(f"  architecture           : {' -> '.join(map(str, sizes))}, "
                         f"{model.activation}, {np.dtype(model.dtype).name}, {n_params} parameters")
        low, high = model.x_min, model.x_max
    ranges = ", ".join(f"{n} {lo:.4g}..{hi:.4g}" for n, lo, hi in zip(model.label_names, low, high))
    lines.append(f"  training label range   : {ranges}")
    floor = getattr(model, "error_floor", None)
    if floor is not None:
        lines.append(f"  error calibration      : {len(floor.labels)} held-out stars, "
                     f"{floor.n_neighbors} neighbours per floor")
    if "training_record" in raw:
        record = json.loads(str(raw["training_record"]))
        settings = ", ".join(f"{k}={v}" for k, v in record.items())
        lines.append(f"  training               : {settings}")
    elif kind in ("cannon", "payne"):
        lines.append("  training               : settings not recorded (written from Python)")
    if "history_train_loss" in raw:
        train, val = raw["history_train_loss"], raw["history_validation_loss"]
        best = int(raw["history_best_epoch"])
        lines.append(f"  loss history           : {train.size} epochs, final train {train[-1]:.4g}"
                     + ("" if np.isnan(val[-1]) else f", validation {val[-1]:.4g}")
                     + (f", best epoch {best}" if best >= 0 else ""))
    return lines


_KIND_NAMES = {"cannon": "The Cannon (starlabel.cannon)", "payne": "The Payne (starlabel.payne)",
               "perpixel": "per-pixel networks (starlabel.payne.PerPixelPayneModel)",
               "payne-npz": "The Payne network", "binspec-npz": "per-pixel network (BinSpec or "
                                                            "paper-era Payne)"}


# --- commands ----------------------------------------------------------------------------

def _check_output(path, overwrite, what="output"):
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")


def _training_spectra(args, reporter):
    grid = None if args.wavelength is None else read_grid(args.wavelength)
    sources = inventory(args.spectra, args.spectra_format)
    spectra = read_spectra(sources, grid=grid, apogee_pixels=args.apogee_pixels,
                           reporter=reporter)
    labels, names = training_labels(args, spectra)
    return spectra, labels, names


def _model_summary(model, path, kind):
    return (f"wrote {path}: {kind} model, {len(model.label_names)} labels "
            f"({', '.join(model.label_names)}), {model.n_pixels} pixels")


def cmd_train_cannon(args, reporter):
    from . import CannonModel

    _check_output(args.output, args.overwrite)
    spectra, labels, names = _training_spectra(args, reporter)
    model = CannonModel(names, order=args.order, terms=args.terms,
                        regularization=args.regularization, wavelength=spectra.wavelength)
    scan = None
    if args.choose_regularization:
        strengths = args.choose_regularization
        with reporter.step(f"scoring {len(strengths)} L1 strengths on held-out stars"):
            scan = model.choose_regularization(labels, spectra.flux, spectra.ivar, strengths,
                                               n_threads=args.threads)
        for strength, cost in zip(scan.strengths, scan.cost):
            reporter.say(f"  regularization {strength:<10g} held-out cost {cost:.8g}")
        model.regularization = scan.best
    with reporter.step(f"training Cannon ({len(spectra)} stars x {spectra.flux.shape[1]} pixels)"):
        start = time.perf_counter()
        model.train(labels, spectra.flux, spectra.ivar, n_threads=args.threads)
        seconds = time.perf_counter() - start
    record = {"command": "train-cannon", "n_stars": len(spectra), "order": args.order,
              "terms": args.terms, "regularization": model.regularization,
              "labels_file": args.labels, "spectra_files": len(args.spectra),
              "seconds": round(seconds, 3)}
    if scan is not None:
        record["regularization_scan"] = {"strengths": scan.strengths.tolist(),
                                          "held_out_cost": scan.cost.tolist()}
    write_model(model, args.output, "cannon", record)
    reporter.say(_model_summary(model, args.output, "Cannon") +
                 f", {model.vectorizer.n_terms} terms, trained in {seconds:.2f} s")
    return 0


def cmd_train_payne(args, reporter):
    from . import PayneModel

    _check_output(args.output, args.overwrite)
    spectra, labels, names = _training_spectra(args, reporter)
    model = PayneModel(names, hidden=args.hidden, activation=args.activation, dtype=args.dtype,
                       wavelength=spectra.wavelength)
    start = time.perf_counter()
    model.train(labels, spectra.flux, validation_fraction=args.validation_fraction,
                epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
                learning_rate=args.learning_rate, lr_schedule=args.lr_schedule,
                patience=args.patience, seed=args.seed, progress=reporter.bars,
                n_threads=args.threads)
    seconds = time.perf_counter() - start
    record = {"command": "train-payne", "n_stars": len(spectra), "hidden": list(args.hidden),
              "activation": args.activation, "dtype": args.dtype, "epochs": args.epochs,
              "batch_size": args.batch_size, "optimizer": args.optimizer,
              "learning_rate": args.learning_rate, "lr_schedule": args.lr_schedule,
              "validation_fraction": args.validation_fraction, "patience": args.patience,
              "seed": args.seed, "labels_file": args.labels, "spectra_files": len(args.spectra),
              "seconds": round(seconds, 3)}
    write_model(model, args.output, "payne", record)
    history = model.history
    reporter.say(_model_summary(model, args.output, "Payne") +
                 f", {len(history['train_loss'])} epochs in {seconds:.1f} s, final loss "
                 f"{history['train_loss'][-1]:.4g}")
    return 0


def fit_options(args):
    """fit_spectra keywords from the command line (JSON-serialisable: part of a shard run's
    fingerprint)."""
    return {"fit_rv": not args.no_rv, "rv_range": list(args.rv_range), "rv_step": args.rv_step,
            "continuum_order": args.continuum_order,
            "segments": _apogee_segments() if args.apogee_chips else None,
            "bounds": None if args.no_bounds else "training", "max_iter": args.max_iter,
            "every_start": args.every_start, "backend": args.backend,
            "broadening": _broadening(args)}


def _broadening(args):
    """fit_spectra's broadening dict from --sigma / --vsini (None when neither is given)."""
    widths = {name: value for name, value in (("sigma", args.sigma), ("vsini", args.vsini))
              if value is not None}
    return widths or None


def _apogee_segments():
    """APOGEE's three chips as wavelength ranges split in the middle of the chip gaps, so
    every grid (apStar, 7514, 7214 pixels, or a survey's own) falls into the right one."""
    from ._grid import APOGEE_CHIPS, apogee_wavelength

    full = apogee_wavelength()
    (_, stop_1), (start_2, stop_2), (start_3, _) = APOGEE_CHIPS[7514]
    cut_1 = float(0.5 * (full[stop_1 - 1] + full[start_2]))
    cut_2 = float(0.5 * (full[stop_2 - 1] + full[start_3]))
    return [[float(full[0]), cut_1], [cut_1, cut_2], [cut_2, float(full[-1])]]


def fit_table(model, spectra, options, *, n_threads=None, chunk_size=500, scheduler=None,
              reporter=None):
    """Fit ``spectra`` and return the results table (one row per spectrum, ``id`` first)."""
    from astropy.table import vstack

    from .io import results_table

    reporter = reporter or Reporter(quiet=True)
    if scheduler is not None:
        result = _fit_distributed(model, spectra, options, scheduler, chunk_size, n_threads,
                                  reporter)
        return results_table(result, ids=spectra.ids)
    from .fitting import fit_spectra

    tables = []
    # Chunks of whole LM batches give the same numbers as one call and let the bar move.
    chunk_size = -(-chunk_size // core.FIT_SPECTRA_BATCH) * core.FIT_SPECTRA_BATCH
    with reporter.bar(len(spectra), "fitting", "spectrum") as bar:
        for lo in range(0, len(spectra), chunk_size):
            hi = min(lo + chunk_size, len(spectra))
            result = fit_spectra(model, spectra.flux[lo:hi], spectra.ivar[lo:hi],
                                 spectra.wavelength, n_threads=n_threads, **options)
            tables.append(results_table(result, ids=spectra.ids[lo:hi]))
            bar.update(hi - lo)
    return tables[0] if len(tables) == 1 else vstack(tables, join_type="exact")


def _fit_distributed(model, spectra, options, address, chunk_size, n_threads, reporter):
    try:
        from distributed import Client
    except ImportError:
        raise ImportError("--scheduler needs dask.distributed: pip install 'dask[distributed]'") \
            from None
    from . import distributed as sl_distributed

    client = Client(address)
    try:
        with reporter.step(f"fitting {len(spectra)} spectra on {address}"):
            lazy = sl_distributed.fit_spectra(model, spectra.flux, spectra.ivar,
                                              spectra.wavelength, chunk_size=chunk_size,
                                              n_threads=n_threads, **options)
            return lazy.compute()
    finally:
        client.close()


def cmd_fit(args, reporter):
    from . import io, shards
    from .status import FitStatus

    if args.merge and args.shard is None:
        raise UsageError("--merge goes with --shard i/N (it merges once every shard is done)")
    shards.split_extension(args.output)  # a bad name fails now, not after the fit
    grid = None if args.model_wavelength is None else read_grid(args.model_wavelength)
    model, kind = load_model(args.model, label_names=args.label_names, wavelength=grid,
                             backend=args.backend)
    options = fit_options(args)
    sources = inventory(args.spectra, args.spectra_format)
    n_total = sum(s.n_rows for s in sources)
    run = shards.run_fingerprint(args.model, args.spectra, options)
    if args.shard is None:
        _check_output(args.output, args.overwrite)
        start, stop, out = 0, n_total, args.output
        meta = {shards.KEY_TOTAL: n_total, shards.KEY_RUN: run}
    else:
        index, count = args.shard
        start, stop = shards.shard_range(n_total, index, count, unit=core.FIT_SPECTRA_BATCH)
        out = shards.shard_path(args.output, index, count)
        meta = shards.shard_meta(index, count, start, stop, n_total, run)
        if not args.overwrite and shards.shard_is_done(out, index, count, start, stop,
                                                       n_total, run):
            reporter.say(f"{out}: shard {index}/{count} already done, skipped")
            return _maybe_merge(args, reporter, n_total, run)
    if stop > start:
        spectra = read_spectra(sources, start, stop, grid=model.wavelength,
                               apogee_pixels=args.apogee_pixels, reporter=reporter)
        table = fit_table(model, spectra, options, n_threads=args.threads,
                          chunk_size=args.chunk_size, scheduler=args.scheduler, reporter=reporter)
    else:
        table = _empty_table(model, options)  # more shards than spectra
    table.meta.update(meta)
    io.write_results(table, out, overwrite=True)
    converged = int(np.sum(table["status"] == FitStatus.CONVERGED)) if len(table) else 0
    reporter.say(f"wrote {out}: {len(table)} spectra (rows {start}:{stop} of {n_total}), "
                 f"{converged} converged")
    return _maybe_merge(args, reporter, n_total, run) if args.shard is not None else 0


def _empty_table(model, options):
    from .fitting import fit_spectra
    from .io import results_table

    # The columns of a real fit, with no rows: fit one dummy spectrum and drop it.
    n_pixels = model.n_pixels
    wave = model.wavelength if model.wavelength is not None else np.arange(1.0, n_pixels + 1)
    result = fit_spectra(model, np.ones((1, n_pixels)), np.ones((1, n_pixels)), wave,
                         **dict(options, max_iter=1))
    return results_table(result, ids=np.array(["-"]))[:0]


def _maybe_merge(args, reporter, n_total, run):
    from . import io, shards

    if not args.merge:
        return 0
    index, count = args.shard
    paths = [shards.shard_path(args.output, i, count) for i in range(count)]
    waiting = [p for p in paths if not os.path.exists(p)]
    if waiting:
        reporter.say(f"{len(waiting)} of {count} shards still to run; not merging yet")
        return 0
    if os.path.exists(args.output) and not args.overwrite:
        done = io.read_results(args.output)
        if str(done.meta.get(shards.KEY_RUN)) == run and len(done) == n_total:
            reporter.say(f"{args.output} already merged")  # another shard's job got there first
            return 0
        raise FileExistsError(f"{args.output} exists and is not this run's merge; pass "
                              "--overwrite to replace it")
    merged = shards.merge_shards(paths, args.output, overwrite=True)
    reporter.say(f"wrote {args.output}: {len(merged)} spectra merged from {count} shards")
    return 0


def cmd_merge(args, reporter):
    from . import shards

    _check_output(args.output, args.overwrite)
    for path in args.shards:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such shard file")
    merged = shards.merge_shards(args.shards, args.output, overwrite=args.overwrite)
    reporter.say(f"wrote {args.output}: {len(merged)} spectra merged from "
                 f"{len(args.shards)} shards")
    return 0


def cmd_info(args, reporter):
    from . import show_config

    show_config()
    if args.model is not None:
        print("\n".join(describe_model(args.model)))
    return 0


def cmd_demo(args, reporter):
    from .demo import run_demo

    if args.plot is not None and not os.path.isdir(args.plot):
        os.makedirs(args.plot, exist_ok=True)
    run_demo(n_train=args.n_train, n_test=args.n_test, n_pixels=args.n_pixels, seed=args.seed,
             payne_epochs=args.payne_epochs, plot_dir=args.plot, n_threads=args.threads,
             reporter=reporter)
    return 0


# --- the parser ----------------------------------------------------------------------------

def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or not np.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _strengths(text):
    try:
        return [_nonnegative_float(v) for v in str(text).split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected strengths >= 0 like 0,10,100,1000, got "
                                         f"{text!r}") from None


def _widths(text):
    try:
        widths = tuple(int(w) for w in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 300,300, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive widths like 300,300, got {text!r}")
    return widths


def _width(text):
    if text == "fit":
        return text
    try:
        return _nonnegative_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected km/s >= 0 or 'fit', got {text!r}") from None


def _shard(text):
    from .shards import parse_shard

    try:
        return parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(parser):
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or status lines")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _threads(parser):
    parser.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                        help="threads of the compiled core (default: all cores or OMP_NUM_THREADS)")


def _inputs(parser):
    parser.add_argument("--spectra-format", choices=SPECTRA_FORMATS, default="auto",
                        help="format of the spectra files (auto: .npz; FITS named apStar*/asStar* "
                             "are apStar, other FITS are 1-D spectra)")
    parser.add_argument("--apogee-pixels", type=int, choices=APOGEE_GRIDS, default=7514,
                        help="APOGEE grid that apStar spectra are cut to (default 7514)")


def _training_inputs(parser):
    parser.add_argument("spectra", nargs="+", metavar="SPECTRA", help="spectra files")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL",
                        help="model file to write (.npz)")
    parser.add_argument("--labels", metavar="CATALOGUE",
                        help="label catalogue (FITS, ECSV, CSV); rows match the spectra in order "
                             "unless --id-column is given; default: labels in the .npz spectra")
    parser.add_argument("--label-names", type=_names, metavar="A,B,...",
                        help="labels to train on, e.g. TEFF,LOGG,FE_H")
    parser.add_argument("--id-column", metavar="COLUMN",
                        help="catalogue column matched to the spectra's ids (apStar OBJID, "
                             "npz ids)")
    parser.add_argument("--wavelength", metavar="GRID",
                        help="grid (.npz/.npy/text) for generic FITS spectra (default: the first "
                             "file's own)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model file")
    _inputs(parser)
    _threads(parser)
    _common(parser)


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Stellar labels from spectra with The Cannon and The Payne.",
        epilog="Exit codes: 0 done, 1 error, 2 bad usage. `starlabel COMMAND -h` for options.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser("demo", help="train a Cannon and a Payne on built-in data and fit "
                                            "held-out spectra")
    demo.add_argument("--n-train", type=_positive_int, default=1000)
    demo.add_argument("--n-test", type=_positive_int, default=500)
    demo.add_argument("--n-pixels", type=_positive_int, default=7514)
    demo.add_argument("--payne-epochs", type=_positive_int, default=100)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plot", metavar="DIR", help="write the figures (PNG) into DIR")
    _threads(demo)
    _common(demo)
    demo.set_defaults(func=cmd_demo)

    cannon = commands.add_parser("train-cannon",
                                 help="train a Cannon model from spectra and labels")
    _training_inputs(cannon)
    cannon.add_argument("--order", type=int, choices=(1, 2, 3), default=2,
                        help="polynomial order in the labels (default 2)")
    cannon.add_argument("--terms", type=_names, metavar="T1,T2,...",
                        help="explicit terms, e.g. TEFF,LOGG,TEFF^2,TEFF*LOGG (overrides --order)")
    cannon.add_argument("--regularization", type=_nonnegative_float, default=0.0,
                        help="L1 strength on the coefficients (default 0)")
    cannon.add_argument("--choose-regularization", type=_strengths, metavar="S1,S2,...",
                        help="train at each L1 strength on 75%% of the stars, score each by the "
                             "likelihood of the other 25%%'s spectra, and train on all stars at "
                             "the best (overrides --regularization)")
    cannon.set_defaults(func=cmd_train_cannon)

    payne = commands.add_parser(
        "train-payne", help="train a Payne (MLP) emulator from spectra and labels",
        description="Train a Payne emulator (labels -> MLP -> flux). It learns from the flux "
                    "alone (ivar is not used), as The Payne learns from noiseless model spectra; "
                    "the flux must be finite everywhere.")
    _training_inputs(payne)
    payne.add_argument("--hidden", type=_widths, default=(300, 300), metavar="W1,W2",
                       help="hidden layer widths (default 300,300)")
    payne.add_argument("--activation", default="leaky_relu",
                       choices=("leaky_relu", "relu", "sigmoid", "tanh", "softplus", "silu"))
    payne.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    payne.add_argument("--epochs", type=_positive_int, default=100)
    payne.add_argument("--batch-size", type=_positive_int, default=512)
    payne.add_argument("--learning-rate", type=_nonnegative_float, default=1e-4)
    payne.add_argument("--optimizer", default="radam", choices=("radam", "adam", "adamw"))
    payne.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"))
    payne.add_argument("--validation-fraction", type=float, default=0.1)
    payne.add_argument("--patience", type=_positive_int, default=None,
                       help="stop after this many epochs without a better validation loss")
    payne.add_argument("--seed", type=int, default=0)
    payne.set_defaults(func=cmd_train_payne)

    fit = commands.add_parser("fit", help="fit labels (and RV, continuum) of spectra with a model")
    fit.add_argument("model", metavar="MODEL",
                     help="model file: starlabel Cannon/Payne, or a Payne/BinSpec network .npz")
    fit.add_argument("spectra", nargs="+", metavar="SPECTRA", help="spectra files")
    fit.add_argument("-o", "--output", required=True, metavar="OUT",
                     help="results table (.fits or .ecsv)")
    fit.add_argument("--no-rv", action="store_true",
                     help="do not fit the radial velocity (spectra are in the rest frame)")
    fit.add_argument("--rv-range", nargs=2, type=float, default=(-500.0, 500.0),
                     metavar=("LOW", "HIGH"), help="RV search range, km/s (default -500 500)")
    fit.add_argument("--rv-step", type=float, default=None, help="RV grid step, km/s")
    fit.add_argument("--continuum-order", type=int, default=None, metavar="K",
                     help="fit a Chebyshev continuum of order K per segment (default: none)")
    fit.add_argument("--apogee-chips", action="store_true",
                     help="one continuum segment per APOGEE chip")
    fit.add_argument("--no-bounds", action="store_true",
                     help="let labels leave the training range")
    fit.add_argument("--sigma", type=_width, default=None, metavar="KMS|fit",
                     help="Gaussian broadening of the model, km/s, or 'fit' (default: none)")
    fit.add_argument("--vsini", type=_width, default=None, metavar="KMS|fit",
                     help="rotational broadening v sin i of the model, km/s, or 'fit' "
                     "(default: none)")
    fit.add_argument("--max-iter", type=_positive_int, default=100)
    fit.add_argument("--every-start", action="store_true",
                     help="run LM from every starting point and keep the lowest chi2 (default: "
                     "from the start of lowest chi2 only)")
    fit.add_argument("--backend", choices=("fast", "reference"), default="fast")
    fit.add_argument("--shard", type=_shard, metavar="i/N",
                     help="fit only the i-th of N contiguous slices (from 0), into its own file "
                          "named after OUT; an existing complete shard file is skipped")
    fit.add_argument("--merge", action="store_true",
                     help="with --shard: merge into OUT once every shard file exists")
    fit.add_argument("--scheduler", metavar="ADDRESS",
                     help="fit on a running Dask cluster (e.g. tcp://host:8786)")
    fit.add_argument("--chunk-size", type=_positive_int, default=500,
                     help="spectra per fit call / Dask task (default 500)")
    fit.add_argument("--label-names", type=_names, metavar="A,B,...",
                     help="label names of a published network (its file has none)")
    fit.add_argument("--model-wavelength", metavar="GRID",
                     help="wavelength grid (.npz/.npy/text) of a published network (default: "
                          "the APOGEE grid of its size)")
    fit.add_argument("--overwrite", action="store_true",
                     help="replace an existing OUT (or refit an existing shard)")
    _inputs(fit)
    _threads(fit)
    _common(fit)
    fit.set_defaults(func=cmd_fit)

    merge = commands.add_parser("merge", help="merge shard result files, in shard order")
    merge.add_argument("output", metavar="OUT")
    merge.add_argument("shards", nargs="+", metavar="SHARD_FILE")
    merge.add_argument("--overwrite", action="store_true")
    _common(merge)
    merge.set_defaults(func=cmd_merge)

    info = commands.add_parser("info", help="build configuration, and a model file's summary")
    info.add_argument("model", nargs="?", metavar="MODEL")
    _common(info)
    info.set_defaults(func=cmd_info)
    for sub in commands.choices.values():
        sub.set_defaults(subparser=sub)  # for usage errors found after parsing
    return parser


def main(argv=None):
    """Run the command line; returns the exit code (0 done, 1 error, 2 bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage and the message (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    reporter = Reporter(quiet=args.quiet)
    try:
        return args.func(args, reporter)
    except UsageError as exc:
        args.subparser.print_usage(sys.stderr)
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure becomes one line (or the traceback with --debug)
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
