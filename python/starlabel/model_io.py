"""Versioned, pickle-free model files (``.npz``) shared by every model type.

Each file records what it holds (``format``: "starlabel.<kind>"), the file-format version
and the package version that wrote it. Writing is atomic: a temporary file in the same
folder, then a rename, so a crash never leaves half a model.
"""

import os
import secrets
import zipfile

import numpy as np

FORMAT_VERSION = 1


def write_model_file(path, kind, arrays):
    """Write ``arrays`` (name -> array) as a model file of ``kind`` at ``path``."""
    from . import __version__

    path = os.fspath(path)
    header = {"format": np.array(f"starlabel.{kind}"),
              "format_version": np.int64(FORMAT_VERSION),
              "package_version": np.array(__version__)}
    atomic_savez(path, {**header, **arrays})


def atomic_savez(path, arrays):
    """``np.savez(path, **arrays)`` through a temporary file in the same folder and a rename,
    so ``path`` is always either the old file or the complete new one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    # Not tempfile.mkstemp: its files are private (0600) and the model file would stay so;
    # mode 0o666 lets the umask decide, as for any other file the user writes.
    tmp = os.path.join(folder, f".starlabel-{secrets.token_hex(8)}.npz.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_model_file(path, kind, required):
    """Read a model file of ``kind``; returns a dict of arrays.

    Raises FileNotFoundError if missing and ValueError if the file is not a readable
    starlabel model of this kind, comes from a newer file-format version, or lacks a field.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model file at {path}")
    try:
        # Open the file ourselves: np.load leaves its handle open when the zip is corrupt.
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise ValueError(f"{path}: not a readable starlabel model file ({exc})") from None
    fmt = str(arrays.get("format", ""))
    if fmt != f"starlabel.{kind}":
        raise ValueError(f"{path}: expected a starlabel.{kind} file, found format {fmt!r}")
    version = int(arrays.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: written by a newer starlabel (file format {version}, this "
                         f"version reads up to {FORMAT_VERSION}); upgrade starlabel")
    if version < 1:
        raise ValueError(f"{path}: unknown file format version {version}")
    missing = [name for name in required if name not in arrays]
    if missing:
        raise ValueError(f"{path}: model file lacks {missing}")
    return arrays
