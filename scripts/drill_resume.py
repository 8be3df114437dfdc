"""Kill drill on the real pipeline: SIGKILL a stage mid-way, run it again, compare bytes.

    python scripts/drill_resume.py teacher@digits --kill-at 15
    python scripts/drill_resume.py evaluate@digits-wmdd-10 --kill-at 150

Run it in a checkout where the stage has already run uninterrupted (``dvc repro``), with
``runtime.checkpoint_seconds: 0`` in params.yaml (no stage depends on it) so that every
epoch or iteration is a checkpoint. The drill re-runs the stage with ``dvc repro --force``,
watches its checkpoint, sends SIGKILL to the stage process once the checkpoint has reached
``--kill-at`` (epochs, or iterations for a synthesis), runs the stage again with ``dvc
repro --force`` (which resumes from the checkpoint), and compares every output file with
the uninterrupted run's. Prints where it killed, where the second run resumed, the wall
times and the comparison; exits 1 if any output differs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml


def outputs_of(stage: str) -> list[Path]:
    """The stage's output files, from dvc.lock (directories expanded)."""
    lock = yaml.safe_load(Path("dvc.lock").read_text())["stages"][stage]
    paths = [Path(o["path"]) for o in lock.get("outs", [])]
    files: list[Path] = []
    for p in paths:
        files += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return files


def digests(files: list[Path]) -> dict[str, str]:
    return {str(f): hashlib.md5(f.read_bytes()).hexdigest() for f in files}


def checkpoint_progress(stage: str) -> int:
    """The furthest epoch / iteration of any loop checkpoint of the stage (0 if none)."""
    name, _, cell = stage.partition("@")
    best = 0
    for f in Path(".checkpoints", name).rglob("*.pt"):
        if f.name.endswith(".done.pt"):
            continue
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except Exception:
            continue  # being replaced right now
        where = str(state.get("where", ""))
        numbers = [int(n) for n in re.findall(r"(?:epoch|iteration) (\d+)", where)]
        best = max(best, *numbers, 0)
    return best


def stage_pid(cmd_fragment: str) -> int | None:
    """The Python process running the stage (not a shell that may wrap it)."""
    out = subprocess.run(["pgrep", "-f", cmd_fragment], capture_output=True, text=True).stdout
    for pid in (int(p) for p in out.split()):
        comm = Path(f"/proc/{pid}/comm")
        if pid != os.getpid() and comm.exists() and comm.read_text().startswith("python"):
            return pid
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", help="a DVC stage, e.g. teacher@digits")
    parser.add_argument("--kill-at", type=int, required=True, help="epoch / iteration")
    args = parser.parse_args()
    runtime = yaml.safe_load(Path("params.yaml").read_text()).get("runtime", {})
    if runtime.get("checkpoint_seconds") != 0:
        sys.exit("set runtime.checkpoint_seconds: 0 in params.yaml for the drill")
    reference = digests(outputs_of(args.stage))
    name, _, cell = args.stage.partition("@")
    fragment = f"pipelines.{name} --dataset {cell.split('-')[0]}"

    start = time.perf_counter()
    first = subprocess.Popen(["dvc", "repro", "--force", "--single-item", args.stage])
    killed_at = 0
    while first.poll() is None:
        killed_at = checkpoint_progress(args.stage)
        if killed_at >= args.kill_at and (pid := stage_pid(fragment)):
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    first.wait()
    print(f"killed the stage with SIGKILL at {killed_at} after {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    second = subprocess.run(
        ["dvc", "repro", "--force", "--single-item", args.stage], capture_output=True, text=True
    )
    print("".join(line + "\n" for line in second.stderr.splitlines() if "resum" in line), end="")
    print(f"second run: exit {second.returncode} in {time.perf_counter() - start:.1f} s")
    after = digests(outputs_of(args.stage))
    for f, md5 in reference.items():
        print(f"{'same' if after.get(f) == md5 else 'DIFFERENT'}  {md5}  {f}")
    sys.exit(0 if after == reference and second.returncode == 0 else 1)


if __name__ == "__main__":
    main()
