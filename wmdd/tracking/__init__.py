"""MLflow tracking: one run per DVC stage execution, tagged so runs join ``dvc.lock``
(``runs``)."""
