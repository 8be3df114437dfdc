"""Small shared utilities: devices, derived seeds, hashing, atomic outputs, resource usage."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available on this machine")
    return device


# Whether wmdd.models.registry.create_model builds models in channels_last (NHWC) memory
# format: benchmark.channels_last, set once per stage process (pipelines.common.open_stage),
# like torch's thread count.
_CHANNELS_LAST = False


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a loop's forward and loss run in (:data:`wmdd.config.Precision`): nothing
    for ``"fp32"``; for ``"bf16"``
    ``torch.autocast`` to bfloat16 on ``device`` (matrix products and convolutions in bf16,
    reductions kept in float32 by autocast's policy).

    Raises:
        ValueError: on an unknown precision.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision: expected 'fp32' or 'bf16', got {precision!r}")


def set_threads(threads: int) -> None:
    """``threads`` torch intra-op threads (0: torch's default, one per core), and the same
    number for the BLAS and OpenMP libraries numpy and scikit-learn call (threadpoolctl).

    The second part makes results independent of how the process was started: a thread
    count changes the order in which a BLAS kernel sums, and launchers set it differently
    (Dask's nanny exports ``OPENBLAS_NUM_THREADS=1`` and friends to its workers, a shell
    leaves OpenBLAS one thread per core), which made the parallel runner's WMDD barycenters
    differ from ``dvc repro``'s in the last bits. The limit holds for the rest of the process
    (threadpoolctl restores only on ``__exit__``, which is never called here)."""
    from threadpoolctl import threadpool_limits

    if threads > 0:
        torch.set_num_threads(threads)
    threadpool_limits(limits=torch.get_num_threads())


# What set_allocator did in this process (tagged ``allocator`` on every MLflow run).
_ALLOCATOR = "system"

_MALLOC_POLICIES = ("retain", "system")
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h> mallopt parameters
_M_MMAP_MAX = -4
_RETAIN_BYTES = 1 << 30
_GLIBC_DEFAULTS = {_M_MMAP_MAX: 65536, _M_TRIM_THRESHOLD: 128 * 1024}  # glibc's documented ones


def set_allocator(policy: str | None = None) -> str:
    """Keep freed memory in the process instead of handing it back to the kernel (glibc).

    glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh
    ``mmap`` and returns it with ``munmap`` when freed, and trims the heap's free top back to
    the kernel. A stage that allocates and frees the same large activations every step (DM
    embeds 10 classes x 32 real images of 64 px at width 128 per iteration: 64 MiB per
    layer) then pays a page fault per 4 KiB page on every step: about a third of DM's CPU
    time was kernel time. ``"retain"`` (the default) turns mmap-served allocations off and
    raises the trim threshold to 1 GiB, so freed blocks are reused from the heap. It changes
    no result (the same memory holds the same values; tested byte for byte on DM), only
    speed and the resident peak (a few percent higher). ``"system"`` leaves glibc as it is.

    Args:
        policy: ``"retain"`` or ``"system"``; ``None`` reads ``WMDD_MALLOC`` (default
            ``"retain"``).

    Returns:
        What was done, as tagged on runs: ``"glibc-retain"``, or ``"system"`` where the
        policy is ``"system"`` or the C library is not glibc (macOS, musl: nothing to do).

    Raises:
        ValueError: on an unknown policy, naming ``WMDD_MALLOC`` and the accepted values.
    """
    global _ALLOCATOR
    if policy is None:
        policy = os.environ.get("WMDD_MALLOC", "retain") or "retain"
    if policy not in _MALLOC_POLICIES:
        raise ValueError(f"WMDD_MALLOC={policy!r}: expected one of {', '.join(_MALLOC_POLICIES)}")
    wanted = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: _RETAIN_BYTES}
    if policy == "system":
        if _ALLOCATOR != "glibc-retain":
            return _ALLOCATOR  # never changed: glibc's own (adaptive) defaults stand
        wanted = _GLIBC_DEFAULTS  # undo an earlier "retain" in this process
    if platform.libc_ver()[0] == "glibc":
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
        if mallopt is not None and all(mallopt(k, v) == 1 for k, v in wanted.items()):
            _ALLOCATOR = "glibc-retain" if policy == "retain" else "system"
    return _ALLOCATOR


def allocator() -> str:
    """What :func:`set_allocator` did in this process (``"system"`` if never called)."""
    return _ALLOCATOR


def set_channels_last(enabled: bool) -> None:
    """Build every later model of this process in channels_last memory format (or not).

    Inputs need no conversion: a convolution with channels_last weights computes and
    returns channels_last. Results differ from the contiguous format at float32 rounding.
    """
    global _CHANNELS_LAST
    _CHANNELS_LAST = bool(enabled)


def channels_last() -> bool:
    """Whether models are built in channels_last memory format (recorded on MLflow runs)."""
    return _CHANNELS_LAST


def derive_seed(*keys: Any) -> int:
    """A 63-bit seed derived deterministically from ``keys`` (base seed, names, indices...).

    All randomness in the project flows through seeds derived this way from the base seed,
    the dataset, the method, the class, the IPC slot and the eval seed, never from global
    RNG state or the clock, so that sharding work across processes does not change results.
    """
    blob = "\x1f".join(repr(k) for k in keys).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") >> 1


def generator(*keys: Any, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with :func:`derive_seed` of ``keys``."""
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*keys))
    return g


def cosine_factor(step: int, total: int) -> float:
    """:math:`\\frac{1}{2}(1 + \\cos(\\pi t / T))`: the one cosine schedule of the project (1 at
    step 0, 0 at step ``total``), multiplied into a base learning rate per step (teacher,
    synthesis) or per epoch (student)."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def level_values(per_set: dict[int, list[float]]) -> list[float]:
    """The values a cell's spread is measured on, from each distilled set's values over its
    eval seeds: the per-set means, or, for a cell with one set, that set's eval-seed values
    (one rule for the evaluate stage's summary and the report's tests)."""
    if not per_set:
        raise ValueError("level_values: no distilled set")
    if len(per_set) > 1:
        return [statistics.fmean(v) for v in per_set.values()]
    return list(next(iter(per_set.values())))


def file_digest(path: str | Path, algorithm: str = "sha256", chunk_size: int = 1 << 20) -> str:
    """Hex digest of a file (``md5`` matches DVC's hash of a single file)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    """The process's umask (read without changing it where Linux allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(path: Path, *, directory: bool) -> None:
    """Gives a temporary file (0600) or directory (0700) the mode a plain ``open`` or
    ``mkdir`` would have given it (0666 / 0777 minus the umask)."""
    path.chmod((0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling directory that replaces ``path`` only on success.

    Stages write their outputs inside it; if anything raises, the temporary directory is
    removed and ``path`` is left as it was, so DVC never caches a half-written output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _normal_mode(tmp, directory=True)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling file path that replaces ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _normal_mode(tmp, directory=False)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    """Writes JSON atomically (sorted keys, indented, trailing newline)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Writes a CSV atomically: a header of ``columns``, one line per row (for DVC plots)."""
    lines = [",".join(columns)] + [",".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c])
                                           for c in columns) for row in rows]  # fmt: skip
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (has its DVC stage run?)")
    return json.loads(path.read_text())


class ArtifactError(ValueError):
    """A stage's input file cannot be read: corrupt, truncated, or from another version."""


def load_artifact(
    path: str | Path, what: str, *, keys: tuple[str, ...] = (), stage: str = "", mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)`` whose errors name the file and what it should
    be, in one line, and say how to re-create it (never to load it unsafely).

    Args:
        what: What the file is ("teacher checkpoint", "synthetic set", ...).
        keys: Keys the loaded mapping must have.
        stage: The DVC stage that writes the file, for the hint.
        mmap: Memory-map the file's tensors instead of reading them (large files).

    Raises:
        FileNotFoundError: The file does not exist.
        ArtifactError: It does not load, or lacks ``keys``.
    """
    path = Path(path)
    hint = f" (run the {stage} stage)" if stage else ""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found{hint}")
    redo = f"; re-create it with `dvc repro --force` of its {stage} stage" if stage else ""
    try:
        with warnings.catch_warnings():  # torch's warnings about foreign pickles: see below
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many kinds: unpickling, zip, EOF, runtime
        raise ArtifactError(
            f"{path}: cannot read this {what}: the file is corrupt, truncated or was written by "
            f"another version of this suite ({type(err).__name__}){redo}"
        ) from None
    if keys and not (isinstance(obj, dict) and all(k in obj for k in keys)):
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ArtifactError(
            f"{path}: not a {what} of this version of the suite: expected keys {list(keys)}, "
            f"found {found}{redo}"
        )
    return obj


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Seeds torch's global RNG for module initialisers only, restoring it afterwards.

    ``nn.Module`` constructors draw from the global generator and take no ``Generator``
    argument; this confines that draw to a fork seeded from a derived seed.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
