#!/usr/bin/env bash
# Side-by-side allreduce comparison on this machine, in one run: kolo-bench,
# Gloo (torch.distributed 'gloo') and Open MPI over TCP, float32 sum on
# loopback, same sizes and iteration counts. Uses ../shared/baselines (sets it
# up with its own setup.sh when its venv is missing).
#
#   scripts/compare.sh [REPEATS=1] [NPROCS="2"] [MINBYTES=8] [MAXBYTES=256M]
#
# Each rep runs kolo, gloo and MPI back to back (interleaved, so machine drift
# hits all three alike); the table shows medians over reps.
set -euo pipefail
cd "$(dirname "$0")/.."
REPEATS=${1:-1}
NPROCS=${2:-"2"}
MINB=${3:-8}
MAXB=${4:-256M}
BASE=$(cd .. && pwd)/shared/baselines
[ -d "$BASE" ] || { echo "compare.sh: $BASE not found" >&2; exit 1; }
if [ ! -x "$BASE/.venv/bin/python" ] || ! command -v mpicc >/dev/null; then
    (cd "$BASE" && ./setup.sh)
fi
mkdir -p "$BASE/bin"
mpicc -O2 -Wall -o "$BASE/bin/mpi_allreduce_bench" "$BASE/mpi_allreduce_bench.c"
cargo build --release --bins
bytes() { python3 -c "import sys; s=sys.argv[1]; m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(s[:-1])*m[s[-1]] if s[-1] in m else int(s))" "$1"; }
lo=$(bytes "$MINB"); hi=$(bytes "$MAXB")
OUT=out/compare_$(date +%Y%m%d_%H%M%S)
mkdir -p "$OUT"
# shellcheck source=/dev/null
. "$BASE/lib.sh"
for r in $(seq 1 "$REPEATS"); do
    for n in $NPROCS; do
        wait_quiet "$OUT/quiet.log"
        echo "== N=$n rep $r: kolo" >&2
        target/release/kolorun -np "$n" target/release/kolo-bench -b "$lo" -e "$hi" -f 2 -c 1 \
            | sed -n 's/^\[0\] //p' > "$OUT/kolo_np${n}_r${r}.txt"
        wait_quiet "$OUT/quiet.log"
        echo "== N=$n rep $r: gloo" >&2
        (cd "$BASE" && .venv/bin/python gloo_allreduce_bench.py -n "$n" -b "$lo" -e "$hi") > "$OUT/gloo_np${n}_r${r}.txt"
        wait_quiet "$OUT/quiet.log"
        echo "== N=$n rep $r: mpi tcp" >&2
        mpirun --allow-run-as-root --oversubscribe -np "$n" --mca pml ob1 --mca btl tcp,self \
            --mca btl_tcp_if_include lo "$BASE/bin/mpi_allreduce_bench" -b "$lo" -e "$hi" > "$OUT/mpi_np${n}_r${r}.txt"
    done
done
for n in $NPROCS; do
    echo
    echo "### N=$n, float32 sum, loopback TCP (median of $REPEATS rep(s)): time(us) / busbw(GB/s) (p50 us)"
    python3 "$BASE/compare_table.py" --p50 --sizes all \
        kolo="$OUT/kolo_np${n}_r*.txt" gloo="$OUT/gloo_np${n}_r*.txt" mpi_tcp="$OUT/mpi_np${n}_r*.txt" \
        | tee "$OUT/table_np${n}.md"
done
echo "raw results in $OUT" >&2
