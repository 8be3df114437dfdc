"""The benchmark report, built from what MLflow recorded.

Every stage run tags the MD5 of each file it read (``input.<path>.md5``) and wrote
(``output.<path>.md5``). The report finds the run behind each output it depends on
(``models/<p>/metrics.json``, ``results/.../metrics.json``, ``results/.../diagnostics.json``)
by that content hash, and the distill and relabel runs behind an evaluation by the hashes
the evaluate run recorded for ``set.pt`` and ``labels.json``; the newest FINISHED such run
wins. It takes every number from those runs, so the tables equal what MLflow shows, and it
reads no other file. It writes:

* ``reports/benchmark.md`` — per dataset profile and budget: methods x IPC as
  ``mean ± std (n)`` of the final-epoch top-1, the teacher's accuracy, the gain over the
  random subset under the same protocol with a Welch t-test p-value, the published numbers
  beside ours (with their protocol noted), compute cost per stage, the protocol hash, the
  git commit and package versions;
* ``reports/results.csv`` — one row per (dataset, budget, method, ipc);
* ``reports/figures/`` — accuracy vs IPC per profile, and synthetic-image grids for
  methods that synthesise from noise (grids of real or real-initialised images are not
  written here: they stay in MLflow and the DVC outputs).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from wmdd import paths
from wmdd.report.compare import welch_interval
from wmdd.report.sensitivity import PANEL_FILE, read_panel, render_panel
from wmdd.tracking.runs import package_versions
from wmdd.utils import atomic_dir, atomic_file, file_digest, level_values, write_csv

# Published ResNet-18 top-1 (%) from the WMDD paper's main table (Liu et al., Table 1), keyed by
# dataset registry name, then method, then IPC. The Random and DM rows were measured by
# earlier papers under a hard-label ConvNet protocol at lower resolution; SRe2L and WMDD
# under the soft-label ResNet-18 protocol at 224 px. RDED's rows are its own paper's (Sun et
# al., CVPR 2024), FADRM's its paper's single-teacher rows (Cui et al., NeurIPS 2025), each
# under its own protocol (PUBLISHED_PROTOCOL).
PUBLISHED: dict[str, dict[str, dict[int, float]]] = {
    "imagenette": {
        "random": {1: 23.5, 10: 47.7},
        "dm": {1: 32.8, 10: 58.1},
        "sre2l": {1: 20.6, 10: 54.2, 50: 80.4, 100: 85.9},
        "wmdd": {1: 40.2, 10: 64.8, 50: 83.5, 100: 87.1},
        "rded": {1: 35.8, 10: 61.4, 50: 80.4},
    },
    "tiny_imagenet": {
        "random": {1: 1.5, 10: 6.0, 50: 16.8},
        "dm": {1: 3.9, 10: 12.9, 50: 24.1},
        "sre2l": {50: 41.1, 100: 49.7},
        "wmdd": {1: 7.6, 10: 41.8, 50: 59.4, 100: 61.0},
        "rded": {1: 9.7, 10: 41.9, 50: 58.2},
        "fadrm": {10: 48.9, 50: 56.4},
    },
    "imagenet1k": {
        "random": {1: 0.5, 10: 3.6, 50: 15.3},
        "dm": {1: 1.5},
        "sre2l": {10: 21.3, 50: 46.8, 100: 52.8},
        "wmdd": {1: 3.2, 10: 38.2, 50: 57.6, 100: 60.7},
        "rded": {1: 6.6, 10: 42.0, 50: 56.5},
        "fadrm": {10: 47.7, 50: 59.8},
    },
    "cifar10": {
        "random": {1: 14.4, 10: 26.0, 50: 43.4},
        "herding": {1: 21.5, 10: 31.6, 50: 40.4},
        "dm": {1: 26.0, 10: 48.9, 50: 63.0},
    },
}
PUBLISHED_SOURCE = {
    "imagenette": "the WMDD paper's table",
    "tiny_imagenet": "the WMDD paper's table",
    "imagenet1k": "the WMDD paper's table",
    "cifar10": "the DM paper's table (random and herding as reported there)",
}
PUBLISHED_PROTOCOL = {
    "random": "hard-label ConvNet, lower resolution (earlier papers)",
    "herding": "hard-label ConvNet, lower resolution (earlier papers)",
    "dm": "hard-label ConvNet, lower resolution (earlier papers)",
    "sre2l": "soft-label ResNet-18, 224 px",
    "wmdd": "soft-label ResNet-18, 224 px",
    "rded": "the RDED paper: ResNet-18, the teacher's labels online, its own schedule "
    "(best of the last evaluations)",
    "fadrm": "the FADRM paper (one teacher): ResNet-18, stored soft labels, student batch 16",
}
NOISE_SYNTHESISED = ("wmdd", "sre2l")  # methods whose images may be shown in committed figures

CSV_COLUMNS = [
    "dataset",
    "profile",
    "budget",
    "method",
    "ipc",
    "protocol",
    "seeds",
    "sets",
    "eval_seeds",
    "std_over",
    "top1_mean",
    "top1_std",
    "top5_mean",
    "best_top1_mean",
    "gain_vs_random",
    "gain_ci_low",
    "gain_ci_high",
    "welch_p",
    "ior",
    "hlr",
    "lrs",
    "full_top1",
    "teacher_top1",
    "teacher_agreement",
    "teacher_label_prob",
    "pixels_outside",
    "barycenter_agreement",
    "feature_distance",
    "distill_seconds",
    "peak_mem_mb",
    "distill_peak_mem_mb",
    "relabel_peak_mem_mb",
    "eval_peak_mem_mb",
    "images_per_second",
    "relabel_seconds",
    "label_bytes",
    "image_bytes",
    "storage_bytes",
    "distill_device",
    "distill_threads",
    "eval_seconds",
    "phase_seconds",
    "protocol_hash",
    "commit",
    "versions",
    "machine",
    "evaluate_run_id",
]


class ReportError(ValueError):
    """The tracking store does not hold the runs the pipeline outputs refer to (an input
    error: the report stage exits with code 2 and this message)."""


@dataclass
class Cell:
    """Everything the report needs about one (profile, method, ipc) under one protocol."""

    profile: str
    method: str
    ipc: int
    protocol: str  # "soft" or "hard"
    evaluate: Any  # mlflow Run
    distill: Any
    relabel: Any  # None under the hard-label protocol (no relabelling)
    diagnose: Any
    samples: list[float]  # the values behind the std: per-set means, or per-seed (one set)
    per_set: dict[int, list[float]]  # final top-1 of every eval seed, by distilled set


EVALUATE_STAGE = {"soft": "evaluate", "hard": "evaluate_hard"}


def per_set_top1(metrics: dict[str, float]) -> dict[int, list[float]]:
    """Final top-1 of every (set, eval seed) an evaluate run logged
    (``set<s>.seed<e>.final_top1``), by set, in seed order."""
    found: dict[int, dict[int, float]] = {}
    for key, value in metrics.items():
        parts = key.split(".")
        if len(parts) == 3 and parts[2] == "final_top1" and parts[0][:3] == "set":
            found.setdefault(int(parts[0][3:]), {})[int(parts[1][4:])] = value
    return {s: [v for _, v in sorted(seeds.items())] for s, seeds in sorted(found.items())}


def _md5(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (has its DVC stage run?)")
    return file_digest(path, "md5")


def _search_all(client, experiment_id: str, stage: str) -> list[Any]:
    """Every FINISHED run of ``stage`` in the experiment, newest first."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            f"tags.stage = '{stage}' and attributes.status = 'FINISHED'",
            max_results=10000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs += list(page)
        token = page.token
        if not token:
            return runs


class RunIndex:
    """Finds the run behind an output by content: the newest FINISHED run of the stage
    that tagged ``output.<path>.md5`` with the output's MD5 (outputs carry no run ids: a
    re-run with the same inputs writes the same bytes, and the newest such run wins)."""

    def __init__(self, client, experiment: str) -> None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ReportError(
                f"MLflow experiment {experiment!r} is not in the tracking store (the store is "
                "$MLFLOW_TRACKING_URI or ./mlflow.db): run the pipeline first"
            )
        self._client, self._experiment_id = client, exp.experiment_id
        self._runs: dict[str, list[Any]] = {}

    def _stage(self, stage: str) -> list[Any]:
        if stage not in self._runs:
            self._runs[stage] = _search_all(self._client, self._experiment_id, stage)
        return self._runs[stage]

    def writer(self, stage: str, path: Path, md5: str, *, cell: str) -> Any:
        key = f"output.{path.as_posix()}.md5"
        for run in self._stage(stage):
            if run.data.tags.get(key) == md5:
                return run
        raise ReportError(
            f"{path} (md5 {md5}): no FINISHED {stage} run in the tracking store wrote this "
            f"content. The store is $MLFLOW_TRACKING_URI or ./mlflow.db; re-run the stage "
            f"(`dvc repro --force {stage}@{cell}`) to log it again."
        )

    def of_output(self, stage: str, path: Path, *, cell: str) -> Any:
        """The run that wrote the file ``path`` as it is now."""
        return self.writer(stage, path, _md5(path), cell=cell)

    def of_input(self, stage: str, reader: Any, path: Path, *, cell: str) -> Any:
        """The run that wrote the file ``path`` as ``reader`` (a later stage's run) read it."""
        md5 = reader.data.tags.get(f"input.{path.as_posix()}.md5")
        if md5 is None:
            raise ReportError(
                f"run {reader.info.run_id} ({reader.data.tags.get('mlflow.runName')}) does not "
                f"record reading {path}: re-run it (`dvc repro --force`)"
            )
        return self.writer(stage, path, md5, cell=cell)


def collect_cells(
    client, profiles: Sequence[str], methods: Sequence[str], ipcs: Sequence[int], *, experiment: str
) -> tuple[list[Cell], dict[str, Any]]:
    """Resolves the MLflow runs behind every cell's outputs, under both protocols, and every
    profile's teacher."""
    index = RunIndex(client, experiment)
    cells, teachers = [], {}
    for p in profiles:
        teachers[p] = index.of_output("teacher", paths.teacher_metrics_path(p), cell=p)
        for m in methods:
            for k in ipcs:
                name = f"{p}-{m}-{k}"
                set_file = paths.set_dir(paths.distilled_dir(p, m, k), 0) / paths.SET_FILE
                diagnose = index.of_output("diagnose", paths.diagnostics_path(p, m, k), cell=name)
                for protocol, stage in EVALUATE_STAGE.items():
                    results = paths.results_path(p, m, k, protocol)
                    ev = index.of_output(stage, results, cell=name)
                    relabel = None
                    if protocol == "soft":
                        labels_file = paths.labels_dir(p, m, k) / paths.LABELS_FILE
                        relabel = index.of_input("relabel", ev, labels_file, cell=name)
                    per_set = per_set_top1(ev.data.metrics)
                    if not per_set:
                        raise ReportError(
                            f"run {ev.info.run_id} ({stage} of {name}) logged no "
                            "set<s>.seed<e>.final_top1 metric: re-run it (`dvc repro --force`)"
                        )
                    distill = index.of_input("distill", ev, set_file, cell=name)
                    cells.append(
                        Cell(
                            p,
                            m,
                            k,
                            protocol,
                            ev,
                            distill,
                            relabel,
                            diagnose,
                            level_values(per_set),
                            per_set,
                        )  # fmt: skip
                    )
    return cells, teachers


def _method_label(method: str, distill_params: dict[str, str]) -> str:
    """The method's row name: its registry name, marked ``(bf16)`` when its set was
    synthesised under bf16 autocast (``synthesis.precision``), so a reduced-precision row is
    never read, or compared, as the float32 method."""
    precision = distill_params.get(
        "method.synthesis.precision",  # the shared synthesis loop (WMDD, SRe2L, FADRM)
        distill_params.get("method.precision", "fp32"),  # DM's own loop
    )
    return method if precision == "fp32" else f"{method} ({precision})"


LRS_WEIGHT = 0.5  # DD-Ranking's default w (``lrs_lambda``)


def label_robust_score(ior: float, hlr: float, w: float = LRS_WEIGHT) -> float:
    r"""DD-Ranking's label-robust score (Li et al., 2025), in [0, 1] for terms in [-1, 1]:
    :math:`(e^{\alpha} - e^{-1}) / (e - e^{-1})`, :math:`\alpha = w\,\mathrm{IOR} -
    (1 - w)\,\mathrm{HLR}`, with IOR and HLR as *fractions* (as DD-Ranking's definition
    states; its shipped code passes percentages, which leaves [0, 1]: not reproduced)."""
    alpha = w * ior - (1 - w) * hlr
    return (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))


def full_data_top1(teacher, hard_evaluate) -> float:
    """Top-1 (%) of the hard-label student's architecture trained on the full real data
    with hard labels, the HLR's reference: the profile's teacher, when its model is the
    hard protocol's student (same name and options, from the runs' params); NaN when it is
    not (no such model was trained, so no HLR)."""
    teacher_model = _params_under(teacher.data.params, "teacher.model.")
    student = _params_under(hard_evaluate.data.params, "protocol.student.")
    if not teacher_model or teacher_model != student:
        return math.nan
    return float(teacher.data.metrics["val_top1"])


def _params_under(params: dict[str, str], prefix: str) -> dict[str, str]:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def add_relative_scores(df: pd.DataFrame) -> pd.DataFrame:
    """DD-Ranking's scores per row, from fractions: ``ior`` = the method minus the random
    subset (same dataset, IPC and protocol), ``hlr`` = full real data minus the method
    under hard labels (``full_top1``, :func:`full_data_top1`), and ``lrs`` =
    :func:`label_robust_score` of the two (w = 0.5). NaN where a term is missing."""
    means = {(r.profile, r.method, r.ipc, r.protocol): r.top1_mean for r in df.itertuples()}
    ior, hlr = [], []
    for r in df.itertuples():
        random = means.get((r.profile, "random", r.ipc, r.protocol), math.nan)
        hard = means.get((r.profile, r.method, r.ipc, "hard"), math.nan)
        ior.append((r.top1_mean - random) / 100)
        hlr.append((r.full_top1 - hard) / 100)
    df = df.assign(ior=ior, hlr=hlr)
    lrs = [
        math.nan if math.isnan(i) or math.isnan(h) else label_robust_score(i, h)
        for i, h in zip(df.ior, df.hlr, strict=True)
    ]
    return df.assign(lrs=lrs)


def results_frame(cells: list[Cell], teachers: dict[str, Any]) -> pd.DataFrame:
    """One row per cell and protocol with the CSV columns (accuracies in percent). The gain
    over random is measured under the same protocol on the set-level samples (Welch's
    interval and p, :func:`wmdd.report.compare.welch_interval`)."""
    random = {(c.profile, c.ipc, c.protocol): c.samples for c in cells if c.method == "random"}
    hard_runs = {(c.profile, c.method, c.ipc): c.evaluate for c in cells if c.protocol == "hard"}
    rows = []
    for c in cells:
        ev, di, dg = c.evaluate.data, c.distill.data, c.diagnose.data
        rl = c.relabel.data if c.relabel is not None else None
        ref = random.get((c.profile, c.ipc, c.protocol))
        gain = lo = hi = p = math.nan
        if ref and c.method != "random":
            gain, lo, hi, p = welch_interval(c.samples, ref)
        rows.append(
            {
                "dataset": ev.tags.get("dataset_name", ""),
                "profile": c.profile,
                "budget": ev.tags["budget"],
                "method": _method_label(c.method, di.params),
                "ipc": c.ipc,
                "protocol": c.protocol,
                "seeds": len(c.samples),
                "sets": len(c.per_set),
                "eval_seeds": len(next(iter(c.per_set.values()))),
                "std_over": "sets" if len(c.per_set) > 1 else "eval seeds",
                "top1_mean": ev.metrics["top1_mean"],
                "top1_std": ev.metrics["top1_std"],
                "top5_mean": ev.metrics["top5_mean"],
                "best_top1_mean": ev.metrics["best_top1_mean"],
                "gain_vs_random": gain,
                "gain_ci_low": lo,
                "gain_ci_high": hi,
                "welch_p": p,
                "full_top1": (
                    full_data_top1(teachers[c.profile], hard_runs[c.profile, c.method, c.ipc])
                    if (c.profile, c.method, c.ipc) in hard_runs
                    else math.nan
                ),
                "teacher_top1": teachers[c.profile].data.metrics["val_top1"],
                "teacher_agreement": dg.metrics["teacher_agreement"],
                "teacher_label_prob": dg.metrics["teacher_label_prob"],
                "pixels_outside": dg.metrics["pixels_outside"],
                "barycenter_agreement": dg.metrics.get("barycenter_agreement", math.nan),
                "feature_distance": dg.metrics.get("feature_distance", math.nan),
                "distill_seconds": di.metrics["distill_seconds"],
                "peak_mem_mb": max(
                    di.metrics["peak_mem_mb"],
                    rl.metrics.get("peak_mem_mb", 0.0) if rl else 0.0,
                    ev.metrics["peak_mem_mb"],
                ),
                "distill_peak_mem_mb": di.metrics["peak_mem_mb"],
                "relabel_peak_mem_mb": rl.metrics.get("peak_mem_mb", math.nan) if rl else math.nan,
                "eval_peak_mem_mb": ev.metrics["peak_mem_mb"],
                "images_per_second": di.metrics["images_per_second"],
                "relabel_seconds": rl.metrics["relabel_seconds"] if rl else 0.0,
                "label_bytes": rl.metrics["label_bytes"] if rl else 0.0,
                "image_bytes": di.metrics.get("image_bytes", math.nan),
                "storage_bytes": _storage_bytes(di, rl, len(next(iter(c.per_set.values())))),
                "distill_device": di.tags.get("device", ""),
                "distill_threads": di.tags.get("threads", ""),
                "eval_seconds": ev.metrics["eval_seconds"],
                "phase_seconds": _phases(di.metrics),
                "protocol_hash": ev.tags["protocol_hash"],
                "commit": ev.tags["git_commit"][:12],
                "versions": ", ".join(
                    f"{k} {ev.tags.get(f'version.{k}', '?')}" for k in ("torch", "timm", "POT")
                ),
                "machine": ev.tags.get("device", ""),
                "evaluate_run_id": c.evaluate.info.run_id,
            }
        )
    return add_relative_scores(pd.DataFrame(rows, columns=CSV_COLUMNS))


def _storage_bytes(distill, relabel, eval_seeds: int) -> float:
    """What one student of the cell needs stored: one set's images (as ``set.pt`` holds
    them) plus, under the soft-label protocol, the soft labels of one eval seed (the relabel
    run's ``label_bytes`` cover every eval seed of a set; nothing when labels are computed
    online). NaN for a distill run from before ``image_bytes`` was logged."""
    images = distill.metrics.get("image_bytes", math.nan)
    if relabel is None:
        return images
    return images + relabel.metrics["label_bytes"] / eval_seeds


def _phases(metrics: dict[str, float]) -> str:
    """A method's own timing breakdown (``time_<phase>_seconds`` metrics of its distill run),
    e.g. ``features 1.2; barycenters 0.3; bn_stats 0.8; optimise 40.1``."""
    phases = sorted(
        (k[5:-8], v)
        for k, v in metrics.items()
        if k.startswith("time_") and k.endswith("_seconds")  # the cell's (mean over sets)
    )
    return "; ".join(f"{name} {v:.1f}" for name, v in phases)


def _fmt_acc(mean: float, std: float, n: int) -> str:
    return f"{mean:.1f} ± {std:.1f} ({n})"


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _fmt_n(r) -> str:
    """``3 × 2`` (sets × eval seeds), marking a one-set cell's spread as over seeds."""
    return f"{int(r.sets)} × {int(r.eval_seeds)}" + (" †" if int(r.sets) == 1 else "")


def _accuracy_table(df: pd.DataFrame) -> list[str]:
    """Per method and IPC: the soft- and hard-label accuracies side by side and what the
    teacher's labels add (soft minus hard, points)."""
    rows = []
    for (method, ipc), g in df.groupby(["method", "ipc"], sort=False):
        by = {r.protocol: r for r in g.itertuples()}
        soft, hard = by.get("soft"), by.get("hard")
        cells = [
            _fmt_acc(r.top1_mean, r.top1_std, int(r.seeds)) if r is not None else "-"
            for r in (soft, hard)
        ]
        adds = f"{soft.top1_mean - hard.top1_mean:+.1f}" if soft and hard else "-"
        rows.append([f"`{method}`", str(ipc), *cells, adds, _fmt_n(soft or hard)])
    return _table(
        ["method", "IPC", "soft labels (teacher)", "hard labels", "the teacher's labels add",
         "sets × eval seeds"],
        rows,
    )  # fmt: skip


def comparison_sentence(r, random_n: int | None = None) -> str:
    """One generated sentence on a method against the random subset (same protocol): the
    gap, its 95% interval and whether it is significant, with the n behind it."""
    where = f"`{r.method}` vs `random` at IPC {r.ipc} ({r.protocol} labels)"
    if math.isnan(r.welch_p):
        return (f"{where}: {r.gain_vs_random:+.1f} points; no interval (one value on a side, "
                "so no noise estimate).")  # fmt: skip
    verdict = "significant" if r.welch_p < 0.05 else "not significant"
    side = "better" if r.gain_vs_random > 0 else "worse"
    claim = f"{r.method} is {side} than random" if r.welch_p < 0.05 else "no difference shown"
    return (
        f"{where}: {r.gain_vs_random:+.1f} points, 95% interval "
        f"[{r.gain_ci_low:+.1f}, {r.gain_ci_high:+.1f}] (Welch on {int(r.seeds)} "
        f"{'per-set means' if r.std_over == 'sets' else 'eval seeds of its one set'} vs "
        f"random's {random_n if random_n is not None else '?'}), "
        f"{verdict} at α = 0.05 (p = {_fmt_p(r.welch_p)}): {claim}."
    )


def _gain_table(df: pd.DataFrame) -> list[str]:
    rows = [
        [
            f"`{r.method}`",
            str(r.ipc),
            r.protocol,
            f"{r.gain_vs_random:+.1f}",
            "n/a"
            if math.isnan(r.gain_ci_low)
            else f"[{r.gain_ci_low:+.1f}, {r.gain_ci_high:+.1f}]",
            _fmt_p(r.welch_p),
        ]
        for r in df.itertuples()
        if r.method != "random" and not math.isnan(r.gain_vs_random)
    ]
    if not rows:
        if "random" not in set(df.method):
            return ["(no `random` cells in this run: gains are measured against them)"]
        return ["(no method other than `random` in this run)"]
    table = _table(
        ["method", "IPC", "protocol", "gain over random (points)", "95% interval", "Welch p"], rows
    )
    random_n = {(r.ipc, r.protocol): int(r.seeds) for r in df.itertuples() if r.method == "random"}
    sentences = [
        f"- {comparison_sentence(r, random_n.get((r.ipc, r.protocol)))}"
        for r in df.itertuples()
        if r.method != "random" and not math.isnan(r.gain_vs_random) and r.protocol == "soft"
    ]
    return table + ["", *sentences]


def _fmt_frac(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:+.3f}"


def _ranking_table(df: pd.DataFrame) -> list[str]:
    """DD-Ranking's scores (IOR, HLR, LRS with w = 0.5, from fractions) per method, IPC and
    protocol, with the n behind each term (sets, or eval seeds †)."""
    n = {(r.method, r.ipc, r.protocol): _fmt_n(r) for r in df.itertuples()}
    rows = []
    for r in df.itertuples():
        rows.append(
            [
                f"`{r.method}`",
                str(r.ipc),
                r.protocol,
                _fmt_frac(r.ior),
                _fmt_frac(r.hlr),
                "n/a" if math.isnan(r.lrs) else f"{100 * r.lrs:.1f}",
                f"{n[r.method, r.ipc, r.protocol]} vs random "
                f"{n.get(('random', r.ipc, r.protocol), '-')}; hard {n.get((r.method, r.ipc, 'hard'), '-')}",
            ]
        )
    full = df.full_top1.dropna()
    reference = (
        f"the profile's teacher, {full.iloc[0]:.1f}% (the hard-label student's architecture "
        "trained on the full real data with hard labels, by the teacher's recipe)"
        if len(full)
        else "none: the teacher is not the hard-label student's architecture, so no HLR"
    )
    return [
        "IOR = method − random subset under the same protocol; HLR = full real data − method "
        "under hard labels; LRS = (e^α − e^−1) / (e − e^−1) with α = 0.5 IOR − 0.5 HLR, as "
        "DD-Ranking defines them, from fractions (IOR, HLR) and shown as % (LRS; 0-100, higher "
        f"is better). Full real data: {reference}. n: sets × eval seeds behind each term.",
        "",
    ] + _table(
        ["method", "IPC", "protocol", "IOR", "HLR", "LRS (%)", "n (method vs random; hard)"], rows
    )


def _drift_notes(df: pd.DataFrame) -> list[str]:
    """Generated lines for sets whose pixels left the valid range (more than 1% of the
    values; DM's drift), with the teacher's agreement and the hard-label score beside."""
    notes = []
    for r in df[df.protocol == "soft"].itertuples():
        if r.pixels_outside > 1.0:
            hard = df[(df.method == r.method) & (df.ipc == r.ipc) & (df.protocol == "hard")]
            beside = (
                f"; under hard labels, where no teacher reads the images, it scores "
                f"{hard.iloc[0].top1_mean:.1f}%"
                if len(hard)
                else ""
            )
            verdict = (
                ", so many of its soft labels teach other classes"
                if r.teacher_agreement < 90
                else ""
            )
            notes.append(
                f"- `{r.method}` at IPC {r.ipc}: {r.pixels_outside:.1f}% of its pixel values lie "
                f"outside [0, 1] and the teacher agrees with {r.teacher_agreement:.0f}% of its "
                f"labels{verdict}{beside}."
                + (
                    " DM's embedder normalises each image (instance norm), so its loss ignores "
                    "an image's scale and every step grows it; faithful to the official code "
                    '(README "DM\'s drift"; `methods.dm.renorm` is the optional fix).'
                    if r.method.startswith("dm")
                    else ""
                )
            )
    return notes


def _secondary_table(df: pd.DataFrame) -> list[str]:
    rows = [
        [
            f"`{r.method}`",
            str(r.ipc),
            f"{r.top5_mean:.1f}",
            f"{r.best_top1_mean:.1f}",
            f"{r.teacher_agreement:.0f}",
            f"{r.teacher_label_prob:.2f}",
            f"{r.pixels_outside:.1f}",
            "-" if math.isnan(r.barycenter_agreement) else f"{r.barycenter_agreement:.0f}",
            "-" if math.isnan(r.feature_distance) else f"{r.feature_distance:.2f}",
        ]
        for r in df[df.protocol == "soft"].itertuples()
    ]
    return _table(
        [
            "method",
            "IPC",
            "top-5 (final)",
            "best-epoch top-1 (not the headline)",
            "teacher agrees with the set's labels (%)",
            "teacher prob. of the label",
            "pixels outside [0, 1] (%)",
            "teacher agrees with the barycenter points (%)",
            "feature distance to its point (relative)",
        ],
        rows,
    )


def _mib(nbytes: float) -> str:
    return "-" if math.isnan(nbytes) else f"{nbytes / 2**20:.2f}"


def _cost_table(df: pd.DataFrame) -> list[str]:
    """Per method and IPC: what the set cost to make (seconds, on which device and threads)
    and to store (one set's images as stored, and one student's soft labels), and what
    relabelling and evaluating it cost."""
    hard = {(r.method, r.ipc): r for r in df[df.protocol == "hard"].itertuples()}
    rows = []
    for r in df[df.protocol == "soft"].itertuples():
        h = hard.get((r.method, r.ipc))
        seeds = int(r.eval_seeds)
        rows.append(
            [
                f"`{r.method}`",
                str(r.ipc),
                f"{r.distill_seconds:.1f}",
                f"{r.images_per_second:.2f}",
                f"{r.distill_device or '?'}, {r.distill_threads or '?'} thr.",
                _mib(r.image_bytes),
                _mib(r.label_bytes / seeds),
                _mib(r.storage_bytes),
                f"{r.relabel_seconds:.1f}",
                f"{r.eval_seconds:.1f}",
                f"{h.eval_seconds:.1f}" if h is not None else "-",
                f"{max(r.peak_mem_mb, h.peak_mem_mb) if h is not None else r.peak_mem_mb:.0f}",
                r.phase_seconds or "-",
            ]
        )
    return _table(
        [
            "method",
            "IPC",
            "distill s (one set)",
            "images/s",
            "distilled on",
            "images MiB (one set, as stored)",
            "soft labels MiB (one student)",
            "storage MiB (images + labels)",
            "relabel s (one set)",
            "soft eval s (one set, all seeds)",
            "hard eval s (one set, all seeds)",
            "peak mem MiB",
            "distill phases (s)",
        ],
        rows,
    )


def _published_table(dataset: str, methods: Sequence[str], ipcs: Sequence[int]) -> list[str]:
    """The published numbers of the run's methods at the run's IPCs beside ours, with the
    protocol each was published under (a method without a number at those IPCs: no row)."""
    pub = PUBLISHED.get(dataset)
    if not pub:
        return []
    rows = []
    for m in methods:
        if m in pub and any(k in pub[m] for k in ipcs):
            rows.append(
                [f"`{m}`"]
                + [f"{pub[m][k]:.1f}" if k in pub[m] else "-" for k in ipcs]
                + [PUBLISHED_PROTOCOL[m]]
            )
    if not rows:
        return []
    return [
        "",
        f"Published ({PUBLISHED_SOURCE[dataset]}; mixes protocols, so not comparable row to row):",
        "",
    ] + _table(["method"] + [f"IPC {k}" for k in ipcs] + ["published under"], rows)


def render_markdown(
    df: pd.DataFrame,
    teachers: dict[str, Any],
    *,
    versions: dict[str, str],
    figures: dict[str, list[str]],
) -> str:
    """The Markdown report (deterministic given the runs: no timestamps)."""
    commits = sorted(set(df.commit))
    out = [
        "# Dataset distillation benchmark",
        "",
        "Generated by `python -m pipelines.report` from the MLflow runs the pipeline "
        "outputs name; do not edit by hand. Headline: final-epoch top-1 (%) on the full "
        "validation split, mean ± sample std (n). Each cell is distilled several times, from "
        "its own seed per set, and every set is evaluated with every eval seed; the std and n "
        "are over the per-set means, so they include the variance of the set itself (which "
        "images were drawn, which noise the synthesis started from). † marks a cell with one "
        "set (a deterministic method such as herding): its spread is over eval seeds only. "
        "Every cell is evaluated under the soft-label protocol (the teacher relabels every "
        "view) and the hard-label protocol (the images with their class labels alone).",
        "",
        f"- commit(s): {', '.join(f'`{c}`' for c in commits)}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]
    for profile, g in df.groupby("profile", sort=False):
        teacher = teachers[profile].data
        first = g.iloc[0]
        hashes = {r.protocol: r.protocol_hash for r in g.itertuples()}
        out += [
            f"## {profile} — {first.dataset} (budget: {first.budget})",
            "",
            "- protocols: " + ", ".join(f"`{k}`-label, hash `{h}`" for k, h in hashes.items()),
            f"- teacher: top-1 {teacher.metrics['val_top1']:.1f}% "
            f"(trained in {teacher.metrics['seconds']:.0f} s, "
            f"peak {teacher.metrics['peak_mem_mb']:.0f} MiB, device "
            f"{teachers[profile].data.tags.get('device', '?')})",
            "",
        ]
        out += _accuracy_table(g)
        out += _published_table(first.dataset, list(g.method.unique()), sorted(g.ipc.unique()))
        out += ["", "Gain over the random real subset under the same protocol:", ""]
        out += _gain_table(g)
        out += ["", "Relative to random and to the full data (DD-Ranking's scores):", ""]
        out += _ranking_table(g)
        drift = _drift_notes(g)
        if drift:
            out += ["", "Sets the teacher cannot read:", "", *drift]
        out += [
            "",
            "Secondary metrics. The teacher columns are the teacher's verdict on the set's "
            "clean images (stage `diagnose`): a set the teacher does not recognise is "
            "relabelled with other classes, whatever the method optimised.",
            "",
        ] + _secondary_table(g)
        out += ["", "Compute cost:", ""] + _cost_table(g)
        for fig in figures.get(profile, []):
            out += ["", f"![{Path(fig).stem}]({fig})"]
        out.append("")
    return "\n".join(out)


def _method_colours(g: pd.DataFrame) -> dict[str, str]:
    """One matplotlib colour per method of ``g``, in row order (the same in every figure)."""
    return {m: f"C{i % 10}" for i, m in enumerate(g.method.unique())}


def plot_accuracy(df: pd.DataFrame, profile: str, out: Path) -> None:
    """Accuracy vs IPC per method, soft (solid) and hard labels (dotted); error bars: the
    sample std over sets (over eval seeds for a one-set cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = df[df.profile == profile]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    colours = _method_colours(g)
    for (method, protocol), m in g.groupby(["method", "protocol"], sort=False):
        m = m.sort_values("ipc")
        soft = protocol == "soft"
        ax.errorbar(
            m.ipc, m.top1_mean, yerr=m.top1_std, capsize=3, label=f"{method} ({protocol})",
            linestyle="-" if soft else ":", marker="o" if soft else "s", color=colours[method],
        )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(sorted(g.ipc.unique()), [str(k) for k in sorted(g.ipc.unique())])
    ax.set_xlabel("images per class")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"{profile} ({g.iloc[0].budget})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def plot_cost(df: pd.DataFrame, profile: str, out: Path) -> None:
    """Accuracy against storage (one set's images plus one student's soft labels; images
    alone under hard labels) and against distillation time, every method and IPC: soft
    labels filled, hard labels hollow; the IPC is written beside each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    g = df[df.profile == profile]
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6), dpi=120, sharey=True)
    colours = _method_colours(g)
    for ax, column, xlabel in (
        (axes[0], "storage_bytes", "storage per student (MiB, log)"),
        (axes[1], "distill_seconds", "distillation time per set (s, log)"),
    ):
        for (method, protocol), m in g.groupby(["method", "protocol"], sort=False):
            x = (m[column] / (2**20 if column == "storage_bytes" else 1)).clip(lower=1e-3)
            soft = protocol == "soft"
            ax.scatter(
                x, m.top1_mean, label=f"{method} ({protocol})",
                color=colours[method], marker="o" if soft else "s",
                facecolors=colours[method] if soft else "none",
            )  # fmt: skip
            for xi, yi, k in zip(x, m.top1_mean, m.ipc, strict=True):
                ax.annotate(str(k), (xi, yi), textcoords="offset points", xytext=(4, 2), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        low, high = ax.get_xlim()
        if high / low < 10:  # no decade inside: label the minor ticks instead
            ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
            ax.tick_params(axis="x", which="minor", labelsize=7)
        else:
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center right")  # beside the axes, not on them
    fig.suptitle(f"{profile} ({g.iloc[0].budget}): accuracy against cost; labels: IPC", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    fig.savefig(out, metadata={"Software": None})
    plt.close(fig)


def write_accuracy_plots(df: pd.DataFrame, methods: Sequence[str], out_dir: Path) -> None:
    """``<profile>.csv`` per profile: ``ipc`` and one column of mean soft-label top-1 per
    method (the data of ``dvc plots show``'s accuracy-vs-IPC plot, declared in dvc.yaml)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for profile, g in df[df.protocol == "soft"].groupby("profile", sort=False):
        table = g.pivot(index="ipc", columns="method", values="top1_mean")
        rows = [
            {"ipc": int(ipc), **{m: float(table.loc[ipc, m]) for m in methods if m in table}}
            for ipc in sorted(table.index)
        ]
        write_csv(out_dir / f"{profile}.csv", rows, ["ipc", *[m for m in methods if m in table]])


def copy_grids(client, cells: list[Cell], figures_dir: Path) -> dict[str, list[str]]:
    """Copies the preview grid of set 0 logged by noise-synthesising methods' distill runs."""
    figures: dict[str, list[str]] = {}
    for c in cells:
        if c.method not in NOISE_SYNTHESISED or c.protocol != "soft":
            continue
        name = f"{c.profile}_{c.method}_ipc{c.ipc}.png"
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(c.distill.info.run_id, "set0/preview.png", tmp)
            shutil.copy(local, figures_dir / name)
        figures.setdefault(c.profile, []).append(f"figures/{name}")
    return figures


def write_report(
    client,
    profiles: Sequence[str],
    methods: Sequence[str],
    ipcs: Sequence[int],
    *,
    experiment: str,
    out: Path,
) -> pd.DataFrame:
    """Writes ``benchmark.md``, ``results.csv``, ``figures/`` and ``plots/`` under ``out``
    (each atomically) from the runs of the grid; returns the results table. A protocol-
    sensitivity panel (``pipelines.sensitivity``'s ``sensitivity.csv`` in ``out``) is
    rendered at the end of ``benchmark.md``."""
    cells, teachers = collect_cells(client, profiles, methods, ipcs, experiment=experiment)
    df = results_frame(cells, teachers)
    with atomic_dir(out / "figures") as fig_dir:
        figures = copy_grids(client, cells, fig_dir)
        for profile in profiles:
            plot_accuracy(df, profile, fig_dir / f"{profile}_accuracy.png")
            plot_cost(df, profile, fig_dir / f"{profile}_cost.png")
            figures.setdefault(profile, [])[:0] = [
                f"figures/{profile}_accuracy.png",
                f"figures/{profile}_cost.png",
            ]
    with atomic_dir(out / "plots") as plots_dir:
        write_accuracy_plots(df, methods, plots_dir / "accuracy")
    text = render_markdown(df, teachers, versions=package_versions(), figures=figures)
    panel = read_panel(out / PANEL_FILE)
    if panel is not None:  # pipelines.sensitivity's CSV beside the report
        text += "\n## Protocol sensitivity\n\n" + "\n".join(render_panel(panel)) + "\n"
    with atomic_file(out / "benchmark.md") as tmp:
        tmp.write_text(text)
    with atomic_file(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return df
