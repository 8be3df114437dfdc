"""The report's protocol-sensitivity panel, from ``pipelines.sensitivity``'s CSV.

The panel asks how far the soft-label protocol's own knobs (the student's batch size, a full
or a half cosine, the final or the best epoch) move each method's score, and whether they
change the methods' order. The reference is the row whose settings hash is the protocol's
own (the profile's batch size, the full cosine, the final epoch): the main table's number.
Each move is paired: the mean over sets and eval seeds of (variant - reference) on the same
distilled set and seed. The best epoch appears only here, never in the main table.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from scipy import stats

PANEL_FILE = "sensitivity.csv"


def read_panel(path: Path) -> pd.DataFrame | None:
    """The panel's rows, or None when ``path`` does not exist."""
    return pd.read_csv(path) if path.exists() else None


def _reference(df: pd.DataFrame) -> tuple[int, str]:
    ref = df[df.variant_hash == df.protocol_hash]
    if ref.empty:
        raise ValueError(
            "sensitivity panel: no row has the protocol's own settings (variant_hash == "
            "protocol_hash), so there is no reference to measure the knobs against"
        )
    return int(ref.batch_size.iloc[0]), str(ref.schedule.iloc[0])


def _per_set(df: pd.DataFrame, column: str) -> pd.Series:
    """Per (method, batch, schedule, set): the mean of ``column`` over eval seeds."""
    return df.groupby(["method", "batch_size", "schedule", "set"])[column].mean()


def panel_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per (method, batch_size, schedule): ``final`` and ``best`` (means over sets of the
    per-set means over eval seeds), ``n`` (sets), ``sd`` (the sample std of the per-set final
    top-1 over sets; nan with one set), ``move`` (the mean paired difference of the final
    top-1 from the reference variant, over the sets both have) and ``move_sd`` (the sample
    std of those paired differences; nan with fewer than two, and for the reference itself)."""
    ref_b, ref_s = _reference(df)
    final, best = _per_set(df, "final_top1"), _per_set(df, "best_top1")
    rows = []
    for (method, b, schedule), g in final.groupby(level=[0, 1, 2]):
        try:
            ref = final.loc[(method, ref_b, ref_s)]  # per set
        except KeyError:
            ref = pd.Series(dtype=float)  # this method lacks the reference: no move
        sets = g.index.get_level_values("set")
        diffs = pd.Series(
            [g.loc[(method, b, schedule, s)] - ref.loc[s] for s in sets if s in ref.index],
            dtype=float,
        )
        rows.append(
            {
                "method": method,
                "batch_size": int(b),
                "schedule": schedule,
                "final": float(g.mean()),
                "best": float(best.loc[(method, b, schedule)].mean()),
                "n": len(g),
                "sd": float(g.std(ddof=1)) if len(g) > 1 else float("nan"),
                "move": float(diffs.mean()) if len(diffs) else float("nan"),
                "move_sd": float(diffs.std(ddof=1))
                if len(diffs) > 1 and (b, schedule) != (ref_b, ref_s)
                else float("nan"),
            }
        )
    return pd.DataFrame(rows).set_index(["method", "batch_size", "schedule"])


def pooled_sd(sds: pd.Series, ns: pd.Series) -> tuple[float, int]:
    """The pooled sample std of several groups, sqrt(sum (n_i - 1) sd_i^2 / sum (n_i - 1)),
    over the groups with two or more values, and its degrees of freedom; (nan, 0) if none."""
    keep = (ns > 1) & sds.notna()
    df = int((ns[keep] - 1).sum())
    if df == 0:
        return float("nan"), 0
    return math.sqrt(float(((ns[keep] - 1) * sds[keep] ** 2).sum()) / df), df


def half_width(sd: float, df: int, *, n_a: int, n_b: int | None = None) -> float:
    """The 95% half-width of a mean over ``n_a`` sets (``n_b`` given: of the difference of two
    independent means) from a pooled ``sd`` with ``df`` degrees of freedom; nan if df is 0."""
    if df == 0:
        return float("nan")
    scale = math.sqrt(1 / n_a + (1 / n_b if n_b else 0.0))
    return float(stats.t.ppf(0.975, df)) * sd * scale


def _variant_name(b: int, schedule: str) -> str:
    return f"batch {b}, {schedule} cosine"


def _order(scores: dict[str, float]) -> str:
    ranked = sorted(scores, key=lambda m: -scores[m])
    return " > ".join(f"{m} {scores[m]:.1f}" for m in ranked)


def render_panel(df: pd.DataFrame) -> list[str]:
    """The panel's Markdown: the table of every method and variant, the methods' order under
    each, and one generated sentence on what the knobs do."""
    summary = panel_summary(df)
    ref_b, ref_s = _reference(df)
    methods = list(dict.fromkeys(df.method))
    variants = [(ref_b, ref_s)] + sorted(
        {(int(b), s) for _, b, s in summary.index} - {(ref_b, ref_s)},
        key=lambda v: (v[1] != ref_s, v[0] != ref_b, v),
    )
    first = df.iloc[0]
    header = ["method", "sets × eval seeds"]
    header += [
        _variant_name(b, s) + (" (the protocol)" if (b, s) == (ref_b, ref_s) else "")
        for b, s in variants
    ]
    header.append("best epoch, protocol settings")
    lines = [
        f"Protocol sensitivity ({first.profile}, IPC {first.ipc}; `python -m "
        f"pipelines.sensitivity`): the final top-1 (%) of each method's sets under the "
        f"soft-label protocol with one knob changed, mean over sets (n) and, in brackets, the "
        f"paired move from the protocol's own settings on the same sets and seeds. A half "
        f"cosine ends at lr / 2 (the first half of a cosine twice as long). The best epoch "
        f"(validated every {int(first.eval_interval)} of {int(first.epochs)} epochs) is shown "
        f"here only; the main table reports the final epoch.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for m in methods:
        seeds = df[df.method == m].eval_seed.nunique()
        cells = [f"`{m}`", f"{int(summary.loc[(m, ref_b, ref_s)].n)} × {seeds}"]
        for b, s in variants:
            if (m, b, s) not in summary.index:
                cells.append("-")
                continue
            r = summary.loc[(m, b, s)]
            cells.append(
                f"{r.final:.1f} ({int(r.n)})"
                if (b, s) == (ref_b, ref_s)
                else f"{r.final:.1f} ({int(r.n)}) [{r.move:+.1f}]"
            )
        r = summary.loc[(m, ref_b, ref_s)]
        cells.append(f"{r.best:.1f} [{r.best - r.final:+.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    settings = {_variant_name(b, s): (b, s, "final") for b, s in variants}
    settings["best epoch, protocol settings"] = (ref_b, ref_s, "best")
    orders: dict[str, dict[str, float]] = {}
    sets: dict[str, dict[str, int]] = {}
    for name, (b, s, column) in settings.items():
        rows = {m: summary.loc[(m, b, s)] for m in methods if (m, b, s) in summary.index}
        orders[name] = {m: float(r[column]) for m, r in rows.items()}
        sets[name] = {m: int(r.n) for m, r in rows.items()}
    lines += ["", "The methods' order under each setting (final top-1 unless named):", ""]
    lines += [f"- {name}: {_order(scores)}" for name, scores in orders.items()]
    lines += [
        "",
        panel_sentence(summary, orders, reference=_variant_name(ref_b, ref_s), sets=sets),
    ]
    return lines


def _swaps(ref: dict[str, float], other: dict[str, float]) -> list[tuple[str, str]]:
    """The pairs (a, b) that ``ref`` orders a > b and ``other`` b > a."""
    return [
        (a, b)
        for a in ref
        for b in ref
        if ref[a] > ref[b] and b in other and a in other and other[b] > other[a]
    ]


def panel_sentence(
    summary: pd.DataFrame,
    orders: dict[str, dict[str, float]],
    *,
    reference: str,
    sets: dict[str, dict[str, int]],
) -> str:
    """What the panel shows, generated, with its noise: the largest move with its 95%
    half-width (from the paired moves' std pooled over the panel), and every pair of methods a
    knob reorders, with their gaps and whether both gaps exceed the noise of a difference of
    two methods' means (the per-set std pooled over the panel's cells). With one set per cell
    no spread is measured, and the sentence says so rather than calling a reordering real.
    ``sets``: per setting (the keys of ``orders``), the sets behind each method's score."""
    move_sd, move_df = pooled_sd(summary.move_sd, summary.n)
    set_sd, set_df = pooled_sd(summary.sd, summary.n)
    moves = summary[summary.move != 0].move.dropna()
    parts = []
    if not moves.empty:
        key = moves.abs().idxmax()
        method, b, schedule = key
        n = int(summary.loc[key].n)
        h = half_width(move_sd, move_df, n_a=n)
        noise = (
            "one set: its spread is not measured"
            if math.isnan(h)
            else f"± {h:.1f} at 95% over {n} sets, from the paired moves' pooled std "
            f"{move_sd:.1f} ({move_df} df)"
        )
        parts.append(
            f"The largest move is {moves.loc[key]:+.1f} points (`{method}`, "
            f"{_variant_name(b, schedule)}; {noise})."
        )
    ref = orders[reference]
    real: list[tuple[str, float]] = []
    within: list[tuple[str, float]] = []
    for name, scores in orders.items():
        if name == reference or set(scores) != set(ref):
            continue
        for a, b in _swaps(ref, scores):
            h = half_width(set_sd, set_df, n_a=sets[name][a], n_b=sets[name][b])
            gap_ref, gap = ref[a] - ref[b], scores[b] - scores[a]
            text = (
                f"`{b}` above `{a}` under {name} (by {gap:.1f}, against {gap_ref:.1f} the other "
                f"way under the protocol)"
            )
            (real if not math.isnan(h) and min(gap, gap_ref) > h else within).append((text, h))
    if real:
        parts.append(
            "The ranking changes beyond the noise: "
            + "; ".join(t for t, _ in real)
            + ", each gap larger than the 95% half-width of a difference of two methods' "
            f"means ({real[0][1]:.1f} points; per-set std {set_sd:.1f} pooled over the "
            "panel): methods are comparable only under one protocol."
        )
    if within:
        hs = [h for _, h in within]
        noise = (
            "with one set per cell the spread between sets is not measured, so this is not "
            "evidence of a reordering by itself"
            if any(math.isnan(h) for h in hs)
            else f"within the noise: in each pair the smaller of the two gaps is under the "
            f"95% half-width of a difference of two methods' means ({max(hs):.1f} points; "
            f"per-set std {set_sd:.1f} pooled over the panel, {set_df} df)"
        )
        parts.append("The order also changes, " + "; ".join(t for t, _ in within) + f": {noise}.")
    if not real and not within:
        parts.append(
            f"Across these knobs the ranking does not change: {_order(ref)} under the protocol."
        )
    return " ".join(parts)
