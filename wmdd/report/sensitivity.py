"""The report's protocol-sensitivity panel, from ``pipelines.sensitivity``'s CSV.

The panel asks how far the soft-label protocol's own knobs (the student's batch size, a full
or a half cosine, the final or the best epoch) move each method's score, and whether they
change the methods' order. The reference is the row whose settings hash is the protocol's
own (the profile's batch size, the full cosine, the final epoch): the main table's number.
Each move is paired: the mean over sets and eval seeds of (variant - reference) on the same
distilled set and seed. The best epoch appears only here, never in the main table.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

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
    per-set means over eval seeds), ``n`` (sets) and ``move`` (the mean paired difference
    of the final top-1 from the reference variant, over the sets both have)."""
    ref_b, ref_s = _reference(df)
    final, best = _per_set(df, "final_top1"), _per_set(df, "best_top1")
    rows = []
    for (method, b, schedule), g in final.groupby(level=[0, 1, 2]):
        try:
            ref = final.loc[(method, ref_b, ref_s)]  # per set
        except KeyError:
            ref = pd.Series(dtype=float)  # this method lacks the reference: no move
        sets = g.index.get_level_values("set")
        common = [s for s in sets if s in ref.index]
        move = (
            sum(g.loc[(method, b, schedule, s)] - ref.loc[s] for s in common) / len(common)
            if common
            else float("nan")
        )
        rows.append(
            {
                "method": method,
                "batch_size": int(b),
                "schedule": schedule,
                "final": float(g.mean()),
                "best": float(best.loc[(method, b, schedule)].mean()),
                "n": len(g),
                "move": float(move),
            }
        )
    return pd.DataFrame(rows).set_index(["method", "batch_size", "schedule"])


def _variant_name(b: int, schedule: str) -> str:
    return f"batch {b}, {schedule} cosine"


def _order(scores: dict[str, float]) -> str:
    ranked = sorted(scores, key=lambda m: -scores[m])
    return " > ".join(f"{m} {scores[m]:.1f}" for m in ranked)


def _ranking(scores: dict[str, float]) -> tuple[str, ...]:
    return tuple(sorted(scores, key=lambda m: -scores[m]))


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
    orders: dict[str, dict[str, float]] = {}
    for b, s in variants:
        scores = {
            m: float(summary.loc[(m, b, s)].final) for m in methods if (m, b, s) in summary.index
        }
        orders[_variant_name(b, s)] = scores
    orders["best epoch, protocol settings"] = {
        m: float(summary.loc[(m, ref_b, ref_s)].best) for m in methods
    }
    lines += ["", "The methods' order under each setting (final top-1 unless named):", ""]
    lines += [f"- {name}: {_order(scores)}" for name, scores in orders.items()]
    lines += ["", panel_sentence(summary, orders, reference=_variant_name(ref_b, ref_s))]
    return lines


def panel_sentence(
    summary: pd.DataFrame, orders: dict[str, dict[str, float]], *, reference: str
) -> str:
    """What the panel shows, generated: the largest move and whether any knob reorders the
    methods that every setting has."""
    moves = summary[summary.move != 0].move.dropna()
    parts = []
    if not moves.empty:
        key = moves.abs().idxmax()
        method, b, schedule = key
        parts.append(
            f"The largest move is {moves.loc[key]:+.1f} points (`{method}`, "
            f"{_variant_name(b, schedule)})."
        )
    ref = orders[reference]
    changed = [
        name
        for name, scores in orders.items()
        if name != reference and set(scores) == set(ref) and _ranking(scores) != _ranking(ref)
    ]
    if changed:
        parts.append(
            "The ranking changes under "
            + "; ".join(f"{name} ({_order(orders[name])})" for name in changed)
            + f", against {_order(ref)} under the protocol: the ranking changes with the "
            "protocol, so methods are comparable only under one protocol."
        )
    else:
        parts.append(
            f"Across these knobs the ranking does not change: {_order(ref)} under the protocol."
        )
    return " ".join(parts)
