"""The MLflow step of ``model-loader demo``: an embedded sqlite registry, no server.

A scikit-learn model is registered in two versions and ``@prod`` points at the first.
It is loaded cold, warm, after ``@prod`` moves to version 2, and with the registry's
database moved away (the source reports the registry unavailable, so the loader serves
the last-known-good version from its cache, flagged degraded).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from model_loader._types import FetchResult

__all__ = ["run_mlflow_demo"]

Report = Callable[[str, "FetchResult | None", float, str], None]
_NAME = "demo-iris"


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Silence chatty third-party loggers (alembic migrations) for the demo's table."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _register_version(client: Any, experiment_id: str, seed: int) -> str:
    import mlflow.sklearn
    import numpy as np

    LogisticRegression: Any = importlib.import_module("sklearn.linear_model").LogisticRegression

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(90, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    model = LogisticRegression(max_iter=300).fit(x, y)
    run = client.create_run(experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model")
        mlflow.sklearn.save_model(model, str(path), input_example=x[:2])
        client.log_artifacts(run.info.run_id, str(path), "model")
    client.set_terminated(run.info.run_id)
    mv = client.create_model_version(_NAME, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return str(mv.version)


def run_mlflow_demo(work: Path, cache_dir: Path, report: Report) -> None:
    """Register, load cold / warm / after the alias moves / with the registry gone.

    Args:
        work: A scratch directory (holds the sqlite registry and its artifacts).
        cache_dir: The loader's cache directory.
        report: Called once per step with ``(step, result, seconds, note)``.
    """
    try:
        import alembic  # noqa: F401 - a sqlite registry needs full mlflow, not mlflow-skinny
        import mlflow  # noqa: F401

        importlib.import_module("sklearn")
    except ImportError as exc:
        report("mlflow: skipped", None, 0.0, f"install model-loader[demo] (full mlflow + scikit-learn): {exc}")
        return
    import numpy as np
    from mlflow.tracking import MlflowClient

    from model_loader.config import CacheConfig, LoaderConfig, RetryPolicy
    from model_loader.loader import ResilientLoader
    from model_loader.sources.mlflow import MlflowRegistrySource

    db = work / "mlflow.db"
    uri = f"sqlite:///{db}"
    with _quiet("alembic", "mlflow"):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = client.create_experiment("demo", artifact_location=(work / "artifacts").as_uri())
        client.create_registered_model(_NAME)
        v1 = _register_version(client, experiment_id, seed=1)
        v2 = _register_version(client, experiment_id, seed=2)
        client.set_registered_model_alias(_NAME, "prod", v1)

        config = LoaderConfig(
            cache=CacheConfig(dir=cache_dir),
            retry=RetryPolicy(attempts=2, initial_backoff=0.05, max_backoff=0.1, jitter=0.0),
        )
        ref = f"models:/{_NAME}@prod"

        def load(step: str, note: str) -> None:
            source = MlflowRegistrySource(tracking_uri=uri, environ={})
            with ResilientLoader([(source, ref)], config=config) as loader:
                t0 = time.perf_counter()
                model = loader.load()
                elapsed = time.perf_counter() - t0
                assert loader.last_result is not None
                model.predict(np.array([[0.1, 0.2, 0.3, 0.4]]))
                report(step, loader.last_result, elapsed, note)
            source.close()

        load("mlflow: cold (sqlite registry)", f"{ref} -> version {v1}")
        load("mlflow: warm, disk cache hit", "")
        client.set_registered_model_alias(_NAME, "prod", v2)
        load("mlflow: after @prod moved", f"{ref} -> version {v2}")
        db.rename(work / "mlflow.db.away")
        load("mlflow: registry unavailable", "database moved away: last-known-good")
