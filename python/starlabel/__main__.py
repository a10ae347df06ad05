"""Command line: ``starlabel demo`` and ``starlabel info`` (also ``python -m starlabel``)."""

import argparse
import copy
import sys
import time

import numpy as np


def demo(n_train=1000, n_test=500, n_pixels=7514, seed=0):
    """Train a Cannon on the built-in synthetic survey and fit held-out spectra."""
    from . import CannonModel, show_config
    from .datasets import synthetic_survey

    show_config()
    print(f"\nSynthetic survey: {n_train} training + {n_test} test stars, {n_pixels} pixels, S/N 100")
    train = synthetic_survey(n_train, n_pixels=n_pixels, seed=seed)
    test = synthetic_survey(n_test, n_pixels=n_pixels, seed=seed + 1)

    n_ref_pixels = min(n_pixels, 500)  # the reference is slow: time it on subsets
    n_ref = min(n_test, 50)
    timings = {}
    for backend, n_pix in (("fast", n_pixels), ("reference", n_ref_pixels)):
        model = CannonModel(train.label_names, backend=backend)
        t0 = time.perf_counter()
        model.train(train.labels, train.flux[:, :n_pix], train.ivar[:, :n_pix])
        timings[backend, "train"] = (time.perf_counter() - t0) / n_pix
        if backend == "fast":
            trained = model

    results = {}
    for backend, n_fit in (("fast", n_test), ("reference", n_ref)):
        model = copy.copy(trained)  # the same trained model through either backend
        model.backend = backend
        t0 = time.perf_counter()
        results[backend] = model.fit_labels(test.flux[:n_fit], test.ivar[:n_fit])
        timings[backend, "fit"] = (time.perf_counter() - t0) / n_fit

    result = results["fast"]
    delta = result.labels - test.labels
    pull = delta / result.errors
    print(f"\nLabel accuracy on {n_test} held-out spectra (fast backend):")
    print(f"  {'label':8s} {'bias':>10s} {'scatter':>10s} {'median error':>13s} {'pull std':>9s}")
    for a, name in enumerate(result.label_names):
        print(f"  {name:8s} {delta[:, a].mean():10.4g} {delta[:, a].std():10.4g} "
              f"{np.median(result.errors[:, a]):13.4g} {pull[:, a].std():9.3f}")
    print(f"  converged: {int(result.converged.sum())}/{n_test}")
    same = np.max(np.abs(results["reference"].labels - result.labels[:n_ref]) / result.errors[:n_ref])
    print(f"  fast vs reference labels: max difference {same:.2g} sigma on {n_ref} spectra")

    print("\nThroughput (fast vs reference; reference on a subset, per item):")
    for step, unit in (("train", "pixel"), ("fit", "spectrum")):
        f, r = timings["fast", step], timings["reference", step]
        print(f"  {step:5s}: fast {f * 1e3:9.3f} ms/{unit}   reference {r * 1e3:9.3f} ms/{unit}"
              f"   speed-up {r / f:7.1f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="starlabel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("demo", help="train a Cannon on built-in data and fit held-out spectra")
    run.add_argument("--n-train", type=int, default=1000)
    run.add_argument("--n-test", type=int, default=500)
    run.add_argument("--n-pixels", type=int, default=7514)
    commands.add_parser("info", help="print the build configuration")
    args = parser.parse_args(argv)
    if args.command == "demo":
        demo(args.n_train, args.n_test, args.n_pixels)
    else:
        from . import show_config
        show_config()
    return 0


if __name__ == "__main__":
    sys.exit(main())
