"""Where a model's artifacts live, and how to list and download them.

An MLflow version (or run) names its artifacts by a storage location; :class:`Stores`
routes it by scheme:

- ``mlflow-artifacts:/...`` (and ``http(s)://host/api/2.0/mlflow-artifacts/artifacts/...``):
  the tracking server's artifacts API over REST (:mod:`._artifacts`);
- ``file:`` or a path: copied from the local filesystem (whether a registry may name a
  local path is the source's decision, made before);
- any scheme with a registered source (``s3://`` through the S3 source, ``gs://``,
  ``abfss://``... through the fsspec source, or a third party's): that source, built
  through the source registry with the loader's settings, and for ``s3://`` with
  MLflow's S3 variables (``MLFLOW_S3_ENDPOINT_URL``, ``MLFLOW_S3_IGNORE_TLS``...);
- anything else (``dbfs:``, ``hdfs:``...): MLflow's own artifact repositories (imports mlflow).

Every location comes with a path inside it (``sub``: a sub-path of the model, a file or a
directory; ``""`` for all of it). ``listing`` says which files are there (after
``include``/``exclude``), each with its size and, where the store has one, a pin (an S3
ETag); ``fetch`` downloads them, and with ``expect`` refuses a listing that changed since
(``StaleListing``): the ``runs:/`` source resolves to a listing, so that is its pin.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from model_loader._deadline import Deadline, FetchContext
from model_loader._io import is_selected
from model_loader._types import FileEntry, Manifest, ModelRef, ResolvedModel
from model_loader.errors import MissingDependencyError, UnknownSchemeError
from model_loader.protocol import ModelSource, SourceSettings
from model_loader.sources.mlflow import _artifacts as artifacts
from model_loader.sources.mlflow._errors import ArtifactsMissing, StaleListing
from model_loader.sources.mlflow._http import Endpoint, RestTransport, check_deadline

__all__ = ["Stores", "is_local"]

logger = logging.getLogger("model_loader.sources.mlflow")

_OWN = frozenset({"models", "runs", "file", "http", "https", "mlflow-artifacts"})


def is_local(location: str) -> bool:
    """A ``file:`` URI or a bare path (``/srv/...``, ``mlruns/0/...``, ``C:\\...``)."""
    scheme = urlsplit(location).scheme.lower()
    return scheme in ("", "file") or len(scheme) == 1


def _join(location: str, sub: str) -> str:
    return f"{location.rstrip('/')}/{sub}" if sub else location.rstrip("/") + "/"


class Stores:
    """Lists and downloads artifacts wherever a location says they are.

    Args:
        http: The REST transport (``None`` when the tracking server is not ``http(s)``).
        tracking: The tracking server's endpoint, for ``mlflow-artifacts:`` locations.
        settings: What routed sources are built with (timeouts, concurrency, globs).
        options: Extra constructor arguments per scheme (``{"s3": {"endpoint_url": ...}}``).
        sources: Ready sources per scheme, used instead of building one (not closed here).
        tracking_uri: For MLflow's artifact repositories.
        registry_uri: For MLflow's artifact repositories.
    """

    def __init__(
        self,
        *,
        http: RestTransport | None,
        tracking: Endpoint | None,
        settings: SourceSettings,
        options: Mapping[str, Mapping[str, Any]],
        sources: Mapping[str, ModelSource],
        tracking_uri: str,
        registry_uri: str,
    ) -> None:
        self._http = http
        self._tracking = tracking
        self._settings = settings
        self._options = {k: dict(v) for k, v in options.items()}
        self._given = dict(sources)
        self._built: dict[str, ModelSource] = {}
        self._tracking_uri = tracking_uri
        self._registry_uri = registry_uri
        self._include = settings.include
        self._exclude = settings.exclude
        self._workers = max(1, settings.max_concurrency)
        self.presign = artifacts.Presign()
        self._lock = threading.Lock()

    # -- routing ------------------------------------------------------------------------

    def _proxied(self, location: str) -> tuple[Endpoint, str] | None:
        """The artifacts API endpoint and root path for a proxied location, else ``None``."""
        if self._http is None or self._tracking is None:
            return None
        parts = urlsplit(location)
        scheme = parts.scheme.lower()
        if scheme == "mlflow-artifacts":
            ep = self._tracking.with_netloc(parts.netloc) if parts.netloc else self._tracking
            return ep, unquote(parts.path).strip("/")
        anchor = artifacts.ARTIFACTS_API + "/"
        if scheme in ("http", "https") and anchor in parts.path:
            before, _, after = parts.path.partition(anchor)
            return Endpoint.parse(f"{scheme}://{parts.netloc}{before}"), unquote(after).strip("/")
        return None

    def routed(self, scheme: str) -> ModelSource | None:
        """The registered source serving ``scheme`` as an artifact store, built on first use;
        ``None`` when nothing is registered for it (or it cannot be imported and mlflow can)."""
        scheme = scheme.lower()
        if scheme in _OWN or len(scheme) <= 1:
            return None
        with self._lock:
            found = self._given.get(scheme) or self._built.get(scheme)
        if found is not None:
            return found
        from model_loader.registry import create_artifact_source

        try:
            built = create_artifact_source(scheme, self._settings, **self._options.get(scheme, {}))
        except UnknownSchemeError:
            return None
        except MissingDependencyError as exc:
            if importlib.util.find_spec("mlflow") is None:
                raise
            logger.info("%s; reading %s:// artifacts through MLflow's repositories instead", exc, scheme)
            return None
        with self._lock:
            if scheme in self._built:  # another thread built one first
                other, built = built, self._built[scheme]
                other.close()
            else:
                self._built[scheme] = built
        return built

    # -- listing and fetching --------------------------------------------------------------

    def listing(self, location: str, sub: str, deadline: Deadline) -> tuple[FileEntry, ...]:
        """The files at ``location``/``sub`` after include/exclude, sorted, with sizes (and pins).

        Raises:
            ArtifactsMissing: Nothing there, or nothing left after include/exclude.
        """
        scheme = urlsplit(location).scheme.lower()
        source = self.routed(scheme)
        if source is not None:
            inner = self._resolve_routed(source, location, sub, deadline)
            return tuple(sorted(inner.files or (), key=lambda f: f.path))
        if (proxied := self._proxied(location)) is not None:
            ep, root = proxied
            assert self._http is not None
            found = artifacts.list_proxied(self._http, ep, root, sub, workers=self._workers, deadline=deadline)
        elif is_local(location):
            found = artifacts.list_local(self._local_root(location), sub)
        else:
            _, found = artifacts.list_with_mlflow(
                location, sub, tracking_uri=self._tracking_uri, registry_uri=self._registry_uri, deadline=deadline
            )
        return tuple(FileEntry(rel, size) for rel, size in self._selected(found).files)

    def fetch(
        self,
        location: str,
        sub: str,
        dest: Path,
        deadline: Deadline,
        context: FetchContext,
        expect: Sequence[FileEntry] | None = None,
    ) -> Manifest:
        """Download the files at ``location``/``sub`` into ``dest``.

        Args:
            expect: The files a resolution listed (with sizes and pins): a listing that
                differs now raises ``StaleListing``.
        """
        scheme = urlsplit(location).scheme.lower()
        source = self.routed(scheme)
        if source is not None:
            return self._fetch_routed(source, location, sub, dest, deadline, context, expect)
        if (proxied := self._proxied(location)) is not None:
            ep, root = proxied
            assert self._http is not None
            found = artifacts.list_proxied(self._http, ep, root, sub, workers=self._workers, deadline=deadline)
            listing = self._checked(self._selected(found), expect)
            return artifacts.download_proxied(
                self._http,
                ep,
                listing,
                dest,
                workers=self._workers,
                deadline=deadline,
                context=context,
                presign=self.presign,
            )
        if is_local(location):
            listing = self._checked(self._selected(artifacts.list_local(self._local_root(location), sub)), expect)
            return artifacts.copy_local(listing, dest, workers=self._workers, deadline=deadline, context=context)
        repo, found = artifacts.list_with_mlflow(
            location, sub, tracking_uri=self._tracking_uri, registry_uri=self._registry_uri, deadline=deadline
        )
        listing = self._checked(self._selected(found), expect)
        return artifacts.download_with_mlflow(repo, listing, dest, deadline=deadline, context=context)

    @staticmethod
    def _local_root(location: str) -> Path:
        parts = urlsplit(location)
        return Path(unquote(parts.path) if parts.scheme.lower() == "file" else location)

    def _selected(self, listing: artifacts.Listing) -> artifacts.Listing:
        chosen = tuple(f for f in listing.files if is_selected(f[0], self._include, self._exclude))
        if not listing.files:
            raise ArtifactsMissing(f"no artifacts at {listing.shown} (deleted, or a path the model does not have?)")
        if not chosen:
            raise ArtifactsMissing(f"none of the {len(listing.files)} files at {listing.shown} matches include/exclude")
        return dataclasses.replace(listing, files=chosen)

    @staticmethod
    def _checked(listing: artifacts.Listing, expect: Sequence[FileEntry] | None) -> artifacts.Listing:
        if expect is not None:
            _compare({(f.path, f.size, f.pin) for f in expect}, {(p, s, None) for p, s in listing.files}, listing.shown)
        return listing

    def _resolve_routed(self, source: ModelSource, location: str, sub: str, deadline: Deadline) -> ResolvedModel:
        from model_loader._uri import parse_ref

        check_deadline(deadline, f"listing {location}")
        ref: ModelRef = parse_ref(_join(location, sub), check_scheme=False)
        return source.resolve(ref)

    def _fetch_routed(
        self,
        source: ModelSource,
        location: str,
        sub: str,
        dest: Path,
        deadline: Deadline,
        context: FetchContext,
        expect: Sequence[FileEntry] | None,
    ) -> Manifest:
        """Through the routed source (which caps its own calls by ``Deadline.current()``),
        handed a resolution restricted to the files an earlier attempt did not complete."""
        inner = self._resolve_routed(source, location, sub, deadline)
        if expect is not None:
            _compare(
                {(f.path, f.size, f.pin) for f in expect},
                {(f.path, f.size, f.pin) for f in inner.files or ()},
                location,
            )
        resume = artifacts.Resume(dest, context)
        todo = resume.todo([(f.path, f) for f in inner.files or ()], lambda f: f.size)
        if not todo and inner.files is not None:
            return Manifest.of(resume.kept)
        reported: set[str] = set()
        lock = threading.Lock()

        def file_done(entry: FileEntry) -> None:
            with lock:
                reported.add(entry.path)
            context.file_done(entry)

        restricted = inner if inner.files is None else dataclasses.replace(inner, files=tuple(f for _, f in todo))
        with FetchContext(file_done=file_done, progress=context.progress).applied():
            manifest = source.fetch(restricted, dest)
        for entry in manifest.files:
            if entry.path not in reported:  # a source that does not report files itself
                context.file_done(entry)
        return Manifest.of(resume.kept + list(manifest.files))

    def close(self) -> None:
        """Close the sources built here (not those given). Idempotent."""
        with self._lock:
            built, self._built = list(self._built.values()), {}
        for source in built:
            source.close()


def _compare(expected: set[tuple[str, int, str | None]], found: set[tuple[str, int, str | None]], where: str) -> None:
    if expected == found:
        return
    changed = sorted({p for p, _, _ in expected ^ found})
    shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    raise StaleListing(f"the artifacts at {where} changed since they were resolved ({shown})")
