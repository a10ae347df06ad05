"""Drive annieslasso (``import thecannon``, Casey et al. 2016) on a problem from test_peers.py.

Run with the peer venv's interpreter; see peer_io.py for the input and output files.

    /tmp/peer-annieslasso/bin/python benchmarks/peers/run_annieslasso.py --input p.npz --output a.json

How annieslasso works, as far as the comparison needs it (read from its source, 0.2.96):
- training: per pixel, theta by L-BFGS-B on chi2 at s2 = 0 (+ the L1 term), then s2 by a
  Nelder-Mead search that makes the median chi2 of that pixel 1; pixels one after another
  (its ``threads`` option maps one pixel at a time through a pool, so it cannot overlap pixels:
  we call it with the default, serial);
- labels are scaled as (labels - median) / (97.5 - 2.5 percentile range);
- test step: ``scipy.optimize.leastsq`` with analytic derivatives from one start (the median
  training labels), weights 1 / (1/ivar + s2); the returned covariance is leastsq's
  ``cov_x`` = (J^T W J)^-1 **in the scaled label space**: physical errors are
  sqrt(diag(cov)) x scales (we report those, and the raw ones).
"""

import numpy as np

import peer_io

import thecannon
from thecannon.vectorizer import PolynomialVectorizer


def new_model(problem, pixels, regularization=None):
    vectorizer = PolynomialVectorizer(problem["label_names"], 2)
    return thecannon.CannonModel(problem["train_labels"], problem["train_flux"][:, pixels],
                                 problem["train_ivar"][:, pixels], vectorizer,
                                 regularization=regularization)


def our_order(model, problem):
    """The peer's theta columns in starlabel's term order, and the column map."""
    n_labels = len(problem["label_names"])
    theirs = np.vstack([np.zeros((1, n_labels), int),   # the constant term is implicit
                        peer_io.exponent_rows(model.vectorizer.terms, n_labels)])
    return peer_io.permutation(problem["model_exponents"], theirs)


def trained(model, problem, seconds):
    index = our_order(model, problem)
    theta = np.empty_like(model.theta)
    theta[:, index] = model.theta
    return dict(seconds=seconds, n_pixels=model.theta.shape[0], theta=theta, s2=model.s2,
                offsets=model._fiducials, scales=model._scales)


def timed(fn):
    import time
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def test(model, problem):
    labels, cov, _ = model.test(problem["test_flux"], problem["test_ivar"])
    raw = np.sqrt(np.array([np.diag(c) for c in cov]))
    return dict(labels=labels, errors=raw * model._scales, errors_as_returned=raw)


def main():
    args = peer_io.arguments()
    steps = args.steps.split(",")
    problem = peer_io.load(args.input)
    answer = peer_io.Answer("annieslasso", thecannon.__version__)
    n_pixels = problem["train_flux"].shape[1]
    state = {}

    def train():
        model = new_model(problem, problem["train_pixels"])
        _, seconds = timed(model.train)      # the constructor's design matrix is not timed
        state["model"] = model
        return trained(model, problem, seconds)

    def test_own():
        model = state.get("model")
        if model is None or model.theta.shape[0] != n_pixels:
            raise RuntimeError("needs the training step on every pixel")
        result, seconds = timed(lambda: test(model, problem))
        return dict(result, seconds=seconds)

    def test_same():
        # starlabel's model (theta, s2, scaling) inside an annieslasso model: the same problem
        model = new_model(problem, np.arange(n_pixels))
        index = our_order(model, problem)
        model._theta = np.ascontiguousarray(problem["model_theta"][:, index])
        model._s2 = problem["model_s2"].copy()
        model._fiducials = problem["model_offsets"].copy()
        model._scales = problem["model_scales"].copy()
        result, seconds = timed(lambda: test(model, problem))
        return dict(result, seconds=seconds)

    def l1():
        pixels = problem["l1_pixels"]
        if len(pixels) == 0:
            return dict(skipped="no L1 pixels requested")
        model = new_model(problem, pixels, regularization=float(problem["l1_strength"]))
        _, seconds = timed(model.train)
        return trained(model, problem, seconds)

    for name, fn in (("train", train), ("test_own", test_own), ("test_same", test_same),
                     ("l1", l1)):
        if name in steps:
            answer.run(name, fn)
    answer.write(args.output)


if __name__ == "__main__":
    main()
