"""Tests of the Tiny-ImageNet and CIFAR-10 readers (wmdd.data.tiny_imagenet, wmdd.data.cifar)
on tiny fixtures written in the official layouts; class identity is encoded in pixel colour."""

from __future__ import annotations

import collections
import hashlib
import pickle
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wmdd.data.cifar  # noqa: F401  (registers cifar10)
import wmdd.data.tiny_imagenet  # noqa: F401  (registers tiny_imagenet)
from wmdd.config import DataConfig
from wmdd.data import load_prepared
from wmdd.data.cifar import CIFAR10_CLASSES, UnsafePickleError
from wmdd.data.folder import LayoutError
from wmdd.data.prepare import prepare_dataset

# -- helpers -----------------------------------------------------------------------------


def _prepare(cfg: DataConfig, tmp_path: Path, name: str = "out") -> tuple[dict, object]:
    out = tmp_path / name
    out.mkdir()
    manifest = prepare_dataset(cfg, out)
    return manifest, load_prepared(out, verify=True)


def _prepare_fails(cfg: DataConfig, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    prepare_dataset(cfg, tmp_path / "out")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _zip_tree(tree: Path, archive: Path) -> Path:
    """Zips ``tree`` with member names starting at ``tree.name/``."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(tree.rglob("*")):
            zf.write(path, path.relative_to(tree.parent).as_posix())
    return archive


def _tar_tree(tree: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tree, arcname=tree.name)
    return archive


# -- Tiny-ImageNet fixtures --------------------------------------------------------------

# wnids.txt lists the classes in this (unsorted) order; labels must follow it.
WNIDS = ["n09999999", "n01000001", "n05555555"]
WNID_COLOURS = {"n09999999": (220, 30, 30), "n01000001": (30, 200, 40), "n05555555": (20, 40, 230)}
TRAIN_COUNTS = [3, 2, 4]  # per class, in WNIDS order
VAL_WNIDS = ["n05555555", "n09999999", "n01000001", "n05555555", "n05555555", "n09999999"]
VAL_COUNTS = [2, 1, 3]  # of VAL_WNIDS, in WNIDS order


def _solid_jpeg(path: Path, colour: tuple[int, int, int], size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="JPEG", quality=95)


def _make_tiny(parent: Path) -> Path:
    """``parent/tiny-imagenet-200`` in the official layout, with solid-colour 8x8 JPEGs."""
    root = parent / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in WNIDS))
    (root / "words.txt").write_text("".join(f"{w}\tsome words\n" for w in sorted(WNIDS)))
    for wnid, n in zip(WNIDS, TRAIN_COUNTS, strict=True):
        for i in range(n):
            _solid_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", WNID_COLOURS[wnid])
        boxes = "".join(f"{wnid}_{i}.JPEG\t0\t0\t7\t7\n" for i in range(n))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(boxes)
    lines = []
    for i, wnid in enumerate(VAL_WNIDS):
        _solid_jpeg(root / "val" / "images" / f"val_{i}.JPEG", WNID_COLOURS[wnid])
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t1\t6\t7\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    return root


def _tiny_cfg(source: Path, **kw) -> DataConfig:
    return DataConfig(
        name="tiny_imagenet", source=str(source), resolution=kw.pop("resolution", 8), **kw
    )


def _check_tiny_colours(data, *, atol: int = 4) -> None:
    """Every image labelled k has wnid k's colour (JPEG rounding within ``atol``)."""
    for x, y in ((data.train_x, data.train_y), (data.val_x, data.val_y)):
        for k, wnid in enumerate(WNIDS):
            imgs = x[y == k].int()  # (n_k, 3, R, R)
            assert len(imgs) > 0
            colour = torch.tensor(WNID_COLOURS[wnid]).view(1, 3, 1, 1)
            assert int((imgs - colour).abs().max()) <= atol, wnid


# -- Tiny-ImageNet: layouts --------------------------------------------------------------


def test_tiny_zip_keeps_wnids_order_and_annotated_val_labels(tmp_path) -> None:
    _make_tiny(tmp_path / "src")
    archive = _zip_tree(tmp_path / "src" / "tiny-imagenet-200", tmp_path / "tiny.zip")
    manifest, data = _prepare(_tiny_cfg(archive), tmp_path)
    assert manifest["classes"] == WNIDS  # file order, not sorted
    assert manifest["counts"]["train_per_class"] == TRAIN_COUNTS
    assert manifest["counts"]["val_per_class"] == VAL_COUNTS
    assert manifest["val_split_name"] == "val"
    assert manifest["source_sha256"] == _sha256(archive)
    assert manifest["mean"] == pytest.approx([0.4802, 0.4481, 0.3975])
    assert data.train_x.shape == (9, 3, 8, 8) and data.val_x.shape == (6, 3, 8, 8)
    assert data.val_y.tolist() == [WNIDS.index(w) for w in VAL_WNIDS]  # annotation order
    _check_tiny_colours(data)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["data.pt", "manifest.json"]


def test_tiny_directory_and_parent_match_the_zip(tmp_path) -> None:
    root = _make_tiny(tmp_path / "src")
    archive = _zip_tree(root, tmp_path / "tiny.zip")
    _, from_zip = _prepare(_tiny_cfg(archive), tmp_path, "zip")
    for name, source in (("dir", root), ("parent", root.parent)):
        manifest, data = _prepare(_tiny_cfg(source), tmp_path, name)
        assert manifest["classes"] == WNIDS and manifest["source_sha256"] == ""
        for split in ("train_x", "train_y", "val_x", "val_y"):
            assert torch.equal(getattr(data, split), getattr(from_zip, split)), (name, split)


def test_tiny_default_resolution_is_64(tmp_path) -> None:
    root = _make_tiny(tmp_path / "src")
    _, data = _prepare(_tiny_cfg(root, resolution=0), tmp_path)
    assert data.resolution == 64 and data.train_x.shape == (9, 3, 64, 64)
    _check_tiny_colours(data)


def test_tiny_skip_corrupt_records_paths_relative_to_the_root(tmp_path) -> None:
    root = _make_tiny(tmp_path / "src")
    (root / "train" / "n01000001" / "images" / "n01000001_1.JPEG").write_bytes(b"not a jpeg")
    (root / "val" / "images" / "val_2.JPEG").write_bytes(b"not a jpeg either")
    archive = _zip_tree(root, tmp_path / "tiny.zip")
    manifest, data = _prepare(_tiny_cfg(archive, skip_corrupt=True), tmp_path)
    assert sorted(manifest["skipped"]["files"]) == [
        "train/n01000001/images/n01000001_1.JPEG",
        "val/images/val_2.JPEG",
    ]
    assert manifest["counts"]["train_per_class"] == [3, 1, 4]
    assert manifest["counts"]["val_per_class"] == [2, 0, 3]
    assert len(data.val_y) == 5


# -- Tiny-ImageNet: errors ---------------------------------------------------------------


def _append_annotation(root: Path, line: str) -> None:
    with (root / "val" / "val_annotations.txt").open("a") as f:
        f.write(line)


def _unknown_wnid(root: Path) -> None:
    _solid_jpeg(root / "val" / "images" / "val_6.JPEG", (0, 0, 0))
    _append_annotation(root, "val_6.JPEG\tn04444444\t0\t0\t7\t7\n")


def _malformed_line(root: Path) -> None:
    _solid_jpeg(root / "val" / "images" / "val_6.JPEG", (0, 0, 0))
    _append_annotation(root, "val_6.JPEG n01000001 0 0 7 7\n")


TINY_ERRORS: dict[str, tuple[Callable[[Path], None], str]] = {
    "unknown_wnid": (
        _unknown_wnid,
        r"val_annotations\.txt, line 7: wnid 'n04444444' of val_6\.JPEG is not listed in "
        r"wnids\.txt",
    ),
    "malformed_line": (
        _malformed_line,
        r"val_annotations\.txt, line 7: expected 6 tab-separated fields",
    ),
    "unannotated_val_image": (
        lambda root: _solid_jpeg(root / "val" / "images" / "val_extra.JPEG", (0, 0, 0)),
        r"val/images: 1 images have no line in .*val_annotations\.txt, e\.g\. \['val_extra\.JPEG'\]",
    ),
    "annotated_image_absent": (
        lambda root: (root / "val" / "images" / "val_3.JPEG").unlink(),
        r"val_annotations\.txt: 1 annotated images not found .*\['val_3\.JPEG'\]",
    ),
    "train_folder_missing": (
        lambda root: shutil.rmtree(root / "train" / "n01000001"),
        r"train: class folders differ from .*wnids\.txt: missing \['n01000001'\], unexpected \[\]",
    ),
    "train_folder_unexpected": (
        lambda root: (root / "train" / "n07777777" / "images").mkdir(parents=True),
        r"missing \[\], unexpected \['n07777777'\]",
    ),
    "train_class_without_images": (
        lambda root: [p.unlink() for p in (root / "train" / "n05555555" / "images").iterdir()],
        r"train/n05555555/images: expected the training images of n05555555, found none",
    ),
    "repeated_wnid": (
        lambda root: (root / "wnids.txt").write_text("\n".join([*WNIDS, WNIDS[1]]) + "\n"),
        r"wnids\.txt: expected unique wnids, found repeated \['n01000001'\]",
    ),
}


@pytest.mark.parametrize("case", sorted(TINY_ERRORS))
def test_tiny_layout_errors_name_the_file_and_wnid(tmp_path, case) -> None:
    root = _make_tiny(tmp_path / "src")
    mutate, message = TINY_ERRORS[case]
    mutate(root)
    with pytest.raises(LayoutError, match=message):
        _prepare_fails(_tiny_cfg(root), tmp_path)


def test_tiny_wrong_layout_lists_what_was_found(tmp_path) -> None:
    (tmp_path / "src" / "train").mkdir(parents=True)
    (tmp_path / "src" / "words.txt").write_text("x")
    with pytest.raises(LayoutError, match=r"wnids\.txt.*found: \['train/', 'words\.txt'\]"):
        _prepare_fails(_tiny_cfg(tmp_path / "src"), tmp_path)


@pytest.mark.parametrize("name", ["tiny_imagenet", "cifar10"])
@pytest.mark.parametrize("source", ["", "builtin"])
def test_no_local_source_says_what_to_set(tmp_path, name, source) -> None:
    with pytest.raises(ValueError, match="data.source: set it to a local"):
        _prepare_fails(DataConfig(name=name, source=source), tmp_path)


# -- CIFAR-10 fixtures -------------------------------------------------------------------

# Batch b holds labels 2b..2b+3 (mod 10): two training images per class in all.
TRAIN_LABELS = [[(2 * b + j) % 10 for j in range(4)] for b in range(5)]
TEST_LABELS = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 3]
ROWS = torch.arange(32).view(32, 1).expand(32, 32)


def _cifar_image(label: int) -> torch.Tensor:
    """(3, 32, 32) uint8: R = 20 * label + 10 everywhere, G = 7 * row, B = 7 * column."""
    red = torch.full((32, 32), 20 * label + 10)
    return torch.stack([red, 7 * ROWS, 7 * ROWS.T]).to(torch.uint8)


def _batch_rows(labels: list[int]) -> np.ndarray:
    """(N, 3072): each row the R plane, then G, then B, each row-major (the official layout)."""
    return np.stack([_cifar_image(k).numpy().reshape(-1) for k in labels])


def _official_pickle(obj: object) -> bytes:
    """Protocol 2, naming numpy.core as the Python 2 pickles of the official archive do."""
    data = pickle.dumps(obj, protocol=2)
    return data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _write_batch(path: Path, labels: list[int], data: np.ndarray | None = None) -> None:
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": labels,
        b"data": _batch_rows(labels) if data is None else data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    path.write_bytes(_official_pickle(batch))


def _make_batches(parent: Path, *, label_names: tuple[str, ...] = CIFAR10_CLASSES) -> Path:
    """``parent/cifar-10-batches-py`` with data_batch_1..5, test_batch and batches.meta."""
    root = parent / "cifar-10-batches-py"
    root.mkdir(parents=True)
    for b, labels in enumerate(TRAIN_LABELS, start=1):
        _write_batch(root / f"data_batch_{b}", labels)
    _write_batch(root / "test_batch", TEST_LABELS)
    meta = {b"label_names": [n.encode() for n in label_names], b"num_vis": 3072}
    (root / "batches.meta").write_bytes(_official_pickle(meta))
    return root


def _make_cifar_folder(parent: Path, *, rename: dict[str, str] | None = None) -> Path:
    """``parent/cifar10/{train,test}/<class name>/NNNN.png`` holding the same images."""
    root = parent / "cifar10"
    rename = rename or {}
    for split, labels in (("train", sum(TRAIN_LABELS, [])), ("test", TEST_LABELS)):
        for i, k in enumerate(labels):
            folder = root / split / rename.get(CIFAR10_CLASSES[k], CIFAR10_CLASSES[k])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = _cifar_image(k).permute(1, 2, 0).numpy()  # (32, 32, 3)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def _cifar_cfg(source: Path, **kw) -> DataConfig:
    return DataConfig(name="cifar10", source=str(source), **kw)


def _pairs(data) -> collections.Counter:
    return collections.Counter(
        (split, img.numpy().tobytes(), int(y))
        for split, x, ys in (("train", data.train_x, data.train_y), ("val", data.val_x, data.val_y))
        for img, y in zip(x, ys, strict=True)
    )


# -- CIFAR-10: layouts -------------------------------------------------------------------


def test_cifar_pickled_archive_counts_order_and_pixel_layout(tmp_path) -> None:
    batches = _make_batches(tmp_path / "src")
    assert b"cnumpy.core.multiarray\n" in (batches / "data_batch_1").read_bytes()
    archive = _tar_tree(batches, tmp_path / "cifar-10-python.tar.gz")
    manifest, data = _prepare(_cifar_cfg(archive), tmp_path)
    assert manifest["classes"] == list(CIFAR10_CLASSES)
    assert manifest["counts"]["train_per_class"] == [2] * 10
    assert manifest["counts"]["val_per_class"] == [1, 1, 1, 2, 1, 1, 1, 1, 1, 1]
    assert manifest["val_split_name"] == "test"
    assert manifest["source_sha256"] == _sha256(archive)
    assert manifest["std"] == pytest.approx([0.2023, 0.1994, 0.2010])
    assert data.train_x.shape == (20, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.train_y.tolist() == sum(TRAIN_LABELS, [])  # batch order kept
    assert data.val_y.tolist() == TEST_LABELS
    for x, ys in ((data.train_x, data.train_y), (data.val_x, data.val_y)):
        for img, y in zip(x, ys, strict=True):
            assert torch.equal(img, _cifar_image(int(y))), int(y)


def test_cifar_pickled_directory_resized(tmp_path) -> None:
    """At 16 px the constant R plane stays exact; G still varies by row only, B by column."""
    batches = _make_batches(tmp_path / "src")
    manifest, data = _prepare(_cifar_cfg(batches.parent, resolution=16), tmp_path)
    assert manifest["source_sha256"] == "" and data.resolution == 16
    x = data.train_x.int()  # (20, 3, 16, 16)
    red = (20 * data.train_y + 10).int().view(-1, 1, 1)
    assert torch.equal(x[:, 0], red.expand(-1, 16, 16))
    assert torch.equal(x[:, 1], x[:, 1, :, :1].expand(-1, 16, 16))  # constant along a row
    assert torch.equal(x[:, 2], x[:, 2, :1, :].expand(-1, 16, 16))  # constant along a column
    assert bool((x[:, 1, 1:, 0] > x[:, 1, :-1, 0]).all())  # increases down the rows
    assert bool((x[:, 2, 0, 1:] > x[:, 2, 0, :-1]).all())  # increases along the columns


def test_cifar_imagefolder_archive_matches_the_pickled_batches(tmp_path) -> None:
    _, pickled = _prepare(_cifar_cfg(_make_batches(tmp_path / "pkl")), tmp_path, "pickled")
    archive = _tar_tree(_make_cifar_folder(tmp_path / "png"), tmp_path / "cifar10.tar.gz")
    manifest, data = _prepare(_cifar_cfg(archive), tmp_path, "folder")
    assert manifest["classes"] == list(CIFAR10_CLASSES)
    assert manifest["val_split_name"] == "test"
    assert manifest["source_sha256"] == _sha256(archive)
    assert data.resolution == 32
    assert _pairs(data) == _pairs(pickled)


# -- CIFAR-10: errors --------------------------------------------------------------------


class _MarkerPayload:
    """Unpickling this calls ``open(marker, "w")``: harmless, but it leaves a file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_cifar_malicious_pickle_is_refused_and_not_run(tmp_path) -> None:
    control = tmp_path / "control-marker"
    opened = pickle.loads(pickle.dumps(_MarkerPayload(control), protocol=2))
    opened.close()
    assert control.exists()  # the payload does run under an unrestricted unpickler

    batches = _make_batches(tmp_path / "src")
    marker = tmp_path / "marker"
    batch = {b"data": _batch_rows([0]), b"labels": _MarkerPayload(marker)}
    (batches / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"data_batch_1: refusing to unpickle .*open"):
        _prepare_fails(_cifar_cfg(batches), tmp_path)
    assert not marker.exists()


def test_cifar_missing_test_batch_is_named(tmp_path) -> None:
    batches = _make_batches(tmp_path / "src")
    (batches / "test_batch").unlink()
    archive = _tar_tree(batches, tmp_path / "cifar-10-python.tar.gz")
    with pytest.raises(LayoutError, match=r"batch files missing: \['test_batch'\]"):
        _prepare_fails(_cifar_cfg(archive), tmp_path)


@pytest.mark.parametrize(
    ("file", "contents", "message"),
    [
        (
            "data_batch_3",
            {b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]},
            r"data_batch_3: b'data': expected a uint8 array of shape \(N, 3072\), found uint8 "
            r"\(2, 3000\)",
        ),
        (
            "test_batch",
            {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]},
            r"test_batch: b'labels': expected a list of 2 ints in 0\.\.9",
        ),
        (
            "data_batch_2",
            {b"data": np.zeros((2, 3072), np.uint8)},
            r"data_batch_2: expected keys b'data' and b'labels', missing \['labels'\]",
        ),
        (
            "batches.meta",
            {b"label_names": [n.encode() for n in reversed(CIFAR10_CLASSES)]},
            r"batches\.meta: label_names \['truck', .*\] differ from the CIFAR-10 classes",
        ),
    ],
)
def test_cifar_malformed_batches_are_named(tmp_path, file, contents, message) -> None:
    batches = _make_batches(tmp_path / "src")
    (batches / file).write_bytes(_official_pickle(contents))
    with pytest.raises(ValueError, match=message):
        _prepare_fails(_cifar_cfg(batches), tmp_path)


def test_cifar_imagefolder_needs_the_ten_class_names(tmp_path) -> None:
    root = _make_cifar_folder(tmp_path / "src", rename={"cat": "kitty"})
    with pytest.raises(LayoutError, match=r"missing \['cat'\], unexpected \['kitty'\]"):
        _prepare_fails(_cifar_cfg(root), tmp_path)


def test_cifar_unknown_layout_names_both_layouts_and_what_was_found(tmp_path) -> None:
    (tmp_path / "src" / "images").mkdir(parents=True)
    (tmp_path / "src" / "README.txt").write_text("hi")
    with pytest.raises(LayoutError) as info:
        _prepare_fails(_cifar_cfg(tmp_path / "src"), tmp_path)
    msg = str(info.value)
    assert "(a) the pickled batches of cifar-10-python.tar.gz" in msg
    assert "(b) train/ and test/ folders" in msg
    assert "found: ['README.txt', 'images/']" in msg
