"""Tests of the ImageNet-1K index (wmdd.data.imagenet) and its lazy datasets (wmdd.data.lazy).

The fixtures are a tiny ILSVRC2012 look-alike built by the tests: three wnids created in
unsorted order, a few 10x12 / 12x10 solid-colour images per class (JPEG, and PNG saved as
``.JPEG`` as some real ImageNet files are), packed as the official nested train tar, the
flat val tar, a devkit with ``meta.mat`` + ground truth, Kaggle's ``LOC_val_solution.csv``,
and as extracted folders.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from wmdd.config import DataConfig
from wmdd.data.archive import UnsafeArchiveError
from wmdd.data.folder import LayoutError, load_image
from wmdd.data.imagenet import (
    DEVKIT,
    LAZY,
    TRAIN_TAR,
    VAL_LABELS_CSV,
    VAL_LABELS_TXT,
    VAL_TAR,
    index_imagenet,
    leaf_synsets,
)
from wmdd.data.lazy import (
    INDEX_FILE,
    MANIFEST_FILE,
    CorruptImageError,
    gather,
    load_lazy,
    make_loader,
)
from wmdd.data.registry import get_dataset

# -- the tiny ILSVRC2012 -----------------------------------------------------------------

# Created in this (unsorted) order; class index = sorted order.
COLOURS = {
    "n03000684": (200, 30, 20),
    "n01440764": (20, 180, 60),
    "n02102040": (40, 60, 220),
}
CLASSES = sorted(COLOURS)  # n01440764, n02102040, n03000684
TRAIN_COUNTS = {"n03000684": 3, "n01440764": 2, "n02102040": 4}
# Official ILSVRC2012_IDs are not in wnid order either; ID 4 is a non-leaf synset.
SYNSET_IDS = {"n03000684": 1, "n01440764": 2, "n02102040": 3}
# Validation wnids in file-number order (so sorting by name interleaves the classes).
VAL_WNIDS = ["n02102040", "n03000684", "n01440764", "n03000684", "n02102040", "n01440764"]
RES = 8
_SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "num_children")  # of meta.mat's synsets


def _image(colour: tuple[int, int, int], i: int) -> bytes:
    """A solid-colour 10x12 or 12x10 image: JPEG, or (odd i) PNG bytes."""
    buf = io.BytesIO()
    img = Image.new("RGB", (10, 12) if i % 2 == 0 else (12, 10), colour)
    if i % 2 == 0:
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


TRAIN = {
    wnid: [(f"{wnid}_{n}.JPEG", _image(COLOURS[wnid], n)) for n in range(TRAIN_COUNTS[wnid])]
    for wnid in COLOURS
}
VAL = [
    (f"ILSVRC2012_val_{k:08d}.JPEG", wnid, _image(COLOURS[wnid], k))
    for k, wnid in enumerate(VAL_WNIDS, start=1)
]
BYTES = {name: data for files in TRAIN.values() for name, data in files} | {
    name: data for name, _, data in VAL
}
LABEL_OF = {name: CLASSES.index(wnid) for wnid, files in TRAIN.items() for name, _ in files} | {
    name: CLASSES.index(wnid) for name, wnid, _ in VAL
}


def _add_file(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _add_symlink(tf: tarfile.TarFile, name: str, target: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    tf.addfile(info)


def _tar_bytes(files: list[tuple[str, bytes]], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files:
            _add_file(tf, name, data)
        for name, target in (links or {}).items():
            _add_symlink(tf, name, target)
    return buf.getvalue()


def _train_tar(
    path: Path,
    *,
    extra: dict[str, list[tuple[str, bytes]]] | None = None,
    inner_links: dict[str, str] | None = None,
    outer_links: dict[str, str] | None = None,
) -> None:
    """The nested train tar; ``extra`` adds members to a class's inner tar, members
    reversed so that the stored order is not the sorted one."""
    with tarfile.open(path, "w") as tf:
        for wnid, files in TRAIN.items():
            members = list(reversed(files)) + (extra or {}).get(wnid, [])
            links = inner_links if wnid == "n01440764" else None
            _add_file(tf, f"{wnid}.tar", _tar_bytes(members, links))
        for name, target in (outer_links or {}).items():
            _add_symlink(tf, name, target)


def _val_tar(path: Path) -> None:
    path.write_bytes(_tar_bytes([(name, data) for name, _, data in reversed(VAL)]))


def _devkit(path: Path, *, truth: list[int] | None = None) -> None:
    synsets = np.zeros((len(SYNSET_IDS) + 1, 1), dtype=[(k, "O") for k in _SYNSET_FIELDS])
    for row, (wnid, sid) in enumerate(SYNSET_IDS.items()):
        synsets[row, 0] = (sid, wnid, 0)
    synsets[-1, 0] = (4, "n00001740", 3)  # a non-leaf synset: not a class
    mat = io.BytesIO()
    scipy.io.savemat(mat, {"synsets": synsets})
    ids = truth if truth is not None else [SYNSET_IDS[w] for _, w, _ in sorted(VAL)]
    text = "".join(f"{i}\n" for i in ids).encode()
    with tarfile.open(path, "w:gz") as tf:
        _add_file(tf, "ILSVRC2012_devkit_t12/data/meta.mat", mat.getvalue())
        _add_file(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", text)


def _csv(path: Path, *, wnids: dict[str, str] | None = None) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ImageId", "PredictionString"])
        for name, wnid, _ in VAL:
            wnid = (wnids or {}).get(name, wnid)
            writer.writerow([name.removesuffix(".JPEG"), f"{wnid} 1 2 9 11 {wnid} 0 0 5 5"])


def _txt(path: Path, *, wnids: dict[str, str] | None = None) -> None:
    path.write_text("".join(f"{name} {(wnids or {}).get(name, wnid)}\n" for name, wnid, _ in VAL))


def _archives(root: Path, labels: str = "devkit") -> Path:
    root.mkdir()
    _train_tar(root / TRAIN_TAR)
    _val_tar(root / VAL_TAR)
    {"devkit": _devkit, "csv": _csv, "txt": _txt}[labels](
        root / {"devkit": DEVKIT, "csv": VAL_LABELS_CSV, "txt": VAL_LABELS_TXT}[labels]
    )
    return root


def _folders(root: Path, val: str = "sub") -> Path:
    for wnid, files in TRAIN.items():
        (root / "train" / wnid).mkdir(parents=True)
        for name, data in files:
            (root / "train" / wnid / name).write_bytes(data)
    (root / "val").mkdir()
    for name, wnid, data in VAL:
        folder = root / "val" / wnid if val == "sub" else root / "val"
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    if val == "flat":
        _txt(root / VAL_LABELS_TXT)
    return root


def _index(source: Path, tmp_path: Path, name: str = "out") -> tuple[dict, Path]:
    out = tmp_path / name
    out.mkdir()
    return index_imagenet(source, out, progress=False), out


def _basename(name: str) -> str:
    return name.rsplit("/", 1)[-1]


@pytest.fixture(scope="module")
def devkit_index(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("devkit")
    return _index(_archives(tmp / "src"), tmp)


# -- the index ---------------------------------------------------------------------------


def test_registry_entry_refuses_eager_reading(tmp_path) -> None:
    info, reader = get_dataset("imagenet1k")
    assert LAZY is True
    assert (info.channels, info.native_resolution) == (3, 0)
    assert info.mean == (0.485, 0.456, 0.406) and info.std == (0.229, 0.224, 0.225)
    with pytest.raises(ValueError, match="prepared lazily.*index_imagenet"):
        reader(DataConfig(name="imagenet1k", source="/x"), tmp_path)


def test_archives_manifest_classes_and_counts(devkit_index) -> None:
    manifest, out = devkit_index
    assert manifest["classes"] == CLASSES == ["n01440764", "n02102040", "n03000684"]
    assert manifest["class_index"] == {w: i for i, w in enumerate(CLASSES)}
    assert manifest["num_classes"] == 3 and manifest["layout"] == "archives"
    assert manifest["counts"] == {
        "train": 9,
        "val": 6,
        "train_per_class": [2, 4, 3],
        "val_per_class": [2, 2, 2],
    }
    src = Path(manifest["source"])
    assert manifest["archives"] == {
        TRAIN_TAR: (src / TRAIN_TAR).stat().st_size,
        VAL_TAR: (src / VAL_TAR).stat().st_size,
    }
    assert manifest["val_labels"] == {"file": DEVKIT, "bytes": (src / DEVKIT).stat().st_size}
    digest = hashlib.sha256((out / INDEX_FILE).read_bytes()).hexdigest()
    assert manifest["checksums"] == {INDEX_FILE: digest}
    assert manifest == json.loads((out / MANIFEST_FILE).read_text())


def test_archive_offsets_point_at_each_image_bytes(devkit_index) -> None:
    """Reading ``size`` bytes at the recorded offset gives back exactly the packed image."""
    manifest, out = devkit_index
    index = torch.load(out / INDEX_FILE, weights_only=True)
    src = Path(manifest["source"])
    archives = [(src / name).read_bytes() for name in index["archives"]]
    for split, want_archive in (("train", 0), ("val", 1)):
        entry = index["splits"][split]
        assert entry["labels"].dtype == torch.int64
        for i, name in enumerate(entry["names"]):
            a, o, s = (int(entry[k][i]) for k in ("archive", "offset", "size"))
            assert a == want_archive
            assert archives[a][o : o + s] == BYTES[_basename(name)], name
            assert int(entry["labels"][i]) == LABEL_OF[_basename(name)], name
    train_names = index["splits"]["train"]["names"]
    assert train_names[:2] == ["n01440764.tar/n01440764_0.JPEG", "n01440764.tar/n01440764_1.JPEG"]
    assert index["splits"]["val"]["names"] == sorted(name for name, _, _ in VAL)


def test_lazy_images_decode_to_class_colour(devkit_index) -> None:
    _, out = devkit_index
    data = load_lazy(out, resolution=RES, verify=True)
    assert data.name == "imagenet1k" and data.classes == CLASSES and data.resolution == RES
    for split in (data.train, data.val):
        assert len(split) == len(split.labels)
        for i in range(len(split)):
            sample = split[i]
            assert sample is not None
            x, y = sample
            assert x.shape == (3, RES, RES) and x.dtype == torch.uint8
            assert y == LABEL_OF[_basename(split.names[i])]
            colour = torch.tensor(COLOURS[CLASSES[y]]).view(3, 1, 1)
            assert int((x.int() - colour).abs().max()) <= 4, split.names[i]  # JPEG rounding


def test_lazy_decode_equals_folder_load_image(devkit_index, tmp_path) -> None:
    """A decoded image is exactly wmdd.data.folder.load_image of the same file."""
    _, out = devkit_index
    data = load_lazy(out, resolution=5)
    for i in (0, 3):
        path = tmp_path / _basename(data.train.names[i])
        path.write_bytes(BYTES[path.name])
        assert np.array_equal(data.train.decode(i), load_image(path, 5))


@pytest.mark.parametrize(
    "make",
    [
        lambda root: _archives(root, "csv"),
        lambda root: _archives(root, "txt"),
        lambda root: _folders(root, "sub"),
        lambda root: _folders(root, "flat"),
    ],
    ids=["archives-csv", "archives-txt", "folders-sub", "folders-flat"],
)
def test_every_layout_gives_the_same_index(devkit_index, tmp_path, make) -> None:
    ref_manifest, ref_out = devkit_index
    manifest, out = _index(make(tmp_path / "src"), tmp_path)
    assert manifest["classes"] == ref_manifest["classes"]
    assert manifest["counts"] == ref_manifest["counts"]
    ref, got = load_lazy(ref_out, resolution=RES), load_lazy(out, resolution=RES)
    for split in ("train", "val"):
        a, b = ref.split(split), got.split(split)
        assert torch.equal(a.labels, b.labels)
        assert [_basename(n) for n in a.names] == [_basename(n) for n in b.names]
        xa, ya = gather(a, range(len(a)))
        xb, yb = gather(b, range(len(b)))
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_indexing_never_extracts(tmp_path) -> None:
    src = _archives(tmp_path / "src")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    _, out = _index(src, tmp_path)
    assert sorted(p.name for p in out.rglob("*")) == [INDEX_FILE, MANIFEST_FILE]
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if out not in p.parents}
    after.pop(out)
    assert after == before


# -- unsafe and inconsistent sources -----------------------------------------------------


@pytest.mark.parametrize(
    ("build", "member"),
    [
        (lambda p: _train_tar(p, extra={"n01440764": [("../evil.JPEG", b"x")]}), "../evil.JPEG"),
        (
            lambda p: _train_tar(p, extra={"n02102040": [("/abs/evil.JPEG", b"x")]}),
            "/abs/evil.JPEG",
        ),
        (lambda p: _train_tar(p, inner_links={"link.JPEG": "/etc/passwd"}), "link.JPEG"),
        (lambda p: _train_tar(p, outer_links={"n09999999.tar": "../x.tar"}), "n09999999.tar"),
    ],
    ids=["dotdot", "absolute", "inner-symlink", "outer-symlink"],
)
def test_unsafe_train_member_is_refused(tmp_path, build, member) -> None:
    src = _archives(tmp_path / "src")
    build(src / TRAIN_TAR)
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchiveError, match=rf"{TRAIN_TAR}: member '[^']*{member}'"):
        index_imagenet(src, tmp_path / "out", progress=False)


def test_symlink_in_val_tar_is_refused(tmp_path) -> None:
    src = _archives(tmp_path / "src")
    files = [(name, data) for name, _, data in VAL]
    (src / VAL_TAR).write_bytes(_tar_bytes(files, {"ILSVRC2012_val_00000009.JPEG": "../a"}))
    (tmp_path / "out").mkdir()
    with pytest.raises(UnsafeArchiveError, match=r"member 'ILSVRC2012_val_00000009.JPEG' is a"):
        index_imagenet(src, tmp_path / "out", progress=False)


@pytest.mark.parametrize("labels", ["csv", "txt"])
def test_val_label_naming_unknown_wnid(tmp_path, labels) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _train_tar(src / TRAIN_TAR)
    _val_tar(src / VAL_TAR)
    bad = {"ILSVRC2012_val_00000004.JPEG": "n09999999"}
    path = src / (VAL_LABELS_CSV if labels == "csv" else VAL_LABELS_TXT)
    (_csv if labels == "csv" else _txt)(path, wnids=bad)
    (tmp_path / "out").mkdir()
    with pytest.raises(LayoutError, match=rf"{path.name}: .*00000004.* 'n09999999'"):
        index_imagenet(src, tmp_path / "out", progress=False)


def test_val_subfolder_not_a_training_class(tmp_path) -> None:
    src = _folders(tmp_path / "src")
    (src / "val" / "n09999999").mkdir()
    (src / "val" / "n09999999" / "x.JPEG").write_bytes(BYTES["n01440764_0.JPEG"])
    (tmp_path / "out").mkdir()
    with pytest.raises(LayoutError, match=r"val: class folders .* extra \['n09999999'\]"):
        index_imagenet(src, tmp_path / "out", progress=False)


def test_devkit_ground_truth_must_match_images(tmp_path) -> None:
    src = _archives(tmp_path / "src")
    _devkit(src / DEVKIT, truth=[1, 2, 3, 4, 1, 2])  # 4 is the non-leaf synset
    (tmp_path / "out").mkdir()
    with pytest.raises(LayoutError, match=r"ground_truth.txt: line 4 .* is '4'"):
        index_imagenet(src, tmp_path / "out", progress=False)
    _devkit(src / DEVKIT, truth=[1, 2, 3])
    with pytest.raises(LayoutError, match=r"ground_truth.txt: expected one .* \(6\), found 3"):
        index_imagenet(src, tmp_path / "out", progress=False)


def test_meta_mat_leaf_synsets() -> None:
    buf = io.BytesIO()
    one = np.zeros((1, 1), dtype=[(k, "O") for k in _SYNSET_FIELDS])
    one[0, 0] = (7, "n01440764", 0)
    scipy.io.savemat(buf, {"synsets": one})
    assert leaf_synsets(buf.getvalue(), "meta.mat") == {7: "n01440764"}  # a 0-d struct
    with pytest.raises(LayoutError, match="meta.mat: expected a 'synsets' variable"):
        buf = io.BytesIO()
        scipy.io.savemat(buf, {"other": np.zeros(2)})
        leaf_synsets(buf.getvalue(), "meta.mat")


def test_missing_labels_and_wrong_layout(tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "README").write_text("x")
    (tmp_path / "out").mkdir()
    with pytest.raises(LayoutError, match=r"expected either .*found: \['README'\]"):
        index_imagenet(src, tmp_path / "out", progress=False)
    _train_tar(src / TRAIN_TAR)
    _val_tar(src / VAL_TAR)
    with pytest.raises(LayoutError, match=rf"need labels: expected one of .*{DEVKIT}"):
        index_imagenet(src, tmp_path / "out", progress=False)


# -- the lazy datasets -------------------------------------------------------------------


def test_loader_batches_do_not_depend_on_workers(devkit_index) -> None:
    _, out = devkit_index
    data = load_lazy(out, resolution=RES)
    batches = []
    for workers in (0, 2):
        g = torch.Generator().manual_seed(3)
        loader = make_loader(
            data.train, 4, workers=workers, device=torch.device("cpu"), shuffle=True, generator=g
        )
        assert loader.num_workers == workers and loader.pin_memory is False
        assert loader.persistent_workers is (workers > 0)
        batches.append(list(loader))
    assert [len(y) for _, y in batches[0]] == [4, 4, 1]
    for (x0, y0), (x2, y2) in zip(*batches, strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    seen = torch.cat([y for _, y in batches[0]]).sort().values
    assert torch.equal(seen, data.train.labels.sort().values)
    assert not torch.equal(torch.cat([y for _, y in batches[0]]), data.train.labels)  # shuffled


def test_subset_gather_and_indices_of_class(devkit_index) -> None:
    _, out = devkit_index
    train = load_lazy(out, resolution=RES).train
    ones = train.indices_of_class(1)
    assert ones.tolist() == [2, 3, 4, 5]  # class 0 has 2 images, class 1 the next 4
    assert train.class_counts() == [2, 4, 3]
    x, y = gather(train, ones[[2, 0]])
    assert x.shape == (2, 3, RES, RES) and y.tolist() == [1, 1]
    sub = train.subset(ones[[2, 0]])
    assert sub.names == [train.names[4], train.names[2]]
    sx, sy = gather(sub, [0, 1])
    assert torch.equal(sx, x) and torch.equal(sy, y)
    assert torch.equal(sx[0], train[4][0])  # type: ignore[index]


def test_unreadable_image_names_the_member(tmp_path) -> None:
    src = _archives(tmp_path / "src")
    _train_tar(src / TRAIN_TAR, extra={"n02102040": [("n02102040_bad.JPEG", b"\xff\xd8junk")]})
    _, out = _index(src, tmp_path)
    train = load_lazy(out, resolution=RES).train
    bad = train.names.index("n02102040.tar/n02102040_bad.JPEG")
    with pytest.raises(CorruptImageError, match=rf"{TRAIN_TAR} member 'n02102040.tar/n02102040_"):
        train[bad]
    skipping = load_lazy(out, resolution=RES, skip_corrupt=True).train
    assert skipping[bad] is None
    x, y = gather(skipping, [bad - 1, bad])
    assert x.shape == (1, 3, RES, RES) and y.tolist() == [1]


def test_unreadable_file_in_folders_names_the_file(tmp_path) -> None:
    src = _folders(tmp_path / "src", "flat")
    (src / "train" / "n03000684" / "n03000684_0.JPEG").write_bytes(b"not an image")
    _, out = _index(src, tmp_path)
    train = load_lazy(out, resolution=RES).train
    with pytest.raises(CorruptImageError, match=r"train/n03000684/n03000684_0\.JPEG"):
        gather(train, train.indices_of_class(2))


def test_changed_archive_is_detected_at_load(tmp_path) -> None:
    src = _archives(tmp_path / "src")
    _, out = _index(src, tmp_path)
    with open(src / VAL_TAR, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ValueError, match=rf"{VAL_TAR}: \d+ bytes, but .* indexed it at"):
        load_lazy(out, resolution=RES)


def test_archive_truncated_after_indexing_names_the_member(tmp_path) -> None:
    src = _archives(tmp_path / "src")
    _, out = _index(src, tmp_path)
    val = load_lazy(out, resolution=RES).val
    last = int(val.locations[:, 1].argmax())  # type: ignore[index]
    with open(src / VAL_TAR, "r+b") as f:
        f.truncate(int(val.locations[last, 1]) + 10)  # type: ignore[index]
    with pytest.raises(CorruptImageError, match=rf"{VAL_TAR} member .*: archive ends after 10 of"):
        val.decode(last)
