"""The protocol-sensitivity panel (``pipelines.sensitivity``, the report's panel): its
variants, its reproduction of the ``evaluate`` stage, its resumable CSV and its summary."""

from __future__ import annotations

import copy
import csv
import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipelines import diagnose, distill, evaluate, prepare, relabel, report, sensitivity, teacher
from wmdd.config import ConfigError, ModelConfig, SoftProtocolConfig, load_params
from wmdd.protocol.plan import protocol_plan
from wmdd.report.sensitivity import half_width, panel_summary, pooled_sd, render_panel
from wmdd.utils import read_json

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_variants_change_only_their_knob() -> None:
    soft = SoftProtocolConfig(student=ModelConfig("convnet", {}), epochs=30, batch_size=100)
    half = sensitivity.variant(soft, batch_size=16, schedule="half", eval_interval=5)
    assert (half.batch_size, half.schedule_epochs, half.eval_interval) == (16, 60, 5)
    assert half.relabel_mode == "online"
    full = sensitivity.variant(soft, batch_size=100, schedule="full", eval_interval=5)
    assert full.schedule_epochs == 0
    same = {f.name for f in dataclasses.fields(soft)} - {
        "batch_size", "schedule_epochs", "eval_interval", "relabel_mode",
    }  # fmt: skip
    assert all(getattr(half, k) == getattr(soft, k) for k in same)
    with pytest.raises(ValueError, match="schedule 'third'"):
        sensitivity.variant(soft, batch_size=16, schedule="third", eval_interval=5)


def test_a_cosine_that_would_rise_again_is_refused() -> None:
    with pytest.raises(ValueError, match=r"schedule_epochs: expected 0 .* >= epochs \(30"):
        SoftProtocolConfig(student=ModelConfig("convnet", {}), epochs=30, schedule_epochs=20)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits with a one-epoch teacher, random IPC 2 (one set) evaluated for 4 epochs."""
    root = tmp_path_factory.mktemp("panel")
    params = copy.deepcopy(PARAMS)
    profile = params["datasets"]["digits"]
    profile["teacher"]["epochs"] = 1
    profile["protocol"]["soft"].update(epochs=4, eval_interval=4)
    params["benchmark"].update(eval_seeds=[0], datasets=["digits"], methods=["random"], ipcs=[2])
    params["methods"]["random"]["sets"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        common = ["--dataset", "digits", "--no-progress"]
        prepare.main(common)
        teacher.main(common)
        cell = [*common, "--method", "random", "--ipc", "2"]
        distill.main(cell)
        relabel.main(cell)
        evaluate.main(cell)
        evaluate.main([*cell, "--protocol", "hard"])
        diagnose.main(cell)
    return root


PANEL = ["--dataset", "digits", "--ipc", "2", "--methods", "random", "--no-progress"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_panel_reproduces_the_protocol_and_resumes(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = workspace / "panel.csv"
    sensitivity.main([*PANEL, "--eval-interval", "2", "--out", str(out)])
    rows = _rows(out)
    # digits' batch size 100 is b = min(100, 20 images) = 20: two batch sizes x two schedules
    assert sorted((r["batch_size"], r["schedule"]) for r in rows) == [
        ("100", "full"), ("100", "half"), ("16", "full"), ("16", "half"),
    ]  # fmt: skip
    by = {(r["batch_size"], r["schedule"]): r for r in rows}
    stored = read_json(workspace / "results/digits/random/ipc2/soft/metrics.json")
    params = load_params("params.yaml")
    plan = protocol_plan(
        params.profile("digits").protocol, profile="digits", ipc=2, eval_seeds=[0], base_seed=0
    )
    protocol = by[("100", "full")]
    # online labels + validation every 2 epochs = the evaluate stage's stored run, exactly
    assert float(protocol["final_top1"]) == stored["per_set"]["0"]["0"]["top1"]
    assert (
        protocol["variant_hash"]
        == protocol["protocol_hash"]
        == plan.hash
        == stored["protocol_hash"]
    )
    assert {r["variant_hash"] for r in rows if r is not protocol}.isdisjoint({plan.hash})
    assert len({r["variant_hash"] for r in rows}) == 4
    assert {int(r["best_epoch"]) for r in rows} <= {2, 4}
    assert all(float(r["best_top1"]) >= float(r["final_top1"]) for r in rows)
    # a finished panel is not run again; another validation interval is refused
    before = out.read_bytes()
    sensitivity.main([*PANEL, "--eval-interval", "2", "--out", str(out)])
    assert out.read_bytes() == before
    with pytest.raises(ConfigError, match=r"panel.csv: written under .* --eval-interval 2"):
        sensitivity.main([*PANEL, "--eval-interval", "1", "--out", str(out)])
    # two worker processes give the same students
    two = workspace / "two.csv"
    sensitivity.main([*PANEL, "--eval-interval", "2", "--jobs", "2", "--out", str(two)])
    key = ("method", "set", "eval_seed", "batch_size", "schedule", "final_top1", "best_top1")
    assert sorted(tuple(r[k] for k in key) for r in _rows(two)) == sorted(
        tuple(r[k] for k in key) for r in rows
    )


def test_the_report_renders_the_panel_beside_its_tables(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = workspace / "report_with_panel"
    sensitivity.main([*PANEL, "--batch-sizes", "100", "--out", str(out / "sensitivity.csv")])
    report.main(["--out", str(out)])
    text = (out / "benchmark.md").read_text()
    panel = text.split("## Protocol sensitivity", 1)[1]
    assert "| `random` | 1 × 1 |" in panel
    assert "batch 100, full cosine (the protocol)" in panel and "batch 100, half cosine" in panel
    assert "Across these knobs the ranking does not change" in panel  # one method: no reorder
    assert "The largest move is" in panel


def test_missing_sets_are_named(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workspace)
    with pytest.raises(ConfigError, match=r"distilled/digits/random/ipc2: distilled sets \[3\]"):
        sensitivity.main([*PANEL, "--sets", "3", "--out", str(workspace / "x.csv")])
    assert not (workspace / "x.csv").exists()


def _panel(values: dict[tuple[str, int, str], list[float]]) -> pd.DataFrame:
    rows = []
    for (method, b, schedule), finals in values.items():
        for s, v in enumerate(finals):
            rows.append(
                {
                    "profile": "p",
                    "method": method,
                    "ipc": 10,
                    "set": s,
                    "eval_seed": 0,
                    "batch_size": b,
                    "schedule": schedule,
                    "final_top1": v,
                    "best_top1": v + 1.0,
                    "best_epoch": 250,
                    "epochs": 300,
                    "eval_interval": 50,
                    "protocol_hash": "h",
                    "variant_hash": "h" if (b, schedule) == (100, "full") else f"{b}{schedule}",
                    "seconds": 1.0,
                }  # fmt: skip
            )
    return pd.DataFrame(rows)


def test_panel_summary_by_hand() -> None:
    df = _panel(
        {
            ("random", 100, "full"): [60.0, 62.0],
            ("random", 16, "full"): [64.0, 64.0],
            ("wmdd", 100, "full"): [58.0, 58.0],
            ("wmdd", 16, "full"): [66.0, 66.0],
        }
    )
    summary = panel_summary(df)
    ref = summary.loc[("random", 100, "full")]
    assert (ref.final, ref.n, ref.move) == (61.0, 2, 0.0)
    assert summary.loc[("random", 16, "full")].move == pytest.approx(3.0)  # paired by set
    assert summary.loc[("wmdd", 16, "full")].move == pytest.approx(8.0)
    assert summary.loc[("wmdd", 100, "full")].best == pytest.approx(59.0)
    text = "\n".join(render_panel(df))
    assert "random 61.0 > wmdd 58.0" in text and "wmdd 66.0 > random 64.0" in text
    # per-set std pooled over the four cells: sqrt(2 / 4) with 4 df; the 95% half-width of a
    # difference of two 2-set means is t(4) * 0.707 * 1 = 1.96 < both gaps (3.0 and 2.0)
    assert "The ranking changes beyond the noise" in text
    assert "`wmdd` above `random` under batch 16, full cosine (by 2.0, against 3.0" in text
    assert "(1.96 points" not in text and "(2.0 points" in text
    # the largest move +8.0 (wmdd); paired moves' std: random's (4-60, 2-62) -> sd 1.414,
    # wmdd's 0 -> pooled 1.0 with 2 df; half-width t(2) * 1.0 / sqrt(2) = 3.04
    assert "The largest move is +8.0 points (`wmdd`, batch 16, full cosine; ± 3.0 at 95%" in text


def test_pooled_sd_and_half_width_by_hand() -> None:
    sd, df = pooled_sd(pd.Series([1.0, 2.0, float("nan")]), pd.Series([3, 2, 1]))
    assert df == 3 and sd == pytest.approx(((2 * 1.0 + 1 * 4.0) / 3) ** 0.5)
    assert half_width(2.0, 10, n_a=4) == pytest.approx(2.2281388 * 2.0 / 2)
    assert half_width(2.0, 10, n_a=4, n_b=4) == pytest.approx(2.2281388 * 2.0 * 0.5**0.5)
    assert pooled_sd(pd.Series([float("nan")]), pd.Series([1])) == (
        pytest.approx(float("nan"), nan_ok=True),
        0,
    )


def test_a_reordering_within_the_noise_is_not_called_a_change() -> None:
    df = _panel(
        {
            ("random", 100, "full"): [60.0, 64.0],
            ("random", 16, "full"): [61.0, 63.0],
            ("wmdd", 100, "full"): [61.0, 62.0],
            ("wmdd", 16, "full"): [62.0, 63.0],
        }
    )
    text = "\n".join(render_panel(df))
    assert "beyond the noise" not in text and "does not change" not in text
    assert "The order also changes, `wmdd` above `random` under batch 16, full cosine" in text
    # per-set std pooled over the cells: sqrt((8 + 2 + 0.5 + 0.5) / 4) = 1.658 with 4 df;
    # the half-width of a difference of two 2-set means is t(4) * 1.658 = 4.6 > the gaps
    assert "in each pair the smaller of the two gaps is under" in text
    assert "(4.6 points; per-set std 1.7 pooled over the panel, 4 df)" in text


def test_one_set_per_cell_is_not_evidence_of_a_reordering() -> None:
    df = _panel(
        {
            ("random", 100, "full"): [60.0],
            ("random", 16, "full"): [55.0],
            ("wmdd", 100, "full"): [58.0],
            ("wmdd", 16, "full"): [59.0],
        }
    )
    text = "\n".join(render_panel(df))
    assert "one set: its spread is not measured" in text
    assert "not evidence of a reordering by itself" in text and "beyond the noise" not in text


def test_panel_without_a_rank_change_says_so() -> None:
    df = _panel(
        {
            ("random", 100, "full"): [60.0, 62.0],
            ("random", 100, "half"): [61.0, 63.0],
            ("rded", 100, "full"): [50.0, 52.0],
            ("rded", 100, "half"): [50.0, 51.0],
        }
    )
    text = "\n".join(render_panel(df))
    assert "the ranking does not change" in text
    assert "random 61.0 > rded 51.0 under the protocol" in text
