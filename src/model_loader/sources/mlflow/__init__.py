"""The MLflow sources: ``models:/...`` (registered models) and ``runs:/...`` (run artifacts).

Modules, from the leaf up: :mod:`._errors` (internal exceptions and the one translation
into :mod:`model_loader.errors`; imports nothing of this package), :mod:`._proxy`,
:mod:`._http` (the REST client), :mod:`._schema` (declared answers), :mod:`._env` (MLflow's
variables), :mod:`._registry` (registry and tracking questions), :mod:`._artifacts` and
:mod:`._stores` (where artifacts are and how to get them), :mod:`._source` (the sources),
and :mod:`._pyfunc` (loading an MLflow model directory, for the loader's default).

Importing this package imports no SDK: mlflow only for non-HTTP servers or artifact
stores nothing else serves, boto3 only for ``s3://`` artifact locations.
"""

from __future__ import annotations

from model_loader.sources.mlflow._source import MlflowRegistrySource, MlflowRunsSource, pinned_model_uri

__all__ = ["MlflowRegistrySource", "MlflowRunsSource", "pinned_model_uri"]
