"""Datasets: registry, sources, the prepare step and the prepared form.

Importing this package registers the built-in datasets (``digits``, ``imagefolder``,
``imagenette``).
"""

from wmdd.data import digits, folder, imagenette  # noqa: F401  (registration side effects)
from wmdd.data.prepared import PreparedData, load_prepared
from wmdd.data.registry import get_dataset, list_datasets

__all__ = ["PreparedData", "get_dataset", "list_datasets", "load_prepared"]
