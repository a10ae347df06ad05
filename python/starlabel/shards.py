"""Splitting a fit into shards that run independently (one per job of a batch system) and
merging their result tables.

Shard ``i`` of ``N`` fits the contiguous slice ``shard_range(n_spectra, i, N)`` of the spectra
and writes its own table at ``shard_path(out, i, N)``. Each shard table records in its metadata
which slice it holds and a fingerprint of the run (model, inputs, fit options), so that

- a rerun skips every shard whose file already exists and belongs to the same run (files are
  written atomically, so an existing file is always complete);
- ``merge_shards`` can check that the pieces are all there, each exactly once, from one run,
  and put them back in order.

Everything here is plain functions on paths and astropy Tables.
"""

import hashlib
import json
import os
import re

import numpy as np

__all__ = ["parse_shard", "shard_range", "shard_path", "shard_meta", "run_fingerprint",
           "shard_is_done", "check_shards", "merge_shards", "ShardError"]

# FITS header keywords are at most 8 characters.
KEY_INDEX, KEY_COUNT = "SL_SHARD", "SL_NSHRD"
KEY_START, KEY_STOP, KEY_TOTAL, KEY_RUN = "SL_START", "SL_STOP", "SL_NTOT", "SL_RUN"
_SHARD_KEYS = (KEY_INDEX, KEY_COUNT, KEY_START, KEY_STOP)

# Extensions that io.write_results understands; the longest match wins (".fits.gz").
_EXTENSIONS = (".fits.gz", ".fits", ".fit", ".ecsv", ".csv")


class ShardError(ValueError):
    """Shard files that do not fit together (missing, duplicated, from another run)."""


def parse_shard(text):
    """``"i/N"`` -> (i, N) with 0 <= i < N; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ValueError(f"shard must look like i/N (e.g. 0/4), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {text!r}: need N >= 1 and 0 <= i < N (shards count from 0)")
    return index, count


def shard_range(n_items, index, count, unit=1):
    """(start, stop) of shard ``index`` of ``count`` over ``n_items`` items.

    Shards are contiguous, start on multiples of ``unit`` (the fit's LM batch, so that every
    spectrum is fitted exactly as in one unsharded run), cover every item exactly once and
    differ in size by at most one unit; when there are fewer units than shards some shards
    are empty.
    """
    if n_items < 0 or count < 1 or not 0 <= index < count or unit < 1:
        raise ValueError(f"bad shard {index}/{count} of {n_items} items")
    n_units = -(-n_items // unit)
    return (min(index * n_units // count * unit, n_items),
            min((index + 1) * n_units // count * unit, n_items))


def split_extension(path):
    """(stem, extension) of a results file name; ValueError for a format we cannot write."""
    path = os.fspath(path)
    lower = path.lower()
    for ext in _EXTENSIONS:
        if lower.endswith(ext):
            return path[:-len(ext)], path[-len(ext):]
    raise ValueError(f"{path}: output must end in one of {', '.join(_EXTENSIONS)}")


def shard_path(out, index, count):
    """The file of shard ``index``/``count`` of output ``out``: ``labels.fits`` ->
    ``labels.shard03-of-16.fits`` (zero-padded so that the names sort in shard order)."""
    stem, ext = split_extension(out)
    width = len(str(count - 1))
    return f"{stem}.shard{index:0{width}d}-of-{count}{ext}"


def shard_meta(index, count, start, stop, n_total, fingerprint):
    """Metadata written into a shard's table (FITS-safe keys)."""
    return {KEY_INDEX: int(index), KEY_COUNT: int(count), KEY_START: int(start),
            KEY_STOP: int(stop), KEY_TOTAL: int(n_total), KEY_RUN: str(fingerprint)}


def run_fingerprint(model_path, spectra_paths, options):
    """A short hash of what determines a run's results: the model file's bytes, the spectra
    files (names and sizes, not their folders, so that a cluster may mount them elsewhere)
    and the fit options (a JSON-serialisable dict)."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    inputs = [(os.path.basename(os.fspath(p)), os.path.getsize(p)) for p in spectra_paths]
    digest.update(json.dumps([inputs, options], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _read(path):
    from .io import read_results

    return read_results(path)


def _meta_int(table, key, path):
    try:
        return int(table.meta[key])
    except (KeyError, TypeError, ValueError):
        raise ShardError(f"{path}: not a starlabel shard file (no {key} in its metadata)") from None


def shard_is_done(path, index, count, start, stop, n_total, fingerprint):
    """True if ``path`` holds this shard of this run (so it can be skipped); False if there is
    no file. A file that exists but holds something else raises ShardError rather than being
    silently replaced or reused."""
    if not os.path.exists(path):
        return False
    table = _read(path)
    found = {key: _meta_int(table, key, path) for key in _SHARD_KEYS + (KEY_TOTAL,)}
    wanted = {KEY_INDEX: index, KEY_COUNT: count, KEY_START: start, KEY_STOP: stop,
              KEY_TOTAL: n_total}
    if found != wanted or str(table.meta.get(KEY_RUN)) != str(fingerprint):
        raise ShardError(f"{path} exists but comes from a different run (shard "
                         f"{found[KEY_INDEX]}/{found[KEY_COUNT]}, rows {found[KEY_START]}:"
                         f"{found[KEY_STOP]} of {found[KEY_TOTAL]}, run "
                         f"{table.meta.get(KEY_RUN)}); "
                         "remove it or pass --overwrite")
    if len(table) != stop - start:
        raise ShardError(f"{path}: holds {len(table)} rows, its metadata says {stop - start}")
    return True


def check_shards(tables, paths):
    """Check shard tables fit together; returns them ordered by shard index.

    Every table must come from one run and one shard count, each index 0..N-1 must appear
    exactly once, and the row ranges must tile 0..n_total in order. Raises ShardError
    naming the files otherwise.
    """
    if not tables:
        raise ShardError("no shard files to merge")
    by_index = {}
    counts, totals, runs = set(), set(), set()
    for table, path in zip(tables, paths):
        meta = {key: _meta_int(table, key, path) for key in _SHARD_KEYS + (KEY_TOTAL,)}
        index = meta[KEY_INDEX]
        if index in by_index:
            raise ShardError(f"shard {index} given twice: {by_index[index][2]} and {path}")
        if len(table) != meta[KEY_STOP] - meta[KEY_START]:
            raise ShardError(f"{path}: holds {len(table)} rows, its metadata says "
                             f"{meta[KEY_STOP] - meta[KEY_START]}")
        by_index[index] = (table, meta, path)
        counts.add(meta[KEY_COUNT])
        totals.add(meta[KEY_TOTAL])
        runs.add(str(table.meta.get(KEY_RUN)))
    if len(counts) > 1:
        raise ShardError(f"the files come from different shard counts {sorted(counts)}")
    if len(totals) > 1 or len(runs) > 1:
        raise ShardError("the files come from different runs (model, spectra or fit options "
                         "differ)")
    count = counts.pop()
    missing = sorted(set(range(count)) - set(by_index))
    if missing:
        raise ShardError(f"missing shard(s) {', '.join(map(str, missing))} of {count}")
    ordered = [by_index[i] for i in range(count)]
    position = 0
    for table, meta, path in ordered:
        if meta[KEY_START] != position:
            raise ShardError(f"{path}: starts at row {meta[KEY_START]}, expected {position}")
        position = meta[KEY_STOP]
    if position != totals.pop():
        raise ShardError(f"the shards end at row {position}, the run has more rows")
    return [table for table, _, _ in ordered]


def merge_shards(paths, out, *, overwrite=False):
    """Merge shard files into ``out`` (in shard order, whatever the order of ``paths``);
    returns the merged Table. Written atomically; the shard files are left in place."""
    from astropy.table import vstack

    from .io import write_results

    paths = [os.fspath(p) for p in paths]
    tables = check_shards([_read(p) for p in paths], paths)
    # The per-shard keys differ by design; the merged file gets the run's keys only.
    merged = vstack(tables, join_type="exact", metadata_conflicts="silent")
    for key in _SHARD_KEYS:
        merged.meta.pop(key, None)
    merged.meta[KEY_TOTAL] = int(np.sum([len(t) for t in tables]))
    merged.meta[KEY_RUN] = tables[0].meta[KEY_RUN]
    write_results(merged, out, overwrite=overwrite)
    return merged
