#!/usr/bin/env bash
# The body of the pull request's benchmark comment (the benchmark workflow posts it with CML):
#   bash scripts/ci_comment.sh origin/main comment.md
# The per-cell comparison with BASE's committed reports/results.csv against run-to-run noise
# (python -m pipelines.compare), the parameters the change touched (dvc params diff) and the
# accuracy figures of the new report. Exits 1 on a significant regression (the comparison's
# exit status); the body is written either way.
set -uo pipefail
BASE="${1:?usage: ci_comment.sh BASE_REF OUT.md}"
OUT="${2:?usage: ci_comment.sh BASE_REF OUT.md}"
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
status=0
{
  echo "## Benchmark: this change against \`$BASE\`"
  echo
  python -m pipelines.compare --base-ref "$BASE" --base reports/results.csv --new reports/results.csv || status=$?
  echo
  echo "### Parameters changed"
  echo
  params="$(dvc params diff "$BASE" --md 2>&1)" || params="(dvc params diff failed: $params)"
  if [ "$(printf '%s\n' "$params" | grep -c '^|')" -le 2 ]; then
    echo "No parameter changed."
  else
    printf '%s\n' "$params"
  fi
  echo
  echo "### Accuracy (this change)"
  echo
  for figure in reports/figures/*_accuracy.png; do
    [ -e "$figure" ] && echo "![$(basename "$figure" .png)]($figure)"
  done
  echo
  echo "Full report: the job's summary and its \`reports\` artefact."
} > "$OUT"
exit "$status"
