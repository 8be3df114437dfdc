"""WMDD's settings (one frozen dataclass, parsed from ``methods.wmdd`` in ``params.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from wmdd.config import check_ranges
from wmdd.synthesis.loop import SynthesisConfig


@dataclass(frozen=True)
class WMDDConfig:
    """WMDD settings; defaults are the published Imagenette configuration."""

    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)  # the shared loop
    lambda_bn: float = 10.0  # BN weight lambda (Imagenette 10, Tiny 300, ImageNet-1K 500)
    feature_loss: Literal["wasserstein", "ce", "mmd"] = "wasserstein"  # feature term (ablation)
    bn_target: Literal["per_class", "global"] = "per_class"  # BN target (ablation)
    r_ce: float = 0.0  # extra CE weight (0 in every published run; official script default 1)
    squared: bool = False  # square the feature and BN norms (paper's figure); official: False
    bn_pooling: Literal["exact", "batch_mean"] = "exact"  # exact pooled stats vs official mean
    # Optimise the barycenter weights too (paper: slightly worse); they weight each image's
    # KD loss in the soft protocol, as in the official code.
    weighted_barycenter: bool = False

    def __post_init__(self) -> None:
        check_ranges(self, non_negative=("lambda_bn", "r_ce"))
