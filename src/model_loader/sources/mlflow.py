"""The MLflow Model Registry source: ``models:/name@alias``, ``/<version>``, ``/<stage>``,
``/latest`` and ``models:/m-<id>``.

For an ``http(s)://`` registry it speaks MLflow's REST API directly (stdlib HTTP, no
mlflow import, our timeouts, no retries of its own); any other registry URI
(``sqlite:///``, ``file:``, ``databricks``) goes through ``mlflow.MlflowClient``. Artifacts
come from the server's ``mlflow-artifacts`` API, from S3 through the S3 source, from a
local ``file:`` store (only for a local registry, unless ``allow_local_artifacts``), or
through MLflow's artifact repositories for anything else.

Every call is capped by ``Deadline.current()`` (read at the top of ``resolve``, ``fetch``
and ``previous_versions`` and handed down explicitly, to worker threads too), every REST
answer is parsed against a declared schema, and ``fetch`` resumes: files an earlier
attempt completed (``FetchContext.current().completed``) are kept, each new one is
reported as it completes.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlsplit

from model_loader._deadline import Deadline, FetchContext
from model_loader._types import FileEntry, Manifest, ModelRef, ResolvedModel
from model_loader._uri import parse_ref
from model_loader.errors import InvalidReferenceError, MissingDependencyError, SourceError
from model_loader.protocol import ModelSource, SourceCapabilities, SourceSettings
from model_loader.sources import _mlflow_artifacts as artifacts
from model_loader.sources._mlflow_errors import LocalArtifactsRefused, NotFound, map_errors
from model_loader.sources._mlflow_http import Endpoint, RestTransport, TlsSettings, check_deadline, redact_url
from model_loader.sources._mlflow_registry import ClientRegistry, Registry, RestRegistry, VersionInfo, sqlite_path

__all__ = ["MlflowRegistrySource"]

logger = logging.getLogger(__name__)

_SCHEME = "models"
_stage_warned: set[str] = set()
_stage_lock = threading.Lock()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _is_local(location: str) -> bool:
    """A ``file:`` URI or a bare path (``/srv/...``, ``mlruns/0/...``, ``C:\\...``)."""
    scheme = urlsplit(location).scheme.lower()
    return scheme in ("", "file") or len(scheme) == 1


def _absolute(uri: str) -> str:
    path = sqlite_path(uri)
    return f"sqlite:///{path}" if path is not None else uri.rstrip("/")


def _authorization(env: Mapping[str, str], url: str) -> str | None:
    """The ``Authorization`` header MLflow itself would send (Basic before Bearer)."""
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if not (user and password):
        file_user, file_password = _credentials_file()
        user, password = user or file_user, password or file_password
    if user and password:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    if token := env.get("MLFLOW_TRACKING_TOKEN"):
        return f"Bearer {token}"
    parts = urlsplit(url)
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        return "Basic " + base64.b64encode(pair.encode()).decode()
    return None


def _credentials_file() -> tuple[str | None, str | None]:
    path = os.path.expanduser("~/.mlflow/credentials")
    if not os.path.isfile(path):
        return None, None
    import configparser

    config = configparser.ConfigParser()
    config.read(path)
    if "mlflow" not in config:
        return None, None
    section = config["mlflow"]
    return section.get("mlflow_tracking_username"), section.get("mlflow_tracking_password")


class MlflowRegistrySource:
    """Models in an MLflow Model Registry.

    ``resolve`` pins a reference to ``<name>/<version>`` (or ``m-<id>``) and the version's
    artifact location; ``fetch`` downloads exactly those artifacts. Registry and artifact
    calls to an ``http(s)`` server use MLflow's REST API with this source's timeouts and no
    retries (the loader's retry policy is the only one), so a refused connection fails in
    milliseconds.

    Args:
        tracking_uri: Default: ``$MLFLOW_TRACKING_URI`` (read now, not at import).
        registry_uri: Default: ``$MLFLOW_REGISTRY_URI``, else the tracking URI.
        connect_timeout: Seconds to open a connection.
        read_timeout: Seconds to wait for bytes on an open connection.
        max_concurrency: Files downloaded in parallel.
        include: Globs of artifact paths to fetch (empty: all).
        exclude: Globs of artifact paths to skip.
        s3_source: The source used for ``s3://`` artifact locations (default: an ``S3Source``
            for ``s3_endpoint_url``, built on first use and closed with this source).
        s3_endpoint_url: Default: ``$MLFLOW_S3_ENDPOINT_URL`` (else boto3's own settings).
        allow_local_artifacts: Let a remote registry name a local path (``file:``, ``/...``)
            as a version's artifacts. Off, such a version is refused (``AccessDeniedError``),
            so a registry cannot make the loader copy a directory of its choosing. A local
            registry (``sqlite:///``, ``file:``) may always use local paths.
        environ: Read the ``MLFLOW_*`` variables from this mapping instead of ``os.environ``.

    Credentials come from ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (Basic),
    ``MLFLOW_TRACKING_TOKEN`` (Bearer) or ``~/.mlflow/credentials``; TLS from
    ``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_SERVER_CERT_PATH`` and
    ``MLFLOW_TRACKING_CLIENT_CERT_PATH``. They are never logged, and sent only to the
    tracking and registry servers.

    Example:
        >>> src = MlflowRegistrySource(tracking_uri="http://mlflow:5000")
        >>> src.resolve(parse_ref("models:/iris@champion")).version
        'iris/3'
    """

    scheme: ClassVar[str] = _SCHEME
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        remote=True, immutable_versions=True, version_history=True, resumable=True
    )

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_concurrency: int = 16,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        s3_source: ModelSource | None = None,
        s3_endpoint_url: str | None = None,
        allow_local_artifacts: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env: Mapping[str, str] = os.environ if environ is None else environ
        raw_tracking = tracking_uri or env.get("MLFLOW_TRACKING_URI") or ""
        if not raw_tracking:
            raise SourceError(
                "no MLflow tracking URI: pass tracking_uri=... or set MLFLOW_TRACKING_URI", scheme=_SCHEME
            )
        raw_registry = registry_uri or env.get("MLFLOW_REGISTRY_URI") or raw_tracking
        self._tracking_uri = _absolute(raw_tracking)
        self._registry_uri = _absolute(raw_registry)
        self._identity = "mlflow+" + redact_url(self._registry_uri)
        self._include = tuple(include)
        self._exclude = tuple(exclude)
        self._workers = max(1, max_concurrency)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._s3_source = s3_source
        self._owns_s3 = False
        self._s3_endpoint_url = s3_endpoint_url or env.get("MLFLOW_S3_ENDPOINT_URL") or None
        # a registry on this machine (sqlite:///, a file store) keeps its artifacts on this machine too
        self._local_artifacts = (
            allow_local_artifacts or _is_local(self._registry_uri) or self._registry_uri.startswith("sqlite:")
        )
        self._presign = artifacts.Presign()
        self._lock = threading.Lock()
        self._closed = False

        def is_http(uri: str) -> bool:
            return urlsplit(uri).scheme.lower() in ("http", "https")

        plugin_auth = bool(env.get("MLFLOW_TRACKING_AUTH")) or _truthy(env.get("MLFLOW_TRACKING_AWS_SIGV4"))
        self._tracking_ep = Endpoint.parse(raw_tracking) if is_http(raw_tracking) and not plugin_auth else None
        self._http: RestTransport | None = None
        self._registry: Registry
        if is_http(raw_registry) and not plugin_auth:
            registry_ep = Endpoint.parse(raw_registry)
            origins = {registry_ep.origin} | ({self._tracking_ep.origin} if self._tracking_ep else set())
            self._http = RestTransport(
                authorization=_authorization(env, raw_registry),
                auth_origins=frozenset(origins),
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_idle=self._workers,
                tls=TlsSettings(
                    verify=not _truthy(env.get("MLFLOW_TRACKING_INSECURE_TLS")),
                    ca_path=env.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or None,
                    client_cert_path=env.get("MLFLOW_TRACKING_CLIENT_CERT_PATH") or None,
                ),
            )
            self._registry = RestRegistry(self._http, registry_ep)
        else:
            import importlib.util

            if importlib.util.find_spec("mlflow") is None:
                raise MissingDependencyError(
                    f"the MLflow registry {self._identity[len('mlflow+') :]!r} is not an http(s) server, so it is "
                    "read through mlflow: pip install 'model-loader[mlflow]' (a sqlite or file store needs the "
                    "full 'mlflow' package)",
                    extra="mlflow",
                )
            if plugin_auth:
                logger.info("MLFLOW_TRACKING_AUTH/AWS_SIGV4 is set: using MlflowClient for %s", self._identity)
            self._registry = ClientRegistry(self._tracking_uri, self._registry_uri)

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> MlflowRegistrySource:
        """Build from the loader's settings; URIs and credentials come from the environment."""
        return cls(**settings.as_kwargs(), allow_local_artifacts=settings.allow_local_artifacts)

    @property
    def identity(self) -> str:
        return self._identity

    def __repr__(self) -> str:
        return f"MlflowRegistrySource({self._identity!r})"

    # -- resolve ------------------------------------------------------------------------

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        """Pin ``ref`` to a registered model version (or logged model) and its artifact location.

        Raises:
            ModelNotFoundError: No such model, version, alias or stage; a failed registration.
            AccessDeniedError: The server refused the credentials; a remote registry named
                a local path for the artifacts (see ``allow_local_artifacts``).
            InvalidResponseError: The server answered with something malformed.
            SourceUnavailableError: The server cannot be reached or answered 5xx.
            SourceTimeoutError: ``Deadline.current()`` ran out.
        """
        if ref.scheme != _SCHEME:
            raise InvalidReferenceError(f"{ref.uri!r} is not a models:/ reference")
        self._check_open()
        deadline = Deadline.current()
        with self._map_errors(ref, "resolve"):
            if ref.selector_kind == "logged_model":
                return self._resolve_logged_model(ref, deadline)
            name, selector = ref.location, ref.selector or ""
            if ref.selector_kind == "alias":
                mv = self._registry.version_by_alias(name, selector, deadline)
            elif ref.selector_kind == "version":
                mv = self._registry.version(name, int(selector), deadline)
            elif ref.selector_kind == "stage":
                _warn_stage()
                mv = self._registry.latest(name, selector, deadline)
            elif ref.selector_kind == "latest":
                mv = self._registry.latest(name, None, deadline)
            else:
                raise InvalidReferenceError(f"{ref.uri!r} names no version, alias, stage or 'latest'")
            if "FAILED" in mv.status.upper():
                raise NotFound(f"version {mv.version} of {name!r} failed to register")
            if "PENDING" in mv.status.upper():
                raise ConnectionError(f"version {mv.version} of {name!r} is still being registered")
            resolved = self._resolved(ref, mv, deadline)
        logger.debug("resolved %s to %s at %s", ref.uri, resolved.version, resolved.meta["storage_location"])
        return resolved

    def _resolved(self, ref: ModelRef, mv: VersionInfo, deadline: Deadline) -> ResolvedModel:
        location = self._concrete(self._registry.download_uri(mv.name, mv.version, deadline), deadline)
        self._check_location(location, f"version {mv.version} of {mv.name!r}")
        meta = {"name": mv.name, "version": str(mv.version), "storage_location": location, "run_id": mv.run_id}
        return ResolvedModel(ref, self._identity, f"{mv.name}/{mv.version}", None, ResolvedModel.pack_metadata(meta))

    def _resolve_logged_model(self, ref: ModelRef, deadline: Deadline) -> ResolvedModel:
        lm = self._registry.logged_model(ref.location, deadline)
        if "FAILED" in lm.status.upper():
            raise NotFound(f"logged model {lm.model_id} failed to upload")
        if "PENDING" in lm.status.upper():
            raise ConnectionError(f"logged model {lm.model_id} is still being uploaded")
        location = self._concrete(lm.artifact_uri, deadline)
        self._check_location(location, f"logged model {lm.model_id}")
        meta = {"model_id": lm.model_id, "storage_location": location, "run_id": lm.run_id}
        return ResolvedModel(ref, self._identity, lm.model_id, None, ResolvedModel.pack_metadata(meta))

    def _concrete(self, location: str, deadline: Deadline) -> str:
        """Follow ``runs:/`` and ``models:/m-<id>`` indirections to a storage location."""
        for _ in range(4):
            parts = urlsplit(location)
            if parts.scheme == "runs":
                run_id, _, sub = (parts.netloc + parts.path).lstrip("/").partition("/")
                base = self._registry.run_artifact_uri(run_id, deadline).rstrip("/")
                location = f"{base}/{sub}" if sub else base
            elif parts.scheme == "models" and parts.path.lstrip("/").startswith("m-"):
                location = self._registry.logged_model(parts.path.lstrip("/").split("/")[0], deadline).artifact_uri
            elif parts.scheme == "models":
                raise NotFound(f"artifact location {location!r} points at another registered model")
            else:
                return location
        raise NotFound(f"artifact location {location!r} does not lead to storage")

    def _check_location(self, location: str, what: str) -> None:
        """Refuse a local artifact path named by a remote registry (unless allowed)."""
        if not self._local_artifacts and _is_local(location):
            raise LocalArtifactsRefused(
                f"{what} keeps its artifacts at the local path {redact_url(location)!r}, and a remote registry "
                "may not make the loader copy local files; if this is intended, set allow_local_artifacts=True "
                "(MODEL_LOADER_ALLOW_LOCAL_ARTIFACTS=1)"
            )

    # -- version history ----------------------------------------------------------------

    def previous_versions(self, resolved: ResolvedModel, limit: int) -> list[ResolvedModel]:
        """Up to ``limit`` READY versions of the same model older than ``resolved``, newest first.

        Deleted and failed versions are skipped, and so are versions a remote registry
        keeps at a local path; a logged model (``m-<id>``) has no history.
        """
        meta = resolved.meta
        if limit <= 0 or "name" not in meta or "version" not in meta:
            return []
        self._check_open()
        deadline = Deadline.current()
        name, current = meta["name"], int(meta["version"])
        out: list[ResolvedModel] = []
        with self._map_errors(resolved.ref, "list versions of"):
            for mv in self._registry.versions_desc(name, deadline):
                if mv.version >= current or mv.status.upper() != "READY":
                    continue
                try:
                    out.append(self._resolved(parse_ref(f"models:/{name}/{mv.version}"), mv, deadline))
                except LocalArtifactsRefused as exc:
                    logger.warning("skipping an earlier version: %s", exc)
                    continue
                if len(out) >= limit:
                    break
        return out

    # -- fetch --------------------------------------------------------------------------

    def fetch(self, resolved: ResolvedModel, dest: Path) -> Manifest:
        """Download the pinned version's artifacts into ``dest``.

        Files that ``FetchContext.current().completed`` lists with the listed size are kept
        as they are (an earlier attempt wrote and verified them); every other file is
        written, hashed and reported to ``FetchContext.current().file_done``.

        Raises:
            ModelNotFoundError: The version's artifacts are gone (the loader may then try
                earlier versions).
            AccessDeniedError: A remote registry named a local path (see ``allow_local_artifacts``).
            InvalidResponseError: A listing is malformed or beyond a bound.
            SourceUnavailableError: The server or the artifact store cannot be reached.
            SourceTimeoutError: ``Deadline.current()`` ran out.
            IntegrityError: A file arrived with another size than listed; an unsafe path.
        """
        location = resolved.meta.get("storage_location")
        if not location:
            raise SourceError(
                f"{resolved.version} was not resolved by an MLflow source", scheme=_SCHEME, ref=resolved.ref.uri
            )
        self._check_open()
        deadline, context = Deadline.current(), FetchContext.current()
        with self._map_errors(resolved.ref, "fetch"):
            self._check_location(location, resolved.version)
            manifest = self._fetch_location(location, dest, deadline, context)
        logger.debug("fetched %s: %d files, %d bytes", resolved.version, len(manifest.files), manifest.total_size)
        return manifest

    def _fetch_location(self, location: str, dest: Path, deadline: Deadline, context: FetchContext) -> Manifest:
        parts = urlsplit(location)
        scheme = parts.scheme.lower()
        if scheme == "s3":
            return self._fetch_s3(location, dest, deadline, context)
        if self._http is not None and self._tracking_ep is not None:
            if scheme == "mlflow-artifacts":
                ep = self._tracking_ep.with_netloc(parts.netloc) if parts.netloc else self._tracking_ep
                return self._fetch_proxied(ep, unquote(parts.path), dest, deadline, context)
            anchor = artifacts.ARTIFACTS_API + "/"
            if scheme in ("http", "https") and anchor in parts.path:
                before, _, after = parts.path.partition(anchor)
                ep = Endpoint.parse(f"{scheme}://{parts.netloc}{before}")
                return self._fetch_proxied(ep, unquote(after), dest, deadline, context)
        if scheme == "file" or (not scheme and location.startswith("/")):
            root = Path(unquote(parts.path) if scheme else location)
            return artifacts.copy_local(
                root,
                dest,
                include=self._include,
                exclude=self._exclude,
                workers=self._workers,
                deadline=deadline,
                context=context,
            )
        return artifacts.fetch_with_mlflow(
            location,
            dest,
            tracking_uri=self._tracking_uri,
            registry_uri=self._registry_uri,
            include=self._include,
            exclude=self._exclude,
            deadline=deadline,
            context=context,
        )

    def _fetch_proxied(
        self, ep: Endpoint, root: str, dest: Path, deadline: Deadline, context: FetchContext
    ) -> Manifest:
        assert self._http is not None
        return artifacts.fetch_proxied(
            self._http,
            ep,
            root,
            dest,
            include=self._include,
            exclude=self._exclude,
            workers=self._workers,
            deadline=deadline,
            context=context,
            presign=self._presign,
        )

    def _fetch_s3(self, location: str, dest: Path, deadline: Deadline, context: FetchContext) -> Manifest:
        """Through the S3 source (which caps its own calls by ``Deadline.current()``), handed
        a resolution restricted to the files an earlier attempt did not complete."""
        s3 = self._s3()
        check_deadline(deadline, "listing the S3 artifacts")
        s3_resolved = s3.resolve(parse_ref(location.rstrip("/") + "/"))
        resume = artifacts.Resume(dest, context)
        todo = resume.todo([(f.path, f) for f in s3_resolved.files or ()], lambda f: f.size)
        if not todo:
            return Manifest.of(resume.kept)
        reported: set[str] = set()
        lock = threading.Lock()

        def file_done(entry: FileEntry) -> None:
            with lock:
                reported.add(entry.path)
            context.file_done(entry)

        restricted = dataclasses.replace(s3_resolved, files=tuple(f for _, f in todo))
        with FetchContext(file_done=file_done, progress=context.progress).applied():
            manifest = s3.fetch(restricted, dest)
        for entry in manifest.files:
            if entry.path not in reported:  # an S3 source that does not report files itself
                context.file_done(entry)
        return Manifest.of(resume.kept + list(manifest.files))

    def _s3(self) -> ModelSource:
        with self._lock:
            if self._s3_source is None:
                from model_loader.sources.s3 import S3Source

                self._s3_source = S3Source(
                    endpoint_url=self._s3_endpoint_url,
                    connect_timeout=self._connect_timeout,
                    read_timeout=self._read_timeout,
                    max_concurrency=self._workers,
                    include=self._include,
                    exclude=self._exclude,
                )
                self._owns_s3 = True
            return self._s3_source

    # -- lifecycle and errors -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SourceError(f"{self!r} is closed", scheme=_SCHEME)

    def close(self) -> None:
        """Close pooled connections and the S3 source this source built. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            s3, owns = self._s3_source, self._owns_s3
        if self._http is not None:
            self._http.close()
        if s3 is not None and owns:
            s3.close()

    @contextlib.contextmanager
    def _map_errors(self, ref: ModelRef, what: str) -> Iterator[None]:
        """Translate every backend error into :mod:`model_loader.errors` (the only place)."""
        with map_errors(self._identity, ref, what):
            yield


def _warn_stage() -> None:
    with _stage_lock:
        if _stage_warned:
            return
        _stage_warned.add("stage")
    message = (
        "MLflow model stages are deprecated; models:/<name>/<stage> still works here, but point an alias "
        "at the version instead and load models:/<name>@<alias>"
    )
    logger.warning(message)
    warnings.warn(message, DeprecationWarning, stacklevel=4)
