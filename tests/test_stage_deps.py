"""Every project file a DVC stage runs is one of its ``deps`` in ``dvc.yaml``.

For each stage, a fresh interpreter imports the stage's entry module (``python -m
pipelines.<stage>`` in its ``cmd``); for ``distill`` it also resolves every registered method
through the lazy registry, as the stage does for its own. Then every project import found
in the loaded modules' source (including imports inside functions) is followed until
nothing new loads. Each loaded project file must lie under one of the stage's code deps
(a file, or a folder above it), and each code dep must cover at least one loaded file (so
deps stay narrow).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE_ROOTS = ("wmdd", "baselines", "pipelines")

# Runs in a fresh interpreter: argv = [entry module, "methods" or ""].
LOADER = r"""
import ast, importlib, json, sys
from pathlib import Path

root = Path.cwd().resolve()
entry, with_methods = sys.argv[1], sys.argv[2] == "methods"
importlib.import_module(entry)
if with_methods:
    from pipelines.registry import METHODS, get_method
    for name in METHODS:
        get_method(name)

def project_files():
    out = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve().is_relative_to(root) and name.split(".")[0] in {ROOTS}:
            out[name] = Path(f).resolve()
    return out

seen = set()
while True:
    mods = project_files()
    todo = [n for n in mods if n not in seen]
    if not todo:
        break
    for name in todo:
        seen.add(name)
        for node in ast.walk(ast.parse(mods[name].read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t.split(".")[0] in {ROOTS}:
                    try:
                        importlib.import_module(t)
                    except ImportError:
                        pass  # `from pkg import name` where name is not a module
print(json.dumps(sorted(str(p.relative_to(root)) for p in project_files().values())))
""".replace("{ROOTS}", repr(set(CODE_ROOTS)))


def stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def entry_module(stage: dict) -> str:
    match = re.search(r"python -m (pipelines\.\w+)", stage["cmd"])
    assert match, f"cmd {stage['cmd']!r} does not run a pipelines module"
    return match.group(1)


def code_deps(stage: dict) -> list[str]:
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    return [d for d in deps if "${" not in d and d.split("/")[0] in CODE_ROOTS]


def loaded_files(entry: str, with_methods: bool) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", LOADER, entry, "methods" if with_methods else ""],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def uncovered(files: list[str], deps: list[str]) -> list[str]:
    return [f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)]


def unused(files: list[str], deps: list[str]) -> list[str]:
    return [d for d in deps if not any(f == d or f.startswith(d.rstrip("/") + "/") for f in files)]


@pytest.mark.parametrize("name", sorted(stages()))
def test_stage_deps_cover_the_code_it_runs(name: str) -> None:
    stage = stages()[name]
    files = loaded_files(entry_module(stage), with_methods=name == "distill")
    deps = code_deps(stage)
    missing = uncovered(files, deps)
    assert not missing, (
        f"stage {name!r} runs {missing}, which its deps in dvc.yaml do not cover: "
        "add the file's folder (or root module) to the stage's deps"
    )
    stale = unused(files, deps)
    assert not stale, f"stage {name!r} lists deps it never loads: {stale}"


def test_checker_fails_when_a_dep_is_dropped() -> None:
    """The check can fail: without ``wmdd/utils.py`` the evaluate stage is not covered."""
    stage = stages()["evaluate"]
    files = loaded_files(entry_module(stage), with_methods=False)
    deps = [d for d in code_deps(stage) if d != "wmdd/utils.py"]
    assert uncovered(files, deps) == ["wmdd/utils.py"]


def test_prepare_loads_no_method_and_no_pot() -> None:
    """Methods are resolved lazily: preparing data imports no method code."""
    files = loaded_files("pipelines.prepare", with_methods=False)
    assert not [f for f in files if f.startswith(("baselines/", "wmdd/method/"))], files
    assert "pipelines/registry.py" not in files
