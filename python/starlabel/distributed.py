"""Survey scale on Dask: ``fit_spectra`` in chunks of spectra, Cannon training in blocks of pixels.

Both build a Dask graph whose tasks call the ordinary local functions (``starlabel.fit_spectra``,
``CannonModel.train``) on pieces of the data, so a distributed run gives exactly, bit for bit,
what one local call on all the data gives. They run on whatever scheduler Dask uses: a
``dask.distributed.Client`` if one is active, else Dask's local threads.

The model enters the graph once, as one key that every task depends on: the scheduler runs
it on one worker and the others fetch it from there, at most once each, however many
chunks they fit. Needs the ``dask`` extra (``dask[distributed]``; ``dask[dataframe]`` and
pandas for ``to_dask_dataframe``).

Threads: each task is one call of the compiled core with ``n_threads`` (None: the worker
process's default). Workers started by a Dask nanny have ``OMP_NUM_THREADS=1`` by default,
so a worker with k threads runs k chunks at once on one core each; pass ``n_threads`` to
give each chunk more cores (then start workers with fewer threads, to stay within the cores).
"""

import copy
import inspect

import numpy as np

from . import _validation as check
from . import fitting
from ._concat import concatenate_results
from ._core import core
from .cannon import CannonModel

# The compiled core's work units, whose arithmetic depends on what shares them (Eigen picks
# its product kernels by the sizes involved): Cannon training runs in blocks of pixels, fits
# in batches of spectra. Tasks start on multiples of them so that every pixel and spectrum
# is computed exactly as a local call computes it.
TRAIN_PIXEL_BLOCK = core.CANNON_TRAIN_PIXEL_BLOCK
FIT_BATCH = core.FIT_SPECTRA_BATCH

_FIT_OPTIONS = frozenset(
    name for name, p in inspect.signature(fitting.fit_spectra).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY)


def _dask():
    try:
        import dask
        import dask.array as da
    except ImportError:
        raise ImportError("starlabel.distributed needs Dask: "
                          "pip install 'starlabel[dask]'") from None
    return dask, da


# --- fit_spectra ------------------------------------------------------------------------------

def fit_spectra(model, flux, ivar, wavelength=None, *, chunk_size=2000, **options):
    """``starlabel.fit_spectra`` over chunks of spectra on a Dask cluster; lazy.

    Parameters
    ----------
    model : PayneModel, PerPixelPayneModel or CannonModel (trained); sent to each worker once
    flux, ivar : (n_spectra, n_pixels) Dask arrays chunked along spectra only (one chunk
        along pixels), with the same chunks; or NumPy arrays, cut into chunks of
        ``chunk_size`` spectra. A (n_pixels,) pair is one spectrum.
    wavelength : (n_pixels,) observed wavelengths, as for ``starlabel.fit_spectra``
    chunk_size : int >= 1, spectra per chunk when neither flux nor ivar is a Dask array.
        Chunks (also a Dask array's) are rounded up to whole LM batches (FIT_BATCH = 32
        spectra), so that every spectrum is fitted exactly as the local call fits it
    **options : the keyword options of ``starlabel.fit_spectra`` (fit_rv, rv_range, rv_step,
        continuum_order, segments, mask, bounds, initial, max_iter, return_model, backend,
        n_threads, ...). ``mask`` (n_spectra, n_pixels) and a per-spectrum ``initial``
        (n_spectra, n_starts, n_labels) are cut into the same chunks as flux (Dask arrays
        are rechunked to them); a (n_pixels,) mask and (n_labels,) or
        (n_starts, n_labels) starts go whole to every chunk. ``n_threads`` is per task.

    Returns
    -------
    DaskSpectrumFit: ``.compute()`` gives the SpectrumFitResult of
    ``starlabel.fit_spectra(model, flux, ivar, wavelength, **options)``, identical in every
    array; ``.to_dask_dataframe()`` one row per spectrum.

    Raises
    ------
    ValueError / TypeError naming the argument, before anything runs, for a bad chunk_size,
    an unknown option, an untrained or unsupported model, a wavelength grid that does not
    fit the model, mismatched shapes or chunks, or Dask arrays chunked along pixels. Bad
    values inside the arrays (NaN flux where ivar > 0, ...) and bad values of the other
    options raise the local call's error when a chunk is computed.

    NumPy inputs and the model travel inside the graph (once each); distributed warns about
    graphs over 10 MB, so for a large survey pass Dask arrays read from files (HDF5, Zarr)
    rather than NumPy arrays.
    """
    dask, da = _dask()
    chunk_size = check.positive_int("chunk_size", chunk_size)
    unknown = sorted(set(options) - _FIT_OPTIONS)
    if unknown:
        raise TypeError(f"fit_spectra() got unexpected keyword argument(s) {unknown}; the "
                        f"options are {sorted(_FIT_OPTIONS)}")
    if options.get("n_threads") is not None:
        check.thread_count(options["n_threads"])
    if options.get("backend") is not None:
        check.choice("backend", options["backend"], fitting.BACKENDS)
    desc = fitting._describe(model)  # TypeError / RuntimeError for a wrong or untrained model
    _, obs_wave = fitting._grids(desc["wavelength"], wavelength, desc["n_model"])
    n_pixels = obs_wave.size

    flux, ivar = _as_2d("flux", flux), _as_2d("ivar", ivar)
    if flux.shape != ivar.shape:
        raise ValueError(f"flux and ivar must have the same shape, got {flux.shape} and "
                         f"{ivar.shape}")
    if flux.shape[1] != n_pixels:
        source = "wavelength" if wavelength is not None else "the model's wavelength grid"
        raise ValueError(f"flux has {flux.shape[1]} pixels, {source} has {n_pixels}")
    n_spectra = flux.shape[0]
    if n_spectra == 0:
        raise ValueError(f"flux is empty (shape {flux.shape})")
    star_chunks = _star_chunks({"flux": flux, "ivar": ivar}, n_spectra, chunk_size)

    per_chunk = {"flux": _blocks(da, "flux", flux, star_chunks),
                 "ivar": _blocks(da, "ivar", ivar, star_chunks)}
    shared = dict(options)
    mask = options.get("mask")
    if mask is not None and np.ndim(mask) == 2:
        _check_mask(mask, flux.shape)
        per_chunk["mask"] = _blocks(da, "mask", mask, star_chunks)
        del shared["mask"]
    elif mask is not None:
        _check_mask(mask, flux.shape)
        shared["mask"] = _as_numpy(mask)
    initial = options.get("initial")
    if initial is not None and np.ndim(initial) == 3:
        if np.shape(initial)[0] != n_spectra:
            raise ValueError(f"initial has starts for {np.shape(initial)[0]} spectra, flux has "
                             f"{n_spectra}")
        per_chunk["initial"] = _blocks(da, "initial", initial, star_chunks)
        del shared["initial"]
    elif initial is not None:
        shared["initial"] = _as_numpy(initial)

    # One key each for the model and for what every chunk shares (wavelength, options): the
    # chunk tasks refer to them, so they are serialized into the graph once.
    model_key = dask.delayed(model, pure=True, traverse=False)
    shared_key = dask.delayed((wavelength, shared), pure=True, traverse=False)
    fit_chunk = dask.delayed(_fit_chunk, pure=True)
    parts, sizes = [], []
    for i, size in enumerate(star_chunks):
        if size == 0:  # a fit of no spectra is an error; it adds nothing to the result
            continue
        pieces = {name: blocks[i] for name, blocks in per_chunk.items()}
        parts.append(fit_chunk(model_key, shared_key, pieces))
        sizes.append(size)
    return DaskSpectrumFit(parts, sizes, desc["label_names"], model_key.key)


def _fit_chunk(model, shared, pieces):
    """One chunk on a worker: the local fit_spectra on its spectra."""
    wavelength, options = shared
    pieces = dict(pieces)
    flux, ivar = pieces.pop("flux"), pieces.pop("ivar")
    return fitting.fit_spectra(model, flux, ivar, wavelength, **options, **pieces)


class DaskSpectrumFit:
    """A lazy ``fit_spectra`` over chunks of spectra (from ``starlabel.distributed.fit_spectra``).

    Attributes
    ----------
    chunks : tuple of int, spectra per chunk (chunks of no spectra left out)
    n_spectra : int, sum(chunks)
    label_names : tuple of str (n_labels)
    model_key : the graph key holding the model, shared by every chunk's task
    """

    def __init__(self, parts, chunks, label_names, model_key):
        self._parts = list(parts)
        self.chunks = tuple(int(c) for c in chunks)
        self.n_spectra = sum(self.chunks)
        self.label_names = tuple(label_names)
        self.model_key = model_key

    def __len__(self):
        return self.n_spectra

    def __repr__(self):
        return (f"DaskSpectrumFit({self.n_spectra} spectra in {len(self.chunks)} chunks, "
                f"labels {list(self.label_names)})")

    def to_delayed(self):
        """list of Delayed, one SpectrumFitResult (chunks[i] spectra) per chunk, in order."""
        return list(self._parts)

    def compute(self, **kwargs):
        """Run every chunk and join them: one SpectrumFitResult (n_spectra rows).

        ``kwargs`` go to ``dask.compute`` (e.g. ``scheduler=``).
        """
        dask, _ = _dask()
        return concatenate_results(dask.compute(*self._parts, **kwargs))

    def persist(self, **kwargs):
        """Start the chunks' computation (kept in the cluster's memory); a new DaskSpectrumFit."""
        dask, _ = _dask()
        parts = dask.persist(*self._parts, **kwargs)
        return DaskSpectrumFit(parts, self.chunks, self.label_names, self.model_key)

    def to_dask_dataframe(self):
        """One row per spectrum, indexed by its position 0..n_spectra-1 (index "spectrum").

        Computing it runs the fits again unless this object came from ``persist()``.

        Columns as ``SpectrumFitResult.to_table()``: for each label ``NAME`` and ``E_NAME``,
        then chi2, reduced_chi2 (float64), n_pixels_used (int64), n_iter (int32),
        status (int8 FitStatus codes), rv, E_rv (km/s; 0 and NaN without an RV fit).
        """
        dask, _ = _dask()
        import dask.dataframe as dd
        import pandas as pd

        columns = self._columns()
        meta = pd.DataFrame({name: np.empty(0, dtype) for name, dtype in columns.items()},
                            index=pd.RangeIndex(0, 0, name="spectrum"))
        offsets = np.concatenate([[0], np.cumsum(self.chunks)])
        to_frame = dask.delayed(_result_frame, pure=True)
        frames = [to_frame(part, int(start), columns)
                  for part, start in zip(self._parts, offsets[:-1])]
        divisions = tuple(int(d) for d in offsets[:-1]) + (int(offsets[-1]) - 1,)
        return dd.from_delayed(frames, meta=meta, divisions=divisions)

    def _columns(self):
        columns = {}
        for name in self.label_names:
            columns[name] = columns[f"E_{name}"] = np.float64
        columns.update(chi2=np.float64, reduced_chi2=np.float64, n_pixels_used=np.int64,
                       n_iter=np.int32, status=np.int8, rv=np.float64, E_rv=np.float64)
        return columns


def _result_frame(result, start, columns):
    """A chunk's SpectrumFitResult as a pandas DataFrame indexed start..start+n-1."""
    import pandas as pd

    values = {}
    errors = result.errors
    for a, name in enumerate(result.label_names):
        values[name], values[f"E_{name}"] = result.labels[:, a], errors[:, a]
    for field in ("chi2", "reduced_chi2", "n_pixels_used", "n_iter", "status", "rv"):
        values[field] = getattr(result, field)
    values["E_rv"] = result.rv_error
    index = pd.RangeIndex(start, start + len(result), name="spectrum")
    return pd.DataFrame({name: np.asarray(values[name], dtype)
                         for name, dtype in columns.items()}, index=index)


# --- Cannon training --------------------------------------------------------------------------

def train_cannon(model, labels, flux, ivar, *, pixels_per_task=1024, n_threads=None):
    """``model.train(labels, flux, ivar)`` with the pixels split into blocks across workers.

    The label scaling, default starts and training range come from the whole training set,
    as in a local train(); each task trains ``pixels_per_task`` pixels of every star. The
    model ends up identical, bit for bit, to a local train() (theta, s2, pixel_status,
    offsets, scales, initial_labels, training_range: everything ``write`` saves).

    Parameters
    ----------
    model : CannonModel; trained in place (and returned), as by ``train``
    labels : (n_stars, n_labels) physical training labels (NumPy)
    flux, ivar : (n_stars, n_pixels) NumPy or Dask arrays (any chunks: they are rechunked
        into blocks of pixels holding every star)
    pixels_per_task : int >= 1, pixels per task, rounded up to a multiple of
        TRAIN_PIXEL_BLOCK (256 pixels), the compiled core's own training block
    n_threads : threads of the compiled core in each task (None: the worker's default)

    Returns
    -------
    model, trained: theta (n_pixels, n_terms), s2 (n_pixels,), pixel_status (n_pixels,)

    Runs at once on Dask's current scheduler (a distributed Client if one is active).
    """
    dask, da = _dask()
    if not isinstance(model, CannonModel):
        raise TypeError(f"model must be a CannonModel, got {type(model).__name__}")
    pixels_per_task = check.positive_int("pixels_per_task", pixels_per_task)
    pixels_per_task = -(-pixels_per_task // TRAIN_PIXEL_BLOCK) * TRAIN_PIXEL_BLOCK
    if n_threads is not None:
        check.thread_count(n_threads)
    labels = check.labels(_as_numpy(labels), len(model.label_names))
    if not (_is_dask(flux) or _is_dask(ivar)):
        flux, ivar = check.spectra(flux, ivar)  # the local train()'s checks and messages
    flux, ivar = _as_2d("flux", flux), _as_2d("ivar", ivar)
    if flux.shape != ivar.shape:
        raise ValueError(f"flux and ivar must have the same shape, got {flux.shape} and "
                         f"{ivar.shape}")
    n_stars, n_pixels = flux.shape
    if labels.shape[0] != n_stars:
        raise ValueError(f"labels has {labels.shape[0]} stars but flux has {n_stars}")
    if n_stars < model.vectorizer.n_terms:
        raise ValueError(f"labels: {n_stars} training stars are fewer than the "
                         f"{model.vectorizer.n_terms} terms of the model")
    if model.wavelength is not None and model.wavelength.size != n_pixels:
        raise ValueError(f"flux has {n_pixels} pixels but wavelength has {model.wavelength.size}")
    model.term_mask(n_pixels)  # checks the censors' sizes

    # The scaling from all training labels, fixed before the pixels are split (fit_scaling
    # keeps given values, so every block's train() uses exactly these).
    vectorizer = copy.deepcopy(model.vectorizer)
    vectorizer.fit_scaling(labels)
    # A copy (not a new model) so that every setting of the model reaches the blocks; minus
    # what train() computes, and what is per pixel (each block gets its slice).
    template = copy.copy(model)
    template.vectorizer = vectorizer
    template.wavelength = template.censors = None
    template.theta = template.s2 = template.pixel_status = None
    template.initial_labels = template.training_range = None

    starts = list(range(0, n_pixels, pixels_per_task))
    widths = tuple(min(pixels_per_task, n_pixels - p0) for p0 in starts)
    flux_blocks = _pixel_blocks(da, flux, widths)
    ivar_blocks = _pixel_blocks(da, ivar, widths)
    template_key = dask.delayed(template, pure=True, traverse=False)
    labels_key = dask.delayed(labels, pure=True, traverse=False)
    train_block = dask.delayed(_train_block, pure=True)
    tasks = []
    for j, (p0, width) in enumerate(zip(starts, widths)):
        censors = None if not model.censors else {
            name: np.ascontiguousarray(mask[p0:p0 + width]) for name, mask in model.censors.items()}
        tasks.append(train_block(template_key, labels_key, flux_blocks[j], ivar_blocks[j],
                                 censors, n_threads))
    blocks = dask.compute(*tasks)

    per_pixel = [np.concatenate([b[0][k] for b in blocks]) for k in range(3)]
    model.vectorizer = vectorizer
    model.theta, model.s2, model.pixel_status = per_pixel
    model.initial_labels, model.training_range = blocks[0][1]
    return model


def _train_block(template, labels, flux, ivar, censors, n_threads):
    """One block of pixels on a worker: a local train() of a copy of the template model.

    Returns ((theta, s2, pixel_status) of the block, (initial_labels, training_range)).
    """
    block = copy.copy(template)  # the worker's template is shared by its concurrent tasks
    block.vectorizer = copy.deepcopy(template.vectorizer)
    block.censors = block._check_censors(censors)
    block.train(labels, flux, ivar, n_threads=n_threads)
    return (block.theta, block.s2, block.pixel_status), (block.initial_labels,
                                                          block.training_range)


# --- arrays and chunks ------------------------------------------------------------------------

def _is_dask(value):
    return hasattr(value, "dask") and hasattr(value, "chunks") and hasattr(value, "to_delayed")


def _as_numpy(value):
    return np.asarray(value.compute() if _is_dask(value) else value)


def _as_2d(name, value):
    """A (n_spectra, n_pixels) Dask or NumPy array from a 1-D or 2-D one."""
    if not _is_dask(value):
        value = np.asarray(value)
    if value.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (n_spectra, n_pixels) or (n_pixels,), got "
                         f"{value.shape}")
    return value[None, :] if value.ndim == 1 else value


def _star_chunks(arrays, n_spectra, chunk_size):
    """Spectra per chunk: the Dask arrays' (which must agree and not split pixels), else
    chunk_size each."""
    chunks = None
    for name, array in arrays.items():
        if not _is_dask(array):
            continue
        if any(np.isnan(c) for axis in array.chunks for c in axis):
            raise ValueError(f"{name} has unknown chunk sizes; call {name}.compute_chunk_sizes()")
        if len(array.chunks[1]) > 1:
            raise ValueError(f"{name} is chunked along pixels (chunks {array.chunks[1]}); each "
                             f"chunk must hold whole spectra: use {name}.rechunk({{1: -1}})")
        if chunks is None:
            chunks, first = array.chunks[0], name
        elif array.chunks[0] != chunks:
            raise ValueError(f"{first} and {name} must be chunked alike along spectra, got "
                             f"{chunks} and {array.chunks[0]}")
    if chunks is None:
        chunks = (chunk_size,)
    if any(c % FIT_BATCH for c in chunks[:-1]) or len(chunks) == 1:
        # whole LM batches per chunk: round the (largest) chunk up to a multiple of the batch
        size = -(-max(chunks) // FIT_BATCH) * FIT_BATCH
        chunks = (size,) * (n_spectra // size) + ((n_spectra % size,) if n_spectra % size else ())
    return tuple(int(c) for c in chunks)


def _blocks(da, name, array, star_chunks):
    """Per-chunk pieces (a list of Delayed) of an array whose first axis is the spectra."""
    if _is_dask(array):
        if any(np.isnan(c) for axis in array.chunks for c in axis):
            raise ValueError(f"{name} has unknown chunk sizes; call {name}.compute_chunk_sizes()")
        if array.chunks[0] != star_chunks:
            array = array.rechunk({0: star_chunks})
        if any(len(axis) > 1 for axis in array.chunks[1:]):
            raise ValueError(f"{name} is chunked along pixels (chunks {array.chunks[1:]}); "
                             f"each chunk must hold whole spectra: rechunk it to one chunk "
                             "along every axis but the first")
    else:
        array = da.from_array(np.asarray(array), chunks=(star_chunks,) + tuple(
            -1 for _ in range(np.ndim(array) - 1)))
    return list(array.to_delayed().reshape(-1))


def _check_mask(mask, shape):
    """The local fit_spectra's mask checks, without computing a Dask mask."""
    dtype = mask.dtype if _is_dask(mask) else np.asarray(mask).dtype
    if dtype != bool:
        raise TypeError(f"mask must be boolean (True leaves a pixel out), got dtype {dtype}")
    if tuple(np.shape(mask)) not in (shape[1:], shape):
        raise ValueError(f"mask must have shape ({shape[1]},) or {shape}, got "
                         f"{tuple(np.shape(mask))}")


def _pixel_blocks(da, array, widths):
    """Delayed (n_stars, width) blocks of every star, one per entry of widths."""
    if not _is_dask(array):
        array = da.from_array(array, chunks=(-1, widths))
    else:
        array = array.rechunk((-1, widths))
    return list(array.to_delayed().reshape(-1))
