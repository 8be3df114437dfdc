"""The protocol of one cell, decided once: which protocol, which relabel mode, which seeds,
what each stage must load. The ``relabel`` and ``evaluate`` stages both read this plan, so
the soft/hard and stored/online choice and the seed derivation live in one place.

Seeds of eval seed ``s`` in cell (profile, IPC), derived from the base seed:

* ``view_seed`` drives the relabel views (crops, flips, CutMix) of the soft protocol and the
  data order and DSA draws of the hard one;
* ``student_seed`` drives the student's initialisation.

Neither depends on the method, on purpose: every method's set is seen through the same
random views and trained from the same initial student (common random numbers, so the
comparison between methods is paired).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from wmdd.config import (
    HardProtocolConfig,
    ProtocolConfig,
    SoftProtocolConfig,
    flatten,
    short_hash,
    to_dict,
)
from wmdd.utils import derive_seed


@dataclass(frozen=True)
class SeedPlan:
    """The seeds of one eval seed of a cell."""

    eval_seed: int  # the benchmark's eval seed (names files and MLflow metrics)
    view_seed: int  # relabel views / hard-label data order and DSA
    student_seed: int  # student initialisation


@dataclass(frozen=True)
class ProtocolPlan:
    """Everything the relabel and evaluate stages need to know about a cell's protocol."""

    kind: Literal["soft", "hard"]  # the selected protocol
    settings: SoftProtocolConfig | HardProtocolConfig  # its settings (student included)
    seeds: tuple[SeedPlan, ...]  # one per eval seed, in the benchmark's order
    hash: str  # short hash of the settings, eval seeds and base seed (rows comparable iff equal)

    @property
    def soft(self) -> SoftProtocolConfig:
        """The soft protocol's settings (a ValueError for a hard-label plan)."""
        if not isinstance(self.settings, SoftProtocolConfig):
            raise ValueError(f"the cell's protocol is {self.kind!r}, not 'soft'")
        return self.settings

    @property
    def hard(self) -> HardProtocolConfig:
        """The hard protocol's settings (a ValueError for a soft-label plan)."""
        if not isinstance(self.settings, HardProtocolConfig):
            raise ValueError(f"the cell's protocol is {self.kind!r}, not 'hard'")
        return self.settings

    @property
    def mode(self) -> Literal["stored", "online"] | None:
        """The soft protocol's relabel mode (None for the hard-label protocol)."""
        return self.settings.relabel_mode if isinstance(self.settings, SoftProtocolConfig) else None

    @property
    def stores_labels(self) -> bool:
        """The relabel stage runs the teacher and stores every epoch's soft labels."""
        return self.mode == "stored"

    @property
    def relabel_needs_teacher(self) -> bool:
        return self.stores_labels

    @property
    def evaluate_needs_teacher(self) -> bool:
        """Only online relabelling runs the teacher while the student trains."""
        return self.mode == "online"

    def mlflow_params(self) -> dict[str, Any]:
        """The selected protocol's settings, flattened (``protocol.epochs``, ...), its kind
        and the eval seeds: the unselected protocol's settings are not logged."""
        return {
            "protocol.kind": self.kind,
            "protocol_hash": self.hash,
            **flatten(self.settings, "protocol."),
            "eval_seeds": [s.eval_seed for s in self.seeds],
        }


def view_seed(base_seed: int, profile: str, ipc: int, eval_seed: int) -> int:
    """Seed of the views of one eval seed; independent of the method on purpose."""
    return derive_seed(base_seed, profile, ipc, "relabel", eval_seed)


def student_seed(base_seed: int, profile: str, ipc: int, eval_seed: int) -> int:
    """Seed of the student's initialisation; independent of the method on purpose."""
    return derive_seed(base_seed, profile, ipc, "student", eval_seed)


def protocol_hash(
    protocol: ProtocolConfig, *, eval_seeds, base_seed: int, kind: str | None = None
) -> str:
    """Short hash of everything that defines a protocol of a profile: protocol ``kind``'s
    settings (default: the headline ``protocol.kind``; student model included), the eval
    seeds and the base seed.

    ``precision`` enters only when it is not ``"fp32"`` and ``schedule_epochs`` only when it
    is not 0: the defaults are the protocol as it was before the settings existed, so those
    rows keep their hash, and a row under another setting never shares one with them."""
    kind = kind or protocol.kind
    settings = to_dict(protocol.settings(kind))
    if settings.get("precision") == "fp32":
        del settings["precision"]
    if settings.get("schedule_epochs") == 0:  # the cosine over the epochs, as before
        del settings["schedule_epochs"]
    return short_hash(
        {
            "kind": kind,
            "settings": settings,
            "eval_seeds": list(eval_seeds),
            "base_seed": base_seed,
        }
    )


def protocol_plan(
    protocol: ProtocolConfig,
    *,
    profile: str,
    ipc: int,
    eval_seeds,
    base_seed: int,
    only: int | None = None,
    kind: str | None = None,
) -> ProtocolPlan:
    """The plan of cell (``profile``, any method, ``ipc``) under protocol ``kind`` of
    ``protocol`` (default: the headline); with ``only``, the plan of that one eval seed (the
    hash stays the cell's). The seeds do not depend on the distilled set either: every set
    of a cell is seen through the same views (paired across sets and methods)."""
    kind = kind or protocol.kind
    if only is not None and only not in eval_seeds:
        raise ValueError(f"--seed {only}: not one of benchmark.eval_seeds {list(eval_seeds)}")
    seeds = tuple(
        SeedPlan(
            eval_seed=s,
            view_seed=view_seed(base_seed, profile, ipc, s),
            student_seed=student_seed(base_seed, profile, ipc, s),
        )
        for s in eval_seeds
        if only is None or s == only
    )
    return ProtocolPlan(
        kind=kind,  # type: ignore[arg-type]
        settings=protocol.settings(kind),
        seeds=seeds,
        hash=protocol_hash(protocol, eval_seeds=eval_seeds, base_seed=base_seed, kind=kind),
    )
