"""Compare two benchmark results tables cell by cell against their run-to-run noise.

    python -m pipelines.compare --base-ref main                  # committed base vs workspace
    python -m pipelines.compare --base old/results.csv --new reports/results.csv --out cmp.md

Per (profile, method, IPC): base and new mean ± std (n), the difference, its standard
error from the eval seeds, Welch's p and a verdict (``wmdd.report.compare``); rows whose
protocol hash differs are reported as not comparable, different package versions or
machines are noted. Thresholds: ``compare.alpha`` and ``compare.max_regression`` (points)
in params.yaml. Prints the Markdown table (and writes it with ``--out``); exits 1 when a
cell regressed significantly by more than ``compare.max_regression``.
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from pipelines.common import run_main
from wmdd.config import load_params
from wmdd.report.compare import compare_tables, render, unmatched


def read_table(spec: str, *, ref: str | None = None) -> pd.DataFrame:
    """A results CSV from a path, or from git at ``ref`` (``git show ref:path``)."""
    if ref is None:
        if not Path(spec).is_file():
            raise FileNotFoundError(f"results table {spec} not found")
        return pd.read_csv(spec)
    proc = subprocess.run(["git", "show", f"{ref}:{spec}"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FileNotFoundError(f"{ref}:{spec}: {proc.stderr.strip()}")
    return pd.read_csv(io.StringIO(proc.stdout))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", default="reports/results.csv", help="base results CSV")
    parser.add_argument("--base-ref", help="read --base from this git revision (e.g. main)")
    parser.add_argument("--new", default="reports/results.csv", help="new results CSV")
    parser.add_argument("--params", default="params.yaml", help="parameter file (thresholds)")
    parser.add_argument("--out", help="also write the Markdown table here")
    args = parser.parse_args(argv)
    cfg = load_params(args.params).compare
    base = read_table(args.base, ref=args.base_ref)
    new = read_table(args.new)
    verdicts = compare_tables(base, new, alpha=cfg.alpha, max_regression=cfg.max_regression)
    base_name = f"{args.base_ref}:{args.base}" if args.base_ref else args.base
    text = render(verdicts, base_name=base_name, new_name=args.new, extra=unmatched(base, new))
    try:
        print(text, flush=True)
    except BrokenPipeError:  # piped into `head` and the like: the verdict still counts
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.out:
        Path(args.out).write_text(text)
    if any(v.verdict == "regression" for v in verdicts):
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
