#!/usr/bin/env bash
# A/B of KOLO_NSOCKS (TCP connections per peer) on this machine: kolo-bench float32 sum
# allreduce from 1 MiB to MAXBYTES (factor 4), checked (-c 1), under `kolorun -np N`.
#
#   scripts/nsocks-ab.sh [REPS=3] [NPROCS="2 4"] [NSOCKS="1 2 4"] [MAXBYTES=256M]
#
# An entry of NSOCKS may name a stripe size too: "4:65536" is KOLO_NSOCKS=4 with
# KOLO_MIN_STRIPE=65536, so stripe sizes can be compared in the same interleaved runs.
#
# Runs are interleaved (each rep runs every N and every stream count once, in turn), so
# drift of the machine hits all alike, and each starts only once the machine is quiet: CPU
# busy below QUIET_BUSY_PCT (default 10) percent over one second, waiting at most
# QUIET_MAX_WAIT (default 300) seconds. Other KOLO_* variables pass through to the ranks
# (e.g. KOLO_MIN_STRIPE=65536, KOLO_ALGO=ring). Prints per N a Markdown table of median
# busbw (GB/s) per size and stream count, with the ratios to the first count, and keeps the
# raw JSON lines and the quietness log in out/nsocks_<stamp>/.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-3}
NPROCS=${2:-"2 4"}
NSOCKS=${3:-"1 2 4"}
MAXB=${4:-256M}
BIN=${CARGO_TARGET_DIR:-target}/release
[ -x "$BIN/kolo-bench" ] && [ -x "$BIN/kolorun" ] || cargo build --release --bins
OUT=out/nsocks_$(date +%Y%m%d_%H%M%S)
mkdir -p "$OUT"

busy_pct() {  # CPU busy percent of the whole machine over one second
    local a b
    read -r -a a < <(awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
    sleep 1
    read -r -a b < <(awk '/^cpu /{print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat)
    echo $(( 100 * (b[0] - a[0]) / (b[1] - a[1] + 1) ))
}
wait_quiet() {
    local start=$SECONDS busy
    while :; do
        busy=$(busy_pct)
        [ "$busy" -lt "${QUIET_BUSY_PCT:-10}" ] && break
        if [ $((SECONDS - start)) -ge "${QUIET_MAX_WAIT:-300}" ]; then
            echo "nsocks-ab: still ${busy}% busy after ${QUIET_MAX_WAIT:-300}s; running anyway" >&2
            break
        fi
    done
    echo "$(date +%T) busy ${busy}% load $(cut -d' ' -f1 /proc/loadavg) waited $((SECONDS - start))s" >> "$OUT/quiet.log"
}

for r in $(seq 1 "$REPS"); do
    for n in $NPROCS; do
        for v in $NSOCKS; do
            k=${v%%:*}
            stripe=()
            [ "$v" != "$k" ] && stripe=(env "KOLO_MIN_STRIPE=${v#*:}")
            wait_quiet
            echo "== rep $r: N=$n KOLO_NSOCKS=$v" >&2
            "${stripe[@]}" env KOLO_NSOCKS="$k" "$BIN/kolorun" -np "$n" "$BIN/kolo-bench" -b 1M -e "$MAXB" -f 4 -c 1 --json \
                | sed -n 's/^\[0\] //p' > "$OUT/np${n}_k${v/:/_s}_r${r}.jsonl"
        done
    done
done

python3 - "$OUT" "$NPROCS" "$NSOCKS" <<'EOF'
import glob, json, statistics, sys
out, nprocs, nsocks = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
def size(b):
    return f"{b >> 20} MiB" if b >= 1 << 20 else f"{b >> 10} KiB"
for n in nprocs:
    cells = {}  # (k, bytes) -> [busbw]
    for k in nsocks:
        for f in sorted(glob.glob(f"{out}/np{n}_k{k.replace(':', '_s')}_r*.jsonl")):
            for line in open(f):
                row = json.loads(line)
                if "bytes" not in row:
                    continue
                if row.get("wrong"):
                    sys.exit(f"{f}: wrong results at {row['bytes']} bytes")
                cells.setdefault((k, row["bytes"]), []).append(row["busbw_gbps"])
    if not cells:
        sys.exit(f"N={n}: no results in {out}")
    sizes = sorted({b for (_, b) in cells})
    reps = min(len(v) for v in cells.values())
    print(f"\nN = {n}: busbw GB/s, median of {reps} runs")
    print("| size | " + " | ".join(f"k={k}" for k in nsocks) + " | "
          + " | ".join(f"k={k} / k={nsocks[0]}" for k in nsocks[1:]) + " |")
    print("|---:|" + "---:|" * (2 * len(nsocks) - 1))
    for b in sizes:
        med = [statistics.median(cells[(k, b)]) for k in nsocks]
        print(f"| {size(b)} | " + " | ".join(f"{m:.2f}" for m in med) + " | "
              + " | ".join(f"{m / med[0]:.2f}" for m in med[1:]) + " |")
EOF
