"""Two ways to ask an MLflow registry the same questions.

:class:`RestRegistry` calls MLflow's documented REST API over :mod:`._mlflow_http` (no
mlflow import: the fast path for ``http(s)://`` tracking servers). :class:`ClientRegistry`
uses ``mlflow.MlflowClient`` for everything else (``sqlite:///``, ``file:``,
``databricks``, plug-in auth). Both return the same small records, and both let their
backend's exceptions out: the source's ``_map_errors`` translates them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

from model_loader.sources._mlflow_http import Endpoint, RestTransport

__all__ = [
    "ClientRegistry",
    "DatabaseUnavailable",
    "LoggedModelInfo",
    "NotFound",
    "Registry",
    "RestRegistry",
    "VersionInfo",
    "sqlite_path",
]

_API = "/api/2.0/mlflow"
_PAGE = 100


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """The facts of one registered model version that resolving needs."""

    name: str
    version: int
    status: str  # READY, PENDING_REGISTRATION, FAILED_REGISTRATION
    source: str
    run_id: str | None
    stage: str | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VersionInfo:
        return cls(
            name=str(d["name"]),
            version=int(d["version"]),
            status=str(d.get("status") or "READY"),
            source=str(d.get("source") or ""),
            run_id=str(d["run_id"]) if d.get("run_id") else None,
            stage=str(d["current_stage"]) if d.get("current_stage") else None,
        )

    @classmethod
    def from_entity(cls, mv: Any) -> VersionInfo:
        return cls(
            name=str(mv.name),
            version=int(mv.version),
            status=str(getattr(mv, "status", None) or "READY"),
            source=str(mv.source or ""),
            run_id=str(mv.run_id) if mv.run_id else None,
            stage=str(mv.current_stage) if getattr(mv, "current_stage", None) else None,
        )


@dataclass(frozen=True, slots=True)
class LoggedModelInfo:
    """An MLflow 3 logged model (``models:/m-<id>``)."""

    model_id: str
    artifact_uri: str
    run_id: str | None
    status: str


class NotFound(LookupError):
    """A lookup found nothing (no version in that stage); mapped to ModelNotFoundError."""


class DatabaseUnavailable(ConnectionError):
    """The registry's sqlite file is missing or unreadable; mapped to SourceUnavailableError."""


class Registry(Protocol):
    """What the MLflow source asks a registry."""

    def version_by_alias(self, name: str, alias: str) -> VersionInfo: ...

    def version(self, name: str, version: int) -> VersionInfo: ...

    def latest(self, name: str, stage: str | None) -> VersionInfo: ...

    def versions_desc(self, name: str) -> Iterator[VersionInfo]: ...

    def download_uri(self, name: str, version: int) -> str: ...

    def logged_model(self, model_id: str) -> LoggedModelInfo: ...

    def run_artifact_uri(self, run_id: str) -> str: ...


def _name_filter(name: str) -> str:
    if "'" not in name:
        return f"name = '{name}'"
    return 'name = "' + name.replace('"', '\\"') + '"'


class RestRegistry:
    """The registry over MLflow's REST API (``/api/2.0/mlflow/...``)."""

    def __init__(self, transport: RestTransport, endpoint: Endpoint) -> None:
        self._http = transport
        self._ep = endpoint

    def _get(self, path: str, **params: str | list[str]) -> dict[str, Any]:
        return self._http.get_json(self._ep, _API + path, params)

    def version_by_alias(self, name: str, alias: str) -> VersionInfo:
        return VersionInfo.from_json(self._get("/registered-models/alias", name=name, alias=alias)["model_version"])

    def version(self, name: str, version: int) -> VersionInfo:
        return VersionInfo.from_json(self._get("/model-versions/get", name=name, version=str(version))["model_version"])

    def latest(self, name: str, stage: str | None) -> VersionInfo:
        payload: dict[str, Any] = {"name": name}
        if stage is not None:
            payload["stages"] = [stage]
        found = self._http.post_json(self._ep, _API + "/registered-models/get-latest-versions", payload)
        versions = [VersionInfo.from_json(v) for v in found.get("model_versions", [])]
        if not versions:
            where = f"in stage {stage!r}" if stage else "at all"
            raise NotFound(f"registered model {name!r} has no version {where}")
        return max(versions, key=lambda v: v.version)

    def versions_desc(self, name: str) -> Iterator[VersionInfo]:
        token = ""
        while True:
            params: dict[str, str | list[str]] = {
                "filter": _name_filter(name),
                "order_by": ["version_number DESC"],
                "max_results": str(_PAGE),
            }
            if token:
                params["page_token"] = token
            page = self._get("/model-versions/search", **params)
            for v in page.get("model_versions", []):
                yield VersionInfo.from_json(v)
            token = str(page.get("next_page_token") or "")
            if not token:
                return

    def download_uri(self, name: str, version: int) -> str:
        found = self._get("/model-versions/get-download-uri", name=name, version=str(version))
        return str(found["artifact_uri"])

    def logged_model(self, model_id: str) -> LoggedModelInfo:
        info = self._http.get_json(self._ep, f"{_API}/logged-models/{quote(model_id, safe='')}")["model"]["info"]
        return LoggedModelInfo(
            model_id=str(info["model_id"]),
            artifact_uri=str(info["artifact_uri"]),
            run_id=str(info["source_run_id"]) if info.get("source_run_id") else None,
            status=str(info.get("status") or ""),
        )

    def run_artifact_uri(self, run_id: str) -> str:
        return str(self._get("/runs/get", run_id=run_id)["run"]["info"]["artifact_uri"])


def sqlite_path(uri: str) -> str | None:
    """The database file of a ``sqlite:///...`` URI (``None`` for in-memory or other URIs)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return os.path.abspath(path) if path and path != ":memory:" else None


class ClientRegistry:
    """The registry through ``mlflow.MlflowClient`` (imported on first use).

    A ``sqlite:///`` registry whose database file is missing or unreadable counts as
    unavailable: MLflow would silently create an empty database in its place.
    """

    def __init__(self, tracking_uri: str, registry_uri: str) -> None:
        self._tracking_uri = tracking_uri
        self._registry_uri = registry_uri
        self._client: Any = None

    def client(self) -> Any:
        """The ``MlflowClient``, created on first use after checking the database file."""
        for uri in {self._tracking_uri, self._registry_uri}:
            path = sqlite_path(uri)
            if path is not None and not os.access(path, os.R_OK):
                raise DatabaseUnavailable(f"the MLflow database {path} is missing or unreadable")
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self._tracking_uri, registry_uri=self._registry_uri)
        return self._client

    def version_by_alias(self, name: str, alias: str) -> VersionInfo:
        return VersionInfo.from_entity(self.client().get_model_version_by_alias(name, alias))

    def version(self, name: str, version: int) -> VersionInfo:
        return VersionInfo.from_entity(self.client().get_model_version(name, str(version)))

    def latest(self, name: str, stage: str | None) -> VersionInfo:
        found = self.client().get_latest_versions(name, None if stage is None else [stage])
        versions = [VersionInfo.from_entity(v) for v in found]
        if not versions:
            where = f"in stage {stage!r}" if stage else "at all"
            raise NotFound(f"registered model {name!r} has no version {where}")
        return max(versions, key=lambda v: v.version)

    def versions_desc(self, name: str) -> Iterator[VersionInfo]:
        token = None
        while True:
            page = self.client().search_model_versions(
                _name_filter(name), max_results=_PAGE, order_by=["version_number DESC"], page_token=token
            )
            for mv in page:
                yield VersionInfo.from_entity(mv)
            token = getattr(page, "token", None)
            if not token:
                return

    def download_uri(self, name: str, version: int) -> str:
        return str(self.client().get_model_version_download_uri(name, str(version)))

    def logged_model(self, model_id: str) -> LoggedModelInfo:
        lm = self.client().get_logged_model(model_id)
        return LoggedModelInfo(
            model_id=str(lm.model_id),
            artifact_uri=str(lm.artifact_location),
            run_id=str(lm.source_run_id) if lm.source_run_id else None,
            status=str(getattr(lm.status, "name", lm.status) or ""),
        )

    def run_artifact_uri(self, run_id: str) -> str:
        return str(self.client().get_run(run_id).info.artifact_uri)
