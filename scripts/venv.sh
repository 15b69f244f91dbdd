#!/usr/bin/env bash
# Make sure the repository's Python virtual environment (.venv, gitignored) exists and
# has the given modules, installing only what is missing, and print its python's path.
# An existing .venv is never deleted or recreated: other scripts keep their packages in
# it too (matplotlib for compare.sh, PyTorch). Concurrent calls wait for each other.
#
#   PY=$(scripts/venv.sh numpy)                 # MODULE, or MODULE:PIP_SPEC
#   PY=$(scripts/venv.sh numpy matplotlib)
set -euo pipefail
cd "$(dirname "$0")/.."
exec 9<"scripts/venv.sh"
flock 9
PY=$PWD/.venv/bin/python
if [ ! -x "$PY" ]; then
    echo "venv.sh: creating .venv" >&2
    python3 -m venv .venv >&2 || {
        echo "venv.sh: 'python3 -m venv' failed (Debian: apt install python3-venv; scripts/test.sh does)" >&2
        exit 1
    }
fi
for spec in "$@"; do
    mod=${spec%%:*}
    pkg=${spec#*:}
    if ! "$PY" -c "import $mod" 2>/dev/null; then
        echo "venv.sh: installing $pkg into .venv" >&2
        "$PY" -m pip install -q "$pkg" >&2
    fi
done
echo "$PY"
