"""Two ways to ask an MLflow registry the same questions.

:class:`RestRegistry` calls MLflow's documented REST API over :mod:`._http` (no
mlflow import: the fast path for ``http(s)://`` tracking servers); every answer is parsed
against its schema (:mod:`._schema`) and every call is capped by the deadline it is
given. :class:`ClientRegistry` uses ``mlflow.MlflowClient`` for everything else
(``sqlite:///``, ``file:``, ``databricks``, plug-in auth); MLflow's calls cannot be cut,
so the deadline is only checked between them. Both return the same small records, and
both let their backend's exceptions out: the source's ``_map_errors`` translates them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

from model_loader._deadline import Deadline
from model_loader.sources.mlflow._errors import DatabaseUnavailable, HttpStatusError, MalformedResponse, NotFound
from model_loader.sources.mlflow._http import Endpoint, RestTransport, check_deadline

if TYPE_CHECKING:
    from model_loader.sources.mlflow._schema import ModelVersion

__all__ = [
    "ClientRegistry",
    "DatabaseUnavailable",
    "LoggedModelInfo",
    "NotFound",
    "Registry",
    "RestRegistry",
    "RunInfo",
    "RestTracking",
    "Tracking",
    "VersionInfo",
    "name_filter",
    "sqlite_path",
]

_API = "/api/2.0/mlflow"
_PAGE = 100
_MAX_PAGES = 1000  # 100,000 versions of one model: a server paging beyond is looping


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
    def from_schema(cls, mv: ModelVersion) -> VersionInfo:
        return cls(
            name=mv.name,
            version=mv.version,
            status=mv.status or "READY",
            source=mv.source or "",
            run_id=mv.run_id or None,
            stage=mv.current_stage or None,
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


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Where a run keeps its artifacts."""

    run_id: str
    artifact_uri: str
    experiment_id: str | None


class Registry(Protocol):
    """What the MLflow source asks a model registry; every call within ``deadline``."""

    def version_by_alias(self, name: str, alias: str, deadline: Deadline) -> VersionInfo: ...

    def version(self, name: str, version: int, deadline: Deadline) -> VersionInfo: ...

    def latest(self, name: str, stage: str | None, deadline: Deadline) -> VersionInfo: ...

    def versions_desc(self, name: str, deadline: Deadline) -> Iterator[VersionInfo]: ...

    def download_uri(self, name: str, version: int, deadline: Deadline) -> str: ...


class Tracking(Protocol):
    """What the MLflow source asks a tracking server; every call within ``deadline``."""

    def logged_model(self, model_id: str, deadline: Deadline) -> LoggedModelInfo: ...

    def run(self, run_id: str, deadline: Deadline) -> RunInfo: ...

    def run_logged_model(self, run: RunInfo, name: str, deadline: Deadline) -> LoggedModelInfo | None:
        """The logged model ``name`` that ``run`` produced (MLflow 3), if any."""
        ...


def _logged_model_filter(name: str) -> str | None:
    if "'" not in name:
        return f"name = '{name}'"
    if '"' not in name:
        return f'name = "{name}"'
    return None  # both quote kinds: no filter MLflow parses can name it (and no model has such a name)


def name_filter(name: str) -> tuple[str, bool]:
    """A ``search_model_versions`` filter for ``name``, and whether it matches it exactly.

    MLflow's filter parser keeps a string literal as written, escapes included, so a name
    holding both quote kinds cannot be compared with ``=``: it is matched with ``LIKE``,
    each quote (and a backslash, an escape character in PostgreSQL's ``LIKE``) standing
    as ``_``, and the caller keeps only the versions whose name is exactly ``name``.
    """
    if "'" not in name:
        return f"name = '{name}'", True
    if '"' not in name:
        return f'name = "{name}"', True
    return "name LIKE '" + re.sub(r"['\"\\]", "_", name) + "'", False


def _newest(versions: list[VersionInfo], name: str, stage: str | None) -> VersionInfo:
    if not versions:
        where = f"in stage {stage!r}" if stage else "at all"
        raise NotFound(f"registered model {name!r} has no version {where}")
    return max(versions, key=lambda v: v.version)


class RestRegistry:
    """The registry over MLflow's REST API (``/api/2.0/mlflow/...``)."""

    def __init__(self, transport: RestTransport, endpoint: Endpoint) -> None:
        self._http = transport
        self._ep = endpoint

    def _get(self, path: str, deadline: Deadline, **params: str | list[str]) -> bytes:
        return self._http.get_json(self._ep, _API + path, params, deadline=deadline)

    def version_by_alias(self, name: str, alias: str, deadline: Deadline) -> VersionInfo:
        from model_loader.sources.mlflow._schema import ModelVersionAnswer, parse

        body = self._get("/registered-models/alias", deadline, name=name, alias=alias)
        return VersionInfo.from_schema(parse(ModelVersionAnswer, body, f"alias {alias!r} of {name!r}").model_version)

    def version(self, name: str, version: int, deadline: Deadline) -> VersionInfo:
        from model_loader.sources.mlflow._schema import ModelVersionAnswer, parse

        body = self._get("/model-versions/get", deadline, name=name, version=str(version))
        found = parse(ModelVersionAnswer, body, f"version {version} of {name!r}").model_version
        if found.version != version:
            raise MalformedResponse(f"asked for version {version} of {name!r}, the registry answered {found.version}")
        return VersionInfo.from_schema(found)

    def latest(self, name: str, stage: str | None, deadline: Deadline) -> VersionInfo:
        from model_loader.sources.mlflow._schema import ModelVersionsAnswer, parse

        payload: dict[str, Any] = {"name": name}
        if stage is not None:
            payload["stages"] = [stage]
        path = _API + "/registered-models/get-latest-versions"
        body = self._http.post_json(self._ep, path, payload, deadline=deadline)
        found = parse(ModelVersionsAnswer, body, f"latest versions of {name!r}")
        return _newest([VersionInfo.from_schema(v) for v in found.model_versions], name, stage)

    def versions_desc(self, name: str, deadline: Deadline) -> Iterator[VersionInfo]:
        from model_loader.sources.mlflow._schema import ModelVersionsAnswer, parse

        token = ""
        seen: set[str] = set()
        search, exact = name_filter(name)
        for _ in range(_MAX_PAGES):
            params: dict[str, str | list[str]] = {
                "filter": search,
                "order_by": ["version_number DESC"],
                "max_results": str(_PAGE),
            }
            if token:
                params["page_token"] = token
            page = parse(ModelVersionsAnswer, self._get("/model-versions/search", deadline, **params), "version search")
            for v in page.model_versions:
                if exact or v.name == name:
                    yield VersionInfo.from_schema(v)
            token = page.next_page_token or ""
            if not token:
                return
            if token in seen:
                raise MalformedResponse(f"the version search of {name!r} pages in a circle")
            seen.add(token)
        raise MalformedResponse(f"the version search of {name!r} goes on for more than {_MAX_PAGES} pages")

    def download_uri(self, name: str, version: int, deadline: Deadline) -> str:
        from model_loader.sources.mlflow._schema import DownloadUriAnswer, parse

        body = self._get("/model-versions/get-download-uri", deadline, name=name, version=str(version))
        return parse(DownloadUriAnswer, body, f"download URI of version {version} of {name!r}").artifact_uri


class RestTracking:
    """The tracking server over MLflow's REST API: runs and logged models."""

    def __init__(self, transport: RestTransport, endpoint: Endpoint) -> None:
        self._http = transport
        self._ep = endpoint

    def logged_model(self, model_id: str, deadline: Deadline) -> LoggedModelInfo:
        from model_loader.sources.mlflow._schema import LoggedModelAnswer, parse

        body = self._http.get_json(self._ep, f"{_API}/logged-models/{quote(model_id, safe='')}", deadline=deadline)
        info = parse(LoggedModelAnswer, body, f"logged model {model_id}").model.info
        return LoggedModelInfo(info.model_id, info.artifact_uri, info.source_run_id or None, info.status or "")

    def run(self, run_id: str, deadline: Deadline) -> RunInfo:
        from model_loader.sources.mlflow._schema import RunAnswer, parse

        body = self._http.get_json(self._ep, _API + "/runs/get", {"run_id": run_id}, deadline=deadline)
        info = parse(RunAnswer, body, f"run {run_id}").run.info
        return RunInfo(run_id, info.artifact_uri, info.experiment_id or None)

    def run_logged_model(self, run: RunInfo, name: str, deadline: Deadline) -> LoggedModelInfo | None:
        from model_loader.sources.mlflow._schema import LoggedModelsAnswer, parse

        search = _logged_model_filter(name)
        if search is None or run.experiment_id is None:
            return None
        token = ""
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            payload: dict[str, Any] = {"experiment_ids": [run.experiment_id], "filter": search, "max_results": _PAGE}
            if token:
                payload["page_token"] = token
            try:
                body = self._http.post_json(self._ep, _API + "/logged-models/search", payload, deadline=deadline)
            except HttpStatusError as exc:
                if exc.status in (404, 405, 501) and exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    return None  # a server before MLflow 3 has no logged models
                raise
            page = parse(LoggedModelsAnswer, body, f"the logged models of run {run.run_id}")
            for model in page.models:
                info = model.info
                if info.source_run_id == run.run_id and (info.name is None or info.name == name):
                    return LoggedModelInfo(info.model_id, info.artifact_uri, info.source_run_id, info.status or "")
            token = page.next_page_token or ""
            if not token:
                return None
            if token in seen:
                raise MalformedResponse(f"the logged-model search of run {run.run_id} pages in a circle")
            seen.add(token)
        raise MalformedResponse(f"the logged-model search of run {run.run_id} goes on for more than {_MAX_PAGES} pages")


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

    def client(self, deadline: Deadline) -> Any:
        """The ``MlflowClient``, created on first use after checking the database file."""
        check_deadline(deadline, "asking the registry")
        for uri in {self._tracking_uri, self._registry_uri}:
            path = sqlite_path(uri)
            if path is not None and not os.access(path, os.R_OK):
                raise DatabaseUnavailable(f"the MLflow database {path} is missing or unreadable")
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self._tracking_uri, registry_uri=self._registry_uri)
        return self._client

    def version_by_alias(self, name: str, alias: str, deadline: Deadline) -> VersionInfo:
        return VersionInfo.from_entity(self.client(deadline).get_model_version_by_alias(name, alias))

    def version(self, name: str, version: int, deadline: Deadline) -> VersionInfo:
        return VersionInfo.from_entity(self.client(deadline).get_model_version(name, str(version)))

    def latest(self, name: str, stage: str | None, deadline: Deadline) -> VersionInfo:
        found = self.client(deadline).get_latest_versions(name, None if stage is None else [stage])
        return _newest([VersionInfo.from_entity(v) for v in found], name, stage)

    def versions_desc(self, name: str, deadline: Deadline) -> Iterator[VersionInfo]:
        token = None
        search, exact = name_filter(name)
        while True:
            page = self.client(deadline).search_model_versions(
                search, max_results=_PAGE, order_by=["version_number DESC"], page_token=token
            )
            for mv in page:
                if exact or str(mv.name) == name:
                    yield VersionInfo.from_entity(mv)
            token = getattr(page, "token", None)
            if not token:
                return

    def download_uri(self, name: str, version: int, deadline: Deadline) -> str:
        return str(self.client(deadline).get_model_version_download_uri(name, str(version)))

    def logged_model(self, model_id: str, deadline: Deadline) -> LoggedModelInfo:
        lm = self.client(deadline).get_logged_model(model_id)
        return LoggedModelInfo(
            model_id=str(lm.model_id),
            artifact_uri=str(lm.artifact_location),
            run_id=str(lm.source_run_id) if lm.source_run_id else None,
            status=str(getattr(lm.status, "name", lm.status) or ""),
        )

    def run(self, run_id: str, deadline: Deadline) -> RunInfo:
        info = self.client(deadline).get_run(run_id).info
        return RunInfo(run_id, str(info.artifact_uri), str(info.experiment_id) if info.experiment_id else None)

    def run_logged_model(self, run: RunInfo, name: str, deadline: Deadline) -> LoggedModelInfo | None:
        search = _logged_model_filter(name)
        if search is None or run.experiment_id is None:
            return None
        client = self.client(deadline)
        if not hasattr(client, "search_logged_models"):  # mlflow before 3
            return None
        token = None
        while True:
            page = client.search_logged_models(
                experiment_ids=[run.experiment_id], filter_string=search, page_token=token
            )
            for lm in page:
                if lm.source_run_id == run.run_id:
                    return LoggedModelInfo(
                        model_id=str(lm.model_id),
                        artifact_uri=str(lm.artifact_location),
                        run_id=run.run_id,
                        status=str(getattr(lm.status, "name", lm.status) or ""),
                    )
            token = getattr(page, "token", None)
            if not token:
                return None
