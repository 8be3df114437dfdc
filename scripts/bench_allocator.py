"""What the stages' allocator policy buys (not a timed test): glibc's default against "retain".

    python scripts/bench_allocator.py --dataset imagenette_cpu --ipc 10

Every stage calls :func:`wmdd.utils.set_allocator` (``WMDD_MALLOC``, default ``retain``).
This script measures, for each policy in a FRESH process (the policy is process-wide and
the heap's history matters), side by side and alternating, on random images at the
profile's shapes (no prepared data needed):

* **DM iteration**: the profile's DM settings (real images per class, embedder width and
  depth, DSA) at ``--ipc``, all classes;
* **teacher train step**: the profile's teacher architecture, one SGD step on a batch of
  its ``batch_size`` at its resolution.

With ``--dm-precision fp32 bf16`` DM is timed in both precisions (``methods.dm.precision``)
and the bf16 speed-up is printed. It prints wall seconds per step, the kernel (system)
seconds, minor page faults per step and the resident peak (medians over ``--repeats``
processes per policy), and checks that DM's images are byte-identical under both policies.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLICIES = ("system", "retain")


def _random_data(classes: int, per_class: int, res: int):
    """A PreparedData of random uint8 images, classes interleaved (seeded)."""
    import torch

    from wmdd.data.prepared import PreparedData

    gen = torch.Generator().manual_seed(0)
    train_y = torch.arange(classes).repeat(per_class)
    x = torch.randint(0, 256, (len(train_y), 3, res, res), generator=gen, dtype=torch.uint8)
    val_y = torch.arange(classes)
    val_x = torch.randint(0, 256, (classes, 3, res, res), generator=gen, dtype=torch.uint8)
    return PreparedData(
        name="random",
        classes=[f"c{i}" for i in range(classes)],
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        train_x=x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
    )


def probe(args: argparse.Namespace) -> dict:
    """One policy, one workload, in this process: per-step figures (run by the parent)."""
    from wmdd.utils import set_allocator

    done = set_allocator(args.probe_policy)
    import dataclasses

    import torch

    from pipelines.registry import method_config
    from wmdd.config import load_params
    from wmdd.models.registry import create_model

    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    profile = params.profile(args.dataset)
    res = profile.data.resolution
    digest = ""
    if args.probe_work == "dm":
        from baselines.dm import dm

        config = dataclasses.replace(
            method_config(params, "dm", args.dataset), precision=args.probe_precision
        )
        data = _random_data(args.classes, max(config.real_per_class, args.ipc) * 2, res)
        steps = args.steps

        def run(iterations: int):
            cfg = dataclasses.replace(config, iterations=iterations)
            return dm(teacher=None, data=data, classes=range(args.classes), ipc=args.ipc,
                      config=cfg, seed=0, device=torch.device("cpu"), progress=False)  # fmt: skip

        run(2)  # warm-up: the heap settles
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        out = run(steps)
        digest = hashlib.sha256(out.images.numpy().tobytes()).hexdigest()[:16]
    else:
        model = profile.teacher.model
        torch.manual_seed(0)
        net = create_model(model.name, num_classes=args.classes, in_chans=3, resolution=res,
                           **model.kwargs)  # fmt: skip
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(profile.teacher.batch_size, 3, res, res)
        y = torch.randint(0, args.classes, (profile.teacher.batch_size,))

        def step() -> None:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

        step()
        steps = args.steps * 2
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            step()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "allocator": done,
        "wall": wall / steps,
        "system": (r1.ru_stime - r0.ru_stime) / steps,
        "faults": (r1.ru_minflt - r0.ru_minflt) / steps,
        "peak_mib": r1.ru_maxrss / 1024,
        "digest": digest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="imagenette_cpu")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=6, help="DM iterations (train steps: 2x)")
    parser.add_argument("--repeats", type=int, default=2, help="processes per policy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--probe-policy", choices=POLICIES, help=argparse.SUPPRESS)
    parser.add_argument("--dm-precision", nargs="+", default=["fp32"], choices=("fp32", "bf16"),
                        help="DM rows to time (methods.dm.precision); bf16 also tests autocast")  # fmt: skip
    parser.add_argument("--probe-work", choices=("dm", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--probe-precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_policy:
        print(json.dumps(probe(args)))
        return
    import torch

    print(f"# {args.dataset}: DM IPC {args.ipc} and a teacher train step, {args.classes} "
          f"classes, random images; {args.repeats} process(es) per policy, alternating")  # fmt: skip
    print(f"torch {torch.__version__}, {args.threads} thread(s), "
          f"load average before {os.getloadavg()[0]:.2f}\n")  # fmt: skip
    rows = []
    dm_retain: dict[str, float] = {}
    works = [("dm", f"DM iteration, IPC {args.ipc}, {p}", p) for p in args.dm_precision]
    for work, label, precision in [*works, ("train", "teacher train step", "fp32")]:
        results: dict[str, list[dict]] = {p: [] for p in POLICIES}
        for _ in range(args.repeats):
            for policy in POLICIES:
                cmd = [sys.executable, __file__, "--probe-policy", policy, "--probe-work", work,
                       "--probe-precision", precision]  # fmt: skip
                for key in ("dataset", "ipc", "classes", "steps", "threads", "params"):
                    cmd += [f"--{key}", str(getattr(args, key))]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results[policy].append(json.loads(out.strip().splitlines()[-1]))
        med = {
            p: {
                k: statistics.median(r[k] for r in rs)
                for k in ("wall", "system", "faults", "peak_mib")
            }
            for p, rs in results.items()
        }
        digests = {r["digest"] for rs in results.values() for r in rs}
        same = "n/a" if digests == {""} else ("yes" if len(digests) == 1 else "NO")
        if work == "dm":
            dm_retain[precision] = med["retain"]["wall"]
        sysd, ret = med["system"], med["retain"]
        rows.append(
            f"| {label} | {sysd['wall']:.3f} s | {ret['wall']:.3f} s | "
            f"{sysd['wall'] / ret['wall']:.2f}x | {sysd['system']:.3f} -> {ret['system']:.3f} s | "
            f"{sysd['faults']:.0f} -> {ret['faults']:.0f} | "
            f"{sysd['peak_mib']:.0f} -> {ret['peak_mib']:.0f} MiB | {same} |"
        )
        print(f"{label}: retain is {results['retain'][0]['allocator']}", file=sys.stderr)
    print("| work | glibc default | retain | speed-up | kernel time per step | page faults "
          "per step | resident peak | identical output |")  # fmt: skip
    print("|---|---:|---:|---:|---|---|---|---|")
    print("\n".join(rows))
    if len(dm_retain) == 2:
        print(f"\nDM bf16 against fp32 (retain): {dm_retain['fp32'] / dm_retain['bf16']:.2f}x")


if __name__ == "__main__":
    main()
