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
from wmdd.data.prepared import PreparedData, load_prepared
from wmdd.data.registry import get_dataset, list_datasets

__all__ = ["PreparedData", "get_dataset", "list_datasets", "load_prepared"]
