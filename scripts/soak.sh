#!/usr/bin/env bash
# Soak: 8 ranks over the four network namespaces of scripts/netns-cluster.sh
# (2 per host, started by kolorun -H over ssh) run OPS collectives (default
# 10000) of random sizes (0 to 8 MiB, log-uniform), dtypes, reduction ops,
# allreduce algorithms and kinds (examples/soak.rs), with random ranks delayed
# and 0.1% packet loss on one link (host2 -> host3: an nftables
# `numgen random mod 1000 < 1` drop on host3's input, per frame: TSO/GSO off on
# host2's eth0 and GRO off on host3's). Every result is checked exactly against
# a reference each rank computes, the ranks' result hashes are compared every
# 100 ops, and each rank's VmRSS after op min(1000, OPS/4) and at the end must
# not differ by more than 10%.
#
#   scripts/soak.sh [OPS]        # needs root; builds what is missing
#
# SOAK_SEED (default 1) picks the sequence of operations. The driver first runs
# every kind and algorithm once at 8 MiB, so buffers (kolo's workspaces, and
# the multi-MiB blocks glibc keeps in its heap once its dynamic mmap threshold
# has risen) reach their high-water marks before the baseline; without that
# warm-up RSS rose in steps up to op ~2300 (+13% from op 1000 to 3000 with 4
# ranks), flat with MALLOC_MMAP_THRESHOLD_=131072, so not a leak.
# KOLO_NETNS_PREFIX picks the cluster (as in
# netns-cluster.sh); a cluster this script brought up is taken down at the end
# unless SOAK_KEEP_CLUSTER=1. SOAK_BIN_DIR: where kolorun and examples/soak are
# (default target/release). Prints `soak: ...` summary lines; exit 0 only when
# all 8 ranks report `soak ok`.
set -euo pipefail
cd "$(dirname "$0")/.."
OPS=${1:-10000}
SEED=${SOAK_SEED:-1}
P=${KOLO_NETNS_PREFIX:-h}
export KOLO_NETNS_PREFIX=$P
BIN=${SOAK_BIN_DIR:-target/release}
CLUSTER=scripts/netns-cluster.sh

if [ ! -x "$BIN/kolorun" ] || [ ! -x "$BIN/examples/soak" ]; then
    cargo build --release --bin kolorun --example soak
fi
was_up=0
[ -f "/run/kolo-netns/$P/up" ] && was_up=1
$CLUSTER up
LOG=$(mktemp /tmp/kolo-soak.XXXXXX)
cleanup() {
    for h in "${P}2" "${P}3"; do
        ip netns exec "$h" nft delete table inet kolo_soak 2>/dev/null || true
    done
    if command -v ethtool >/dev/null; then
        ip netns exec "${P}2" ethtool -K eth0 tso on gso on 2>/dev/null || true
        ip netns exec "${P}3" ethtool -K eth0 gro on 2>/dev/null || true
    fi
    if [ $was_up -eq 0 ] && [ "${SOAK_KEEP_CLUSTER:-0}" != 1 ]; then $CLUSTER down; fi
}
trap cleanup EXIT

# Per-frame loss on the link host2 -> host3, dropped where it is received.
if command -v ethtool >/dev/null; then
    ip netns exec "${P}2" ethtool -K eth0 tso off gso off
    ip netns exec "${P}3" ethtool -K eth0 gro off
else
    echo "soak: ethtool missing: losses hit whole GSO/GRO units, not single frames" >&2
fi
ip netns exec "${P}3" nft -f - <<'EOF'
table inet kolo_soak {
  chain in {
    type filter hook input priority 0; policy accept;
    ip saddr 10.213.0.2 tcp flags & (syn | fin | rst) == 0 numgen random mod 1000 < 1 counter drop
  }
}
EOF

echo "soak: $OPS ops, seed $SEED, 8 ranks on ${P}1..${P}4, 0.1% loss ${P}2 -> ${P}3" >&2
start=$SECONDS
set +e
$CLUSTER exec "${P}1" "$BIN/kolorun" -H "${P}1:2,${P}2:2,${P}3:2,${P}4:2" \
    "$BIN/examples/soak" --ops "$OPS" --seed "$SEED" >"$LOG" 2>&1
rc=$?
set -e
secs=$((SECONDS - start))
drops=$(ip netns exec "${P}3" nft list table inet kolo_soak | grep -o 'counter packets [0-9]*' | awk '{s+=$3} END {print s+0}')
ok=$(grep -c ': soak ok ' "$LOG" || true)
# Injected delays, summed over the ranks' `soak ok` lines.
delays=$(grep -o ' delays=[0-9]*' "$LOG" | awk -F= '{s+=$2} END {print s+0}')
delay_ms=$(grep -o ' delay_ms=[0-9]*' "$LOG" | awk -F= '{s+=$2} END {print s+0}')
grep -E ': soak ok |soak: |kolorun: |error|WRONG' "$LOG" || true
echo "soak: rc=$rc ranks_ok=$ok/8 ops=$OPS seed=$SEED secs=$secs frames_dropped=$drops (${P}2 -> ${P}3) rank_delays=$delays (${delay_ms} ms)"
grep -o 'rank [0-9]: soak ok.*' "$LOG" | sed -E 's/.*rank ([0-9]).*rss_kb_base=([0-9]+) \(op ([0-9]+)\) rss_kb_end=([0-9]+) growth=([-0-9.]+)%.*/soak: rank \1 rss_kb after op \3: \2, at the end: \4 (\5%)/'
rm -f "$LOG"
[ "$rc" -eq 0 ] && [ "$ok" -eq 8 ]
