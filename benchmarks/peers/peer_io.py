"""What the peer runners share: reading the problem, timing steps, writing the answer.

The runners execute with a peer's own interpreter (its venv), so this file imports NumPy only:
never starlabel, never pytest.

Input (``--input problem.npz``), written by ``benchmarks/test_peers.py``:
    label_names (L,)            train_labels (N, L), train_flux / train_ivar (N, P)
    train_pixels (k,)           the pixels to train on (all of them for the test step on the
                                peer's own model; a spread subset when only timing)
    test_flux / test_ivar (S, P)
    model_exponents (T, L), model_theta (P, T), model_s2 (P,), model_offsets / model_scales (L,):
                                starlabel's trained model, for the test step on the same model
    l1_pixels (m,), l1_strength (): L1 training of these pixels (empty: skip)
Output (``--output answer.json``): ``{"peer", "version", "steps": {name: {...}}}``; each step
holds ``seconds`` (the runner's own timing, data loading excluded) and its scalar results, or
``error`` (a traceback) when the peer raised: one crashing step does not hide the others.
Array results (labels, errors, theta, ...) go to ``answer.json.npz`` as ``"step/name"``.
"""

import argparse
import json
import sys
import time
import traceback

import numpy as np


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", default="train,test_own,test_same,l1",
                        help="comma-separated steps to run")
    return parser.parse_args()


def load(path):
    with np.load(path, allow_pickle=False) as data:
        problem = {key: data[key] for key in data.files}
    problem["label_names"] = [str(name) for name in problem["label_names"]]
    return problem


class Answer:
    """Collects step results; ``step(name)`` times a block and records a crash instead of dying."""

    def __init__(self, peer, version):
        self.data = {"peer": peer, "version": version, "python": sys.version.split()[0],
                     "numpy": np.__version__, "steps": {}}
        self.arrays = {}

    def run(self, name, fn):
        start = time.perf_counter()
        try:
            result = fn()
        except Exception:  # a peer failing is a result to report, not a reason to lose the rest
            self.data["steps"][name] = {"error": traceback.format_exc(limit=8),
                                        "seconds": time.perf_counter() - start}
            return None
        seconds = time.perf_counter() - start
        result = dict(result or {})
        result.setdefault("seconds", seconds)
        scalars = {}
        for key, value in result.items():
            if isinstance(value, np.ndarray):
                self.arrays[f"{name}/{key}"] = value
            else:
                scalars[key] = value.item() if isinstance(value, np.generic) else value
        self.data["steps"][name] = scalars
        return result

    def write(self, path):
        np.savez(path + ".npz", **self.arrays)
        with open(path, "w") as f:
            json.dump(self.data, f)


def exponent_rows(terms, n_labels):
    """Exponent vectors of a peer's terms, each given as [(label index, power), ...]."""
    rows = np.zeros((len(terms), n_labels), dtype=int)
    for t, term in enumerate(terms):
        for index, power in term:
            rows[t, index] += power
    return rows


def permutation(ours, theirs):
    """index such that theirs[i] == ours[index[i]] (both (T, L) exponent arrays)."""
    lookup = {tuple(row): i for i, row in enumerate(np.asarray(ours))}
    index = np.array([lookup[tuple(row)] for row in np.asarray(theirs)])
    if len(set(index.tolist())) != len(index) or len(index) != len(lookup):
        raise ValueError("the peer's quadratic terms are not starlabel's")
    return index


def predict(exponents, theta, offsets, scales, labels):
    """Model flux at labels for a polynomial model (terms as exponent rows): (N, P)."""
    x = (np.asarray(labels) - offsets) / scales
    design = np.prod(x[:, None, :] ** np.asarray(exponents)[None, :, :], axis=2)
    return design @ np.asarray(theta).T
