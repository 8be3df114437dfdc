r"""Did a change move any number? Two results tables, cell by cell, against their noise.

For every (profile, method, IPC, protocol) in both tables the new mean top-1 is compared
with the base mean by Welch's t-test on the summary statistics (means, sample stds and their
n, the columns of ``reports/results.csv``: n is the number of distilled sets, or of eval
seeds for a cell with one set):

.. math::

    t = \frac{\bar x_{new} - \bar x_{base}}{\sqrt{s_{new}^2 / n_{new} + s_{base}^2 / n_{base}}},

with the Welch-Satterthwaite degrees of freedom. A difference is *within noise* unless
``p < alpha``; a significant drop larger than ``max_regression`` points is a *regression*
(the command exits 1), a significant rise an *improvement*. Rows are never compared
blindly: a different protocol hash means different settings (*not comparable*), and
different package versions or a different machine (CPU model, device) are stated beside
the verdict, since CPU kernels differ between machines and move digits by tenths of a
point. With one eval seed on either side there is no noise estimate: the difference is
reported, the verdict is *no noise estimate*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats

KEY = ["profile", "method", "ipc", "protocol"]


@dataclass(frozen=True)
class Verdict:
    cell: tuple[str, str, int, str]  # profile, method, ipc, protocol
    base: str  # "mean ± std (n)"
    new: str
    diff: float  # new - base, points
    noise: float  # standard error of the difference, points (nan without an estimate)
    p: float  # Welch p-value (nan without an estimate)
    verdict: str  # within noise | regression | improvement | not comparable | ...
    notes: str  # versions / machine differences


def welch_summary(
    m1: float, s1: float, n1: int, m2: float, s2: float, n2: int
) -> tuple[float, float]:
    """(standard error of m2 - m1, two-sided Welch p) from summary statistics; nan when
    either side has fewer than 2 seeds or there is no spread at all."""
    if n1 < 2 or n2 < 2:
        return math.nan, math.nan
    v1, v2 = s1 * s1 / n1, s2 * s2 / n2
    se = math.sqrt(v1 + v2)
    if se == 0:
        return 0.0, (1.0 if m1 == m2 else 0.0)
    dof = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (n2 - 1))
    t = (m2 - m1) / se
    return se, float(2 * stats.t.sf(abs(t), dof))


def welch_interval(
    a: list[float], b: list[float], *, level: float = 0.95
) -> tuple[float, float, float, float]:
    """``mean(a) - mean(b)``, its ``level`` confidence interval (Welch-Satterthwaite degrees
    of freedom) and the two-sided Welch p; the interval and p are nan when there is no noise
    estimate: fewer than 2 values on a side, or no spread on either side."""
    diff = sum(a) / len(a) - sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan, math.nan
    va, vb = stats.tvar(a) / len(a), stats.tvar(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:  # t = +-inf or 0/0: no test without any spread
        return diff, math.nan, math.nan, math.nan
    dof = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    half = float(stats.t.ppf(0.5 + level / 2, dof)) * se
    return diff, diff - half, diff + half, float(2 * stats.t.sf(abs(diff) / se, dof))


def _fmt(row) -> str:
    return f"{row.top1_mean:.2f} ± {row.top1_std:.2f} ({int(row.seeds)})"


def with_protocol(table: pd.DataFrame) -> pd.DataFrame:
    """A results table with its ``protocol`` column (tables written before every cell had
    both protocols evaluated one, the soft-label protocol, and may lack the column)."""
    return table if "protocol" in table else table.assign(protocol="soft")


def compare_tables(
    base: pd.DataFrame, new: pd.DataFrame, *, alpha: float = 0.05, max_regression: float = 1.0
) -> list[Verdict]:
    """The verdict of every cell present in both tables, in the new table's order."""
    base, new = with_protocol(base), with_protocol(new)
    base_rows = {tuple(r[k] for k in KEY): r for _, r in base.iterrows()}
    out = []
    for _, n in new.iterrows():
        cell = tuple(n[k] for k in KEY)
        if cell not in base_rows:
            continue
        b = base_rows[cell]
        diff = float(n.top1_mean - b.top1_mean)
        notes = []
        for column, what in (("versions", "package versions"), ("machine", "machine")):
            if column in n and column in b and str(n[column]) != str(b[column]):
                notes.append(f"{what} differ ({b[column]} -> {n[column]})")
        if str(n.protocol_hash) != str(b.protocol_hash):
            out.append(Verdict(cell, _fmt(b), _fmt(n), diff, math.nan, math.nan, "not comparable: protocol differs", "; ".join(notes)))  # fmt: skip
            continue
        se, p = welch_summary(
            b.top1_mean, b.top1_std, int(b.seeds), n.top1_mean, n.top1_std, int(n.seeds)
        )
        if math.isnan(p):
            verdict = "no noise estimate (fewer than 2 seeds)"
        elif p >= alpha:
            verdict = "within noise"
        elif diff < -max_regression:
            verdict = "regression"
        elif diff > max_regression:
            verdict = "improvement"
        else:
            verdict = f"significant but within {max_regression:g} points"
        out.append(Verdict(cell, _fmt(b), _fmt(n), diff, se, p, verdict, "; ".join(notes)))
    return out


def unmatched(base: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """Lines saying which cells only one table has, and which provenance columns
    (``versions``, ``machine``) one side does not record, so that nothing is left out
    silently."""
    base, new = with_protocol(base), with_protocol(new)
    cells = {side: {tuple(r) for r in df[KEY].itertuples(index=False)} for side, df in (("base", base), ("new", new))}  # fmt: skip
    lines = []
    for side, other in (("base", "new"), ("new", "base")):
        only = sorted(cells[side] - cells[other], key=str)
        if only:
            per_profile: dict[str, int] = {}
            for profile, *_ in only:
                per_profile[profile] = per_profile.get(profile, 0) + 1
            listed = ", ".join(f"{p} ({n})" for p, n in sorted(per_profile.items()))
            lines.append(f"Cells only in the {side} table, not compared: {listed}.")
    for column in ("versions", "machine"):
        missing = [side for side, df in (("base", base), ("new", new)) if column not in df]
        if missing:
            lines.append(f"The {' and '.join(missing)} table records no `{column}`: not checked.")
    return lines


def render(
    verdicts: list[Verdict], *, base_name: str, new_name: str, extra: list[str] | None = None
) -> str:
    """A Markdown table of the verdicts, with a one-line summary first (and ``extra``
    lines, e.g. from :func:`unmatched`, after it)."""
    counts: dict[str, int] = {}
    for v in verdicts:
        counts[v.verdict.split(":")[0]] = counts.get(v.verdict.split(":")[0], 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no common cells"
    lines = [
        f"Comparison of `{new_name}` against `{base_name}` (top-1 %, mean ± sample std (n)): {summary}.",
        "",
        *([*(f"- {line}" for line in extra), ""] if extra else []),
        "| profile | method | IPC | protocol | base | new | diff | noise (SE) | Welch p | verdict | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        se = "n/a" if math.isnan(v.noise) else f"{v.noise:.2f}"
        p = "n/a" if math.isnan(v.p) else (f"{v.p:.3f}" if v.p >= 1e-3 else f"{v.p:.1e}")
        lines.append(
            f"| {v.cell[0]} | `{v.cell[1]}` | {v.cell[2]} | {v.cell[3]} | {v.base} | {v.new} | {v.diff:+.2f} | "
            f"{se} | {p} | {v.verdict} | {v.notes or '-'} |"
        )
    return "\n".join(lines) + "\n"
