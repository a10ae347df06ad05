"""Drive TheCannon (Ho et al. 2017, ``import TheCannon``) on a problem from test_peers.py.

Run with the peer venv's interpreter; see peer_io.py for the input and output files.

    /tmp/peer-thecannon/bin/python benchmarks/peers/run_thecannon.py --input p.npz --output a.json

How TheCannon works, as far as the comparison needs it (read from its source, 0.7.3):
- training (``useErrors=False``): per pixel, a grid over ln(scatter) from ln(1e-4) to 0 in
  steps of 0.5, a weighted linear solve of theta at each, a parabola through the best three
  points of chi2 - sum ln(Cinv); pixels one after another in Python, no threads;
- labels are scaled as (labels - median) / ((97.5 - 2.5 percentile range) / 4);
  the quadratic terms are the upper triangle of x x^T, row by row (starlabel's order);
- test step: ``scipy.optimize.curve_fit`` (numerical derivatives) from one start, the scaled
  labels all 1 by default, with sigma = sqrt(1/ivar + scatter^2) and absolute_sigma=True; the
  errors it returns are sqrt(diag(cov)) **in scaled label units** while the labels are
  unscaled: physical errors are those x scales (we report those, and the raw ones).
"""

import os

os.environ.setdefault("MPLBACKEND", "Agg")   # TheCannon imports pyplot at import time

import contextlib
import io
import time
from importlib import metadata

import numpy as np

import peer_io

from TheCannon import dataset, model as tc_model

# quadratic terms in TheCannon's label vector: 1, x_i, then x_i x_j for i <= j row by row


def exponents(n_labels):
    rows = [np.zeros(n_labels, int)] + list(np.eye(n_labels, dtype=int))
    for i, j in zip(*np.triu_indices(n_labels)):
        row = np.zeros(n_labels, int)
        row[i] += 1
        row[j] += 1
        rows.append(row)
    return np.array(rows)


def new_dataset(problem, pixels):
    n_train, n_test = len(problem["train_labels"]), len(problem["test_flux"])
    with contextlib.redirect_stdout(io.StringIO()):   # it prints "Loading dataset ..."
        ds = dataset.Dataset(np.arange(len(pixels), dtype=float), np.arange(n_train),
                             problem["train_flux"][:, pixels].copy(),
                             problem["train_ivar"][:, pixels].copy(), problem["train_labels"],
                             np.arange(n_test), problem["test_flux"][:, pixels].copy(),
                             problem["test_ivar"][:, pixels].copy())
    ds.set_label_names(problem["label_names"])
    return ds


def timed(fn):
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        value = fn()
    return value, time.perf_counter() - start


def main():
    args = peer_io.arguments()
    steps = args.steps.split(",")
    problem = peer_io.load(args.input)
    answer = peer_io.Answer("TheCannon", metadata.version("TheCannon"))
    n_labels = len(problem["label_names"])
    n_pixels = problem["train_flux"].shape[1]
    index = peer_io.permutation(problem["model_exponents"], exponents(n_labels))
    state = {}

    def train():
        ds = new_dataset(problem, problem["train_pixels"])
        md = tc_model.CannonModel(2, useErrors=False)
        _, seconds = timed(lambda: md.train(ds))
        state["model"], state["dataset"] = md, ds
        theta = np.empty_like(md.coeffs)
        theta[:, index] = md.coeffs
        return dict(seconds=seconds, n_pixels=theta.shape[0], theta=theta, s2=md.scatters**2,
                    offsets=md.pivots, scales=md.scales)

    def test(md, ds, starting_guess=None):
        (errors, _), seconds = timed(lambda: md.infer_labels(ds, starting_guess))
        return dict(seconds=seconds, labels=np.array(ds.test_label_vals),
                    errors=errors * md.scales, errors_as_returned=errors)

    def test_own():
        md = state.get("model")
        if md is None or md.coeffs.shape[0] != n_pixels:
            raise RuntimeError("needs the training step on every pixel")
        return test(md, state["dataset"])

    def test_same():
        # starlabel's model inside TheCannon's: same theta, scatter = sqrt(s2), same scaling;
        # started at the scaled origin (starlabel's offsets), not TheCannon's default of 1s,
        # which on starlabel's scaling lies outside the training set
        ds = new_dataset(problem, np.arange(n_pixels))
        md = tc_model.CannonModel(2, useErrors=False)
        md.coeffs = np.ascontiguousarray(problem["model_theta"][:, index])
        md.scatters = np.sqrt(problem["model_s2"])
        md.pivots = problem["model_offsets"].copy()
        md.scales = problem["model_scales"].copy()
        return test(md, ds, np.zeros(n_labels))

    def l1():
        return dict(skipped="TheCannon has no L1 regularization")

    for name, fn in (("train", train), ("test_own", test_own), ("test_same", test_same),
                     ("l1", l1)):
        if name in steps:
            answer.run(name, fn)
    answer.write(args.output)


if __name__ == "__main__":
    main()
