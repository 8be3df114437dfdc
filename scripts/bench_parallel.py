"""Benchmark of the parallel runner (not a timed test): wall times side by side, same outputs.

    python scripts/bench_parallel.py pipeline          # digits: dvc repro vs 2 workers
    python scripts/bench_parallel.py shards --tiny-source /path/to/tiny-imagenet-200-subset.zip

``pipeline``: two fresh copies of this checkout (``git clone`` of HEAD); one runs ``dvc
repro`` (sequential, ``benchmark.threads`` torch threads), the other ``python -m
pipelines.parallel --workers 2`` (2 stage processes, the same threads each); prints both
wall times, the ratio, and whether ``dvc.lock`` and every output file are identical.

``shards``: a copy with the ``tiny_cpu`` profile (Tiny-ImageNet subset, 200 classes) runs
prepare + teacher, then distils WMDD at IPC 10 (20 synthesis batches) once in one process
and once as 2 class-range shards in 2 processes (then merged); prints both wall times, the
ratio, and whether the two ``set.pt`` are byte-identical.

Run it alone on the machine: the ratios mean nothing under other load. Prints the
machine's load average before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    return dest


def run(cmd: list[str], cwd: Path, **env: str) -> float:
    full_env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        **env,
    }
    full_env.pop("MLFLOW_TRACKING_URI", None)
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
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["pipeline", "shards"])
    parser.add_argument("--workers", type=int, default=2)
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
        else:
            if not args.tiny_source:
                sys.exit("shards needs --tiny-source")
            shards(work, os.path.abspath(args.tiny_source), args.teacher_epochs)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
