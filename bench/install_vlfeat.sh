#!/usr/bin/env bash
# VLFeat's vl_fisher for the pipeline benchmark: Debian's libvlfeat-dev (0.9.21) and the cyvlfeat wrapper compiled
# against it, into the project's .venv (or the interpreter in $PYTHON). Idempotent: each step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}

if "$PYTHON" -c "import cyvlfeat.fisher" 2>/dev/null; then
    echo "cyvlfeat is already installed for $PYTHON"
    exit 0
fi
if ! dpkg -s libvlfeat-dev >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y libvlfeat-dev
fi
"$PYTHON" -m pip install cython numpy scipy
# cyvlfeat's setup compiles against the numpy and Cython of this environment (and finds /usr/include/vl), so
# the build must not be isolated from it.
"$PYTHON" -m pip install --no-build-isolation cyvlfeat
"$PYTHON" -c "import cyvlfeat.fisher; print('cyvlfeat installed for $PYTHON')"
