"""wmdd: a benchmark suite for dataset distillation (WMDD, SRe2L, DM, herding, random).

The library: datasets, models, the shared synthesis loop, WMDD, the relabel/evaluation
protocol, MLflow tracking and report building. Baseline methods live in ``baselines``;
DVC stage entry points in ``pipelines``.
"""

__version__ = "0.1.0"
