#!/usr/bin/env bash
# The main job: data-parallel training of a small CNN on the 8×8 digits set with PyTorch
# (tch) models and kolo averaging the gradients, on 4 local ranks.
#   scripts/run.sh [train_digits flags]    e.g. scripts/run.sh --epochs 5 --model mlp
#   KOLORUN_ARGS="-np 2" scripts/run.sh    replaces the launcher's flags "-np 4"
# Sets up libtorch first when it is missing (scripts/setup-libtorch.sh: PyTorch 2.11.0 from
# PyPI into .venv, a few GB on the first run), then builds in release mode. Rank 0 prints the
# loss, test accuracy and throughput per epoch and ends with final_accuracy=<fraction>.
# The allreduce benchmark that used to be the main job:
#   target/release/kolorun -np 4 target/release/kolo-bench -b 8 -e 128M -f 4
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "run.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi

eval "$(scripts/setup-libtorch.sh)"
cargo build --release --bins
cargo build --release --features torch --example train_digits

# shellcheck disable=SC2206 # KOLORUN_ARGS is a word list on purpose
launcher_args=(${KOLORUN_ARGS:--np 4})
exec target/release/kolorun "${launcher_args[@]}" target/release/examples/train_digits "$@"
