#!/usr/bin/env bash
# Creates ./.venv (Python 3.11) if needed and installs the project with its pinned stack,
# the development tools and the parallel runner's engine (the `cluster` extra).
# Sourced by scripts/run.sh and scripts/test.sh; safe to re-run (pip skips what is there).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 required, found {sys.version}"'
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,cluster]'
export PATH="$PWD/.venv/bin:$PATH"
