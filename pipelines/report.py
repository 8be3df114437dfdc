"""Stage ``report``: tables, CSV and figures from what MLflow recorded.

    python -m pipelines.report

Reads the MLflow runs named by the pipeline's outputs for the grid in
``params.yaml: benchmark`` and writes ``reports/benchmark.md``, ``reports/results.csv``
and ``reports/figures/``; the report is also logged as an artefact of a ``report`` run.
Works against the default SQLite store or ``$MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from pipelines.common import base_parser, load_checked, run_main
from wmdd import paths
from wmdd.report.benchmark import (
    NOISE_SYNTHESISED,
    collect_cells,
    plot_accuracy,
    render_markdown,
    results_frame,
)
from wmdd.tracking.runs import package_versions, stage_run
from wmdd.utils import atomic_dir, atomic_file, resolve_device


def copy_grids(client, cells, figures_dir: Path) -> dict[str, list[str]]:
    """Copies the preview grids logged by noise-synthesising methods' distill runs."""
    figures: dict[str, list[str]] = {}
    for c in cells:
        if c.method not in NOISE_SYNTHESISED:
            continue
        name = f"{c.profile}_{c.method}_ipc{c.ipc}.png"
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(c.distill.info.run_id, "preview.png", tmp)
            shutil.copy(local, figures_dir / name)
        figures.setdefault(c.profile, []).append(f"figures/{name}")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = base_parser(__doc__, dataset=False)
    parser.add_argument("--out", default=str(paths.REPORTS), help="output directory")
    args = parser.parse_args(argv)
    params = load_checked(args.params)
    bench = params.benchmark
    out = Path(args.out)
    with stage_run(
        experiment=bench.experiment,
        stage="report",
        run_name="report",
        tags={"datasets": ",".join(bench.datasets)},
        params={},
        inputs=[],
        device=resolve_device("cpu"),
    ) as mlflow:
        client = mlflow.MlflowClient()
        cells, teachers = collect_cells(client, bench.datasets, bench.methods, bench.ipcs)
        df = results_frame(cells, teachers)
        with atomic_dir(out / "figures") as fig_dir:
            figures = copy_grids(client, cells, fig_dir)
            for profile in bench.datasets:
                plot_accuracy(df, profile, fig_dir / f"{profile}_accuracy.png")
                figures.setdefault(profile, []).insert(0, f"figures/{profile}_accuracy.png")
        text = render_markdown(df, teachers, versions=package_versions(), figures=figures)
        with atomic_file(out / "benchmark.md") as tmp:
            tmp.write_text(text)
        with atomic_file(out / "results.csv") as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")
        mlflow.log_artifact(str(out / "benchmark.md"))
        mlflow.log_artifact(str(out / "results.csv"))
        mlflow.log_metric("cells", len(df))


if __name__ == "__main__":
    run_main(main)
