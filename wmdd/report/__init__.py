"""The benchmark report: tables, statistics and figures read back from MLflow
(``benchmark``)."""
