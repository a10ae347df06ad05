"""Peak resident memory of one starlabel job, run in a fresh process by test_memory.py.

    python benchmarks/memory_probe.py cannon_train --labels 17 --stars 1600 --pixels 8575
    python benchmarks/memory_probe.py payne_train --stars 2048 --pixels 7214 --epochs 2
    python benchmarks/memory_probe.py cannon_stream --n 100000 --chunk 2000 --pixels 8575

Prints one JSON line. Memory is read from /proc/self/status: the job's inputs are built first,
then the peak is reset (``5`` to /proc/self/clear_refs, Linux >= 4.0) so that VmHWM afterwards
is the peak of the job alone, not of building its data. Where the reset is refused, the
probe falls back to ``resource.getrusage`` (peak of the whole process) and says so.
"""

import argparse
import json
import resource
import time

import numpy as np

import starlabel
from starlabel import CannonModel, FitStatus, PayneModel, PixelStatus, datasets

MB = 1024.0 ** 2


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak():
    """Reset VmHWM to the current RSS; False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_mb(reset):
    if reset:
        return status_kb("VmHWM") / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def measure(job, setup):
    """Run setup (untracked), reset the peak, run job(inputs); memory and time of the job."""
    inputs = setup()
    rss_before = status_kb("VmRSS") / 1024.0
    reset = reset_peak()
    start = time.perf_counter()
    result = job(inputs)
    seconds = time.perf_counter() - start
    peak = peak_mb(reset)
    return dict(result, rss_before_mb=rss_before, peak_mb=peak, job_peak_over_before_mb=peak - rss_before,
                peak_is_job_only=reset, seconds=seconds)


def cannon_train(args):
    names = datasets.SUPPORTED_LABELS[:args.labels]

    def setup():
        return datasets.synthetic_survey(args.stars, label_names=names, n_pixels=args.pixels, seed=1)

    def job(train):
        model = CannonModel(names, order=2).train(train.labels, train.flux, train.ivar,
                                                  n_threads=args.threads)
        return dict(input_mb=(train.flux.nbytes + train.ivar.nbytes) / MB,
                    pixels_ok=int(np.sum(model.pixel_status == PixelStatus.OK)),
                    n_pixels=int(model.theta.shape[0]))

    return measure(job, setup)


def payne_train(args):
    names = datasets.SUPPORTED_LABELS

    def setup():
        return datasets.synthetic_survey(args.stars, label_names=names, n_pixels=args.pixels, seed=1)

    def job(train):
        model = PayneModel(names, hidden=tuple(args.hidden))
        model.train(train.labels, train.flux, epochs=args.epochs, batch_size=512,
                    n_threads=args.threads)
        losses = np.asarray(model.history["train_loss"], dtype=float)
        return dict(input_mb=train.flux.nbytes / MB, n_stars=args.stars, epochs=args.epochs,
                    losses=losses.tolist(),
                    all_finite=bool(losses.size == args.epochs and np.all(np.isfinite(losses))))

    return measure(job, setup)


def cannon_stream(args):
    """Train a 3-label model, then fit n spectra generated and fitted chunk by chunk."""
    names = datasets.SUPPORTED_LABELS[:3]

    def setup():
        train = datasets.synthetic_survey(args.train_stars, label_names=names,
                                          n_pixels=args.pixels, seed=1)
        return CannonModel(names, order=2).train(train.labels, train.flux, train.ivar)

    def job(model):
        n_done, converged, finite = 0, 0, True
        sq = []
        for k, start in enumerate(range(0, args.n, args.chunk)):
            size = min(args.chunk, args.n - start)
            chunk = datasets.synthetic_survey(size, label_names=names, n_pixels=args.pixels,
                                              seed=1000 + k)
            fit = model.fit_labels(chunk.flux, chunk.ivar, n_threads=args.threads)
            finite &= bool(np.all(np.isfinite(fit.labels)) and np.all(np.isfinite(fit.errors)))
            converged += int(np.sum(fit.status == FitStatus.CONVERGED))
            sq.append(np.mean((fit.labels - chunk.labels) ** 2, axis=0))
            n_done += size
            del chunk, fit   # only one chunk alive at a time, as a streaming job would
        sq = np.array(sq)
        return dict(n=n_done, chunk=args.chunk, all_finite=finite,
                    converged_fraction=converged / n_done,
                    rms_first_chunk=np.sqrt(sq[0]).tolist(), rms_last_chunk=np.sqrt(sq[-1]).tolist(),
                    rms_all=np.sqrt(sq.mean(axis=0)).tolist(),
                    chunk_input_mb=2 * min(args.chunk, args.n) * args.pixels * 8 / MB)

    return measure(job, setup)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="job", required=True)
    p = sub.add_parser("cannon_train")
    p.add_argument("--labels", type=int, default=17)
    p.add_argument("--stars", type=int, default=1600)
    p.add_argument("--pixels", type=int, default=8575)
    p = sub.add_parser("payne_train")
    p.add_argument("--stars", type=int, default=2048)
    p.add_argument("--pixels", type=int, default=7214)
    p.add_argument("--hidden", type=int, nargs=2, default=(300, 300))
    p.add_argument("--epochs", type=int, default=2)
    p = sub.add_parser("cannon_stream")
    p.add_argument("--n", type=int, default=100000)
    p.add_argument("--chunk", type=int, default=2000)
    p.add_argument("--pixels", type=int, default=8575)
    p.add_argument("--train-stars", type=int, default=1600)
    for p in sub.choices.values():
        p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = {"cannon_train": cannon_train, "payne_train": payne_train,
              "cannon_stream": cannon_stream}[args.job](args)
    result.update(job=args.job, starlabel=starlabel.__version__, args=vars(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
