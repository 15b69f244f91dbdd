#!/usr/bin/env bash
# Set up libtorch for the `torch` feature: the PyPI build of PyTorch 2.11.0 (the version tch
# 0.24 is paired with) in the repository's .venv, installed only when missing.
#
#   eval "$(scripts/setup-libtorch.sh)"     # installs if needed, then exports the variables
#   scripts/setup-libtorch.sh --check       # exit 0 when torch 2.11.0 is already there
#
# Progress goes to stderr; stdout is only `export` lines, so the eval form works:
#   LIBTORCH_USE_PYTORCH=1   torch-sys takes libtorch from the Python installation
#   PATH=<repo>/.venv/bin:…  so torch-sys's build script runs the venv's python3
#   LIBTORCH_BYPASS_VERSION_CHECK unset (2.11.0 is the version tch 0.24 wants)
#   LD_LIBRARY_PATH=<torch/lib>:…  only a fallback: kolo's build.rs also sets an rpath, so
#                             the binaries, examples and tests run without it.
# The .venv is shared with scripts/compare.sh (numpy, matplotlib); it is created when missing
# and never deleted. The wheel is the CUDA build (it runs on CPU too) and pulls ~2.7 GB of
# nvidia-* wheels on the first run.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
PY=$VENV/bin/python
WANT=2.11.0

# Prints "<version> <torch/lib>" when torch $WANT is importable from the venv; fails otherwise.
torch_info() {
    [ -x "$PY" ] && "$PY" -W ignore -c "
import os, sys, torch
v = torch.__version__
sys.exit(1) if v.split('+')[0] != '$WANT' else print(v, os.path.join(os.path.dirname(torch.__file__), 'lib'))
" 2>/dev/null
}

if [ "${1:-}" = --check ]; then
    torch_info >/dev/null
    exit
fi

if ! INFO=$(torch_info); then
    if [ ! -x "$PY" ]; then
        echo "setup-libtorch: creating $VENV" >&2
        python3 -m venv "$VENV" >&2 || {
            echo "setup-libtorch: python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
            exit 1
        }
    fi
    echo "setup-libtorch: pip install torch==$WANT into $VENV (large: CUDA build with nvidia-* wheels)" >&2
    t0=$(date +%s)
    "$PY" -m pip install --no-input --disable-pip-version-check -q "torch==$WANT" >&2
    echo "setup-libtorch: installed in $(( $(date +%s) - t0 )) s" >&2
    INFO=$(torch_info) || { echo "setup-libtorch: torch $WANT still not importable from $PY" >&2; exit 1; }
fi

TORCH_LIB=${INFO#* }
echo "setup-libtorch: torch ${INFO%% *} at $TORCH_LIB" >&2
printf 'export LIBTORCH_USE_PYTORCH=1\n'
printf 'export PATH=%q:"$PATH"\n' "$VENV/bin"
printf 'export LD_LIBRARY_PATH=%q"${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"\n' "$TORCH_LIB"
