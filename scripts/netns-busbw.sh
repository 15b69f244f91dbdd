#!/usr/bin/env bash
# What the namespaces cost: one 8-rank 64 MiB float32 sum allreduce job over
# the four namespace hosts of scripts/netns-cluster.sh (2 ranks each, started
# by `kolorun -H` over ssh, data over the veth pairs and the bridge) against
# the same job on loopback (`kolorun -np 8`), run as interleaved pairs so
# machine drift hits both alike. Prints each run's busbw, both medians and
# the ratio; exits 1 when the namespaces reach less than MIN_PCT (default 75)
# percent of loopback.
#
#   scripts/netns-busbw.sh [PAIRS=5] [SIZE=64M]    # needs root
#
# KOLO_NETNS_PREFIX picks the cluster (default bw, so a running soak's cluster
# is left alone); a cluster this script brought up is taken down at the end.
# BUSBW_BIN_DIR: where kolorun and kolo-bench are (default target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-5}
SIZE=${2:-64M}
MIN_PCT=${MIN_PCT:-75}
P=${KOLO_NETNS_PREFIX:-bw}
export KOLO_NETNS_PREFIX=$P
BIN=$(realpath "${BUSBW_BIN_DIR:-target/release}")
CLUSTER=scripts/netns-cluster.sh
if [ ! -x "$BIN/kolorun" ] || [ ! -x "$BIN/kolo-bench" ]; then
    cargo build --release --bins
fi
was_up=0
[ -f "/run/kolo-netns/$P/up" ] && was_up=1
$CLUSTER up >&2
cleanup() { if [ $was_up -eq 0 ]; then $CLUSTER down >&2; fi; }
trap cleanup EXIT

# One JSON line per size from rank 0; keep busbw (GB/s) of the only size.
bench=("$BIN/kolo-bench" -b "$SIZE" -e "$SIZE" -n 5 -w 2 -c 1 --json)
busbw() { sed -n 's/^\[0\] //p' | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["busbw_gbps"])'; }
lo=()
ns=()
for i in $(seq 1 "$PAIRS"); do
    a=$("$BIN/kolorun" -np 8 "${bench[@]}" | busbw)
    b=$($CLUSTER exec "${P}1" "$BIN/kolorun" -H "${P}1:2,${P}2:2,${P}3:2,${P}4:2" "${bench[@]}" | busbw)
    printf "pair %d: loopback %.3f GB/s, namespaces %.3f GB/s\n" "$i" "$a" "$b"
    lo+=("$a")
    ns+=("$b")
done
python3 - "$MIN_PCT" "${lo[*]}" "${ns[*]}" <<'PY'
import statistics, sys
need = float(sys.argv[1])
lo = [float(x) for x in sys.argv[2].split()]
ns = [float(x) for x in sys.argv[3].split()]
ml, mn = statistics.median(lo), statistics.median(ns)
pct = 100 * mn / ml
print(f"netns-busbw: 8 ranks, median busbw loopback {ml:.3f} GB/s, namespaces {mn:.3f} GB/s: {pct:.0f}% (need >= {need:.0f}%)")
sys.exit(0 if pct >= need else 1)
PY
