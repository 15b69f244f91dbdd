#!/usr/bin/env python3
"""compare_table.py - kolo (every algorithm) vs Gloo vs Open MPI, medians over reps (Markdown).

    python3 scripts/compare_table.py [--title T] LABEL=GLOB [LABEL=GLOB ...]

Each GLOB matches the raw run files of one configuration (one file per rep). A file is either
kolo-bench --json output (one JSON object per size; the summary line is skipped) or an
nccl-tests style table with 10 columns (kolo-bench without --json, gloo_allreduce_bench.py,
mpi_allreduce_bench). Labels: `kolo` is kolo-bench -a auto, `kolo_<algo>` one fixed algorithm,
`gloo` and `mpi` the baselines (any other label is ignored by the table but still plotted).

Per size, time(us) is the median over reps of each run's mean time; busbw is recomputed from
it (busbw = size/time * 2(N-1)/N, GB/s = 1e9 B/s), as /work/shared/baselines/compare_table.py
does. `best algo` is the fixed kolo algorithm with the lowest median time at that size.
`kolo/gloo` and `kolo/mpi` are busbw ratios of kolo auto to the baseline: > 1 means kolo is
faster.
"""
import argparse
import glob
import json
import re
import statistics
import sys


def parse(path):
    """(nranks, {bytes: {"time": us, "p50": us}}) of one run file (JSON lines or a table)."""
    n, rows = None, {}
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if line.startswith("{"):
                obj = json.loads(line)
                if obj.get("summary"):
                    n = n or obj.get("nranks")
                    continue
                n = obj["nranks"]
                rows[int(obj["bytes"])] = dict(time=float(obj["time_us"]), p50=float(obj["p50_us"]))
                continue
            m = re.search(r"nranks=(\d+)", line)
            if m:
                n = int(m.group(1))
            f = line.split()
            if len(f) == 10 and f[0].isdigit():
                rows[int(f[0])] = dict(time=float(f[4]), p50=float(f[7]))
    return n, rows


def load(configs):
    """[(label, nranks, {bytes: median time us}, nfiles)] for LABEL=GLOB arguments."""
    out = []
    for c in configs:
        label, pat = c.split("=", 1)
        files = sorted(glob.glob(pat))
        if not files:
            raise SystemExit(f"compare_table.py: no files match {pat}")
        runs = [parse(f) for f in files]
        ns = {r[0] for r in runs}
        if len(ns) != 1 or None in ns:
            raise SystemExit(f"compare_table.py: {pat}: nranks missing or differs: {ns}")
        sizes = set().union(*[set(r[1]) for r in runs])
        med = {s: statistics.median(r[1][s]["time"] for r in runs if s in r[1]) for s in sizes}
        if not med:
            raise SystemExit(f"compare_table.py: {pat}: no rows")
        out.append((label, ns.pop(), med, len(files)))
    return out


def busbw(size, t_us, n):
    return size / (t_us * 1e-6) / 1e9 * 2 * (n - 1) / n if t_us > 0 else 0.0


def human(b):
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= k and b % k == 0:
            return f"{b // k} {unit}"
    return f"{b} B"


def cell(size, t, n):
    if t is None:
        return "-"
    bw = busbw(size, t, n)
    return f"{t:,.0f} / {bw:.2f}" if t >= 100 else f"{t:.1f} / {bw:.3f}"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "-"


def table(cols):
    n = cols[0][1]
    by = {label: med for label, _, med, _ in cols}
    reps = {label: k for label, _, _, k in cols}
    algos = [label for label, _, _, _ in cols if label.startswith("kolo_")]
    sizes = sorted(set().union(*[set(med) for _, _, med, _ in cols]))
    lines = [
        "| size | kolo auto | best kolo algo: busbw | gloo | mpi | kolo/gloo busbw | kolo/mpi busbw |",
        "|---:|---:|:--|---:|---:|---:|---:|",
    ]
    for s in sizes:
        t_kolo = by.get("kolo", {}).get(s)
        t_gloo = by.get("gloo", {}).get(s)
        t_mpi = by.get("mpi", {}).get(s)
        cand = [(by[a][s], a[len("kolo_"):]) for a in algos if s in by[a]]
        if cand:
            t_best, name = min(cand)
            best = f"{name}: {busbw(s, t_best, n):.3f}"
        else:
            best = "-"
        bw = lambda t: busbw(s, t, n) if t is not None else None  # noqa: E731
        lines.append(
            f"| {human(s)} | {cell(s, t_kolo, n)} | {best} | {cell(s, t_gloo, n)} | "
            f"{cell(s, t_mpi, n)} | {ratio(bw(t_kolo), bw(t_gloo))} | {ratio(bw(t_kolo), bw(t_mpi))} |"
        )
    runs = ", ".join(f"{label} {k}" for label, k in reps.items())
    return n, lines, runs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--title", default=None)
    p.add_argument("configs", nargs="+", help="LABEL=GLOB")
    a = p.parse_args()
    cols = load(a.configs)
    ns = {c[1] for c in cols}
    if len(ns) != 1:
        raise SystemExit(f"compare_table.py: configurations have different nranks: {ns}")
    n, lines, runs = table(cols)
    title = a.title or f"N={n}, float32 sum, loopback TCP"
    print(f"### {title}")
    print()
    print(f"Cells: time(us) / busbw(GB/s), medians over reps (runs: {runs}). "
          "Ratios > 1: kolo auto is faster.")
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
