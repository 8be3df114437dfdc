"""The suite's performance dashboard (not a timed test): stage work against its floor.

    python scripts/bench_speed.py --dataset imagenette_cpu --ipc 10 --iterations 20

Needs the profile's prepared data (``dvc repro prepare@<profile>``). With its trained
teacher (``models/<profile>/teacher.pt``) the teacher is that one; without it (or with
``--random-teacher``) a freshly initialised teacher of the profile's architecture stands in:
the times do not depend on the weights.

In ONE process, with ``--threads`` torch threads (default 1, the pipeline's), side by side:

* **floor**: the bare teacher forward + backward (to the input) on one synthesis batch of
  the cell (``batch_budget`` images at the profile's resolution), no loss terms;
* **WMDD iteration**: ``--iterations`` synthesis steps of the cell's first batch through the
  real loop (views, loss, Adam step), as floor / iteration: the share of the wall time
  inside the teacher's forward + backward; and the BN-matching loss alone (forward +
  backward on the BN inputs of one batch);
* **teacher statistics**: the former two passes over the training set (features, then
  per-class BN statistics) against the one pass of the ``teacher_stats`` stage, both on
  ``--stats-classes`` classes, with the one pass's share of one distill stage at
  ``--full-iterations`` iterations and what a distill stage spends loading the shared file.

* with ``--modes``: a WMDD iteration, a soft-protocol student step and DM's embedder on its
  real images, in float32 and under bf16 autocast, each in contiguous and channels_last
  memory format (``synthesis.precision``, the protocol's ``precision``,
  ``benchmark.channels_last``), with the speed-up over fp32 contiguous.

Times are medians over repeats, after one warm-up. Run it alone on the machine; it prints
the load average, torch's version and threads. Output: a Markdown table (README,
"Performance").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.registry import method_config  # noqa: E402
from wmdd import paths  # noqa: E402
from wmdd.config import load_params  # noqa: E402
from wmdd.data import load_data  # noqa: E402
from wmdd.method.distill import wmdd_distill  # noqa: E402
from wmdd.method.loss import bn_matching_loss  # noqa: E402
from wmdd.models.registry import create_model  # noqa: E402
from wmdd.models.teacher import load_teacher  # noqa: E402
from wmdd.synthesis.bn_stats import BNInputRecorder, per_class_bn_stats  # noqa: E402
from wmdd.synthesis.features import class_features  # noqa: E402
from wmdd.synthesis.loop import class_batches  # noqa: E402
from wmdd.synthesis.teacher_stats import TeacherStats, compute_teacher_stats  # noqa: E402

CPU = torch.device("cpu")


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_step(teacher: nn.Module, batch: int, res: int, channels: int) -> Callable[[], None]:
    """One bare forward + backward to the input: what any synthesis step must pay."""
    x = torch.randn(batch, channels, res, res, requires_grad=True)
    forward_features = cast(Callable[[Tensor], Tensor], teacher.forward_features)
    forward_head = cast(Callable[[Tensor], Tensor], teacher.forward_head)

    def step() -> None:
        forward_head(forward_features(x)).sum().backward()
        x.grad = None

    return step


def two_passes(teacher: nn.Module, data, classes: range, batch_size: int) -> None:
    """The precompute as WMDD ran it before the shared stage."""
    class_features(teacher, data, classes, batch_size=256, device=CPU, progress=False)
    for c in classes:
        x = data.normalize(data.train_of_class(c))
        per_class_bn_stats(teacher, x, torch.zeros(len(x), dtype=torch.long), num_classes=1,
                           batch_size=batch_size, progress=False)  # fmt: skip


def mode_table(args, params, data, teacher, config, group, batch) -> list[tuple]:
    """Per (precision, memory format): a WMDD iteration, a soft-protocol student step
    (forward, KD loss, backward, AdamW step on one batch of views) and DM's embedder on its
    real images (forward, no gradient), each a median, as in the pipeline's stages."""
    from baselines.dm import make_embedder
    from pipelines.registry import method_config as config_of
    from wmdd.protocol.runner import build_student
    from wmdd.protocol.soft import kd_loss
    from wmdd.utils import autocast, set_channels_last

    soft = params.profile(args.dataset).protocol.soft
    dm = config_of(params, "dm", args.dataset)
    views = torch.randn(soft.batch_size, data.channels, data.resolution, data.resolution)
    targets = torch.randn(soft.batch_size, data.num_classes)
    real = torch.randn(dm.real_per_class, data.channels, data.resolution, data.resolution)
    stats = compute_teacher_stats(teacher, data, group, device=CPU, progress=False)
    out = []
    for precision in ("fp32", "bf16"):
        for nhwc in (False, True):
            set_channels_last(nhwc)
            try:
                layout = torch.channels_last if nhwc else torch.contiguous_format
                model = teacher.to(memory_format=layout)  # type: ignore[call-overload]
                synthesis = dataclasses.replace(
                    config.synthesis, iterations=args.iterations, precision=precision
                )
                cfg = dataclasses.replace(config, synthesis=synthesis)
                run = dict(teacher=model, data=data, classes=group, ipc=args.ipc, seed=0,
                           device=CPU, progress=False, teacher_stats=stats, config=cfg)  # fmt: skip
                wmdd_distill(**run)  # type: ignore[arg-type]
                iteration = statistics.median(
                    wmdd_distill(**run).aux["timings"]["optimise"] / args.iterations  # type: ignore[arg-type]
                    for _ in range(args.repeats)
                )
                student = build_student(soft.student, num_classes=data.num_classes,
                                        in_chans=data.channels, resolution=data.resolution, seed=0)  # fmt: skip
                opt = torch.optim.AdamW(student.parameters(), lr=soft.lr)

                def step(student=student, opt=opt, precision=precision) -> None:
                    with autocast(precision, CPU):
                        logits = student(views)
                    loss = kd_loss(logits.float(), targets, soft.temperature, soft.t2_factor)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

                student_step = median_seconds(step, args.repeats)
                net = make_embedder(data, dm, seed=0, iteration=0, device=CPU)

                def embed(net=net, precision=precision) -> None:
                    with torch.no_grad(), autocast(precision, CPU):
                        net.forward_features(real)

                dm_embed = median_seconds(embed, args.repeats)
            finally:
                set_channels_last(False)
                teacher.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
            name = f"{precision}, {'channels_last' if nhwc else 'contiguous'}"
            out.append((name, iteration, student_step, dm_embed))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="imagenette_cpu")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20, help="timed synthesis steps")
    parser.add_argument("--full-iterations", type=int, default=0,
                        help="the stage's iterations (default: the profile's)")  # fmt: skip
    parser.add_argument("--stats-classes", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--random-teacher", action="store_true")
    parser.add_argument("--modes", action="store_true",
                        help="also fp32/bf16 x contiguous/channels_last (WMDD, student, DM)")  # fmt: skip
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    profile = params.profile(args.dataset)
    data = load_data(paths.data_dir(args.dataset), profile.data)
    teacher_file = paths.teacher_path(args.dataset)
    if teacher_file.is_file() and not args.random_teacher:
        teacher, which = load_teacher(teacher_file, device=CPU), str(teacher_file)
    else:
        model = profile.teacher.model
        teacher = create_model(model.name, num_classes=data.num_classes, in_chans=data.channels,
                               resolution=data.resolution, **model.kwargs)  # fmt: skip
        teacher = teacher.eval().requires_grad_(False)
        which = f"random-init {model.name}"
    config = method_config(params, "wmdd", args.dataset)
    scfg = config.synthesis
    full_iterations = args.full_iterations or scfg.iterations
    batches = class_batches(range(data.num_classes), args.ipc, scfg.batch_budget)
    group = range(int(batches[0].classes[0]), int(batches[0].classes[-1]) + 1)
    batch = len(batches[0].classes)
    print(f"# {args.dataset}, WMDD IPC {args.ipc}: {batch} images per batch, {len(batches)} "
          f"batch(es), {full_iterations} iterations; teacher {which}")  # fmt: skip
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"load average before {os.getloadavg()[0]:.2f}")  # fmt: skip

    floor = median_seconds(floor_step(teacher, batch, data.resolution, data.channels), args.repeats)
    stats = compute_teacher_stats(teacher, data, group, device=CPU, progress=False)
    timed = dict(teacher=teacher, data=data, classes=group, ipc=args.ipc, seed=0, device=CPU,
                 progress=False, teacher_stats=stats)  # fmt: skip
    short = dataclasses.replace(
        config, synthesis=dataclasses.replace(scfg, iterations=args.iterations)
    )

    def iteration_seconds() -> float:
        out = wmdd_distill(config=short, **timed)  # type: ignore[arg-type]
        return float(out.aux["timings"]["optimise"]) / args.iterations

    iteration_seconds()  # warm-up
    iteration = statistics.median(iteration_seconds() for _ in range(args.repeats))
    # The BN loss alone (forward + backward) on the BN inputs of one real batch forward.
    with BNInputRecorder(teacher) as recorder, torch.no_grad():
        teacher(torch.randn(batch, data.channels, data.resolution, data.resolution))
        recorded = [z.clone() for z in recorder.inputs]
    rows_of = batches[0].classes - group.start
    targets = stats.bn_stats(group, config.bn_pooling)
    inputs = [z.clone().requires_grad_(True) for z in recorded]
    bn_loss = median_seconds(
        lambda: bn_matching_loss(inputs, targets, rows_of).backward(), 5 * args.repeats
    )

    classes = range(min(args.stats_classes, data.num_classes))
    batch_size = params.teacher_stats.batch_size
    n_images = sum(int(data.class_counts("train")[c]) for c in classes)
    old = median_seconds(lambda: two_passes(teacher, data, classes, batch_size), 1)
    new = median_seconds(
        lambda: compute_teacher_stats(
            teacher, data, classes, batch_size=batch_size, device=CPU, progress=False
        ),  # fmt: skip
        1,
    )
    per_image = new / n_images
    all_images = int(sum(data.class_counts("train")))
    stage_stats = per_image * all_images  # the one pass over every class
    distill = iteration * full_iterations * len(batches)
    with tempfile.TemporaryDirectory() as tmp:
        full = compute_teacher_stats(teacher, data, classes, device=CPU, progress=False)
        full.save(Path(tmp) / "s.pt")
        load = median_seconds(lambda: TeacherStats.load(Path(tmp) / "s.pt"), args.repeats)
    load *= data.num_classes / len(classes)

    modes = mode_table(args, params, data, teacher, config, group, batch) if args.modes else []

    rows = [
        ("floor: teacher fwd+bwd, one batch", floor, "1.00"),
        ("WMDD iteration (views, loss, Adam step)", iteration, f"{floor / iteration:.2f}"),
        ("of which the BN loss, fwd+bwd", bn_loss, f"{floor / bn_loss:.2f}"),
    ]
    print("\n| work | seconds | floor / work |\n|---|---:|---:|")
    for name, seconds, ratio in rows:
        print(f"| {name} | {seconds:.4f} | {ratio} |")
    print(
        f"\n| teacher statistics ({len(classes)} classes, {n_images} images) | seconds |\n"
        f"|---|---:|\n| two passes (former: features at 256, BN statistics at {batch_size}) "
        f"| {old:.2f} |\n| one pass (teacher_stats stage) | {new:.2f} |\n"
        f"| ratio two / one | {old / new:.2f}x |"
    )
    print(
        f"\nWhole profile ({all_images} images): one pass ~{stage_stats:.0f} s, once per teacher; "
        f"one WMDD IPC-{args.ipc} distill ~{distill:.0f} s of synthesis. Before: two passes "
        f"inside every WMDD distill, {old / new * stage_stats / (old / new * stage_stats + distill):.0%} "
        f"of it; now the stage reads the shared file in ~{load:.2f} s "
        f"({load / (load + distill):.2%} of it) and the one pass, shared by WMDD IPC 1 and 10 "
        f"and herding, is {stage_stats / (stage_stats + distill):.0%} of one such distill."
    )
    if modes:
        print("\n| mode | WMDD iteration s | student step s | DM embedder, real fwd s |")
        print("|---|---:|---:|---:|")
        base = modes[0][1:]
        for name, *times in modes:
            cells = [f"{t:.4f} ({b / t:.2f}x)" for t, b in zip(times, base, strict=True)]
            print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
