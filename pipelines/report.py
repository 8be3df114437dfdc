"""Stage ``report``: tables, CSV and figures from what MLflow recorded.

    python -m pipelines.report

Finds the MLflow runs behind the pipeline's outputs for the grid in
``params.yaml: benchmark`` (by the outputs' content hashes) and writes
``reports/benchmark.md``, ``reports/results.csv`` and ``reports/figures/``; the report is
also logged as an artefact of a ``report`` run. Works against the default SQLite store or
``$MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.common import open_stage, run_main
from wmdd import paths
from wmdd.report.benchmark import write_report


def main(argv: list[str] | None = None) -> None:
    stage = open_stage(
        "report", __doc__, argv, dataset=False, device="cpu",
        add_arguments=lambda p: p.add_argument("--out", default=str(paths.REPORTS), help="output directory"),
    )  # fmt: skip
    bench, out = stage.bench, Path(stage.args.out)
    with stage.tracked(params={}, inputs=[], datasets=",".join(bench.datasets)) as mlflow:
        table = write_report(
            mlflow.MlflowClient(), bench.datasets, bench.methods, bench.ipcs,
            experiment=bench.experiment, out=out,
        )  # fmt: skip
        for name in ("benchmark.md", "results.csv"):
            mlflow.log_artifact(str(out / name))
        mlflow.log_artifacts(str(out / "figures"), "figures")
        mlflow.log_table(data=table, artifact_file="results_table.json")  # the UI's table view
        mlflow.log_metric("cells", len(table))


if __name__ == "__main__":
    run_main(main)
