#!/usr/bin/env bash
# One command: set up the environment and run the default pipeline (digits, CPU budget).
#   bash scripts/run.sh                 # = dvc repro
#   bash scripts/run.sh -S 'benchmark.ipcs=[1,10,50]'   # any `dvc exp run` arguments
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pipelines.check     # every params section parses (fails in seconds, naming the key)
if [ "$#" -eq 0 ]; then
  dvc repro
else
  dvc exp run "$@"
fi
echo "Report: reports/benchmark.md   CSV: reports/results.csv   Runs: mlflow ui --backend-store-uri sqlite:///mlflow.db"
