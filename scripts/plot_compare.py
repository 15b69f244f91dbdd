#!/usr/bin/env python3
"""plot_compare.py - busbw vs size for kolo (auto and each algorithm), Gloo and Open MPI.

    python3 scripts/plot_compare.py OUT.png [--title T] [--mpi-label L] LABEL=GLOB [LABEL=GLOB ...]

Same inputs and labels as compare_table.py (medians over reps, busbw recomputed from the median
time). kolo auto, gloo and mpi are drawn thick, each fixed kolo algorithm (`kolo_<algo>`) thin.
Needs matplotlib (scripts/compare.sh installs it into .venv).
"""
import argparse
import os
import sys

sys.dont_write_bytecode = True  # no scripts/__pycache__ in the work tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_table import busbw, human, load  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

STYLE = {
    "kolo": dict(color="black", lw=2.4, marker="o", ms=4, label="kolo (auto)", zorder=5),
    "gloo": dict(color="tab:red", lw=2.0, marker="s", ms=4, label="Gloo (torch, TCP)", zorder=4),
    "mpi": dict(color="tab:blue", lw=2.0, marker="^", ms=4, label="Open MPI (TCP)", zorder=4),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("png")
    p.add_argument("--title", default=None)
    p.add_argument("--mpi-label", default="Open MPI (TCP)", help="legend of the mpi line")
    p.add_argument("configs", nargs="+", help="LABEL=GLOB")
    a = p.parse_args()
    cols = load(a.configs)
    n = cols[0][1]
    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    algo_colors = iter(["tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink",
                        "tab:olive", "tab:cyan", "tab:gray"])
    sizes = set()
    # Thin algorithm lines first, so the thick ones are on top.
    for label, nn, med, k in sorted(cols, key=lambda c: c[0] in STYLE):
        xs = sorted(med)
        sizes.update(xs)
        ys = [busbw(s, med[s], nn) for s in xs]
        if label in STYLE:
            st = dict(STYLE[label])
            if label == "mpi":
                st["label"] = a.mpi_label
        else:
            name = label[len("kolo_"):] if label.startswith("kolo_") else label
            st = dict(color=next(algo_colors, None), lw=1.0, ls="--", marker=".", ms=3,
                      label=f"kolo {name}", zorder=3, alpha=0.9)
        st["label"] += f" ({k} rep{'s' if k != 1 else ''})"
        ax.plot(xs, ys, **st)
    ax.set_xscale("log", base=2)
    ticks = sorted(sizes)
    if len(ticks) > 14:
        step = (len(ticks) + 13) // 14
        ticks = ticks[::step]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([human(s) for s in ticks], rotation=45, ha="right")
    ax.set_xlabel("message size per rank (float32 sum)")
    ax.set_ylabel("busbw (GB/s)  = size/time * 2(N-1)/N")
    ax.set_ylim(bottom=0)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(a.title or f"allreduce busbw, N={n} ranks, loopback TCP (median over reps)")
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.png)
    print(a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
