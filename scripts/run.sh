#!/usr/bin/env bash
# The main job: build kolo in release mode and run kolo-bench on 4 local ranks.
#   scripts/run.sh [kolo-bench flags]     e.g. scripts/run.sh -d bfloat16 -o max
#   KOLORUN_ARGS="-np 2" scripts/run.sh   replaces "-np 4"
# Arguments are appended after the default flags "-b 8 -e 128M -f 4"; a later flag wins.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "run.sh: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi

cargo build --release --bins --examples

# shellcheck disable=SC2206 # KOLORUN_ARGS is a word list on purpose
launcher_args=(${KOLORUN_ARGS:--np 4})
exec target/release/kolorun "${launcher_args[@]}" target/release/kolo-bench -b 8 -e 128M -f 4 "$@"
