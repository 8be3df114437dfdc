"""End-to-end: ``dvc repro`` of the default pipeline in a temporary copy of the repository.

Checks the default run completes and writes the report and CSV, that the report's numbers
equal what MLflow recorded, that a second ``dvc repro`` does no work, that changing one
method parameter or one code file invalidates exactly the stages that depend on it, and
that a forced re-run changes nothing.

The copy runs three of the five methods at IPC 1 and 10, with shorter loops, set with DVC's
own ``-S`` machinery (``E2E_OVERRIDES``): the pipeline's mechanics are under test here, not
its accuracy (every method's code is tested on its own), and CI's time is shared.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.e2e


def _run(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "DVC_NO_ANALYTICS": "1",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, **kw)


E2E_OVERRIDES = [
    "benchmark.methods=[random,dm,wmdd]",  # a real-image, a real-init and a noise method
    "benchmark.eval_seeds=[0,1]",
    "benchmark.sets=2",  # two distilled sets per cell: the set level of the statistics
    "methods.random.sets=2",
    "datasets.digits.protocol.soft.epochs=100",
    "datasets.digits.protocol.soft.eval_interval=50",
    "datasets.digits.protocol.hard.epochs=100",
    "methods.wmdd.synthesis.iterations=100",
    "methods.sre2l.synthesis.iterations=100",
    "methods.dm.iterations=100",
]


def _copy_repo(dest: Path) -> None:
    """Copies the working tree's tracked and non-ignored files (no data, no stores)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for rel in listed:
        src = ROOT / rel
        if not src.is_file() or rel.startswith(("reports/", "dvc.lock")):
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
    assert (dest / ".dvc" / "config").is_file(), "dvc init must be committed"
    from dvc.utils.hydra import apply_overrides

    apply_overrides(dest / "params.yaml", E2E_OVERRIDES)
    _run(["git", "init", "-q"], dest)
    _run(["git", "add", "-A"], dest)
    assert _run(["git", "commit", "-qm", "copy"], dest).returncode == 0


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("repo")
    _copy_repo(dest)
    start = time.perf_counter()
    proc = _run([str(BIN / "dvc"), "repro"], dest)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    print(f"default pipeline: {time.perf_counter() - start:.0f} s")
    if os.environ.get("WMDD_E2E_RESULTS"):  # .ci/run compares it with the committed table
        shutil.copy(dest / "reports" / "results.csv", os.environ["WMDD_E2E_RESULTS"])
    return dest


def test_default_run_writes_report_and_csv(repo: Path) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())["benchmark"]
    rows = list(csv.DictReader((repo / "reports" / "results.csv").open()))
    cells = [(r["profile"], r["method"], int(r["ipc"]), r["protocol"]) for r in rows]
    expected = {
        (d, m, k, p)
        for d in params["datasets"]
        for m in params["methods"]
        for k in params["ipcs"]
        for p in ("soft", "hard")
    }
    assert sorted(cells) == sorted(expected)  # every cell under both protocols, once
    for r in rows:
        # the spread is over the distilled sets; each set saw every eval seed
        assert (int(r["seeds"]), int(r["sets"])) == (params["sets"], params["sets"])
        assert int(r["eval_seeds"]) == len(params["eval_seeds"]) and r["std_over"] == "sets"
        assert 0.0 <= float(r["top1_mean"]) <= 100.0
        assert float(r["teacher_top1"]) >= 95.0, "digits teacher must reach 95% top-1"
    text = (repo / "reports" / "benchmark.md").read_text()
    assert "mean ± sample std" in text and rows[0]["protocol_hash"] in text
    assert (repo / "reports" / "figures" / "digits_accuracy.png").stat().st_size > 1000


def test_report_numbers_equal_mlflow(repo: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    for r in csv.DictReader((repo / "reports" / "results.csv").open()):
        run = client.get_run(r["evaluate_run_id"])
        assert run.data.tags["method"] == r["method"]
        assert float(r["top1_mean"]) == pytest.approx(run.data.metrics["top1_mean"], abs=1e-4)
        assert float(r["top1_std"]) == pytest.approx(run.data.metrics["top1_std"], abs=1e-4)
    stages = {
        run.data.tags["stage"]
        for run in client.search_runs(
            [client.get_experiment_by_name("wmdd-benchmark").experiment_id]
        )
    }
    assert stages == {
        "prepare",
        "teacher",
        "teacher_stats",
        "distill",
        "relabel",
        "evaluate",
        "evaluate_hard",
        "diagnose",
        "report",
    }


def test_mlflow_runs_are_laid_out_for_comparing(repo: Path) -> None:
    """What the MLflow UI's compare view needs: the cell and the protocol as params, only the
    selected protocol's settings, per-epoch curves, the dataset input, the report's table."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("wmdd-benchmark").experiment_id
    row = next(r for r in csv.DictReader((repo / "reports" / "results.csv").open())
               if (r["method"], r["ipc"], r["protocol"]) == ("wmdd", "10", "soft"))  # fmt: skip
    run = client.get_run(row["evaluate_run_id"])
    assert run.info.run_name == "evaluate/digits/wmdd/ipc10"
    params = run.data.params
    assert {k: params[k] for k in ("dataset", "method", "ipc", "budget")} == {
        "dataset": "digits", "method": "wmdd", "ipc": "10", "budget": "cpu"
    }  # fmt: skip
    assert params["protocol.kind"] == "soft" and params["eval_seeds"] == "[0, 1]"
    assert not [k for k in params if k.startswith(("protocol.hard", "protocol.soft"))]
    assert params["protocol_hash"] == row["protocol_hash"]
    assert params["sets"] == "[0, 1]"
    for metric in ("set0.seed0.top1", "set1.seed1.top5"):  # which set, which eval seed
        steps = [m.step for m in client.get_metric_history(run.info.run_id, metric)]
        assert steps == [50, 100], (metric, steps)  # eval_interval 50 of 100 epochs
    # The distill run's loss curves, per set and component (WMDD: feature and BN terms).
    (distill,) = client.search_runs(
        [exp], "tags.stage = 'distill' and tags.method = 'wmdd' and tags.ipc = '10'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )  # fmt: skip
    for name in ("set0.synthesis.feature", "set1.synthesis.bn"):
        history = client.get_metric_history(distill.info.run_id, name)
        assert len(history) > 10 and history[-1].step == 100, name  # 100 iterations
    (dataset,) = run.inputs.dataset_inputs
    manifest = json.loads((repo / "data" / "digits" / "manifest.json").read_text())
    assert dataset.dataset.name == "digits"
    assert dataset.dataset.digest == manifest["checksums"]["data.pt"][:16]
    (report,) = client.search_runs(
        [exp], "tags.stage = 'report'", order_by=["attributes.start_time DESC"], max_results=1
    )
    artifacts = {a.path for a in client.list_artifacts(report.info.run_id)}
    assert {"results_table.json", "benchmark.md", "figures"} <= artifacts


def test_second_repro_does_no_work(repo: Path) -> None:
    start = time.perf_counter()
    proc = _run([str(BIN / "dvc"), "repro"], repo)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    assert "Running stage" not in proc.stdout, proc.stdout
    assert elapsed < 30, f"no-op repro took {elapsed:.1f} s"


def test_method_param_invalidates_only_dependants(repo: Path) -> None:
    params_file = repo / "params.yaml"
    original = params_file.read_text()
    try:
        params_file.write_text(original.replace("    draw: 0", "    draw: 1", 1))
        assert params_file.read_text() != original
        proc = _run([str(BIN / "dvc"), "status", "--json"], repo)
        changed = set(json.loads(proc.stdout))
        assert changed and all(s.startswith("distill@") and "-random-" in s for s in changed), (
            changed
        )
    finally:
        params_file.write_text(original)


def _status_after_edit(repo: Path, rel: str) -> set[str]:
    """Stages ``dvc status`` lists after appending a comment to ``rel`` (then restored)."""
    path = repo / rel
    original = path.read_text()
    try:
        path.write_text(original + "\n# an edit\n")
        proc = _run([str(BIN / "dvc"), "status", "--json"], repo)
        assert proc.returncode == 0, proc.stderr
        return set(json.loads(proc.stdout))
    finally:
        path.write_text(original)


def test_code_edits_invalidate_exactly_the_stages_that_run_the_code(repo: Path) -> None:
    every = {s for s in _stage_names(repo)}
    assert _status_after_edit(repo, "wmdd/utils.py") == every
    assert _status_after_edit(repo, "wmdd/report/benchmark.py") == {"report"}
    protocol = _status_after_edit(repo, "wmdd/protocol/soft.py")
    assert protocol and all(
        s.split("@")[0] in {"relabel", "evaluate", "evaluate_hard", "diagnose"} for s in protocol
    )
    distill = _status_after_edit(repo, "baselines/dm.py")
    assert distill == {s for s in every if s.startswith("distill@")}
    assert _status_after_edit(repo, "pipelines/teacher_stats.py") == {"teacher_stats@digits"}


def _stage_names(repo: Path) -> list[str]:
    proc = _run([str(BIN / "dvc"), "stage", "list", "--name-only"], repo)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


# One stage of each kind; report first: it reads the newest runs, and the forced re-runs
# below add newer ones (with other timings) that a later report would cite.
FORCED = [
    "report",
    "prepare@digits",
    "teacher@digits",
    "teacher_stats@digits",
    "distill@digits-wmdd-1",
    "relabel@digits-random-1",
    "evaluate@digits-random-1",
    "evaluate_hard@digits-random-1",
    "diagnose@digits-random-1",
]


def test_forced_rerun_with_unchanged_inputs_changes_nothing(repo: Path) -> None:
    """Outputs hold no run metadata: re-running any stage writes the same bytes, so
    ``dvc.lock`` stays byte-identical and ``dvc status`` has nothing to report."""
    lock = (repo / "dvc.lock").read_bytes()
    for stage in FORCED:
        proc = _run([str(BIN / "dvc"), "repro", "--force", "--single-item", stage], repo)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert f"Running stage '{stage}'" in proc.stdout
        assert (repo / "dvc.lock").read_bytes() == lock, f"dvc.lock changed after {stage}"
    proc = _run([str(BIN / "dvc"), "status", "--json"], repo)
    assert json.loads(proc.stdout) == {}, proc.stdout


def test_parallel_runner_writes_what_sequential_repro_wrote(repo: Path, tmp_path: Path) -> None:
    """``python -m pipelines.parallel`` on a sub-grid (2 local workers, distillations in 2 class
    shards, evaluations one task per seed) writes byte-identical outputs and the same
    ``dvc.lock`` entries as the sequential ``dvc repro`` of the fixture."""
    pytest.importorskip("distributed", reason="the cluster extra is not installed")
    from dvc.utils.hydra import apply_overrides

    dest = tmp_path / "parallel"
    dest.mkdir()
    _copy_repo(dest)
    apply_overrides(dest / "params.yaml", ["benchmark.methods=[random,wmdd]", "benchmark.ipcs=[1]"])
    proc = _run(
        [
            str(BIN / "python"),
            "-m",
            "pipelines.parallel",
            "--workers",
            "2",
            "--shards",
            "2",
            "--seed-tasks",
        ],
        dest,  # fmt: skip
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "classes 0:" in proc.stderr and "seed 1" in proc.stderr  # split into tasks
    ours = yaml.safe_load((dest / "dvc.lock").read_text())["stages"]
    theirs = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    common = [s for s in ours if s != "report"]
    assert len(common) == 3 + 5 * 2  # prepare, teacher, teacher_stats; 5 stages x 2 cells
    for stage in common:
        assert ours[stage]["outs"] == theirs[stage]["outs"], stage
    status = _run([str(BIN / "dvc"), "status", "--json"], dest)
    assert json.loads(status.stdout) == {}, status.stdout


def test_dvc_plots_render_the_declared_plots(repo: Path) -> None:
    """``dvc plots show`` finds accuracy vs IPC (one series per method), the students' and the
    teacher's curves."""
    proc = _run([str(BIN / "dvc"), "plots", "show", "--json"], repo)
    assert proc.returncode == 0, proc.stderr
    plots = json.loads(proc.stdout)["data"]
    assert "reports/plots/accuracy/digits.csv" in plots
    assert "models/digits/curve.csv" in plots
    assert "results/digits/wmdd/ipc10/soft/curve.csv" in plots
    assert "results/digits/wmdd/ipc10/hard/curve.csv" in plots
    accuracy = plots["reports/plots/accuracy/digits.csv"][0]["content"]["data"]["values"]
    methods = yaml.safe_load((repo / "params.yaml").read_text())["benchmark"]["methods"]
    assert {v["field"] for v in accuracy} == set(methods)
