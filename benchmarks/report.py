"""Markdown tables from pytest-benchmark JSON files of the starlabel benchmarks.

    pytest benchmarks --size survey --benchmark-json out.json
    python benchmarks/report.py out.json [peers.json torch.json memory.json ...]

One section per area: Cannon (test_cannon.py), Payne (test_payne.py), fit_spectra
(test_fit_spectra.py), peers (test_peers.py: annieslasso, TheCannon), PyTorch (test_torch.py)
and memory (test_memory.py); areas absent from the files are left out. Several files (for
example the peers and torch runs, which need other interpreters) are merged; the header
describes the machine from the first file that has it and lists each file's size and load.

Times are medians scaled to the full problem (training: all pixels; test step: per spectrum);
"~" marks a time measured on a subset (pixels or spectra) and scaled.
"""

import argparse
import json
import time

AREAS = {
    "train": "Training (time for all pixels)",
    "l1": "L1-regularized training, strength 1e3 (time for all pixels)",
    "fit": "Test step, fit_labels with 9 starts (time per spectrum)",
}


def seconds(value):
    if value is None:
        return "n/a"
    for unit, factor in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= 0.9995 * factor or unit == "µs":  # 0.99996 s is "1 s", not "1e+03 ms"
            return f"{value / factor:.3g} {unit}"


def number(value):
    return "n/a" if value is None else f"{value:.3g}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load(path):
    """(machine_info, Cannon entries, every benchmark) of one JSON file."""
    with open(path) as f:
        data = json.load(f)
    entries, everything = [], []
    for bench in data["benchmarks"]:
        info = dict(bench.get("extra_info") or {})
        stats = bench.get("stats") or {}
        median = stats.get("median")
        info.update(median=median, rounds=stats.get("rounds"), name=bench.get("name", ""),
                    fullname=bench.get("fullname", ""))
        everything.append(info)
        if (info.get("area") not in (*AREAS, "matmul", "train_fixed_s2", "calibrate")
                or "scale" not in info):
            continue  # not a Cannon benchmark of test_cannon.py
        info["time"] = None if median is None else median * info["scale"]
        entries.append(info)
    return data.get("machine_info", {}), entries, everything


def timing(entry):
    text = seconds(entry["time"])
    if entry["area"] == "fit":
        return f"{text} ({entry['measured_on']})"
    return text if entry["scale"] == 1.0 else f"~{text} (from {entry['measured_on']})"


def counts(mapping):
    return ", ".join(f"{k} {v}" for k, v in mapping.items())


def fast_extras(entry):
    m = entry["metrics"]
    if entry["area"] == "train":
        return [f"pixels {counts(m['pixel_status'])}", f"{m['n_terms']} terms, {m['n_monomials']} monomials"]
    if entry["area"] == "l1":
        return [f"pixels {counts(m['pixel_status'])}", f"zero theta {m['zero_fraction']:.1%}"]
    extras = [f"converged {m['converged_fraction']:.1%}", f"median iterations {m['median_n_iter']:g}",
              f"median reduced chi2 {m['median_reduced_chi2']:.3g}",
              f"status {counts(m['fit_status'])}"]
    if "first_call_seconds" in m:  # files written before it was recorded lack it
        extras.append(f"first call (1 spectrum, untimed above) {seconds(m['first_call_seconds'])}")
    return extras


def reference_extras(entry):
    m = entry["metrics"]
    if entry["area"] == "train":
        return [f"max abs dtheta {m['max_abs_dtheta']:.1e}", f"max abs ds2 {m['max_abs_ds2']:.1e}"]
    if entry["area"] == "l1":
        return [f"objective (fast - ref)/abs(ref) <= {m['max_objective_excess']:.1e}",
                f"max abs dtheta {m['max_abs_dtheta']:.1e}"]
    return [f"max abs dlabel {m['max_deviation_sigma']:.1e} sigma"]


def speed_tables(entries):
    out = []
    for area, title in AREAS.items():
        rows = []
        problems = dict.fromkeys(e["problem"] for e in entries if e["area"] == area)
        for problem in problems:
            ref = next((e for e in entries if e["area"] == area and e["problem"] == problem
                        and e["backend"] == "reference"), None)
            fasts = [e for e in entries if e["area"] == area and e["problem"] == problem
                     and e["backend"] == "fast"]
            for fast in sorted(fasts, key=lambda e: -e["n_threads"]) or [None]:
                ratio = None if None in (fast, ref) or None in (fast["time"], ref["time"]) \
                    else ref["time"] / fast["time"]
                extras = (fast_extras(fast) if fast else []) + (reference_extras(ref) if ref else [])
                extras.append("load " + "/".join(f"{e['load_1min']:.1f}" for e in (fast, ref) if e))
                rows.append([problem, timing(fast) if fast else "n/a",
                             timing(ref) if ref else "n/a",
                             "n/a" if ratio is None else f"{ratio:.3g}x",
                             fast["n_threads"] if fast else "", "; ".join(extras)])
        if rows:
            out.append(f"### {title}\n\n" + table(
                ["problem", "starlabel fast", "reference (NumPy)", "reference / fast", "threads",
                 "extra metrics"], rows))
    return out


def accuracy_tables(entries):
    out = []
    for fast in (e for e in entries if e["area"] == "fit" and e["backend"] == "fast"
                 and e["n_threads"] == 2):
        ref = next((e for e in entries if e["area"] == "fit" and e["backend"] == "reference"
                    and e["problem"] == fast["problem"]), None)
        calibrated = next((e["metrics"] for e in entries if e["area"] == "calibrate"
                           and e["problem"] == fast["problem"]), None)
        m = fast["metrics"]
        header = ["label", f"RMS fast ({m['n_spectra']})", f"pull std fast ({m['n_spectra']})"]
        if calibrated:
            header += [f"calibrated on {calibrated['n_calibration']} stars: median floor",
                       "pull std"]
        if ref:
            n = ref["metrics"]["n_spectra"]
            header += [f"RMS fast ({n})", f"RMS reference ({n})", f"pull std reference ({n})"]
        rows = []
        for name in m["rms"]:
            row = [name, number(m["rms"][name]), number(m["pull_std"][name])]
            if calibrated:
                row += [number(calibrated["median_floor"][name]),
                        number(calibrated["pull_std"][name])]
            if ref:
                r = ref["metrics"]
                row += [number(r["fast_on_subset"]["rms"][name]),
                        number(r["reference_on_subset"]["rms"][name]),
                        number(r["reference_on_subset"]["pull_std"][name])]
            rows.append(row)
        out.append(f"### Label accuracy vs truth: {fast['problem']}\n\n" + table(header, rows))
    return out


def limit_table(entries):
    def fast_entry(area, mm):
        return next((e for e in entries if e["area"] == area and e["backend"] == "fast"
                     and e["problem"] == mm["problem"] and e["n_threads"] == mm["n_threads"]), None)

    def rate(gflop, entry, limit):
        if not entry or entry["time"] is None or not gflop:
            return "n/a"
        achieved = gflop / entry["time"]
        return f"{number(achieved)} ({achieved / limit:.0%})" if limit else number(achieved)

    rows = []
    for mm in (e for e in entries if e["area"] == "matmul"):
        m = mm["metrics"]
        train, fixed = fast_entry("train", mm), fast_entry("train_fixed_s2", mm)
        recorded = train or fixed  # either records the moment GEMM's flops
        gemm = recorded and recorded["metrics"]["one_gemm_gflop"]
        rows.append([mm["problem"], m["shape"], mm["n_threads"],
                     f"{number(m['gflops'])} (load {mm['load_1min']:.1f})", number(gemm),
                     seconds(None if not gemm or not m["gflops"] else gemm / m["gflops"]),
                     timing(fixed) if fixed else "n/a",
                     rate(gemm, fixed, m["gflops"]),
                     rate(fixed and fixed["metrics"]["pass_gflop"], fixed, m["gflops"]),
                     timing(train) if train else "n/a", rate(gemm, train, m["gflops"])])
    if not rows:
        return []
    return ["### Machine limit: NumPy float64 GEMM vs fast training\n\n"
            "One moment GEMM = 2 x pixels x stars x monomials flops, done once over all pixels. "
            "Training at fixed s2 (the trained s2) is one pass of the Gram / normal-equation "
            "work: that GEMM, the right-hand sides and the Cholesky solves. Its "
            "GEMM rate counts only the GEMM's flops in the pass's time, so it is a lower bound; "
            "the pass rate counts all of them. The maximum-likelihood training repeats the pass "
            "per s2 iteration for the pixels still searching, so its one-GEMM rate is a lower "
            "bound too. In brackets: the fraction of NumPy's rate.\n\n" + table(
                ["problem", "matmul shape", "threads", "NumPy GFLOP/s", "one moment GEMM (GFLOP)",
                 "its time at NumPy rate", "one pass at fixed s2", "GEMM GFLOP/s in it (>=)",
                 "pass GFLOP/s", "fast training", "one GEMM / training (>=)"], rows)]


# -- Payne, fit_spectra -------------------------------------------------------------------------

def ms(value):
    return "n/a" if value is None else seconds(value)


def payne_tables(everything):
    """Forward / train step / Jacobian: fast (1, 2 threads), reference, NumPy matmul yardstick."""
    rows = []
    matmul = {e["batch"]: e for e in everything
              if e.get("area") == "payne_forward" and e.get("backend") == "numpy_matmul"}
    refs = {(e["area"], e.get("batch", e.get("stars"))): e for e in everything
            if str(e.get("area", "")).startswith("payne_") and e.get("backend") == "reference"}
    for e in everything:
        area = e.get("area")
        if area not in ("payne_forward", "payne_train_step", "payne_jacobian") \
                or e.get("backend") != "fast":
            continue
        if area == "payne_jacobian":
            problem, key = f"forward + Jacobian, {e['stars']} stars (time per star)", e["stars"]
            scale = 1.0 / e["stars"]
        else:
            what = "forward" if area == "payne_forward" else "training step (RAdam, L1)"
            problem, key, scale = f"{what}, batch {e['batch']}", e["batch"], 1.0
        ref = refs.get((area, key)) or (refs.get((area, min(key, 16))) if area == "payne_jacobian"
                                        else None)
        fast_t = None if e["median"] is None else e["median"] * scale
        ref_t = None
        if ref and ref["median"] is not None:
            ref_t = ref["median"] / (ref.get("stars") or 1) if area == "payne_jacobian" \
                else ref["median"]
        limit = matmul.get(e.get("batch")) if area == "payne_forward" else None
        fraction = "n/a"
        if limit and limit.get("gflops") and e.get("gflops"):
            fraction = f"{e['gflops'] / limit['gflops']:.0%} of {number(limit['gflops'])}"
        rows.append([problem, e.get("n_threads"), ms(fast_t), ms(ref_t),
                     "n/a" if None in (fast_t, ref_t) else f"{ref_t / fast_t:.3g}x",
                     number(e.get("gflops")), fraction])
    if not rows:
        return []
    return ["### Payne network (float32 MLP)\n\nNumPy matmul = the three float32 matmuls of "
            "the forward pass alone (no bias, no activation, NumPy's BLAS threads): the machine "
            "limit for that batch.\n\n" + table(
                ["problem", "threads", "starlabel fast", "reference (NumPy)", "reference / fast",
                 "fast GFLOP/s", "fraction of NumPy matmul GFLOP/s"], rows)]


def fit_spectra_table(everything):
    found = [e for e in everything if e.get("area") == "fit_spectra"]
    if not found:  # JSON from before test_fit_spectra.py recorded extra_info
        found = [e for e in everything if "test_fit_spectra.py" in e["fullname"]]
    if not found:
        return []
    rows = []
    ref = next((e for e in found if e.get("backend") == "reference"
                or e["name"].startswith("test_fit_reference")), None)
    # The Payne's own procedure (curve_fit with finite differences), when it was run
    procedure = next((e for e in found if e.get("backend") == "payne_procedure"), None)

    def per_spectrum(e):
        if e is None or e["median"] is None or not e.get("n_spectra"):
            return None
        return e["median"] / e["n_spectra"]

    ref_t, proc_t = per_spectrum(ref), per_spectrum(procedure)
    for e in found:
        if e is ref or e is procedure:
            continue
        n = e.get("n_spectra")
        t = per_spectrum(e)
        rows.append([f"labels + RV + continuum, {n or '?'} spectra, "
                     f"{e.get('n_pixels', '?')} px", e.get("n_threads", e["name"]), ms(t),
                     f"{ms(ref_t)} ({ref.get('n_spectra', '?')} spectra)" if ref else "n/a",
                     "n/a" if None in (t, ref_t) else f"{ref_t / t:.3g}x",
                     f"{ms(proc_t)} ({procedure['n_spectra']} spectra)" if procedure else "n/a",
                     "n/a" if None in (t, proc_t) else f"{proc_t / t:.3g}x",
                     "n/a" if t is None else f"{1 / t:.3g}"])
    return ["### fit_spectra (time per spectrum)\n\n" + table(
        ["problem", "threads", "starlabel fast", "reference (NumPy)", "reference / fast",
         "Payne procedure (curve_fit)", "procedure / fast", "spectra / s"], rows)]


# -- peers -----------------------------------------------------------------------------------

PEER_LABELS = {"annieslasso": "annieslasso", "thecannon": "TheCannon"}


def peer_tables(everything, cannon_entries):
    peers = [e for e in everything if e.get("area") == "peers"]
    # the same L1 benchmark in several files: the later file wins
    l1 = list({(e["problem"], e["peer"]): e for e in everything
               if e.get("area") == "peers_l1"}.values())
    if not peers and not l1:
        return []
    names = [n for n in PEER_LABELS if any(e["peer"] == n for e in peers + l1)]
    out = []
    rows = []
    # one group per problem and number of pixels the peers trained on (runs may be merged)
    keys = list(dict.fromkeys((e["problem"], e["metrics"]["n_train_pixels"]) for e in peers))
    for problem, n_px in keys:
        group = {e["peer"]: e for e in peers
                 if (e["problem"], e["metrics"]["n_train_pixels"]) == (problem, n_px)}
        first = next(iter(group.values()))["metrics"]
        ref = {e["area"]: e for e in cannon_entries if e["problem"] == problem
               and e["backend"] == "reference"}

        def ours(key):
            value = first.get(key) or {}
            return value.get("2"), value.get("1")

        n_sp = first["n_spectra"]
        specs = [("training (all pixels)", "starlabel_train_s", "peer_train_s", "train",
                  f"peers on {n_px} px" + ("" if n_px == int(problem.split(" x ")[1].split()[0])
                                           else ", scaled")),
                 ("test step, own model (per spectrum)", "starlabel_fit_s", "peer_test_own_s",
                  "fit", f"{n_sp} spectra; peers from 1 start, starlabel best of 9"),
                 ("test step, starlabel's model (per spectrum)", "starlabel_fit_s",
                  "peer_test_same_s", "fit", f"{n_sp} spectra; same theta, s2, scaling")]
        for title, our_key, peer_key, ref_area, note in specs:
            two, one = ours(our_key)
            row = [f"{problem}: {title}", f"{ms(two)} ({ms(one)})",
                   ms(ref[ref_area]["time"]) if ref_area in ref else "n/a"]
            for n in names:
                row.append(ms(group[n]["metrics"].get(peer_key)) if n in group else "n/a")
            for n in names:
                value = group[n]["metrics"].get(peer_key) if n in group else None
                row.append("n/a" if value is None or not two else f"{value / two:.3g}x")
            loads = "/".join(f"{group[n]['load_1min']:.1f}" for n in names if n in group)
            blas = first.get("peer_blas_threads", "?")
            rows.append(row + [f"{note}; peer BLAS threads {blas}; load {loads}"])
    for e in l1:
        m = e["metrics"]
        row = [f"{e['problem']}: L1 training, strength {m['strength']:g} (all pixels)",
               f"~{ms(m.get('starlabel_total_s'))} (from {m.get('starlabel_total_from_pixels')} px;"
               f" {ms(m.get('starlabel_per_pixel_s'))} per pixel on 1 thread)", "n/a"]
        for n in names:
            row.append(f"~{ms(m.get('peer_total_s'))} ({ms(m.get('peer_per_pixel_s'))} per pixel)"
                       if n == e["peer"] else "n/a (no L1)" if n == "thecannon" else "n/a")
        for n in names:  # per pixel on the same pixels, 1 thread each
            ok = n == e["peer"] and m.get("peer_per_pixel_s") and m.get("starlabel_per_pixel_s")
            row.append(f"{m['peer_per_pixel_s'] / m['starlabel_per_pixel_s']:.3g}x (per pixel)"
                       if ok else "n/a")
        rows.append(row + [f"peer on {m['n_pixels']} px; ratio per pixel on those pixels, "
                           "1 thread each; zero coefficients: starlabel "
                           f"{m.get('starlabel_zero_fraction', 0):.0%}, peer "
                           f"{m.get('peer_zero_fraction', 0):.0%} exact / "
                           f"{m.get('peer_small_fraction', 0):.0%} below 1e-6; "
                           f"load {e['load_1min']:.1f}"])
    header = ["problem", "starlabel 2 threads (1 thread)", "NumPy reference"] + \
        [PEER_LABELS[n] for n in names] + [f"{PEER_LABELS[n]} / starlabel" for n in names] + \
        ["notes"]
    versions = ", ".join(sorted({f"{PEER_LABELS[e['peer']]} {e['metrics'].get('peer_version')}"
                                 for e in peers + l1}))
    out.append("### Peers: training and test step\n\n"
               f"{versions}; each in its own venv, run as shipped (one Python process, "
               "BLAS threads as recorded), timed by the runner itself in the same test as "
               "starlabel. Ratios: peer / starlabel on 2 threads.\n\n" + table(header, rows))

    for problem, n_px in keys:
        group = {e["peer"]: e for e in peers
                 if (e["problem"], e["metrics"]["n_train_pixels"]) == (problem, n_px)}
        first = next(iter(group.values()))["metrics"]
        if not any(e["metrics"].get("peer_test_own") for e in group.values()) and \
                any(k[0] == problem and k != (problem, n_px) for k in keys):
            continue  # no own-model results here, and another run of this problem has some
        label_names = list(first["starlabel"]["rms"])
        header = ["label", "RMS starlabel"] + \
            [f"RMS {PEER_LABELS[n]} (own model)" for n in group] + ["pull std starlabel"] + \
            [f"pull std {PEER_LABELS[n]} (own model)" for n in group] + \
            [f"pull std {PEER_LABELS[n]} (starlabel's model)" for n in group]
        rows = []
        for name in label_names:
            row = [name, number(first["starlabel"]["rms"][name])]
            for n, e in group.items():
                own = e["metrics"].get("peer_test_own")
                row.append(number(own["rms"][name]) if own else "n/a")
            row.append(number(first["starlabel"]["pull_std"][name]))
            for key in ("peer_test_own", "peer_test_same"):
                for n, e in group.items():
                    res = e["metrics"].get(key)
                    row.append(number(res["pull_std"][name]) if res else "n/a")
            rows.append(row)
        checks = []
        for n, e in group.items():
            m = e["metrics"]
            checks.append(
                f"{PEER_LABELS[n]}: model flux vs ours max "
                f"{m.get('predict_diff_noise_max', float('nan')):.1e} noise; "
                f"same start reaches our labels on {m.get('same_start_agree_fraction', 0):.1%} "
                f"of spectra; its answer has a lower chi2 than our default fit on "
                f"{m.get('peer_beats_default_fraction', 0):.1%}; failed fits "
                f"{m.get('peer_failed', 0)}; errors {m.get('errors') or 'none'}")
        out.append(f"### Peers: label accuracy vs truth, {problem} ({first['n_spectra']} "
                   f"spectra; peers trained on {n_px} px)\n\nErrors in physical units (both peers return them in their "
                   "scaled label units; the runners multiply by the scales).\n\n"
                   + table(header, rows) + "\n\n" + "\n".join(f"- {c}" for c in checks))
    return out


# -- PyTorch -----------------------------------------------------------------------------------

def torch_table(everything):
    found = [e for e in everything if e.get("area") in ("torch_forward", "torch_train_step")]
    if not found:
        return []
    matmul = {e["batch"]: e for e in everything
              if e.get("area") == "payne_forward" and e.get("backend") == "numpy_matmul"}
    rows = []
    for e in found:
        m = e["metrics"]
        what = "forward" if e["area"] == "torch_forward" else "training step (RAdam, L1)"
        # the limit measured in the same test; else test_payne's yardstick of the same batch
        limit = m.get("numpy_matmul_gflops")
        if limit is None and e["area"] == "torch_forward" and e["batch"] in matmul:
            limit = matmul[e["batch"]].get("gflops")
        fractions = "n/a"
        if limit and m.get("starlabel_gflops"):
            fractions = (f"{m['starlabel_gflops'] / limit:.0%} / "
                         f"{m['torch_gflops'] / limit:.0%} of {number(limit)}")
        rows.append([f"{what}, batch {e['batch']}", e["n_threads"], ms(m.get("starlabel_s")),
                     ms(m.get("torch_s")),
                     "n/a" if m.get("ratio_torch_to_starlabel") is None
                     else f"{m['ratio_torch_to_starlabel']:.3g}x",
                     f"{number(m.get('starlabel_gflops'))} / {number(m.get('torch_gflops'))}",
                     fractions, f"{e['load_1min']:.1f}"])
    version = found[0].get("torch_version")
    policy = found[0].get("omp_wait_policy")
    return [f"### PyTorch {version} on the CPU vs starlabel (same network and weights)\n\n"
            f"Same thread count on both sides; medians of calls timed one side after the other "
            f"in the same test (OMP_WAIT_POLICY={policy}). Fraction of the rate of NumPy's float32 "
            "matmuls of the same shapes on the same number of BLAS threads, timed in the same "
            "test (the forward pass's machine limit).\n\n" + table(
                ["problem", "threads", "starlabel", "PyTorch", "PyTorch / starlabel",
                 "GFLOP/s starlabel / PyTorch", "fraction of NumPy matmul", "load"], rows)]


# -- memory ------------------------------------------------------------------------------------

def memory_table(everything):
    found = [e for e in everything if e.get("area") == "memory"]
    if not found:
        return []
    rows = []
    for e in found:
        m = e["metrics"]
        input_mb = m.get("input_mb", m.get("chunk_input_mb"))
        notes = []
        if m.get("job") == "cannon_stream":
            notes.append(f"converged {m['converged_fraction']:.1%}")
            if m.get("peak_growth_from_small_n_mb") is not None:
                notes.append(f"peak growth from the smaller n: "
                             f"{m['peak_growth_from_small_n_mb']:+.1f} MB")
        if m.get("job") == "cannon_train":
            notes.append(f"pixels OK {m['pixels_ok']}/{m['n_pixels']}")
        if not m.get("peak_is_job_only", True):
            notes.append("peak of the whole process (counter reset refused)")
        rows.append([e["problem"], f"{input_mb:.0f}" + (" per chunk" if "chunk_input_mb" in m
                                                         else ""),
                     f"{m['rss_before_mb']:.0f}", f"{m['peak_mb']:.0f}",
                     f"{m['job_peak_over_before_mb']:.0f}", seconds(m.get("seconds")),
                     "; ".join(notes)])
    return ["### Peak memory (MB, resident; 2 threads)\n\n" + table(
        ["job", "input", "resident before the job", "peak during the job", "peak - before",
         "job time", "notes"], rows)]


def dask_table(everything):
    """fit_spectra in one process with 2 threads against a LocalCluster of 2 x 1 thread."""
    runs = {e.get("backend"): e for e in everything if e.get("area") == "dask"}
    local, dask = runs.get("local"), runs.get("dask")
    if not local or not dask or None in (local["median"], dask["median"]):
        return []
    n = local["n_spectra"]
    overhead = dask["median"] / local["median"] - 1
    row = [f"fit_spectra, {n} spectra, {local['n_pixels']} px", ms(local["median"] / n),
           ms(dask["median"] / n), f"{overhead:+.0%}",
           "met" if abs(overhead) <= 0.15 else "not met"]
    return ["### Dask overhead (time per spectrum)\n\n" + table(
        ["problem", "1 process x 2 threads", "LocalCluster 2 x 1 thread", "difference",
         "goal: within 15%"], [row])]


SECTIONS = ["cannon", "payne", "fit_spectra", "dask", "peers", "pytorch", "memory"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="outputs of pytest benchmarks --benchmark-json")
    parser.add_argument("--areas", default=",".join(SECTIONS),
                        help=f"comma-separated sections to print (default: all of {SECTIONS})")
    args = parser.parse_args(argv)
    wanted = set(args.areas.split(","))
    machine, entries, everything, files = {}, [], [], []
    for path in args.json:
        m, e, a = load(path)
        machine = machine or m
        entries += e
        everything += a
        load_end = m.get("load_average_1_5_15_min") or []
        files.append(f"{path}: size {m.get('benchmark_size', '?')}, {len(a)} benchmarks, load "
                     f"at the end {', '.join(f'{x:.1f}' for x in load_end) or '?'}")
    parts = (["## Cannon"] + speed_tables(entries) + accuracy_tables(entries) + limit_table(entries)
             if entries and "cannon" in wanted else [])
    for title, section in (("Payne", payne_tables(everything)),
                           ("fit_spectra", fit_spectra_table(everything)),
                           ("Dask", dask_table(everything)),
                           ("Peers", peer_tables(everything, entries)),
                           ("PyTorch", torch_table(everything)),
                           ("Memory", memory_table(everything))):
        if section and title.lower() in wanted:
            parts += [f"## {title}"] + section
    cpu = machine.get("cpu", {})
    head = [f"Size: {machine.get('benchmark_size', '?')}; CPU: {cpu.get('brand_raw', '?')}, "
            f"{cpu.get('count', '?')} logical cores; OPENBLAS_CORETYPE="
            f"{machine.get('OPENBLAS_CORETYPE')}; load average (1/5/15 min) at the end: "
            f"{', '.join(f'{x:.1f}' for x in machine.get('load_average_1_5_15_min', []))}"]
    if machine.get("starlabel_core"):
        core = machine["starlabel_core"]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(core["mtime"]))
        head.append(f"Compiled core: {core['file']} (installed {stamp})")
    if machine.get("starlabel_config"):
        head.append("```\n" + machine["starlabel_config"].rstrip() + "\n```")
    if len(files) > 1:
        head.append("Files:\n\n" + "\n".join(f"- {f}" for f in files))
    print("\n\n".join(head + parts))


if __name__ == "__main__":
    main()
