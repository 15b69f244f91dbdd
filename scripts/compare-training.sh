#!/usr/bin/env bash
# Training throughput side by side: kolo from Rust (tch, examples/synthetic_benchmark.rs),
# kolo from Python (kolo.torch, ffi/python/examples/pytorch_synthetic_benchmark.py) and
# PyTorch DDP with gloo (the same Python script with --ddp), all training the same MLP
# (3x32x32 inputs, two hidden layers of 1024, 1000 classes; batch 32 per rank, one thread per
# rank) on synthetic data, in interleaved rounds, over two wires:
#   loopback   N ranks on this host (kolorun -np N)
#   netns      2 ranks, one on each of two network-namespace hosts (scripts/netns-cluster.sh)
#              joined by veth links shaped to RATE (tbf on each host's eth0)
# Prints one line per run and a table of medians: wire, N, kolo-rust, kolo-python, ddp-gloo
# (img/s in total) and the two ratios against DDP.
#
#   scripts/compare-training.sh [ROUNDS=3] [NPS="1 2 4"] [RATE=8gbit]   # netns needs root
#   COMPARE_WIRES=loopback scripts/compare-training.sh                 # skip the namespaces
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
NPS=${2:-1 2 4}
RATE=${3:-8gbit}
WIRES=${COMPARE_WIRES:-loopback netns}
ARGS=(--model mlp --image-size 32 --batch-size 32 --num-warmup-batches 3 --num-batches-per-iter 5 --num-iters 5)

eval "$(scripts/setup-libtorch.sh)"
cargo build --release --bins >&2
cargo build --release --features torch --example synthetic_benchmark >&2
# The Python package in a venv of its own, with torch taken from .venv (as scripts/test.sh).
PYV=$PWD/target/compare-venv
if [ ! -x "$PYV/bin/kolorun" ]; then
    python3 -m venv "$PYV"
    "$PYV/bin/pip" install --no-input --disable-pip-version-check -q ./ffi/python >&2
    .venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' \
        >"$("$PYV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/kolo_torch_from.pth"
fi
KOLORUN=$PWD/target/release/kolorun
RUST=("$PWD/target/release/examples/synthetic_benchmark" "${ARGS[@]}" --hidden 1024)
PY=("$PYV/bin/python" "$PWD/ffi/python/examples/pytorch_synthetic_benchmark.py" "${ARGS[@]}")

# The total img/s a run printed.
total() { grep -Eo '([0-9.]+) img/s total|Total img/sec on [0-9]+ rank\(s\): [0-9.]+' | grep -Eo '[0-9]+\.[0-9]+' | tail -1; }

P=${KOLO_NETNS_PREFIX:-tr}
export KOLO_NETNS_PREFIX=$P
CLUSTER=scripts/netns-cluster.sh
launch() {  # wire n cmd...
    local wire=$1 n=$2; shift 2
    if [ "$wire" = loopback ]; then
        "$KOLORUN" -np "$n" "$@"
    else
        # gloo finds its address from the host name (loopback here) unless told.
        $CLUSTER exec "${P}1" "$KOLORUN" -H "${P}1,${P}2" -x GLOO_SOCKET_IFNAME=eth0 "$@"
    fi
}
netns_up() {
    $CLUSTER up >&2
    for h in 1 2; do
        ip netns exec "$P$h" tc qdisc replace dev eth0 root tbf rate "$RATE" burst 4mb latency 50ms
    done
}
if [[ " $WIRES " == *" netns "* ]]; then
    netns_up
    trap '$CLUSTER down >&2' EXIT
fi

results=$(mktemp)
for wire in $WIRES; do
    nps=$NPS
    [ "$wire" = netns ] && nps=2
    for n in $nps; do
        for round in $(seq "$ROUNDS"); do
            for impl in kolo-rust kolo-python ddp-gloo; do
                case $impl in
                    kolo-rust) cmd=("${RUST[@]}") ;;
                    kolo-python) cmd=("${PY[@]}") ;;
                    ddp-gloo) cmd=("${PY[@]}" --ddp) ;;
                esac
                v=$(launch "$wire" "$n" "${cmd[@]}" 2>/dev/null | total || true)
                echo "$wire n=$n round=$round $impl ${v:-failed}" >&2
                echo "$wire $n $impl ${v:-nan}" >>"$results"
            done
        done
    done
done

python3 - "$results" "$RATE" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    wire, n, impl, v = line.split()
    rows.setdefault((wire, int(n)), {}).setdefault(impl, []).append(float(v))
print(f"\n| wire | N | kolo (Rust) img/s | kolo (Python) img/s | DDP gloo img/s | Rust/DDP | Python/DDP |")
print("|---|---|---|---|---|---|---|")
for (wire, n), r in rows.items():
    med = {k: statistics.median(v) for k, v in r.items()}
    label = f"2 netns hosts, {sys.argv[2]}" if wire == "netns" else "loopback"
    d = med.get("ddp-gloo", float("nan"))
    print(f"| {label} | {n} | {med['kolo-rust']:.0f} | {med['kolo-python']:.0f} | {d:.0f} "
          f"| {med['kolo-rust'] / d:.2f} | {med['kolo-python'] / d:.2f} |")
EOF
rm -f "$results"
