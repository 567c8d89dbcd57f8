"""The MLflow sources: registered models (``models:/...``) and run artifacts (``runs:/...``).

For ``http(s)://`` servers they speak MLflow's REST API directly (stdlib HTTP, no mlflow
import, our timeouts, proxies from the environment, no retries of their own); any other
URI (``sqlite:///``, ``file:``, ``databricks``) goes through ``mlflow.MlflowClient``.
Model versions are asked of the registry (``MLFLOW_REGISTRY_URI``), runs and logged
models of the tracking server (``MLFLOW_TRACKING_URI``), as MLflow's client does.
Artifacts are listed and downloaded wherever their location says (:mod:`._stores`).

Every call is capped by ``Deadline.current()`` (read at the top of ``resolve``, ``fetch``
and ``previous_versions`` and handed down explicitly, to worker threads too), every REST
answer is parsed against a declared schema, and ``fetch`` resumes: files an earlier
attempt completed (``FetchContext.current().completed``) are kept, each new one is
reported as it completes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar
from urllib.parse import urlsplit

from model_loader._deadline import Deadline, FetchContext
from model_loader._identity import normalise_url
from model_loader._types import Manifest, ModelRef, ResolvedModel
from model_loader._uri import parse_ref
from model_loader.errors import InvalidReferenceError, MissingDependencyError, SourceError
from model_loader.protocol import ModelSource, SourceCapabilities, SourceSettings
from model_loader.sources.mlflow import _env
from model_loader.sources.mlflow._errors import LocalArtifactsRefused, NotFound, map_errors
from model_loader.sources.mlflow._http import Endpoint, RestTransport, redact_url
from model_loader.sources.mlflow._registry import (
    ClientRegistry,
    Registry,
    RestRegistry,
    RestTracking,
    Tracking,
    VersionInfo,
    sqlite_path,
)
from model_loader.sources.mlflow._stores import Stores, is_local

__all__ = ["MlflowRegistrySource", "MlflowRunsSource", "pinned_model_uri"]

logger = logging.getLogger("model_loader.sources.mlflow")

_DEFAULT_CONNECT = 5.0
_DEFAULT_READ = 60.0
_SETTINGS_DEFAULTS = SourceSettings()
_stage_warned: set[str] = set()
_stage_lock = threading.Lock()


def _absolute(uri: str) -> str:
    path = sqlite_path(uri)
    return f"sqlite:///{path}" if path is not None else uri.rstrip("/")


def _is_http(uri: str) -> bool:
    return urlsplit(uri).scheme.lower() in ("http", "https")


def _sub_path(ref: ModelRef) -> str:
    return dict(ref.params).get("path", "")


class _MlflowSource:
    """What both MLflow sources share: configuration, clients, artifact stores, fetch, close."""

    scheme: ClassVar[str]
    capabilities: ClassVar[SourceCapabilities]

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        registry_uri: str | None = None,
        connect_timeout: float | None = None,
        read_timeout: float | None = None,
        max_concurrency: int = 16,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        s3_source: ModelSource | None = None,
        s3_endpoint_url: str | None = None,
        artifact_sources: Mapping[str, ModelSource] | None = None,
        allow_local_artifacts: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        env: Mapping[str, str] = os.environ if environ is None else environ
        raw_tracking = _env.check_uri(
            "tracking_uri" if tracking_uri else "MLFLOW_TRACKING_URI",
            tracking_uri or env.get("MLFLOW_TRACKING_URI") or "",
        )
        if not raw_tracking:
            raise SourceError(
                "no MLflow tracking URI: pass tracking_uri=... or set MLFLOW_TRACKING_URI", scheme=self.scheme
            )
        raw_registry = (
            _env.check_uri(
                "registry_uri" if registry_uri else "MLFLOW_REGISTRY_URI",
                registry_uri or env.get("MLFLOW_REGISTRY_URI") or "",
            )
            or raw_tracking
        )
        self._tracking_uri = _absolute(raw_tracking)
        self._registry_uri = _absolute(raw_registry)
        self._tracking_identity = "mlflow+" + normalise_url(self._tracking_uri)
        self._registry_identity = "mlflow+" + normalise_url(self._registry_uri)
        request_timeout = _env.request_timeout(env)  # MLflow's per-request timeout, when ours are not given
        if connect_timeout is None:
            connect_timeout = min(_DEFAULT_CONNECT, request_timeout) if request_timeout else _DEFAULT_CONNECT
        if read_timeout is None:
            read_timeout = request_timeout or _DEFAULT_READ
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._workers = max(1, max_concurrency)
        self._allow_local = allow_local_artifacts
        self._lock = threading.Lock()
        self._closed = False

        plugin_auth = _env.plugin_auth(env)
        rest_tracking = _is_http(raw_tracking) and not plugin_auth
        rest_registry = _is_http(raw_registry) and not plugin_auth
        self._tracking_ep = Endpoint.parse(raw_tracking) if rest_tracking else None
        registry_ep = Endpoint.parse(raw_registry) if rest_registry else None
        self._http: RestTransport | None = None
        if rest_tracking or rest_registry:
            origins = {ep.origin for ep in (self._tracking_ep, registry_ep) if ep is not None}
            self._http = RestTransport(
                authorization=_env.authorization(env, raw_registry if rest_registry else raw_tracking),
                auth_origins=frozenset(origins),
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_idle=self._workers,
                tls=_env.tls(env),
                proxies=_env.proxies(env),
            )
        client: ClientRegistry | None = None
        if not (rest_tracking and rest_registry):
            if importlib.util.find_spec("mlflow") is None:
                which = raw_registry if not rest_registry else raw_tracking
                raise MissingDependencyError(
                    f"the MLflow server {redact_url(which)!r} is not an http(s) server, so it is read through mlflow: "
                    "pip install 'model-loader[mlflow]' (a sqlite or file store needs the full 'mlflow' package)",
                    extra="mlflow",
                )
            if plugin_auth:
                logger.info("MLFLOW_TRACKING_AUTH/AWS_SIGV4 is set: using MlflowClient for %s", self.identity)
            client = ClientRegistry(self._tracking_uri, self._registry_uri)
        self._registry: Registry
        self._tracking: Tracking
        if self._http is not None and registry_ep is not None:
            self._registry = RestRegistry(self._http, registry_ep)
        else:
            assert client is not None
            self._registry = client
        if self._http is not None and self._tracking_ep is not None:
            self._tracking = RestTracking(self._http, self._tracking_ep)
        else:
            assert client is not None
            self._tracking = client
        given = dict(artifact_sources or {})
        if s3_source is not None:
            given.setdefault("s3", s3_source)
        self._stores = Stores(
            http=self._http,
            tracking=self._tracking_ep,
            settings=SourceSettings(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                max_concurrency=self._workers,
                include=tuple(include),
                exclude=tuple(exclude),
            ),
            options={"s3": _env.s3_options(env, s3_endpoint_url)},
            sources=given,
            tracking_uri=self._tracking_uri,
            registry_uri=self._registry_uri,
        )

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> _MlflowSource:
        """Build from the loader's settings; URIs and credentials come from the environment.

        A timeout the loader leaves at its default gives way to ``MLFLOW_HTTP_REQUEST_TIMEOUT``.
        """
        kwargs = settings.as_kwargs()
        explicit = getattr(settings, "explicit", None)  # names the user set, where the loader says
        for name in ("connect_timeout", "read_timeout"):
            unset = name not in explicit if explicit is not None else kwargs[name] == getattr(_SETTINGS_DEFAULTS, name)
            if unset:
                kwargs.pop(name)
        return cls(**kwargs, allow_local_artifacts=settings.allow_local_artifacts)

    @property
    def identity(self) -> str:
        raise NotImplementedError

    @property
    def timeouts(self) -> tuple[float, float]:
        """``(connect_timeout, read_timeout)`` of every request, each capped by the load's deadline."""
        return self._connect_timeout, self._read_timeout

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity!r})"

    def _local_artifacts_ok(self, server_uri: str) -> bool:
        # a server on this machine (sqlite:///, a file store) keeps its artifacts on this machine too
        return self._allow_local or is_local(server_uri) or server_uri.startswith("sqlite:")

    def _check_location(self, location: str, what: str, server_uri: str) -> None:
        """Refuse a local artifact path named by a remote server (unless allowed)."""
        if not self._local_artifacts_ok(server_uri) and is_local(location):
            raise LocalArtifactsRefused(
                f"{what} keeps its artifacts at the local path {redact_url(location)!r}, and a remote server "
                "may not make the loader copy local files; if this is intended, set allow_local_artifacts=True "
                "(MODEL_LOADER_ALLOW_LOCAL_ARTIFACTS=1)"
            )

    def _concrete(self, location: str, deadline: Deadline) -> str:
        """Follow ``runs:/`` and ``models:/m-<id>`` indirections (on the tracking server) to storage."""
        for _ in range(4):
            parts = urlsplit(location)
            scheme = parts.scheme.lower()
            if scheme == "runs":
                run_id, _, sub = (parts.netloc + parts.path).lstrip("/").partition("/")
                base, inner, _ = self._run_location(run_id, sub.strip("/"), deadline)
                location = f"{base}/{inner}" if inner else base
            elif scheme == "models" and parts.path.lstrip("/").startswith("m-"):
                location = self._tracking.logged_model(parts.path.lstrip("/").split("/")[0], deadline).artifact_uri
            elif scheme == "models":
                raise NotFound(f"artifact location {location!r} points at another registered model")
            else:
                return location
        raise NotFound(f"artifact location {location!r} does not lead to storage")

    def _run_location(self, run_id: str, sub: str, deadline: Deadline) -> tuple[str, str, str | None]:
        """Where ``runs:/<run_id>/<sub>`` is stored: the location, the path inside it, and the
        logged model serving it, if any.

        As MLflow 3's client reads it: when the path's first segment names a logged model the
        run produced (``log_model(name="model")`` keeps its files there, not in the run's
        directory), that model's artifacts are served; otherwise the run's own.
        """
        run = self._tracking.run(run_id, deadline)
        base = run.artifact_uri.rstrip("/")
        if sub:
            name, _, rest = sub.partition("/")
            model = self._tracking.run_logged_model(run, name, deadline)
            if model is not None:
                return model.artifact_uri.rstrip("/"), rest, model.model_id
        return base, sub, None

    # -- fetch --------------------------------------------------------------------------

    def fetch(self, resolved: ResolvedModel, dest: Path) -> Manifest:
        """Download the pinned artifacts into ``dest``.

        Files that ``FetchContext.current().completed`` lists with the listed size are kept
        as they are (an earlier attempt wrote and verified them); every other file is
        written, hashed and reported to ``FetchContext.current().file_done``.

        Raises:
            ModelNotFoundError: The artifacts (or the path inside the model) are gone (the
                loader may then try earlier versions).
            StaleResolutionError: A run's artifacts changed since they were resolved.
            AccessDeniedError: A remote server named a local path (see ``allow_local_artifacts``).
            InvalidResponseError: A listing is malformed or beyond a bound.
            SourceUnavailableError: The server or the artifact store cannot be reached.
            SourceTimeoutError: ``Deadline.current()`` ran out.
            IntegrityError: A file arrived with another size than listed; an unsafe path.
        """
        meta = resolved.meta
        location = meta.get("storage_location")
        if not location:
            raise SourceError(
                f"{resolved.version} was not resolved by an MLflow source", scheme=self.scheme, ref=resolved.ref.uri
            )
        self._check_open()
        deadline, context = Deadline.current(), FetchContext.current()
        expect = resolved.files if self.scheme == "runs" else None
        with self._map_errors(resolved.ref, "fetch"):
            self._check_location(location, resolved.version, self._server_uri)
            manifest = self._stores.fetch(location, meta.get("path", ""), dest, deadline, context, expect)
        logger.debug("fetched %s: %d files, %d bytes", resolved.version, len(manifest.files), manifest.total_size)
        return manifest

    @property
    def _server_uri(self) -> str:
        return self._registry_uri

    # -- lifecycle and errors -----------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SourceError(f"{self!r} is closed", scheme=self.scheme)

    def close(self) -> None:
        """Close pooled connections and the artifact sources this source built. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._http is not None:
            self._http.close()
        self._stores.close()

    @contextlib.contextmanager
    def _map_errors(self, ref: ModelRef, what: str) -> Iterator[None]:
        """Translate every backend error into :mod:`model_loader.errors` (the only place)."""
        with map_errors(self.identity, ref, what):
            yield


class MlflowRegistrySource(_MlflowSource):
    """Models in an MLflow Model Registry: ``models:/name@alias``, ``/<version>``,
    ``/<stage>``, ``/latest``, ``models:/m-<id>``, each optionally with a path inside the model.

    ``resolve`` pins a reference to ``<name>/<version>`` (or ``m-<id>``; plus the path inside
    the model, if any) and the version's artifact location; ``fetch`` downloads exactly
    those artifacts (or that path). Registry and artifact calls to an ``http(s)`` server use
    MLflow's REST API with this source's timeouts and no retries (the loader's retry policy
    is the only one), so a refused connection fails in milliseconds.

    Args:
        tracking_uri: Default: ``$MLFLOW_TRACKING_URI`` (read now, not at import). Runs and
            logged models are looked up there.
        registry_uri: Default: ``$MLFLOW_REGISTRY_URI``, else the tracking URI.
        connect_timeout: Seconds to open a connection (default 5, or
            ``$MLFLOW_HTTP_REQUEST_TIMEOUT`` if smaller).
        read_timeout: Seconds to wait for bytes (default ``$MLFLOW_HTTP_REQUEST_TIMEOUT``, else 60).
        max_concurrency: Files downloaded in parallel.
        include: Globs of artifact paths to fetch (empty: all).
        exclude: Globs of artifact paths to skip.
        s3_source: The source used for ``s3://`` artifact locations (the same as
            ``artifact_sources={"s3": ...}``).
        s3_endpoint_url: Default: ``$MLFLOW_S3_ENDPOINT_URL`` (else boto3's own settings).
        artifact_sources: Ready sources for artifact locations, by scheme (not closed by
            :meth:`close`); other schemes get the source registered for them, built on first use.
        allow_local_artifacts: Let a remote registry name a local path (``file:``, ``/...``)
            as a version's artifacts. Off, such a version is refused (``AccessDeniedError``),
            so a registry cannot make the loader copy a directory of its choosing. A local
            registry (``sqlite:///``, ``file:``) may always use local paths.
        environ: Read the ``MLFLOW_*`` and proxy variables from this mapping instead of ``os.environ``.

    Credentials come from ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (Basic),
    ``MLFLOW_TRACKING_TOKEN`` (Bearer) or ``~/.mlflow/credentials``; TLS from
    ``MLFLOW_TRACKING_INSECURE_TLS``, ``MLFLOW_TRACKING_SERVER_CERT_PATH`` and
    ``MLFLOW_TRACKING_CLIENT_CERT_PATH``; proxies from ``HTTP(S)_PROXY``/``NO_PROXY``. They are
    never logged, and credentials are sent only to the tracking and registry servers.

    Example:
        >>> src = MlflowRegistrySource(tracking_uri="http://mlflow:5000")
        >>> src.resolve(parse_ref("models:/iris@champion")).version
        'iris/3'
    """

    scheme: ClassVar[str] = "models"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        remote=True, immutable_versions=True, version_history=True, resumable=True
    )

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> MlflowRegistrySource:
        source = super().from_settings(settings)
        assert isinstance(source, MlflowRegistrySource)
        return source

    @property
    def identity(self) -> str:
        """``mlflow+<registry URI>``, normalised, without credentials (what the cache keys on)."""
        return self._registry_identity

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
        if ref.scheme != self.scheme:
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
        self._check_location(location, f"version {mv.version} of {mv.name!r}", self._registry_uri)
        sub = _sub_path(ref)
        meta = {
            "name": mv.name,
            "version": str(mv.version),
            "storage_location": location,
            "run_id": mv.run_id,
            "path": sub or None,
        }
        version = f"{mv.name}/{mv.version}" + (f"/{sub}" if sub else "")
        return ResolvedModel(ref, self.identity, version, None, ResolvedModel.pack_metadata(meta))

    def _resolve_logged_model(self, ref: ModelRef, deadline: Deadline) -> ResolvedModel:
        lm = self._tracking.logged_model(ref.location, deadline)
        if "FAILED" in lm.status.upper():
            raise NotFound(f"logged model {lm.model_id} failed to upload")
        if "PENDING" in lm.status.upper():
            raise ConnectionError(f"logged model {lm.model_id} is still being uploaded")
        location = self._concrete(lm.artifact_uri, deadline)
        self._check_location(location, f"logged model {lm.model_id}", self._tracking_uri)
        sub = _sub_path(ref)
        meta = {"model_id": lm.model_id, "storage_location": location, "run_id": lm.run_id, "path": sub or None}
        version = lm.model_id + (f"/{sub}" if sub else "")
        return ResolvedModel(ref, self.identity, version, None, ResolvedModel.pack_metadata(meta))

    # -- version history ----------------------------------------------------------------

    def previous_versions(self, resolved: ResolvedModel, limit: int) -> list[ResolvedModel]:
        """Up to ``limit`` READY versions of the same model older than ``resolved``, newest first
        (the same path inside each, if the reference named one).

        Deleted and failed versions are skipped, and so are versions a remote registry
        keeps at a local path; a logged model (``m-<id>``) has no history.
        """
        meta = resolved.meta
        if limit <= 0 or "name" not in meta or "version" not in meta:
            return []
        self._check_open()
        deadline = Deadline.current()
        name, current = meta["name"], int(meta["version"])
        params = resolved.ref.params
        sub = _sub_path(resolved.ref)
        out: list[ResolvedModel] = []
        with self._map_errors(resolved.ref, "list versions of"):
            for mv in self._registry.versions_desc(name, deadline):
                if mv.version >= current or mv.status.upper() != "READY":
                    continue
                uri = f"models:/{name}/{mv.version}" + (f"/{sub}" if sub else "")
                ref = ModelRef("models", uri, name, str(mv.version), "version", params)
                try:
                    out.append(self._resolved(ref, mv, deadline))
                except LocalArtifactsRefused as exc:
                    logger.warning("skipping an earlier version: %s", exc)
                    continue
                if len(out) >= limit:
                    break
        return out


class MlflowRunsSource(_MlflowSource):
    """A run's artifacts on an MLflow tracking server: ``runs:/<run_id>/<path>``.

    A run's artifacts have no version number and can be added to later, so ``resolve``
    lists them and pins that listing: the version is ``<run_id>/<path>@<listing hash>``
    (paths, sizes and, where the store has them, ETags), ``ResolvedModel.files`` is the
    listing, and ``fetch`` refuses artifacts that changed since (``StaleResolutionError``;
    the loader then resolves again). The run is looked up on the tracking server.

    Takes the same arguments as :class:`MlflowRegistrySource`; its identity is the
    tracking server's (``mlflow+<tracking URI>``).

    Example:
        >>> src = MlflowRunsSource(tracking_uri="http://mlflow:5000")
        >>> src.resolve(parse_ref("runs:/0a1b2c/model")).version
        '0a1b2c/model@5f0c6e1d2a3b4c5d'
    """

    scheme: ClassVar[str] = "runs"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        remote=True, immutable_versions=False, version_history=False, resumable=True
    )

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> MlflowRunsSource:
        source = super().from_settings(settings)
        assert isinstance(source, MlflowRunsSource)
        return source

    @property
    def identity(self) -> str:
        """``mlflow+<tracking URI>``, normalised, without credentials (what the cache keys on)."""
        return self._tracking_identity

    @property
    def _server_uri(self) -> str:
        return self._tracking_uri

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        """List the run's artifacts under the path and pin that listing.

        Raises:
            ModelNotFoundError: No such run, or nothing at that path.
            AccessDeniedError: The server refused the credentials; a remote server named a
                local path for the run's artifacts (see ``allow_local_artifacts``).
            InvalidResponseError: The server answered with something malformed.
            SourceUnavailableError: The server or the artifact store cannot be reached.
            SourceTimeoutError: ``Deadline.current()`` ran out.
        """
        if ref.scheme != self.scheme:
            raise InvalidReferenceError(f"{ref.uri!r} is not a runs:/ reference")
        self._check_open()
        deadline = Deadline.current()
        run_id, sub = ref.location, _sub_path(ref)
        with self._map_errors(ref, "resolve"):
            location, inner, model_id = self._run_location(run_id, sub, deadline)
            self._check_location(location, f"run {run_id}", self._tracking_uri)
            files = self._stores.listing(location, inner, deadline)
        digest = hashlib.sha256(f"{location}\n{inner}\n".encode())
        for f in files:
            digest.update(f"{f.path}\0{f.size}\0{f.pin or ''}\n".encode())
        listing = digest.hexdigest()
        version = f"{run_id}/{sub}@{listing[:16]}" if sub else f"{run_id}@{listing[:16]}"
        meta = {
            "run_id": run_id,
            "storage_location": location,
            "path": inner or None,
            "model_id": model_id,
            "listing": listing,
        }
        logger.debug("resolved %s to %s (%d files)", ref.uri, version, len(files))
        return ResolvedModel(ref, self.identity, version, files, ResolvedModel.pack_metadata(meta))


def pinned_model_uri(resolved: ResolvedModel) -> str | None:
    """A ``models:/`` URI naming exactly ``resolved``'s version (and the path inside it), for a
    lock file; ``None`` where MLflow's syntax cannot name it (a model named with ``@``: its
    ``models:/team@fraud/3`` would be read as alias ``fraud`` of ``team``).
    """
    ref = resolved.ref
    if ref.scheme != "models":
        return None
    if ref.selector_kind in ("version", "logged_model"):
        return ref.uri
    meta = resolved.meta
    name, version, sub = meta.get("name"), meta.get("version") or "", meta.get("path") or ""
    if not name or not (version.isascii() and version.isdigit()):
        return None
    try:
        pinned = parse_ref(f"models:/{name}/{version}" + (f"/{sub}" if sub else ""))
    except InvalidReferenceError:
        return None
    if (pinned.location, pinned.selector, _sub_path(pinned)) != (name, version, sub):
        return None
    return pinned.uri


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
