"""Survey data in and out through astropy: APOGEE apStar/apVisit, 1-D FITS spectra, label
catalogues and fit results.

Needs astropy (``pip install starlabel[io]``). Every reader returns plain NumPy arrays with
``ivar == 0`` marking pixels to ignore. Errors name the file. Writers are atomic: a temporary
file in the destination folder, then a rename, so a crash never leaves half a file.
"""

import contextlib
import dataclasses
import os
import tempfile
import warnings

import numpy as np

from . import _grid

__all__ = [
    "Spectra", "LabelCatalogue", "APOGEE_PIXMASK", "DEFAULT_BAD_BITS",
    "read_apstar", "read_apstars", "read_apvisit", "read_fits_spectrum", "read_fits_spectra",
    "read_labels", "write_results", "read_results", "results_table", "atomic_write",
]

#: APOGEE_PIXMASK bit names (SDSS DR17 bitmask documentation).
APOGEE_PIXMASK = {
    "BADPIX": 0, "CRPIX": 1, "SATPIX": 2, "UNFIXABLE": 3, "BADDARK": 4, "BADFLAT": 5,
    "BADERR": 6, "NOSKY": 7, "LITTROW_GHOST": 8, "PERSIST_HIGH": 9, "PERSIST_MED": 10,
    "PERSIST_LOW": 11, "SIG_SKYLINE": 12, "SIG_TELLURIC": 13, "NOT_ENOUGH_PSF": 14,
}
#: Bits that zero a pixel's ivar by default: the detector/reduction failures (0-7),
#: significant sky lines (12, as The Payne's download code) and too little PSF (14).
DEFAULT_BAD_BITS = ("BADPIX", "CRPIX", "SATPIX", "UNFIXABLE", "BADDARK", "BADFLAT", "BADERR",
                    "NOSKY", "SIG_SKYLINE", "NOT_ENOUGH_PSF")

# Units of common result columns (matched case-insensitively after dropping an E_ prefix).
_UNITS = {
    "teff": "K", "logg": "dex", "log_g": "dex", "vmicro": "km/s", "vmacro": "km/s",
    "vsini": "km/s", "v_micro": "km/s", "v_macro": "km/s", "rv": "km/s", "vhelio": "km/s",
    "vrad": "km/s", "radial_velocity": "km/s",
}


def _astropy():
    """astropy's fits, Table and units, imported on first use (astropy is the io extra)."""
    try:
        from astropy.io import fits
        from astropy.table import Table
        import astropy.units as u
    except ImportError:  # pragma: no cover - exercised only without astropy
        raise ImportError("starlabel.io needs astropy: pip install 'starlabel[io]'") from None
    return fits, Table, u


@dataclasses.dataclass
class Spectra:
    """Spectra read from files; every array has one row per spectrum (or chip).

    wavelength, flux, ivar : (n_rows, n_pixels) float64, vacuum Angstrom for APOGEE
    bitmask : (n_rows, n_pixels) int64 (zeros when the file has none)
    meta : dict of header metadata (object id, S/N, VHELIO, rows read, ...)
    """

    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    bitmask: np.ndarray
    meta: dict

    def __len__(self):
        return self.flux.shape[0]


@dataclasses.dataclass
class LabelCatalogue:
    """Labels read from a catalogue.

    labels : (n_rows, n_labels) float64, NaN where missing (``missing="keep"``)
    missing : (n_rows, n_labels) bool
    label_names : tuple of str (as requested), columns : tuple of the matched column names
    table : the astropy Table of the kept rows
    ids : the ``id_column`` values of the kept rows (None without id_column)
    """

    labels: np.ndarray
    missing: np.ndarray
    label_names: tuple
    columns: tuple
    table: object
    ids: np.ndarray = None


# --- helpers ---------------------------------------------------------------------------

def _open_fits(path):
    fits, _, _ = _astropy()
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    hdul = None
    try:
        with _truncation_is_an_error():
            hdul = fits.open(path, memmap=False)
            len(hdul)   # reads every header now, so a damaged file fails here
    except Exception as exc:  # astropy raises OSError, ValueError, TypeError, ... on bad files
        if hdul is not None:
            hdul.close()
        raise OSError(f"{path}: not a readable FITS file ({type(exc).__name__}: {exc})") from None
    return path, hdul


@contextlib.contextmanager
def _truncation_is_an_error():
    """astropy only warns when a file is shorter than its headers promise, then fails later
    with an unrelated message; make it an error that _open_fits/_hdu_data report with the path."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="File may have been truncated")
        yield


def _hdu_data(path, hdul, index, what):
    if index >= len(hdul):
        raise ValueError(f"{path}: missing HDU {index} ({what}); the file has {len(hdul)} HDUs")
    try:
        with _truncation_is_an_error():
            data = hdul[index].data
    except Exception as exc:
        raise OSError(f"{path}: HDU {index} ({what}) could not be read "
                      f"({type(exc).__name__}: {exc})") from None
    if data is None:
        raise ValueError(f"{path}: HDU {index} ({what}) holds no data")
    return np.asarray(data)


def bad_bit_mask(bad_bits):
    """An integer mask from bit names / bit numbers (iterable) or an int mask itself."""
    if bad_bits is None:
        return 0
    if isinstance(bad_bits, (int, np.integer)) and not isinstance(bad_bits, bool):
        if bad_bits < 0:
            raise ValueError(f"bad_bits must be >= 0, got {bad_bits}")
        return int(bad_bits)
    if isinstance(bad_bits, str):
        bad_bits = (bad_bits,)
    mask = 0
    for bit in bad_bits:
        if isinstance(bit, str):
            if bit.upper() not in APOGEE_PIXMASK:
                raise ValueError(f"bad_bits: unknown APOGEE_PIXMASK bit {bit!r} "
                                 f"(known: {sorted(APOGEE_PIXMASK)})")
            bit = APOGEE_PIXMASK[bit.upper()]
        if isinstance(bit, bool) or not isinstance(bit, (int, np.integer)) or not 0 <= bit < 63:
            raise ValueError(f"bad_bits: a bit must be a name or an int in [0, 63), got {bit!r}")
        mask |= 1 << int(bit)
    return mask


def _ivar_from_error(flux, error, bitmask, bad_mask):
    """1/error^2, zero where the error is not a positive finite number, the flux is not
    finite, or the bitmask has a bad bit."""
    error = np.asarray(error, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    good = np.isfinite(error) & (error > 0) & np.isfinite(flux)
    if bad_mask:
        good &= (bitmask & bad_mask) == 0
    ivar = np.zeros_like(error)
    np.divide(1.0, error * error, out=ivar, where=good)
    ivar[~np.isfinite(ivar)] = 0.0   # error so small its square underflows
    return ivar


def _header_meta(header, keys):
    return {k.lower(): header[k] for k in keys if k in header}


def _wavelength_from_header(path, header, n_pixels, dispersion="auto"):
    """Wavelength (Angstrom) of a 1-D solution in ``header``: CRVAL1, CDELT1 (or CD1_1),
    CRPIX1; log-linear when CTYPE1 says LOG or DC-FLAG = 1 (or dispersion="log10"/"ln")."""
    _, _, u = _astropy()
    if "CRVAL1" not in header:
        raise ValueError(f"{path}: header has no CRVAL1, so no wavelength solution")
    step = header.get("CDELT1", header.get("CD1_1"))
    if step is None:
        raise ValueError(f"{path}: header has neither CDELT1 nor CD1_1")
    start, step, ref = float(header["CRVAL1"]), float(step), float(header.get("CRPIX1", 1.0))
    if dispersion == "auto":
        ctype = str(header.get("CTYPE1", "")).upper()
        if "LOG" in ctype or int(header.get("DC-FLAG", 0)) == 1:
            dispersion = "log10"
        else:
            dispersion = "linear"
    pix = np.arange(n_pixels) + 1.0 - ref
    if dispersion == "linear":
        wave = start + step * pix
    elif dispersion == "log10":
        wave = 10.0 ** (start + step * pix)
    elif dispersion == "ln":
        wave = np.exp(start + step * pix)
    else:
        raise ValueError(f"dispersion must be 'auto', 'linear', 'log10' or 'ln', got {dispersion!r}")
    unit = str(header.get("CUNIT1", "Angstrom")).strip() or "Angstrom"
    try:
        wave = (wave * u.Unit(unit)).to_value(u.AA, equivalencies=u.spectral())
    except (ValueError, u.UnitsError):
        raise ValueError(f"{path}: CUNIT1 {unit!r} is not a wavelength unit") from None
    if not np.all(np.isfinite(wave)) or np.any(np.diff(wave) <= 0):
        raise ValueError(f"{path}: the header wavelength solution is not finite and increasing")
    return wave


# --- APOGEE ----------------------------------------------------------------------------

_APSTAR_KEYS = ("OBJID", "TELESCOP", "FIELD", "NVISITS", "SNR", "VHELIO", "VSCATTER", "VERR",
                "RV_TEFF", "RV_LOGG", "RV_FEH", "RA", "DEC", "J", "H", "K", "STARFLAG")


def read_apstar(path, rows="combined", *, bad_bits=DEFAULT_BAD_BITS):
    """Read an APOGEE apStar (or 1-D aspcapStar-style) file.

    Parameters
    ----------
    path : str or path-like
    rows : "combined" (the pixel-weighted combined row), "visits" (one row per visit; for a
        single-visit star the combined row is that visit), "all", or an int / sequence of
        row indices into the file
    bad_bits : APOGEE_PIXMASK bit names or numbers, or an int mask; pixels with any of them
        set get ivar = 0 (None keeps every pixel with a valid error)

    Returns
    -------
    Spectra with wavelength from the header's log-linear vacuum solution, flux (1e-17
    erg/s/cm^2/A), ivar = 1/error^2, the pixel bitmask and header metadata (``objid``,
    ``snr``, ``vhelio``, ``nvisits``, ``rows``, per-row ``row_vhelio`` and ``row_snr``).
    """
    mask = bad_bit_mask(bad_bits)
    path, hdul = _open_fits(path)
    with hdul:
        header0 = hdul[0].header
        flux = _hdu_data(path, hdul, 1, "flux").astype(np.float64)
        error = _hdu_data(path, hdul, 2, "error")
        if flux.ndim not in (1, 2):
            raise ValueError(f"{path}: HDU 1 (flux) must be 1-D or 2-D, got shape {flux.shape}")
        flux = np.atleast_2d(flux)
        error = np.atleast_2d(error)
        if error.shape != flux.shape:
            raise ValueError(f"{path}: HDU 2 (error) has shape {error.shape}, flux has {flux.shape}")
        bitmask = np.zeros(flux.shape, dtype=np.int64)
        if len(hdul) > 3 and hdul[3].data is not None and np.issubdtype(hdul[3].data.dtype, np.integer):
            bits = np.atleast_2d(np.asarray(hdul[3].data))
            if bits.shape != flux.shape:
                raise ValueError(f"{path}: HDU 3 (bitmask) has shape {bits.shape}, flux has {flux.shape}")
            bitmask = bits.astype(np.int64)
        header1 = hdul[1].header
        solution = header1 if "CRVAL1" in header1 else header0
        wave = _wavelength_from_header(path, solution, flux.shape[1])
        meta = _header_meta(header0, _APSTAR_KEYS)
        nvisits = int(header0.get("NVISITS", 1))
        row_vhelio = np.full(flux.shape[0], np.nan)
        row_snr = np.full(flux.shape[0], np.nan)
        row_vhelio[0] = header0.get("VHELIO", np.nan)
        row_snr[0] = header0.get("SNR", np.nan)
        if nvisits > 1:
            for v in range(nvisits):
                if 2 + v < flux.shape[0]:
                    row_vhelio[2 + v] = header0.get(f"VHELIO{v + 1}", np.nan)
                    row_snr[2 + v] = header0.get(f"SNRVIS{v + 1}", np.nan)

    n_rows = flux.shape[0]
    if isinstance(rows, str):
        if rows == "combined":
            index = [0]
        elif rows == "visits":
            index = list(range(2, 2 + nvisits)) if nvisits > 1 else [0]
        elif rows == "all":
            index = list(range(n_rows))
        else:
            raise ValueError(f"rows must be 'combined', 'visits', 'all' or row indices, got {rows!r}")
    else:
        index = np.atleast_1d(np.asarray(rows))
        if not np.issubdtype(index.dtype, np.integer) or index.ndim != 1:
            raise TypeError(f"rows must be 'combined', 'visits', 'all' or integer row indices, got {rows!r}")
        index = index.tolist()
    if not index:
        raise ValueError(f"{path}: no rows selected")
    for i in index:
        if not -n_rows <= i < n_rows:
            raise ValueError(f"{path}: row {i} out of range; the file has {n_rows} rows")
    index = [i % n_rows for i in index]
    flux, error, bitmask = flux[index], np.asarray(error, dtype=np.float64)[index], bitmask[index]
    ivar = _ivar_from_error(flux, error, bitmask, mask)
    meta.update(path=path, rows=tuple(int(i) for i in index), bad_bits=mask,
                row_vhelio=row_vhelio[index], row_snr=row_snr[index],
                flux_unit="1e-17 erg / (s cm2 Angstrom)")
    wavelength = np.broadcast_to(wave, flux.shape).copy()
    return Spectra(wavelength, flux, ivar, bitmask, meta)


def read_apstars(paths, *, n_pixels=7514, bad_bits=DEFAULT_BAD_BITS):
    """Combined spectra of many apStar files as one (n_stars, n_pixels) array.

    Each file's combined row is read with read_apstar and cut to the APOGEE grid of
    ``n_pixels`` (7514: DR13-DR17 chip ranges, 7214: DR12 / The Payne, 8575: the full apStar
    grid). ``meta`` holds per-star arrays (``objid``, ``snr``, ``vhelio``, ``nvisits``) and
    the ``paths``. A file whose wavelength solution is not the APOGEE one raises ValueError.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("paths is empty")
    full = _grid.apogee_wavelength(_grid.APOGEE_N_APSTAR)
    index = (np.arange(full.size) if n_pixels == _grid.APOGEE_N_APSTAR
             else _grid.apogee_pixel_index(n_pixels))
    flux = np.empty((len(paths), index.size))
    ivar = np.empty_like(flux)
    bitmask = np.empty(flux.shape, dtype=np.int64)
    meta = {"paths": tuple(paths), "objid": [], "snr": [], "vhelio": [], "nvisits": []}
    for k, path in enumerate(paths):
        one = read_apstar(path, bad_bits=bad_bits)
        w = one.wavelength[0]
        if w.size != full.size or not np.allclose(w, full, rtol=1e-12, atol=0):
            raise ValueError(f"{path}: not on the APOGEE apStar wavelength grid "
                             f"({w.size} pixels from {w[0]:.6g} A)")
        flux[k], ivar[k], bitmask[k] = one.flux[0, index], one.ivar[0, index], one.bitmask[0, index]
        for key in ("objid", "snr", "vhelio", "nvisits"):
            meta[key].append(one.meta.get(key, np.nan if key != "objid" else ""))
    for key in ("snr", "vhelio", "nvisits"):
        meta[key] = np.asarray(meta[key])
    meta["objid"] = np.asarray(meta["objid"], dtype=str)
    wavelength = np.broadcast_to(full[index], flux.shape).copy()
    return Spectra(wavelength, flux, ivar, bitmask, meta)


_APVISIT_KEYS = ("OBJID", "TELESCOP", "PLATE", "MJD5", "FIBERID", "DATE-OBS", "JD-MID", "EXPTIME",
                 "SNR", "VHELIO", "VRAD", "BC", "RA", "DEC")


def read_apvisit(path, *, bad_bits=DEFAULT_BAD_BITS, ascending=True):
    """Read an APOGEE apVisit file: three chips with per-pixel wavelength arrays.

    Returns Spectra with one row per chip, shape (3, 4096). With ``ascending=True`` (default)
    the chips are ordered blue, green, red and the pixels run to increasing wavelength (the
    file stores red first and decreasing); ``meta["chips"]`` names the rows. Wavelengths are
    vacuum Angstrom in the observed frame.
    """
    mask = bad_bit_mask(bad_bits)
    path, hdul = _open_fits(path)
    with hdul:
        flux = _hdu_data(path, hdul, 1, "flux").astype(np.float64)
        error = _hdu_data(path, hdul, 2, "error").astype(np.float64)
        bitmask = _hdu_data(path, hdul, 3, "bitmask").astype(np.int64)
        wave = _hdu_data(path, hdul, 4, "wavelength").astype(np.float64)
        for name, arr in (("error", error), ("bitmask", bitmask), ("wavelength", wave)):
            if arr.shape != flux.shape:
                raise ValueError(f"{path}: {name} has shape {arr.shape}, flux has {flux.shape}")
        if flux.ndim != 2:
            raise ValueError(f"{path}: expected (n_chips, n_pixels) arrays, got shape {flux.shape}")
        meta = _header_meta(hdul[0].header, _APVISIT_KEYS)
    chips = ("red", "green", "blue") if flux.shape[0] == 3 else tuple(range(flux.shape[0]))
    if ascending:
        order = np.argsort(np.median(wave, axis=1))
        flux, error, bitmask, wave = (a[order] for a in (flux, error, bitmask, wave))
        chips = tuple(chips[i] for i in order)
        flip = wave[:, -1] < wave[:, 0]
        for a in (flux, error, bitmask, wave):
            a[flip] = a[flip, ::-1]
    ivar = _ivar_from_error(flux, error, bitmask, mask)
    meta.update(path=path, chips=chips, bad_bits=mask, flux_unit="1e-17 erg / (s cm2 Angstrom)")
    return Spectra(wave, flux, ivar, bitmask, meta)


# --- generic 1-D FITS ------------------------------------------------------------------

def read_fits_spectrum(path, *, hdu=None, error_hdu=None, ivar_hdu=None, dispersion="auto"):
    """Read a one-dimensional FITS spectrum with a linear or log-linear wavelength solution.

    The flux is the first HDU with 1-D data unless ``hdu`` is given. Uncertainties come from
    ``error_hdu`` (1-sigma) or ``ivar_hdu``; without either every finite pixel gets ivar = 1.
    Returns Spectra with one row.
    """
    path, hdul = _open_fits(path)
    with hdul:
        if hdu is None:
            hdu = next((i for i, h in enumerate(hdul)
                        if h.data is not None and getattr(h.data, "ndim", 0) == 1
                        and h.header.get("XTENSION", "IMAGE").strip() == "IMAGE"), None)
            if hdu is None:
                raise ValueError(f"{path}: no HDU holds a 1-D spectrum")
        flux = _hdu_data(path, hdul, hdu, "flux").astype(np.float64)
        if flux.ndim != 1:
            raise ValueError(f"{path}: HDU {hdu} is not 1-D (shape {flux.shape})")
        wave = _wavelength_from_header(path, hdul[hdu].header, flux.size, dispersion)
        if error_hdu is not None and ivar_hdu is not None:
            raise ValueError("give error_hdu or ivar_hdu, not both")
        if error_hdu is not None:
            error = _hdu_data(path, hdul, error_hdu, "error").astype(np.float64)
            if error.shape != flux.shape:
                raise ValueError(f"{path}: HDU {error_hdu} (error) has shape {error.shape}, flux has {flux.shape}")
            ivar = _ivar_from_error(flux, error, None, 0)
        elif ivar_hdu is not None:
            ivar = _hdu_data(path, hdul, ivar_hdu, "ivar").astype(np.float64)
            if ivar.shape != flux.shape:
                raise ValueError(f"{path}: HDU {ivar_hdu} (ivar) has shape {ivar.shape}, flux has {flux.shape}")
            ivar = np.where(np.isfinite(ivar) & (ivar > 0) & np.isfinite(flux), ivar, 0.0)
        else:
            ivar = np.isfinite(flux).astype(np.float64)
        meta = _header_meta(hdul[0].header, ("OBJECT", "OBJID", "TELESCOP", "INSTRUME", "DATE-OBS"))
    meta.update(path=path, hdu=hdu)
    return Spectra(wave[None, :], flux[None, :], ivar[None, :],
                   np.zeros((1, flux.size), dtype=np.int64), meta)


def read_fits_spectra(paths, wavelength, *, backend="fast", **options):
    """Read many 1-D FITS spectra onto one common grid: (n_stars, n_pixels) flux and ivar.

    Each file is read with read_fits_spectrum(**options) and resampled (flux-conserving, with
    ivar propagation) onto ``wavelength``; pixels of the grid a file does not cover get
    ivar = 0. A file whose spectrum does not overlap the grid at all raises ValueError.
    """
    from .preprocess import resample

    grid = _grid.increasing_wavelength("wavelength", wavelength)
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError("paths is empty")
    flux = np.empty((len(paths), grid.size))
    ivar = np.empty((len(paths), grid.size))
    for k, path in enumerate(paths):
        one = read_fits_spectrum(path, **options)
        w = one.wavelength[0]
        if w[-1] <= grid[0] or w[0] >= grid[-1]:
            raise ValueError(f"{path}: wavelength range {w[0]:.6g}-{w[-1]:.6g} A does not overlap "
                             f"the grid {grid[0]:.6g}-{grid[-1]:.6g} A")
        flux[k], ivar[k] = resample(w, one.flux, one.ivar, grid, backend=backend)
    meta = {"paths": tuple(paths)}
    return Spectra(np.broadcast_to(grid, flux.shape).copy(), flux, ivar,
                   np.zeros(flux.shape, dtype=np.int64), meta)


# --- label catalogues ------------------------------------------------------------------

def _normal(name):
    return "".join(ch for ch in str(name).lower() if ch.isalnum())


# Extra spellings of common labels: normalized label -> column spellings (never mixing two
# different quantities, e.g. [Fe/H] never falls back to [M/H]).
_ALIASES = {
    "teff": ("teff", "t_eff", "tef"), "logg": ("logg", "log_g", "grav"),
    "feh": ("fe_h", "[fe/h]", "feh"), "mh": ("m_h", "[m/h]", "param_m_h"),
    "alphafe": ("alpha_fe", "[alpha/fe]"), "alpham": ("alpha_m", "[a/m]", "param_alpha_m"),
    "vmicro": ("vmicro", "vmic", "vturb"), "rv": ("rv", "vhelio", "rvel", "vrad"),
}


def _match_column(table, label, column_map):
    """The column for ``label``: column_map, exact, case/punctuation-insensitive, alias."""
    if column_map and label in column_map:
        column = column_map[label]
        if column not in table.colnames:
            raise KeyError(column)
        return column
    if label in table.colnames:
        return label
    by_normal = {}
    for col in table.colnames:
        by_normal.setdefault(_normal(col), col)
    key = _normal(label)
    for candidate in (key,) + tuple(_normal(a) for a in _ALIASES.get(key, ())):
        if candidate in by_normal:
            return by_normal[candidate]
    raise KeyError(label)


def read_labels(path, label_names, *, column_map=None, missing="error",
                missing_values=(-9999.0, -9999.99), format=None, id_column=None, hdu=None):
    """Read labels from a catalogue (FITS, ECSV, CSV... anything astropy.table reads).

    Parameters
    ----------
    path : catalogue file
    label_names : label names in the order wanted (e.g. ["teff", "logg", "fe_h"]); each is
        matched to a column exactly, then ignoring case and punctuation (TEFF, Teff, T_eff),
        then through a few standard aliases
    column_map : dict label -> exact column name, overriding the matching
    missing : what to do with missing values (masked, NaN, inf or a ``missing_values``
        sentinel): "error" raises ValueError naming the column and rows, "drop" removes the
        rows, "keep" leaves NaN and reports them in ``.missing``
    missing_values : sentinels that mean "missing" (compared to 1e-6 relative, so the
        float32 -9999.99 of APOGEE catalogues matches)
    format : astropy format name when the extension does not say it
    id_column : optional column returned as ``ids`` (e.g. "APOGEE_ID")
    hdu : the table HDU of a FITS catalogue with several tables

    Returns
    -------
    LabelCatalogue
    """
    _, Table, _ = _astropy()
    path = os.fspath(path)
    if isinstance(label_names, str):
        label_names = [label_names]
    label_names = tuple(label_names)
    if not label_names:
        raise ValueError("label_names is empty")
    if missing not in ("error", "drop", "keep"):
        raise ValueError(f"missing must be 'error', 'drop' or 'keep', got {missing!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        missing_values = tuple(float(v) for v in np.atleast_1d(missing_values))
    except (TypeError, ValueError):
        raise TypeError(f"missing_values must be numbers, got {missing_values!r}") from None
    kwargs = {} if format is None else {"format": format}
    if hdu is not None:
        kwargs["hdu"] = hdu
    try:
        table = Table.read(path, **kwargs)
    except Exception as exc:  # astropy raises many types for unreadable tables
        raise OSError(f"{path}: not a readable table ({type(exc).__name__}: {exc})") from None
    columns, values = [], []
    for label in label_names:
        try:
            column = _match_column(table, label, column_map)
        except KeyError as exc:
            raise ValueError(f"{path}: no column for label {label!r} (looked for {exc}); columns are "
                             f"{table.colnames}; pass column_map={{{label!r}: 'COLUMN'}}") from None
        col = table[column]
        if col.ndim != 1:
            raise TypeError(f"{path}: column {column!r} (label {label!r}) is not one value per row "
                            f"(shape {col.shape})")
        if not (np.issubdtype(col.dtype, np.number) or col.dtype == bool):
            raise TypeError(f"{path}: column {column!r} (label {label!r}) is not numeric (dtype {col.dtype})")
        data = np.ma.getdata(col).astype(np.float64)
        mask = np.ma.getmaskarray(col) | ~np.isfinite(data)
        for sentinel in missing_values:
            mask |= np.isclose(data, sentinel, rtol=1e-6, atol=0.0)
        columns.append(column)
        values.append(np.where(mask, np.nan, data))
    labels = np.stack(values, axis=1)
    is_missing = np.isnan(labels)
    if missing == "error" and is_missing.any():
        bad = [f"{c!r} ({int(n)} rows, first row {int(np.argmax(is_missing[:, k]))})"
               for k, (c, n) in enumerate(zip(columns, is_missing.sum(0))) if n]
        raise ValueError(f"{path}: missing values in {', '.join(bad)}; use missing='drop' or 'keep'")
    if missing == "drop":
        keep = ~is_missing.any(axis=1)
        labels, is_missing, table = labels[keep], is_missing[keep], table[keep]
    ids = None
    if id_column is not None:
        if id_column not in table.colnames:
            raise ValueError(f"{path}: no id column {id_column!r}; columns are {table.colnames}")
        ids = np.asarray(table[id_column])
    return LabelCatalogue(labels, is_missing, label_names, tuple(columns), table, ids)


# --- results ---------------------------------------------------------------------------

def _unit_for(name):
    """K, km/s or dex for a label-like column name (and its E_ error column), else None."""
    key = name.lower()
    if key.startswith("e_"):
        key = key[2:]
    if key in _UNITS:
        return _UNITS[key]
    if key.startswith(("vmic", "vmac", "vbroad", "vsini")) or key == "sigma":
        return "km/s"
    if (key.startswith("[") or key.endswith(("_h", "_fe", "_m")) or
            key in ("feh", "mh", "alpha", "alphafe", "alpham")):
        return "dex"
    return None


def results_table(result, *, ids=None, rv=None):
    """An astropy Table from a FitResult (or anything with ``to_table()``, or a Table), with
    units on the label columns (K, dex, km/s) and optional ``id`` and ``rv`` columns."""
    _, Table, u = _astropy()
    if isinstance(result, Table):
        table = result.copy()
    elif hasattr(result, "to_table"):
        table = result.to_table()
    else:
        raise TypeError(f"result must be a FitResult or an astropy Table, got {type(result).__name__}")
    if ids is not None:
        ids = np.asarray(ids)
        if ids.shape != (len(table),):
            raise ValueError(f"ids must have shape ({len(table)},), got {ids.shape}")
        table.add_column(ids, name="id", index=0)
    if rv is not None:
        rv = np.asarray(rv, dtype=np.float64)
        if rv.shape != (len(table),):
            raise ValueError(f"rv must have shape ({len(table)},), got {rv.shape}")
        table["rv"] = rv
    for name in table.colnames:
        unit = _unit_for(name)
        if unit is not None and table[name].unit is None and np.issubdtype(table[name].dtype, np.floating):
            table[name].unit = u.Unit(unit)
    return table


def atomic_write(path, write):
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then move it into place.

    The temporary file keeps ``path``'s extension (writers choose formats from it); it is
    removed if ``write`` fails, so ``path`` is either the old file or the complete new one.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{path}: folder {folder} does not exist")
    _, dot, rest = os.path.basename(path).partition(".")
    suffix = dot + rest
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".starlabel-", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _table_format(path, format):
    if format is not None:
        return format
    name = os.fspath(path).lower()
    for ext, fmt in ((".fits", "fits"), (".fit", "fits"), (".fits.gz", "fits"),
                     (".ecsv", "ascii.ecsv"), (".csv", "ascii.csv")):
        if name.endswith(ext):
            return fmt
    raise ValueError(f"{path}: cannot tell the table format from the extension; "
                     f"use .fits or .ecsv or pass format=")


def write_results(result, path, *, overwrite=False, format=None, ids=None, rv=None):
    """Write fit results (a FitResult or Table) as an astropy Table to FITS or ECSV, atomically.

    Columns carry units where they exist (K, dex, km/s). Refuses to replace an existing file
    unless ``overwrite=True``. Returns the Table written.
    """
    fmt = _table_format(path, format)
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    table = results_table(result, ids=ids, rv=rv)
    table.meta["SL_VERS"] = _version()   # FITS keywords are at most 8 characters
    if fmt == "fits":
        atomic_write(path, lambda tmp: _write_fits_table(table, tmp))
    else:
        atomic_write(path, lambda tmp: table.write(tmp, format=fmt, overwrite=True))
    return table


def _write_fits_table(table, path):
    """Write ``table`` as a FITS binary table. 'dex' is not a FITS standard unit (astropy would
    drop it with a warning), so those columns get TUNITn = 'dex' written directly."""
    fits, _, u = _astropy()
    plain = table.copy(copy_data=False)
    dex = [name for name in plain.colnames if plain[name].unit == u.dex]
    for name in dex:
        plain[name].unit = None
    hdu = fits.table_to_hdu(plain)
    for i, name in enumerate(plain.colnames, start=1):
        if name in dex:
            hdu.header[f"TUNIT{i}"] = "dex"
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(path, overwrite=True)


def read_results(path, *, format=None):
    """Read a results table written by write_results (units restored)."""
    _, Table, u = _astropy()
    fmt = _table_format(path, format)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():
            # Our own TUNITn = 'dex' (see _write_fits_table) is not a FITS standard unit, so
            # astropy warns that it could not parse it; the column is given u.dex below.
            warnings.filterwarnings("ignore", message=".*'dex'.*", category=u.UnitsWarning)
            table = Table.read(path, format=fmt)
    except Exception as exc:
        raise OSError(f"{path}: not a readable {fmt} table ({type(exc).__name__}: {exc})") from None
    table.convert_bytestring_to_unicode()  # FITS string columns (ids) read back as bytes
    for name in table.colnames:
        unit = table[name].unit
        if unit is not None and str(unit) == "dex":
            table[name].unit = u.dex
    return table


def _version():
    from . import __version__
    return __version__
