"""Serve an MLflow pyfunc model with FastAPI, following the registry while the service runs.

Run:
    MODEL_LOADER_SOURCES=models:/fraud@champion,s3://mirror/fraud/ \\
    MODEL_LOADER_CACHE_DIR=/var/cache/models MODEL_LOADER_RELOAD_INTERVAL=30 \\
    MLFLOW_TRACKING_URI=https://mlflow.internal \\
    uvicorn --app-dir examples fastapi_app:app --host 0.0.0.0 --port 8000

Configured only by the environment: ``MODEL_LOADER_SOURCES`` (URIs tried in order),
``MODEL_LOADER_CACHE_DIR``, ``MODEL_LOADER_RELOAD_INTERVAL`` (seconds; 0 turns reloading
off), any other ``MODEL_LOADER_*`` setting, and MLflow's and AWS's standard variables.

- ``GET /healthz``: 200 while the process runs (liveness).
- ``GET /readyz``: 503 until a model is loaded, then 200 (degraded included); the body
  says ``ready``, ``state``, ``version``, ``digest``, ``source`` and ``degraded``.
- ``POST /predict`` ``{"inputs": [[...], ...]}``: ``{"predictions": [...], "version": ...}``,
  the version that made these predictions; 503 before a model is loaded.
- ``GET /metrics``: Prometheus text.

The process accepts requests while the first load runs in the background, comes up
degraded from the cache when the registry is down, and swaps new versions in without
failing a request: requests read an immutable snapshot and never touch the network.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from model_loader.metrics import ServingMetrics
from model_loader.serving import ModelNotReadyError, ServedModel

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class PredictRequest(BaseModel):
    inputs: list[list[float]]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    served = ServedModel.from_env(metrics=ServingMetrics()).start()  # loads in the background
    app.state.served = served
    try:
        yield
    finally:
        served.close()


app = FastAPI(title="model_loader example", lifespan=lifespan)


def _served(request: Request) -> ServedModel:
    served: ServedModel = request.app.state.served
    return served


@app.get("/healthz")
def healthz() -> dict[str, bool]:
    return {"ok": True}


@app.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    status = _served(request).status()
    body = {k: v for k, v in status.to_dict().items() if k not in ("loaded_at", "last_check")}
    return JSONResponse(body, status_code=200 if status.ready else 503)


@app.post("/predict")
def predict(body: PredictRequest, request: Request) -> dict[str, Any]:
    try:
        with _served(request).use() as (model, result):  # one consistent (model, version) pair
            predictions = model.predict(np.asarray(body.inputs, dtype=np.float64))
    except ModelNotReadyError as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from exc
    return {"predictions": np.asarray(predictions).tolist(), "version": result.version}


@app.get("/metrics")
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
