#!/usr/bin/env bash
# One command: set up the environment, lint, type-check the library, and run the test suite
# (fast tests + the end-to-end `dvc repro`; slow tests are opt-in: bash scripts/test.sh -m slow).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ruff check .
ruff format --check .
mypy
python -m pytest "$@"
