"""Markdown tables from a pytest-benchmark JSON of the starlabel benchmarks.

    pytest benchmarks --size survey --benchmark-json out.json
    python benchmarks/report.py out.json

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
        if value >= factor or unit == "µs":
            return f"{value / factor:.3g} {unit}"


def number(value):
    return "n/a" if value is None else f"{value:.3g}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load(path):
    with open(path) as f:
        data = json.load(f)
    entries = []
    for bench in data["benchmarks"]:
        info = dict(bench.get("extra_info") or {})
        if info.get("area") not in (*AREAS, "matmul") or "scale" not in info:
            continue  # not a Cannon benchmark of test_cannon.py
        stats = bench.get("stats") or {}
        median = stats.get("median")
        info["median"] = median
        info["time"] = None if median is None else median * info["scale"]
        info["rounds"] = stats.get("rounds")
        entries.append(info)
    return data.get("machine_info", {}), entries


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
    return [f"converged {m['converged_fraction']:.1%}", f"median iterations {m['median_n_iter']:g}",
            f"median reduced chi2 {m['median_reduced_chi2']:.3g}",
            f"status {counts(m['fit_status'])}"]


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
        m = fast["metrics"]
        header = ["label", f"RMS fast ({m['n_spectra']})", f"pull std fast ({m['n_spectra']})"]
        if ref:
            n = ref["metrics"]["n_spectra"]
            header += [f"RMS fast ({n})", f"RMS reference ({n})", f"pull std reference ({n})"]
        rows = []
        for name in m["rms"]:
            row = [name, number(m["rms"][name]), number(m["pull_std"][name])]
            if ref:
                r = ref["metrics"]
                row += [number(r["fast_on_subset"]["rms"][name]),
                        number(r["reference_on_subset"]["rms"][name]),
                        number(r["reference_on_subset"]["pull_std"][name])]
            rows.append(row)
        out.append(f"### Label accuracy vs truth: {fast['problem']}\n\n" + table(header, rows))
    return out


def limit_table(entries):
    rows = []
    for mm in (e for e in entries if e["area"] == "matmul"):
        m = mm["metrics"]
        train = next((e for e in entries if e["area"] == "train" and e["backend"] == "fast"
                      and e["problem"] == mm["problem"] and e["n_threads"] == mm["n_threads"]), None)
        gemm = train and train["metrics"]["one_gemm_gflop"]
        achieved = None if not train or train["time"] is None else gemm / train["time"]
        rate = f"{number(m['gflops'])} (load {mm['load_1min']:.1f})"
        rows.append([mm["problem"], m["shape"], mm["n_threads"], rate,
                     number(gemm), seconds(None if not gemm or not m["gflops"] else gemm / m["gflops"]),
                     timing(train) if train else "n/a", number(achieved),
                     "n/a" if None in (achieved, m["gflops"]) else f"{achieved / m['gflops']:.1%}"])
    if not rows:
        return []
    return ["### Machine limit: NumPy float64 GEMM vs fast training\n\n"
            "One moment GEMM = 2 x pixels x stars x monomials flops, done once over all pixels; "
            "training evaluates it at least once per s2 iteration, so the achieved rate is a "
            "lower bound.\n\n" + table(
                ["problem", "matmul shape", "threads", "NumPy GFLOP/s", "one moment GEMM (GFLOP)",
                 "its time at NumPy rate", "fast training", "lower bound GFLOP/s",
                 "fraction of NumPy"], rows)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="output of pytest benchmarks --benchmark-json")
    args = parser.parse_args(argv)
    machine, entries = load(args.json)
    parts = speed_tables(entries) + accuracy_tables(entries) + limit_table(entries)
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
    print("\n\n".join(head + parts))


if __name__ == "__main__":
    main()
