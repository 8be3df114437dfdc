"""Benchmark of the parallel runner (not a timed test): wall times side by side, same outputs.

    python scripts/bench_parallel.py pipeline          # digits: dvc repro vs 2 workers
    python scripts/bench_parallel.py shards --tiny-source /path/to/tiny-imagenet-200-subset.zip
    python scripts/bench_parallel.py commits --base 2b0739c --targets evaluate \
        --set 'benchmark.datasets=[imagenette_cpu]' --set-head benchmark.sets=1 ...

``pipeline``: two fresh copies of this checkout (``git clone`` of HEAD); one runs ``dvc
repro`` (sequential, ``benchmark.threads`` torch threads), the other ``python -m
pipelines.parallel --workers 2`` (2 stage processes, the same threads each); prints both
wall times, the ratio, and whether ``dvc.lock`` and every output file are identical.

``shards``: a copy with the ``tiny_cpu`` profile (Tiny-ImageNet subset, 200 classes) runs
prepare + teacher, then distils WMDD at IPC 10 (20 synthesis batches) once in one process
and once as 2 class-range shards in 2 processes (then merged); prints both wall times, the
ratio, and whether the two ``set.pt`` are byte-identical.

``commits``: the whole pipeline at an older commit (``--base``) against this checkout's
HEAD, on the same machine, one run after another: the base in one process (``dvc repro``),
HEAD in one process, then HEAD with the parallel runner (``--workers``, ``--shards``). Each
copy gets the ``--set`` overrides (``dvc exp run -S`` syntax), plus ``--set-base`` or
``--set-head`` for keys that exist at one commit only, so that both run the same work.
Prints every stage's time at each commit in one table (a sequential stage: from DVC's
"Running stage" to its lock update; a parallel one: its task time), the totals and wall
times with the ratios, and each cell's top-1 at both commits with the difference and the
reported std. Stage times are appended to ``<copy>/bench_stages.jsonl`` as stages finish,
so with ``--keep DIR`` an interrupted run resumes where it stopped (DVC skips what is
done) and the table still has every stage. ``--concurrent`` runs the two one-process
pipelines at once, each pinned to one core.

Run it alone on the machine: the ratios mean nothing under other load. Prints the
machine's load average before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    return dest


def stage_env() -> dict[str, str]:
    """This environment with the venv's tools first, no DVC analytics, and the copy's own
    MLflow store (no inherited tracking URI)."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run(cmd: list[str], cwd: Path, **env: str) -> float:
    full_env = {**stage_env(), **env}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.perf_counter() - start


def digests(root: Path) -> dict[str, str]:
    out = {}
    for top in ("data", "models", "distilled", "labels", "results"):
        for f in sorted((root / top).rglob("*")):
            if f.is_file():
                out[str(f.relative_to(root))] = hashlib.md5(f.read_bytes()).hexdigest()
    return out


def override(repo: Path, *overrides: str) -> None:
    from dvc.utils.hydra import apply_overrides

    apply_overrides(repo / "params.yaml", list(overrides))
    subprocess.run(["git", "commit", "-qam", "bench params"], cwd=repo, check=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
                        "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"})  # fmt: skip


def pipeline(work: Path, workers: int) -> None:
    seq, par = clone(work / "sequential"), clone(work / "parallel")
    t_seq = run([str(BIN / "dvc"), "repro"], seq)
    print(f"sequential dvc repro: {t_seq:.0f} s")
    t_par = run([str(BIN / "python"), "-m", "pipelines.parallel", "--workers", str(workers)], par)
    print(f"parallel runner ({workers} workers): {t_par:.0f} s")
    print(f"speed-up: {t_seq / t_par:.2f}x")
    same_lock = (seq / "dvc.lock").read_bytes() == (par / "dvc.lock").read_bytes()
    a, b = digests(seq), digests(par)
    print(f"dvc.lock identical: {same_lock}; output files identical: {a == b} ({len(a)} files)")


def shards(work: Path, source: str, teacher_epochs: int | None) -> None:
    repo = clone(work / "tiny")
    extra = [f"datasets.tiny_cpu.teacher.epochs={teacher_epochs}"] if teacher_epochs else []
    override(repo, "benchmark.datasets=[tiny_cpu]", "benchmark.methods=[wmdd]", "benchmark.ipcs=[10]",
             f"datasets.tiny_cpu.data.source={source}", *extra)  # fmt: skip
    t_setup = run([str(BIN / "dvc"), "repro", "teacher@tiny_cpu"], repo)
    print(f"prepare + teacher (not compared): {t_setup:.0f} s")
    cmd = [str(BIN / "python"), "-m", "pipelines.distill", "--dataset", "tiny_cpu", "--method", "wmdd",
           "--ipc", "10", "--no-progress"]  # fmt: skip
    t_one = run(cmd, repo)
    one = (repo / "distilled/tiny_cpu/wmdd/ipc10/set0/set.pt").read_bytes()
    print(f"one process: {t_one:.0f} s")
    env = stage_env()
    start = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--classes", r], cwd=repo, env=env, stderr=subprocess.DEVNULL)
             for r in ("0:100", "100:200")]  # fmt: skip
    codes = [p.wait() for p in procs]
    t_shards = time.perf_counter() - start
    t_merge = run(cmd, repo)
    two = (repo / "distilled/tiny_cpu/wmdd/ipc10/set0/set.pt").read_bytes()
    print(f"2 shards in 2 processes: {t_shards:.0f} s (exit {codes}), merge: {t_merge:.0f} s")
    print(
        f"speed-up: {t_one / t_shards:.2f}x shards alone, {t_one / (t_shards + t_merge):.2f}x with the merge"
    )
    print(f"set.pt identical: {one == two}")


RUNNING = re.compile(r"Running stage '([^']+)'")
LOCKED = re.compile(r"(?:Updating|Generating) lock file")
TASK_DONE = re.compile(r"(?:\[\d+/\d+\] )?(\S+@\S+?)(?: classes \S+)?: done in ([0-9.]+) s")


def clone_at(dest: Path, commit: str, overrides: list[str]) -> Path:
    """A copy of this repository at ``commit`` with ``overrides`` applied (kept if present,
    so that an interrupted run resumes)."""
    if not (dest / ".git").exists():
        clone(dest)
        subprocess.run(["git", "checkout", "-q", commit], cwd=dest, check=True)
        if overrides:
            override(dest, *overrides)
    return dest


def timed_stages(cmd: list[str], cwd: Path, parallel: bool, core: int | None = None) -> float:
    """Run ``cmd`` in ``cwd`` (pinned to CPU ``core`` if given), appending each finished
    stage's seconds to ``bench_stages.jsonl`` and this call's elapsed wall time to
    ``bench_wall.json`` as stages finish (so an interrupted call still counts up to its
    last stage); returns the wall seconds of all calls in this copy so far."""
    env = stage_env()
    wall_file = cwd / "bench_wall.json"
    calls = json.loads(wall_file.read_text()) if wall_file.exists() else []
    calls.append({"seconds": 0.0, "load_before": os.getloadavg()[0], "core": core})
    with (cwd / "bench_stages.jsonl").open("a") as record, (cwd / "bench.log").open("a") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        if core is not None:  # before DVC starts a stage; its processes inherit the mask
            os.sched_setaffinity(proc.pid, {core})
        current: tuple[str, float] | None = None
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter()
            log.write(line)
            log.flush()
            entry = None
            if parallel:
                if (done := TASK_DONE.search(line)) is not None:
                    entry = {"stage": done.group(1), "seconds": float(done.group(2))}
            elif (running := RUNNING.search(line)) is not None:
                current = (running.group(1), now)
            elif LOCKED.search(line) and current is not None:
                entry = {"stage": current[0], "seconds": now - current[1]}
                current = None
            if entry is not None:
                record.write(json.dumps(entry) + "\n")
                record.flush()
                calls[-1]["seconds"] = now - start
                wall_file.write_text(json.dumps(calls))
        code = proc.wait()
        if current is not None and code == 0:  # DVC printed no lock line after the last stage
            record.write(
                json.dumps({"stage": current[0], "seconds": time.perf_counter() - current[1]})
                + "\n"
            )
        calls[-1].update(seconds=time.perf_counter() - start, load_after=os.getloadavg()[0])
        wall_file.write_text(json.dumps(calls))
    if code != 0:
        sys.exit(f"{' '.join(cmd)} failed in {cwd} (exit {code}); see {cwd / 'bench.log'}")
    return sum(c["seconds"] for c in calls)


def stage_seconds(copy: Path) -> dict[str, float]:
    """Seconds per stage from ``bench_stages.jsonl`` (a sharded stage: its tasks summed)."""
    out: dict[str, float] = {}
    path = copy / "bench_stages.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        entry = json.loads(line)
        out[entry["stage"]] = out.get(entry["stage"], 0.0) + entry["seconds"]
    return out


def top1(copy: Path) -> dict[str, tuple[float, float]]:
    """(mean, std) of each soft-label cell's final top-1, keyed ``dataset/method/ipcK`` (the
    results layout of both older and newer commits)."""
    out = {}
    for metrics in sorted((copy / "results").rglob("metrics.json")):
        rel = metrics.relative_to(copy / "results").parts
        if rel[-2] == "hard" or not rel[-2].startswith(("ipc", "soft")):
            continue
        key = "/".join(p for p in rel[:-1] if p != "soft")
        data = json.loads(metrics.read_text())
        out[key] = (data["top1_mean"], data.get("top1_std", math.nan))
    return out


def commits(work: Path, args: argparse.Namespace) -> None:
    targets = args.targets or []
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    runs = [
        ("base", args.base, [*args.set, *args.set_base], [str(BIN / "dvc"), "repro", *targets], False),
        ("head", head, [*args.set, *args.set_head], [str(BIN / "dvc"), "repro", *targets], False),
        ("head-parallel", head, [*args.set, *args.set_head],
         [str(BIN / "python"), "-m", "pipelines.parallel", "--workers", str(args.workers),
          "--shards", str(args.shards), *targets], True),
    ]  # fmt: skip
    copies = {
        name: clone_at(work / name, commit, overrides) for name, commit, overrides, *_ in runs
    }

    def one(name: str, cmd: list[str], parallel: bool, core: int | None) -> float:
        wall = timed_stages(cmd, copies[name], parallel, core)
        print(f"{name}: {wall:.0f} s wall (all calls in {copies[name]})", flush=True)
        return wall

    walls: dict[str, float] = {}
    if args.concurrent:  # the two one-process runs side by side, one core each
        with ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(one, name, cmd, False, core)
                       for core, (name, _, _, cmd, _) in enumerate(runs[:2])}  # fmt: skip
            walls.update({name: f.result() for name, f in futures.items()})
    else:
        for name, _, _, cmd, _ in runs[:2]:
            walls[name] = one(name, cmd, False, None)
    name, _, _, cmd, _ = runs[2]
    walls[name] = one(name, cmd, True, None)
    times = {name: stage_seconds(work / name) for name, *_ in runs}
    stages = sorted(set().union(*times.values()))
    print(
        "\n| stage | base (1 process) s | HEAD (1 process) s | base / HEAD | HEAD parallel, task s |"
    )
    print("|---|---:|---:|---:|---:|")
    for stage in stages:
        b, h, p = (times[n].get(stage, math.nan) for n in ("base", "head", "head-parallel"))
        print(f"| `{stage}` | {b:.0f} | {h:.0f} | {b / h:.2f}x | {p:.0f} |")
    sums = {n: sum(t.values()) or math.nan for n, t in times.items()}
    print(f"| **sum** | {sums['base']:.0f} | {sums['head']:.0f} | "
          f"{sums['base'] / sums['head']:.2f}x | {sums['head-parallel']:.0f} |")  # fmt: skip
    print(f"\nwall: base {walls['base']:.0f} s, HEAD {walls['head']:.0f} s "
          f"({walls['base'] / walls['head']:.2f}x), HEAD parallel {walls['head-parallel']:.0f} s "
          f"({walls['base'] / walls['head-parallel']:.2f}x)")  # fmt: skip
    print(
        "\n| cell (soft labels) | base top-1 | HEAD top-1 | HEAD parallel top-1 | HEAD - base | std (base, HEAD) |"
    )
    print("|---|---:|---:|---:|---:|---|")
    acc = {name: top1(work / name) for name, *_ in runs}
    for cell in sorted(set().union(*acc.values())):
        (bm, bs), (hm, hs), (pm, _) = (acc[n].get(cell, (math.nan, math.nan)) for n in acc)
        print(f"| {cell} | {bm:.2f} | {hm:.2f} | {pm:.2f} | {hm - bm:+.2f} | {bs:.2f}, {hs:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["pipeline", "shards", "commits"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--shards", type=int, default=2, help="commits: the parallel run's --shards"
    )
    parser.add_argument("--base", default="2b0739c", help="commits: the older commit")
    parser.add_argument(
        "--concurrent",
        action="store_true",
        help="commits: run the two one-process pipelines at once, each pinned to its own core "
        "(half the wall time; each then shares memory bandwidth with the other, as the "
        "parallel runner's processes do)",
    )
    parser.add_argument("--targets", nargs="*", help="commits: DVC targets (default: all)")
    for flag, what in (("--set", "both copies"), ("--set-base", "the base copy"),
                       ("--set-head", "the HEAD copies")):  # fmt: skip
        parser.add_argument(flag, action="append", default=[], metavar="KEY=VALUE",
                            help=f"commits: a params override for {what} (dvc exp run -S syntax)")  # fmt: skip
    parser.add_argument("--tiny-source", help="tiny-imagenet-200 archive (shards)")
    parser.add_argument(
        "--teacher-epochs",
        type=int,
        help="shards: train the teacher for this many epochs only (it is not timed, and a "
        "synthesis iteration costs the same whatever the teacher's weights)",
    )
    parser.add_argument("--keep", help="work directory to keep (default: a temporary one)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}; cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.what == "pipeline":
            pipeline(work, args.workers)
        elif args.what == "commits":
            commits(work, args)
        else:
            if not args.tiny_source:
                sys.exit("shards needs --tiny-source")
            shards(work, os.path.abspath(args.tiny_source), args.teacher_epochs)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
