"""The FastAPI example end to end: a real ``mlflow server`` (sqlite, artifacts in moto S3),
real sklearn models, the app under a real uvicorn process, a real HTTP client.

One scenario, in the order an operator lives it: the app starts before its registry
(503), then serves; an alias move is followed under continuous traffic with no failed
request; a broken version leaves the old one serving; a rollback; the registry dies
(requests keep succeeding, degraded); the app restarts with the registry still down
(ready, degraded, serving the rollback).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from _mlflow_server import (
    MlflowServer,
    server_env,
    start_mlflow_server,
    stop_mlflow_server,
    stop_process_group,
    use_tracking_uri,
)
from _s3_server import MotoServer, free_port
from helpers import wait_for

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NAME = "fraud"
X = np.random.default_rng(7).normal(size=(12, 4))  # the batch every request sends


class App:
    """``uvicorn --app-dir examples fastapi_app:app`` on a free loopback port."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.log = log
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES), "fastapi_app:app"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30)
        try:
            wait_for(self._alive, timeout=60, what="the app to answer /healthz")
        except BaseException:
            self.stop()
            raise

    def _alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the app exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def ready(self) -> dict[str, Any]:
        body: dict[str, Any] = self.client.get("/readyz").json()
        return body

    def predict(self) -> httpx.Response:
        return self.client.post("/predict", json={"inputs": X.tolist()})

    def metric(self, name: str, **labels: str) -> float | None:
        text = self.client.get("/metrics").text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.client.close()
        stop_process_group(self.proc)


@dataclass
class Traffic:
    """A client sending /predict back to back, checking each answer against its version."""

    app: App
    expected: dict[str, list[int]]
    versions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._client = httpx.Client(base_url=self.app.client.base_url, timeout=30)  # its own connection
        self._thread = threading.Thread(target=self._run, name="traffic")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                resp = self._client.post("/predict", json={"inputs": X.tolist()})
            except httpx.HTTPError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if resp.status_code != 200:
                self.failures.append(f"{resp.status_code}: {resp.text}")
                continue
            body = resp.json()
            if body["predictions"] != self.expected.get(body["version"]):
                self.failures.append(f"version {body['version']} answered {body['predictions']}")
            self.versions.append(body["version"])

    def count(self, version: str) -> int:
        return self.versions.count(version)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._client.close()


def publish(server: MlflowServer, shift: int) -> tuple[str, list[int]]:
    """Log a LogisticRegression whose classes are shifted by ``shift``: every version answers
    every row of ``X`` differently. Returns its version and its predictions for ``X``."""
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 4))
    y = ((x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 0.5).astype(int) + shift) % 3
    model = LogisticRegression(max_iter=500).fit(x, y)
    signature = infer_signature(x, model.predict(x))
    with use_tracking_uri(server.url), mlflow.start_run():
        # explicit requirements: inferring them runs the model in a subprocess (seconds)
        info = mlflow.sklearn.log_model(
            model, name="model", registered_model_name=NAME, signature=signature, pip_requirements=["scikit-learn"]
        )
    return f"{NAME}/{info.registered_model_version}", model.predict(X).tolist()


def app_env(moto: MotoServer, tracking_uri: str, cache: Path) -> dict[str, str]:
    env = {k: v for k, v in server_env(moto).items() if not k.startswith("MODEL_LOADER_")}
    env.update(
        {
            "MLFLOW_TRACKING_URI": tracking_uri,
            "MODEL_LOADER_SOURCES": f"models:/{NAME}@prod",
            "MODEL_LOADER_CACHE_DIR": str(cache),
            "MODEL_LOADER_RELOAD_INTERVAL": "0.5",
        }
    )
    return env


@pytest.fixture
def apps() -> Iterator[list[App]]:
    started: list[App] = []
    yield started
    for app in started:
        app.stop()


def test_the_example_app_follows_the_registry_without_failing_a_request(
    moto_server: MotoServer, mlflow_test_env: None, tmp_path: Path, apps: list[App]
) -> None:
    port = free_port()
    env = app_env(moto_server, f"http://127.0.0.1:{port}", tmp_path / "cache")

    # 1. The app starts before its registry: it answers, but is not ready.
    app = App(env, tmp_path / "app.log")
    apps.append(app)
    assert app.client.get("/readyz").status_code == 503
    body = app.ready()
    assert body["ready"] is False
    assert body["state"] in ("loading", "failed")
    assert (body["version"], body["digest"], body["source"], body["degraded"]) == (None, None, None, False)
    assert app.predict().status_code == 503

    server = start_mlflow_server(tmp_path / "mlflow", moto_server, "s3", port=port)
    try:
        v1, p1 = publish(server, 0)
        v2, p2 = publish(server, 1)
        v3, p3 = publish(server, 2)
        expected = {v1: p1, v2: p2, v3: p3}
        assert p1 != p2 != p3 != p1
        client = server.client()
        client.set_registered_model_alias(NAME, "prod", v1.split("/")[1])

        wait_for(lambda: app.client.get("/readyz").status_code == 200, timeout=60, what="readiness")
        body = app.ready()
        assert (body["ready"], body["state"], body["version"], body["degraded"]) == (True, "ready", v1, False)
        assert body["source"] == f"models:/{NAME}@prod"
        assert body["digest"].startswith("sha256:")

        # 2. The alias moves under continuous traffic: no failed request, each answer from its version.
        traffic = Traffic(app, expected)
        try:
            wait_for(lambda: traffic.count(v1) >= 20, what="traffic on v1")
            client.set_registered_model_alias(NAME, "prod", v2.split("/")[1])
            wait_for(lambda: traffic.count(v2) >= 20, timeout=60, what="traffic on v2")
        finally:
            traffic.stop()
        assert traffic.failures == []
        switch = traffic.versions.index(v2)
        assert set(traffic.versions[:switch]) == {v1}
        assert set(traffic.versions[switch:]) == {v2}  # once swapped, never the old one again
        assert app.metric("model_loader_reloads_total", result="success") == 1.0

        # 3. A broken version (its artifacts deleted) leaves v2 serving and counts a failed reload.
        server.delete_artifacts(client.get_model_version_download_uri(NAME, v3.split("/")[1]))
        client.set_registered_model_alias(NAME, "prod", v3.split("/")[1])
        wait_for(
            lambda: (app.metric("model_loader_reloads_total", result="failure") or 0) >= 1,
            what="a failed reload in /metrics",
        )
        resp = app.predict()
        assert resp.status_code == 200
        assert resp.json() == {"predictions": p2, "version": v2}
        assert app.ready()["state"] == "ready"

        # 4. Moving the alias back is just another new version: v1 again (from memory).
        client.set_registered_model_alias(NAME, "prod", v1.split("/")[1])
        wait_for(lambda: app.predict().json()["version"] == v1, what="the rollback to v1")
        assert app.metric("model_loader_model_info", version=v1) == 1.0
        assert app.metric("model_loader_model_info", version=v2) is None
    finally:
        stop_mlflow_server(server)

    # 5. The registry is gone: requests keep succeeding; the app reports degraded.
    traffic = Traffic(app, expected)
    try:
        wait_for(lambda: app.ready()["degraded"] is True, timeout=60, what="degraded")
        wait_for(lambda: traffic.count(v1) >= 20, what="traffic during the outage")
    finally:
        traffic.stop()
    assert traffic.failures == []
    assert set(traffic.versions) == {v1}
    assert app.client.get("/readyz").status_code == 200
    assert app.metric("model_loader_degraded") == 1.0
    app.stop()
    apps.remove(app)

    # 6. Restarted with the registry still down: ready, degraded, serving the rollback.
    app = App(env, tmp_path / "app2.log")
    apps.append(app)
    wait_for(lambda: app.client.get("/readyz").status_code == 200, timeout=60, what="readiness from the cache")
    body = app.ready()
    assert (body["ready"], body["state"], body["version"], body["degraded"]) == (True, "degraded", v1, True)
    resp = app.predict()
    assert resp.status_code == 200
    assert resp.json() == {"predictions": p1, "version": v1}
