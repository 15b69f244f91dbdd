#!/usr/bin/env bash
# Side-by-side allreduce comparison on this machine, in one run: kolo-bench (auto and each
# fixed algorithm), Gloo (torch.distributed 'gloo') and Open MPI over TCP, float32 sum on
# loopback, same sizes and iteration counts. Uses ../shared/baselines (sets it up with its own
# setup.sh when its venv or mpicc is missing).
#
#   scripts/compare.sh [REPEATS=1] [NPROCS="2 4"] [MINBYTES=8] [MAXBYTES=256M] [ALGOS="auto ring tree rhd rd"]
#
# COMPARE_WARMUP (default 20) untimed calls per size, the same for all three: with the
# benchmarks' own default of 5, the first size still carries the job's start-up (the
# other ranks finishing their setup, connections' first round trips) for every library.
#
# Each rep runs, per N, kolo-bench once per algorithm in ALGOS (label kolo for auto,
# kolo_<algo> for the others), then gloo, then MPI, back to back (interleaved, so machine drift
# hits all alike), each after the baselines' wait_quiet. Then per N it prints one Markdown table
# (medians over reps: kolo auto, the best fixed kolo algorithm per size, gloo, MPI, and the
# busbw ratios kolo/gloo and kolo/mpi) and writes out/compare_<stamp>/table_np<N>.md and
# out/compare_<stamp>/busbw_np<N>.png (matplotlib, installed into .venv here if missing).
# kolo moves bulk payloads between ranks of this host through shared memory by default
# (KOLO_SHM_BYTES; 0 = TCP only, the same wire as the default MPI run). COMPARE_MPI=shm runs
# Open MPI with its shared-memory transport (btl vader) instead of TCP, for the comparison
# with kolo's default.
# On another machine (say one without cargo or network): COMPARE_BIN=<dir with kolorun and
# kolo-bench> skips the build, COMPARE_BASELINES=<copy of the baselines dir> and
# COMPARE_PYTHON=<a python with torch 2.11.0> replace ../shared/baselines and its venv.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-1}
NPROCS=${2:-"2 4"}
MINB=${3:-8}
MAXB=${4:-256M}
ALGOS=${5:-"auto ring tree rhd rd"}
WARMUP=${COMPARE_WARMUP:-20}
case "${COMPARE_MPI:-tcp}" in
    tcp) MPI_WIRE=tcp; MPI_BTL=(--mca btl tcp,self --mca btl_tcp_if_include lo) ;;
    shm) MPI_WIRE="shared memory"; MPI_BTL=(--mca btl vader,self) ;;
    *) echo "compare.sh: COMPARE_MPI is tcp or shm, not ${COMPARE_MPI}" >&2; exit 2 ;;
esac
BASE=${COMPARE_BASELINES:-$(cd .. && pwd)/shared/baselines}
[ -d "$BASE" ] || { echo "compare.sh: $BASE not found" >&2; exit 1; }
BASE=$(cd "$BASE" && pwd)
PY=${COMPARE_PYTHON:-$BASE/.venv/bin/python}
if [ ! -x "$PY" ] || ! command -v mpicc >/dev/null; then
    (cd "$BASE" && ./setup.sh)
fi
mkdir -p "$BASE/bin"
mpicc -O2 -Wall -o "$BASE/bin/mpi_allreduce_bench" "$BASE/mpi_allreduce_bench.c"
if [ -n "${COMPARE_BIN:-}" ]; then
    BIN=$COMPARE_BIN
else
    cargo build --release --bins
    BIN=target/release
fi
# Fail early on a bad algorithm name, before any timed run.
for a in $ALGOS; do
    "$BIN/kolo-bench" -a "$a" -h >/dev/null 2>&1 \
        || { echo "compare.sh: unknown algorithm $a (auto ring tree rhd rd binomial)" >&2; exit 2; }
done
label() { if [ "$1" = auto ]; then echo kolo; else echo "kolo_$1"; fi; }
bytes() { python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$1"; }
lo=$(bytes "$MINB"); hi=$(bytes "$MAXB")
OUT=out/compare_$(date +%Y%m%d_%H%M%S)
mkdir -p "$OUT"
# shellcheck source=/dev/null
. "$BASE/lib.sh"
for r in $(seq 1 "$REPEATS"); do
    for n in $NPROCS; do
        for a in $ALGOS; do
            l=$(label "$a")
            wait_quiet "$OUT/quiet.log"
            echo "== N=$n rep $r: $l" >&2
            # Rank 0 prints JSON lines ("[0] {...}" under kolorun); keep them without the prefix.
            "$BIN/kolorun" -np "$n" "$BIN/kolo-bench" -b "$lo" -e "$hi" -f 2 -c 1 -w "$WARMUP" -a "$a" --json \
                | sed -n 's/^\[0\] //p' > "$OUT/${l}_np${n}_r${r}.jsonl"
        done
        wait_quiet "$OUT/quiet.log"
        echo "== N=$n rep $r: gloo" >&2
        (cd "$BASE" && "$PY" gloo_allreduce_bench.py -n "$n" -b "$lo" -e "$hi" -w "$WARMUP") > "$OUT/gloo_np${n}_r${r}.txt"
        wait_quiet "$OUT/quiet.log"
        echo "== N=$n rep $r: mpi $MPI_WIRE" >&2
        mpirun --allow-run-as-root --oversubscribe -np "$n" --mca pml ob1 "${MPI_BTL[@]}" \
            "$BASE/bin/mpi_allreduce_bench" -b "$lo" -e "$hi" -w "$WARMUP" > "$OUT/mpi_np${n}_r${r}.txt"
    done
done

# Plotting needs matplotlib: a venv in the repo root (gitignored), made on first use.
PLOT=1
PLOTPY=.venv/bin/python
if "$PY" -c "import matplotlib" 2>/dev/null; then
    PLOTPY=$PY
elif [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import matplotlib" 2>/dev/null; then
    echo "== setting up .venv with matplotlib for the plots" >&2
    { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q matplotlib >&2 \
        || { echo "compare.sh: could not install matplotlib into .venv; no plots" >&2; PLOT=0; }
fi
rc=0
for n in $NPROCS; do
    cfg=()
    for a in $ALGOS; do l=$(label "$a"); cfg+=("$l=$OUT/${l}_np${n}_r*.jsonl"); done
    cfg+=("gloo=$OUT/gloo_np${n}_r*.txt" "mpi=$OUT/mpi_np${n}_r*.txt")
    echo
    python3 scripts/compare_table.py \
        --title "N=$n, float32 sum, kolo KOLO_SHM_BYTES=${KOLO_SHM_BYTES:-default}, MPI over $MPI_WIRE, $MINB..$MAXB, median of $REPEATS rep(s)" "${cfg[@]}" \
        | tee "$OUT/table_np${n}.md"
    if [ "$PLOT" = 1 ]; then
        "$PLOTPY" scripts/plot_compare.py "$OUT/busbw_np${n}.png" --mpi-label "Open MPI ($MPI_WIRE)" \
            --title "allreduce busbw, N=$n, kolo KOLO_SHM_BYTES=${KOLO_SHM_BYTES:-default}, MPI over $MPI_WIRE (median over reps)" \
            "${cfg[@]}" >/dev/null || rc=1
        [ -f "$OUT/busbw_np${n}.png" ] && echo "plot: $OUT/busbw_np${n}.png"
    else
        rc=1
    fi
done
echo "raw results in $OUT" >&2
exit "$rc"
