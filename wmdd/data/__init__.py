"""Datasets: registry, sources, the prepare step and the prepared form.

Importing this package registers the built-in datasets (``digits``, ``imagefolder``,
``imagenette``, ``tiny_imagenet``, ``cifar10``, ``imagenet1k``).
"""

from wmdd.data import (  # noqa: F401  (registration side effects)
    cifar,
    digits,
    folder,
    imagenet,
    imagenette,
    tiny_imagenet,
)
from wmdd.data.lazy import LazySplitSet, load_data
from wmdd.data.prepared import PreparedData, TrainingImages, load_prepared
from wmdd.data.registry import get_dataset, list_datasets

__all__ = [
    "LazySplitSet",
    "PreparedData",
    "TrainingImages",
    "get_dataset",
    "list_datasets",
    "load_data",
    "load_prepared",
]
