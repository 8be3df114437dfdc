"""``python -m pipelines.compare``: cell-by-cell verdicts against the seeds' noise."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from wmdd.report.compare import compare_tables, render, unmatched, welch_summary

ROOT = Path(__file__).resolve().parents[1]


def _table(changes: dict | None = None) -> pd.DataFrame:
    rows = [
        {"profile": "digits", "method": m, "ipc": k, "protocol": "soft", "seeds": 3, "top1_mean": mean, "top1_std": std,
         "protocol_hash": "h1", "versions": "torch 2.14.1", "machine": "cpu:2 cores (EPYC)"}
        for m, k, mean, std in [("random", 1, 60.0, 1.0), ("wmdd", 1, 70.0, 0.5), ("wmdd", 10, 95.0, 0.2)]
    ]  # fmt: skip
    df = pd.DataFrame(rows)
    for (method, ipc, column), value in (changes or {}).items():
        df.loc[(df.method == method) & (df.ipc == ipc), column] = value
    return df


def test_welch_from_summaries_equals_scipy() -> None:
    se, p = welch_summary(70.0, 0.5, 3, 68.0, 1.5, 4)
    ref = stats.ttest_ind_from_stats(70.0, 0.5, 3, 68.0, 1.5, 4, equal_var=False)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    assert se == pytest.approx(math.sqrt(0.25 / 3 + 2.25 / 4))
    assert math.isnan(welch_summary(70, 0.5, 1, 68, 1.5, 4)[1])


def test_unchanged_tables_are_within_noise() -> None:
    verdicts = compare_tables(_table(), _table())
    assert [v.verdict for v in verdicts] == ["within noise"] * 3
    assert all(v.diff == 0 for v in verdicts)


def test_a_worsened_cell_is_a_regression_and_a_small_move_is_noise() -> None:
    new = _table({("wmdd", 10, "top1_mean"): 90.0, ("random", 1, "top1_mean"): 59.5})
    verdicts = {v.cell: v for v in compare_tables(_table(), new, max_regression=1.0)}
    assert verdicts["digits", "wmdd", 10, "soft"].verdict == "regression"
    assert verdicts["digits", "wmdd", 10, "soft"].diff == pytest.approx(-5.0)
    assert verdicts["digits", "random", 1, "soft"].verdict == "within noise"  # -0.5 with std 1
    better = compare_tables(_table(), _table({("wmdd", 1, "top1_mean"): 75.0}))
    assert [v.verdict for v in better if v.cell == ("digits", "wmdd", 1, "soft")] == ["improvement"]


def test_rows_are_not_compared_blindly() -> None:
    new = _table(
        {("wmdd", 1, "protocol_hash"): "h2", ("random", 1, "machine"): "cpu:8 cores (Xeon)"}
    )
    verdicts = {v.cell: v for v in compare_tables(_table(), new)}
    assert verdicts["digits", "wmdd", 1, "soft"].verdict == "not comparable: protocol differs"
    assert "machine differ" in verdicts["digits", "random", 1, "soft"].notes
    one_seed = _table({("wmdd", 10, "seeds"): 1})
    assert [v.verdict for v in compare_tables(_table(), one_seed) if v.cell[2] == 10] == [
        "no noise estimate (fewer than 2 seeds)"
    ]


def test_tables_without_a_protocol_column_are_the_soft_protocol() -> None:
    """A base table from before both protocols were evaluated has no protocol column: its
    rows are the soft-label protocol's, and a hard-label row of the new table has no base."""
    old = _table().drop(columns="protocol")
    new = pd.concat([_table(), _table().assign(protocol="hard")], ignore_index=True)
    verdicts = compare_tables(old, new)
    assert sorted(v.cell[3] for v in verdicts) == ["soft"] * 3
    assert any("only in the new table" in line for line in unmatched(old, new))


def test_welch_interval_matches_scipy_and_covers_the_difference() -> None:
    from wmdd.report.compare import welch_interval

    a, b = [57.0, 55.5, 58.2], [59.1, 60.3, 58.7, 61.0, 59.9]
    diff, lo, hi, p = welch_interval(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)
    assert diff == pytest.approx(sum(a) / 3 - sum(b) / 5)
    ci = ref.confidence_interval(0.95)
    assert (lo, hi) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    # No noise estimate: fewer than 2 values on a side, or no spread on either side.
    for x, y in (([1.0], b), (b, [1.0]), ([40.0, 40.0], [50.0, 50.0, 50.0])):
        assert all(math.isnan(v) for v in welch_interval(x, y)[1:])
    assert welch_interval([40.0, 40.0], [50.0, 50.0])[0] == pytest.approx(-10.0)


def test_render_is_a_markdown_table_with_a_summary() -> None:
    text = render(
        compare_tables(_table(), _table()), base_name="main:reports/results.csv", new_name="new.csv"
    )
    assert text.startswith("Comparison of `new.csv` against `main:reports/results.csv`")
    assert "3 within noise" in text and text.count("\n| digits |") == 3


def _cli(tmp_path: Path, new: pd.DataFrame) -> subprocess.CompletedProcess:
    _table().to_csv(tmp_path / "base.csv", index=False)
    new.to_csv(tmp_path / "new.csv", index=False)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.compare", "--base", str(tmp_path / "base.csv"),
         "--new", str(tmp_path / "new.csv"), "--params", str(ROOT / "params.yaml"),
         "--out", str(tmp_path / "cmp.md")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_cli_exits_1_on_a_regression_and_0_otherwise(tmp_path: Path) -> None:
    worse = _cli(tmp_path, _table({("wmdd", 10, "top1_mean"): 90.0}))
    assert worse.returncode == 1 and "| regression |" in worse.stdout
    assert (tmp_path / "cmp.md").read_text() in worse.stdout
    same = _cli(tmp_path, _table())
    assert same.returncode == 0 and "3 within noise" in same.stdout


def test_cells_in_one_table_only_and_unrecorded_provenance_are_stated() -> None:
    base = pd.concat([_table(), _table().assign(profile="tiny_cpu")]).drop(columns="machine")
    new = _table()
    lines = unmatched(base, new)
    assert "Cells only in the base table, not compared: tiny_cpu (3)." in lines
    assert "The base table records no `machine`: not checked." in lines
    assert unmatched(_table(), _table()) == []
    text = render(compare_tables(base, new), base_name="b", new_name="n", extra=lines)
    assert "tiny_cpu (3)" in text and text.count("\n| digits |") == 3
