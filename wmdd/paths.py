"""Where each stage reads and writes, relative to the project root (mirrored by dvc.yaml)."""

from __future__ import annotations

from pathlib import Path


def data_dir(profile: str) -> Path:
    return Path("data") / profile


def teacher_dir(profile: str) -> Path:
    return Path("models") / profile


def teacher_path(profile: str) -> Path:
    return teacher_dir(profile) / "teacher.pt"


def teacher_stats_path(profile: str) -> Path:
    """The teacher's features and per-class BN statistics (``teacher_stats`` stage)."""
    return teacher_dir(profile) / "teacher_stats.pt"


def teacher_metrics_path(profile: str) -> Path:
    return teacher_dir(profile) / "metrics.json"


def teacher_curve_path(profile: str) -> Path:
    """The teacher's training curve (epoch, loss, val_top1, lr): a DVC plot."""
    return teacher_dir(profile) / "curve.csv"


def distilled_dir(profile: str, method: str, ipc: int) -> Path:
    """A cell's distilled sets: one ``set<s>/`` folder per distilled set (:func:`set_dir`)."""
    return Path("distilled") / profile / method / f"ipc{ipc}"


def set_dir(cell_dir: Path, set_index: int) -> Path:
    """Set ``set_index`` of a cell inside its ``distilled/`` or ``labels/`` directory."""
    return cell_dir / f"set{set_index}"


def set_indices(cell_dir: Path) -> list[int]:
    """The sets a distill stage wrote into ``cell_dir`` (folders ``set<s>`` holding a
    ``set.pt``), in order; a FileNotFoundError names the folder when there is none."""
    found = sorted(
        int(d.name[3:])
        for d in (cell_dir.iterdir() if cell_dir.is_dir() else [])
        if d.is_dir() and d.name[:3] == "set" and d.name[3:].isdigit() and (d / SET_FILE).is_file()
    )
    if not found:
        raise FileNotFoundError(
            f"{cell_dir}: no distilled set (set<s>/{SET_FILE}) found (run the distill stage first)"
        )
    return found


SET_FILE = "set.pt"  # the distilled set inside its distilled directory
LABELS_FILE = "labels.json"  # the relabel stage's record inside its labels directory


def labels_dir(profile: str, method: str, ipc: int) -> Path:
    return Path("labels") / profile / method / f"ipc{ipc}"


PROTOCOLS = ("soft", "hard")  # every cell is evaluated under both (stages evaluate, evaluate_hard)


def results_path(profile: str, method: str, ipc: int, protocol: str = "soft") -> Path:
    return Path("results") / profile / method / f"ipc{ipc}" / protocol / "metrics.json"


def curve_path(profile: str, method: str, ipc: int, protocol: str = "soft") -> Path:
    """The students' validation top-1 / top-5 per evaluated epoch, mean over sets and seeds."""
    return Path("results") / profile / method / f"ipc{ipc}" / protocol / "curve.csv"


def accuracy_plot_path(profile: str) -> Path:
    """Accuracy vs IPC of every method of a profile: a DVC plot written by the report."""
    return REPORTS / "plots" / "accuracy" / f"{profile}.csv"


def diagnostics_path(profile: str, method: str, ipc: int) -> Path:
    return Path("results") / profile / method / f"ipc{ipc}" / "diagnostics.json"


REPORTS = Path("reports")


def stored_labels_path(labels_dir: Path, eval_seed: int) -> Path:
    """The stored soft labels of one eval seed inside a ``labels/...`` directory."""
    return labels_dir / f"seed{eval_seed}.pt"
