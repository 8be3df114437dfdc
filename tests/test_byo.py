"""Bring your own set or method: an external set (``baselines.external``) and a method from an
installed plugin package (entry-point group ``wmdd_bench.methods``), each run through the
digits pipeline's stages into the report, and the checks that refuse a mismatched set."""

from __future__ import annotations

import copy
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from baselines.external import ExternalConfig, external_set, source_digest
from pipelines import diagnose, distill, evaluate, prepare, registry, relabel, report, teacher
from wmdd.config import ConfigError, load_params
from wmdd.data import load_data
from wmdd.synthetic_set import SyntheticSet
from wmdd.utils import read_json

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
IPC = 2

PLUGIN_INIT = '''
"""A tiny plugin: declares its method; the method's module is imported only when run."""
from pipelines.registry import MethodRef

METHOD = MethodRef(
    module="tiny_means.method",
    fn="class_means",
    config="MeansConfig",
    needs_teacher=False,
    description="per class, the means of random pairs of real images",
)
'''

PLUGIN_METHOD = """
from dataclasses import dataclass

import torch

from wmdd.synthetic_set import SyntheticSet
from wmdd.utils import generator


@dataclass(frozen=True)
class MeansConfig:
    pool: int = 2  # real images averaged into each image


def class_means(*, teacher, data, classes, ipc, config, seed, device, progress=True):
    images, labels = [], []
    for c in classes:
        idx = data.train_indices_of_class(c)
        gen = generator(seed, "tiny_means", c)
        for _ in range(ipc):
            pick = idx[torch.randperm(len(idx), generator=gen)[: config.pool]]
            images.append(data.normalize(data.train_images(pick)).mean(0))
            labels.append(c)
    return SyntheticSet(torch.stack(images).to(device), torch.tensor(labels, device=device))
"""

PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "tiny-means"
version = "0.3.1"

[project.entry-points."wmdd_bench.methods"]
tiny_means = "tiny_means:METHOD"

[tool.setuptools]
packages = ["tiny_means"]
"""


def install_plugin(tmp: Path) -> Path:
    """Builds and installs the tiny plugin with pip into its own folder (no network, no
    change to the test environment); returns the folder to put on ``sys.path``."""
    src = tmp / "tiny-means"
    (src / "tiny_means").mkdir(parents=True)
    (src / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (src / "tiny_means/__init__.py").write_text(PLUGIN_INIT)
    (src / "tiny_means/method.py").write_text(PLUGIN_METHOD)
    site = tmp / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--target", str(site), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    return site


def write_image_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, classes) -> None:
    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        folder = root / classes[int(y)]
        folder.mkdir(parents=True, exist_ok=True)
        array = x.permute(1, 2, 0).numpy()
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(
            folder / f"{i:03d}.png"
        )


@pytest.fixture()
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    site = install_plugin(tmp_path)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    registry.reload_plugins()
    yield site
    registry.reload_plugins()
    for name in [m for m in sys.modules if m.startswith("tiny_means")]:
        del sys.modules[name]


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Digits prepared, a one-epoch teacher, 2-epoch protocols, one eval seed."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = copy.deepcopy(PARAMS)
    profile = params["datasets"]["digits"]
    profile["teacher"]["epochs"] = 1
    profile["protocol"]["soft"].update(epochs=2, eval_interval=2)
    profile["protocol"]["hard"].update(epochs=2)
    params["benchmark"].update(datasets=["digits"], ipcs=[IPC], eval_seeds=[0])
    params["methods"]["random"]["sets"] = 1
    (ws / "params.yaml").write_text(yaml.safe_dump(params))
    prepare.main(["--dataset", "digits", "--no-progress"])
    return ws


def _set_params(ws: Path, **edits) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for key, value in edits.items():
        params["methods"][key] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(params))


def _run_cell(method: str) -> None:
    cell = ["--dataset", "digits", "--method", method, "--ipc", str(IPC), "--no-progress"]
    distill.main(cell)
    diagnose.main(cell)
    relabel.main(cell)
    evaluate.main(cell)
    evaluate.main([*cell, "--protocol", "hard"])


def _digits_pixels(ws: Path, per_class: int = IPC):
    data = load_data(ws / "data/digits", load_params("params.yaml").profile("digits").data)
    picks = torch.cat([data.train_indices_of_class(c)[-per_class:] for c in range(10)])
    return data, data.train_images(picks), data.train_y[picks]


def test_an_external_folder_and_a_plugin_reach_the_report(
    workspace: Path, plugin_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, pixels, labels = _digits_pixels(workspace)
    folder = workspace.parent / "my_set" / f"ipc{IPC}"
    write_image_folder(folder, pixels, labels, data.classes)
    _set_params(
        workspace,
        my_set={"method": "external", "path": str(folder.parent / "ipc{ipc}")},
        tiny_means={"pool": 3},
    )
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["benchmark"]["methods"] = ["random", "my_set", "tiny_means"]
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    teacher.main(["--dataset", "digits", "--no-progress"])
    for method in ("random", "my_set", "tiny_means"):
        _run_cell(method)
    # the external set holds exactly the folder's pixels, normalised, with its content hash
    cell = workspace / f"distilled/digits/my_set/ipc{IPC}/set0"
    stored = SyntheticSet.load(cell / "set.pt")
    order = torch.argsort(labels, stable=True)
    assert torch.equal(stored.labels, labels[order])
    assert torch.equal(stored.images, data.normalize(pixels[order]))
    meta = read_json(cell / "meta.json")
    assert meta["source"]["sha256"] == source_digest(folder)
    assert meta["source"]["format"] == "imagefolder"
    # the plugin ran with its own config and is named as a plugin with its version
    plugin_meta = read_json(workspace / f"distilled/digits/tiny_means/ipc{IPC}/set0/meta.json")
    assert plugin_meta["config"] == {"pool": 3}
    assert plugin_meta["method_source"] == "plugin tiny-means 0.3.1"
    # image_bytes (the report's storage column): the stored images' bytes, on disk in set.pt
    import mlflow

    runs = mlflow.search_runs(
        experiment_names=[PARAMS["benchmark"]["experiment"]],
        filter_string="tags.stage = 'distill' and tags.method = 'my_set'",
    )
    logged = float(runs["metrics.image_bytes"].iloc[0])
    assert logged == stored.images.numel() * 4 > 0
    on_disk = (cell / "set.pt").stat().st_size
    assert 0 < on_disk - logged < stored.labels.numel() * 8 + 4096  # + labels and pickle framing
    report.main(["--out", "reports"])
    text = (workspace / "reports/benchmark.md").read_text()
    for row in ("`random`", "`my_set`", "`tiny_means`"):
        assert f"| {row} | {IPC} |" in text
    csv_text = (workspace / "reports/results.csv").read_text()
    assert csv_text.count("my_set") == 2 and csv_text.count("tiny_means") == 2  # both protocols


def test_a_plugin_cannot_shadow_a_built_in_or_be_anything_but_a_method_ref(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = install_plugin(tmp_path)
    entry = next(site.glob("tiny_means-*.dist-info")) / "entry_points.txt"
    monkeypatch.syspath_prepend(str(site))
    registry.reload_plugins()
    try:
        entry.write_text("[wmdd_bench.methods]\nrandom = tiny_means:METHOD\n")
        with pytest.raises(ConfigError, match="'random' is a built-in method"):
            registry.registered()
        registry.reload_plugins()
        entry.write_text("[wmdd_bench.methods]\nodd = tiny_means.method:MeansConfig\n")
        with pytest.raises(ConfigError, match="expected a pipelines.registry.MethodRef, got type"):
            registry.registered()
        registry.reload_plugins()
        entry.write_text("[wmdd_bench.methods]\ngone = tiny_means.nothing:METHOD\n")
        with pytest.raises(ConfigError, match="gone = .* cannot be loaded: ModuleNotFoundError"):
            registry.registered()
        # a broken plugin is named when asked for, and never stops a built-in
        with pytest.raises(ConfigError, match="gone = .* cannot be loaded"):
            registry.get_method("gone")
        assert registry.get_method("random").source == "built-in"
        with pytest.raises(ConfigError, match=r"unknown method 'nope'; registered: .*gone.*random"):
            registry.get_method("nope")
    finally:
        registry.reload_plugins()
        for name in [m for m in sys.modules if m.startswith("tiny_means")]:
            del sys.modules[name]


def test_a_row_names_a_registered_method() -> None:
    params = load_params(ROOT / "params.yaml")
    rows = {**params.methods, "mine": {"method": "nope"}, "random2": {"method": "random"}}
    params = type(params)(**{**params.__dict__, "methods": rows})
    with pytest.raises(ConfigError, match=r"methods.mine.method: unknown method 'nope'"):
        registry.method_name(params, "mine")
    assert registry.method_name(params, "random2") == "random"
    rows["random"] = {"method": "wmdd"}
    with pytest.raises(ConfigError, match="'random' is a registered method itself"):
        registry.method_name(params, "random")


# -- the checks on an external set --------------------------------------------------------


def _run_external(ws: Path, path: Path, ipc: int = IPC) -> SyntheticSet:
    data = load_data(ws / "data/digits", load_params("params.yaml").profile("digits").data)
    return external_set(
        teacher=None, data=data, classes=range(10), ipc=ipc,
        config=ExternalConfig(str(path)), seed=0, device=torch.device("cpu"), progress=False,
    )  # fmt: skip


def test_wrong_classes_sizes_counts_and_ranges_are_refused(workspace: Path) -> None:
    data, pixels, labels = _digits_pixels(workspace)
    root = workspace / "folder"
    write_image_folder(root, pixels, labels, data.classes)
    assert len(_run_external(workspace, root).labels) == 10 * IPC
    with pytest.raises(ValueError, match=r"expected 3 images per class .* found \{"):
        _run_external(workspace, root, ipc=3)
    # a class folder renamed: missing and unexpected classes named
    (root / data.classes[0]).rename(root / "zero")
    with pytest.raises(
        ValueError, match=rf"missing \['{data.classes[0]}'\], unexpected \['zero'\]"
    ):
        _run_external(workspace, root)
    (root / "zero").rename(root / data.classes[0])
    # an image of another size: the file, the expected and found sizes
    bad = next((root / data.classes[1]).iterdir())
    res = data.resolution
    Image.new("L", (res + 1, res)).save(bad)
    with pytest.raises(
        ValueError, match=rf"{bad.name}: expected {res}x{res} .* found {res + 1}x{res}"
    ):
        _run_external(workspace, root)
    # a colour image for a greyscale profile (or the reverse): the mode is named
    Image.new("RGB" if data.channels == 1 else "L", (res, res)).save(bad)
    with pytest.raises(ValueError, match=rf"{bad.name}: image mode (RGB|L), expected one of"):
        _run_external(workspace, root)
    # tensor files: class order, pixel range, shape
    file = workspace / "set.pt"
    floats = pixels.float() / 255
    torch.save({"images": floats, "labels": labels, "classes": list(data.classes)}, file)
    out = _run_external(workspace, file)
    order = torch.argsort(labels, stable=True)
    want = (floats[order] - torch.tensor(data.mean).view(1, -1, 1, 1)) / torch.tensor(
        data.std
    ).view(1, -1, 1, 1)
    assert torch.allclose(out.images, want) and torch.equal(out.labels, labels[order])
    swapped = list(data.classes)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    torch.save({"images": floats, "labels": labels, "classes": swapped}, file)
    with pytest.raises(
        ValueError, match="set.pt: classes: the classes do not match the profile .another order"
    ):
        _run_external(workspace, file)
    torch.save({"images": floats * 2 - 1, "labels": labels, "classes": list(data.classes)}, file)
    with pytest.raises(ValueError, match=r"expected pixel values in \[0, 1\] .*found \[-1, 1\]"):
        _run_external(workspace, file)
    torch.save({"images": floats[:, :, :-1], "labels": labels, "classes": list(data.classes)}, file)
    with pytest.raises(ValueError, match=r"images: expected \(N, 1, 8, 8\)|images: expected \(N, "):
        _run_external(workspace, file)
    torch.save({"images": floats, "labels": labels}, file)
    with pytest.raises(
        ValueError, match=r"expected a dict with keys \['classes', 'images', 'labels'\]"
    ):
        _run_external(workspace, file)


def test_a_refused_set_leaves_no_output(workspace: Path) -> None:
    data, pixels, labels = _digits_pixels(workspace, per_class=IPC + 1)
    root = workspace.parent / "three"
    write_image_folder(root, pixels, labels, data.classes)
    _set_params(workspace, mine={"method": "external", "path": str(root)})
    with pytest.raises(ValueError, match=r"expected 2 images per class"):
        distill.main(
            ["--dataset", "digits", "--method", "mine", "--ipc", str(IPC), "--no-progress"]
        )
    assert not (workspace / f"distilled/digits/mine/ipc{IPC}").exists()  # no output at all
    shutil.rmtree(root)
