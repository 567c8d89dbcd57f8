"""The S3 source: ``s3://bucket/prefix/`` (a model directory) and ``s3://bucket/key`` (one file).

Works with AWS S3 and S3-compatible stores (MinIO, Ceph, R2) through boto3, which is
imported when a source is built, never when this module is imported. Standard boto3
configuration applies unchanged: credentials from the environment, profiles or instance
roles; ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; the region.

``resolve`` lists the prefix (paginated) and pins every object by ETag (and VersionId in
:class:`VersionedS3Source`); the version is a hash over the sorted (key, size, ETag,
VersionId) listing. ``s3://bucket/key`` is the single object ``key`` when that key
exists, else the prefix ``key/``. ``?versionId=`` pins one object; ``?include=`` and
``?exclude=`` take comma-separated globs. ``fetch`` downloads exactly what was pinned, in
parallel, with bounded memory, verifying every byte it can; see
:mod:`model_loader.sources._s3_transfer`. Every request spends from
``Deadline.current()`` (:mod:`model_loader.sources._s3_deadline`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from model_loader._deadline import Deadline, FetchContext
from model_loader._io import is_selected, safe_relpath
from model_loader._types import FileEntry, Manifest, ModelRef, ResolvedModel
from model_loader.errors import (
    IntegrityError,
    InvalidReferenceError,
    InvalidResponseError,
    MissingDependencyError,
    ModelNotFoundError,
    SourceError,
)
from model_loader.protocol import SourceCapabilities, SourceSettings
from model_loader.sources._s3_deadline import RequestGuard
from model_loader.sources._s3_errors import disk_error, map_errors
from model_loader.sources._s3_listing import MAX_OBJECTS, S3Object, list_page, object_from_head, versions_page
from model_loader.sources._s3_requests import Runner
from model_loader.sources._s3_transfer import MiB, ObjectSpec, RangeSplit, TransferOptions, download

if TYPE_CHECKING:
    import boto3
    from mypy_boto3_s3 import S3Client

__all__ = ["DEFAULT_MULTIPART_THRESHOLD", "DEFAULT_PART_SIZE", "S3Source", "VersionedS3Source"]

logger = logging.getLogger(__name__)

DEFAULT_PART_SIZE = 8 * MiB
"""Smallest ranged part a large object is split into (AWS suggests 8-16 MB ranges; see docs/s3.md)."""
DEFAULT_MULTIPART_THRESHOLD = 2 * DEFAULT_PART_SIZE
"""Objects at least this large may be fetched as parallel ranges; smaller ones take one GET."""

_PARAMS = ("include", "exclude")
_LIST_PAGE_SIZE = 1000  # S3's maximum
_NAME_MAX = 255  # bytes in one path component on every common filesystem (ext4, xfs, btrfs, APFS, NTFS)


def _pin(etag: str, version_id: str | None) -> str:
    # An ETag never contains a space (RFC 9110 entity-tag), so the space separates them.
    return f"{etag} {version_id}" if version_id else etag


def _unpin(pin: str | None) -> tuple[str | None, str | None]:
    if not pin:
        return None, None
    etag, _, version_id = pin.partition(" ")
    return etag or None, version_id or None


def _parent(key: str) -> str:
    """The prefix of a single object's key: ``"a/b/"`` for ``"a/b/c"``, ``""`` for ``"c"``."""
    head, sep, _ = key.rpartition("/")
    return head + sep


def _identity(endpoint_url: str | None) -> str:
    """``"s3"`` for AWS (one bucket namespace), else ``"s3+scheme://host:port/path"``."""
    if not endpoint_url:
        return "s3"
    parts = urlsplit(endpoint_url)
    host = (parts.hostname or "").lower()
    if host == "amazonaws.com" or host.endswith(".amazonaws.com"):
        return "s3"
    netloc = host + (f":{parts.port}" if parts.port else "")
    return f"s3+{parts.scheme}://{netloc}{parts.path.rstrip('/')}"


class S3Source:
    """Models stored in S3 or an S3-compatible store.

    Args:
        endpoint_url: The store's URL (MinIO, Ceph, R2, moto). Default: boto3's own
            resolution (``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, profile, AWS).
        region: The region; default: boto3's resolution.
        profile: A named profile from the AWS config files.
        session: A ``boto3.Session`` to build the client from (its credentials, region).
        client: A ready S3 client; used as is (its timeouts, retries and pool) and not
            closed by :meth:`close`. Give it ``retries={"total_max_attempts": 1}`` so retries do not multiply.
        connect_timeout: Seconds to open a connection.
        read_timeout: Seconds to wait for bytes on an open connection.
        max_concurrency: Parallel requests per fetch (files and ranged parts).
        part_size: Smallest ranged part a large object is split into.
        multipart_threshold: Objects at least this large may be fetched as parallel ranges
            (default ``2 * part_size``).
        range_split: ``"auto"`` splits a large object into parallel ranges when one stream
            is slow compared with a request's latency (real S3); ``"eager"`` always does;
            ``"off"`` never does.
        include: Globs of relative paths to fetch (empty: all); ``*`` crosses ``/``.
        exclude: Globs of relative paths to skip.
        verify_checksums: Check every object's bytes end to end: against the checksum S3
            stores with it, else its ETag (the MD5, or the MD5 of the parts' MD5s); see
            docs/s3.md for what cannot be checked. Off: sizes only.
        request_attempts: Tries per request (a listing page, a HEAD, an object or ranged
            part) within one resolve or fetch, for failures that come fast (5xx, SlowDown,
            resets, bodies cut short, malformed answers); a GET resumes at the last byte
            written, and a file whose bytes fail their check is downloaded again. Timeouts
            and permanent errors are never retried here, and a per-source quota stops
            re-issuing when the store fails more than it succeeds.
        request_backoff: Seconds before the first such retry (doubling, full jitter, at
            most 2 s, never past the deadline).
        addressing_style: ``"path"`` or ``"virtual"`` bucket addressing (default: boto3's).
        verify: TLS verification of the endpoint: ``False`` to skip it (MLflow's
            ``MLFLOW_S3_IGNORE_TLS``), a CA bundle path, or ``None`` for boto3's default
            (``AWS_CA_BUNDLE`` or the system's).

    Example:
        >>> source = S3Source(endpoint_url="http://127.0.0.1:9000")
        >>> resolved = source.resolve(parse_ref("s3://models/iris/"))
    """

    scheme: ClassVar[str] = "s3"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        remote=True, immutable_versions=False, version_history=False, resumable=True
    )

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        profile: str | None = None,
        session: boto3.Session | None = None,
        client: S3Client | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_concurrency: int = 16,
        part_size: int = DEFAULT_PART_SIZE,
        multipart_threshold: int | None = None,
        range_split: RangeSplit = "auto",
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        verify_checksums: bool = True,
        request_attempts: int = 5,
        request_backoff: float = 0.1,
        addressing_style: str | None = None,
        verify: bool | str | None = None,
    ) -> None:
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("connect_timeout and read_timeout must be positive")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if part_size < 64 * 1024:
            raise ValueError("part_size must be at least 64 KiB")
        threshold = 2 * part_size if multipart_threshold is None else multipart_threshold
        if threshold < 1:
            raise ValueError("multipart_threshold must be positive")
        if range_split not in ("auto", "eager", "off"):
            raise ValueError("range_split must be 'auto', 'eager' or 'off'")
        if request_attempts < 1 or request_backoff < 0:
            raise ValueError("request_attempts must be at least 1 and request_backoff not negative")
        self._options = TransferOptions(
            max_concurrency=max_concurrency,
            part_size=part_size,
            multipart_threshold=threshold,
            range_split=range_split,
            verify_checksums=verify_checksums,
            request_attempts=request_attempts,
            request_backoff=request_backoff,
        )
        self._include = tuple(include)
        self._exclude = tuple(exclude)
        self._owns_client = client is None
        if client is None:
            client = self._build_client(
                endpoint_url,
                region,
                profile,
                session,
                connect_timeout,
                read_timeout,
                max_concurrency,
                addressing_style,
                verify,
            )
        self._client: S3Client = client
        self._guard = RequestGuard()
        self._guard.install(client)
        self._runner = Runner(self._guard, request_attempts, request_backoff)
        self._identity = _identity(endpoint_url or client.meta.endpoint_url)
        self._closed = False
        self._close_lock = threading.Lock()

    @staticmethod
    def _build_client(
        endpoint_url: str | None,
        region: str | None,
        profile: str | None,
        session: boto3.Session | None,
        connect_timeout: float,
        read_timeout: float,
        max_concurrency: int,
        addressing_style: str | None,
        verify: bool | str | None = None,
    ) -> S3Client:
        try:
            import boto3
            import botocore.session
            from botocore.config import Config
        except ImportError as exc:
            raise MissingDependencyError(
                f"the S3 source needs boto3 ({exc}); install it with: pip install 'model-loader[s3]'", extra="s3"
            ) from exc
        options: dict[str, Any] = {
            "connect_timeout": connect_timeout,
            "read_timeout": read_timeout,
            "retries": {"total_max_attempts": 1, "mode": "standard"},  # one attempt: the loader retries
            "max_pool_connections": max_concurrency + 4,
            # checksums are asked for explicitly (ChecksumMode) where they can be checked
            "response_checksum_validation": "when_required",
        }
        if addressing_style:
            options["s3"] = {"addressing_style": addressing_style}
        config = Config(**options)
        what = f"building an S3 client for {endpoint_url or 'the default endpoint'}"
        with map_errors(what, ""):
            if session is None:
                core = botocore.session.get_session()
                # timestamps (LastModified) are never used: skip parsing them (a third of a listing's parse time)
                core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
                session = boto3.session.Session(profile_name=profile, region_name=region, botocore_session=core)
            return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config, verify=verify)

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> S3Source:
        """Build from the loader's settings (timeouts, concurrency, include/exclude)."""
        return cls(**settings.as_kwargs())

    @property
    def identity(self) -> str:
        """``"s3"`` for AWS, ``"s3+http://host:port"`` for another endpoint (no credentials)."""
        return self._identity

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._identity!r})"

    # -- resolve ----------------------------------------------------------------------

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        """List the prefix (or head the object) and pin every file by ETag / VersionId.

        Raises:
            InvalidReferenceError: Not an ``s3://`` reference, or an unknown query parameter.
            ModelNotFoundError: No such bucket, key or version; an empty prefix; nothing left
                after include/exclude.
            IntegrityError: A key would escape the model directory (``..``, ``//``, ``\\``).
            AccessDeniedError: The credentials were refused.
            SourceUnavailableError: The store could not be reached or answered 5xx.
        """
        deadline = Deadline.current()
        self._check_open()
        if ref.scheme != "s3":
            raise InvalidReferenceError(f"{type(self).__name__} resolves s3:// references, not {ref.uri!r}")
        include, exclude = self._filters(ref)
        bucket, _, key = ref.location.partition("/")
        started = time.perf_counter()
        if ref.selector_kind == "version_id":
            assert ref.selector is not None
            single = self._head(deadline, ref.uri, bucket, key, ref.selector)
            objects, prefix, kind = [single], _parent(key), "object"
        elif not key or key.endswith("/"):
            objects, prefix, kind = self._list(deadline, ref.uri, bucket, key), key, "prefix"
        else:
            found = self._probe_object(deadline, ref.uri, bucket, key)
            if found is not None:
                objects, prefix, kind = [found], _parent(key), "object"
            else:
                prefix, kind = key + "/", "prefix"
                objects = self._list(deadline, ref.uri, bucket, prefix)
        files = self._entries(ref, bucket, prefix, objects, include, exclude)
        digest = hashlib.sha256(f"{bucket}\n".encode())
        for obj in sorted(objects, key=lambda o: o.key):
            if obj.key[len(prefix) :] in files:
                digest.update(f"{obj.key}\0{obj.size}\0{obj.etag}\0{obj.version_id or ''}\n".encode())
        logger.debug("resolved %s: %d files in %.3fs", ref.uri, len(files), time.perf_counter() - started)
        return ResolvedModel(
            ref=ref,
            source_id=self.identity,
            version="s3-" + digest.hexdigest()[:32],
            files=tuple(files[p] for p in sorted(files)),
            metadata=ResolvedModel.pack_metadata({"bucket": bucket, "prefix": prefix, "kind": kind}),
        )

    def _filters(self, ref: ModelRef) -> tuple[tuple[str, ...], tuple[str, ...]]:
        params = dict(ref.params)
        unknown = sorted(set(params) - set(_PARAMS))
        if unknown:
            raise InvalidReferenceError(
                f"invalid model reference {ref.uri!r}: unknown parameter(s) {', '.join(unknown)}; "
                "S3 references accept versionId, include and exclude (comma-separated globs)"
            )

        def split(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
            if name not in params:
                return default
            return tuple(p.strip() for p in params[name].split(",") if p.strip())

        return split("include", self._include), split("exclude", self._exclude)

    def _entries(
        self,
        ref: ModelRef,
        bucket: str,
        prefix: str,
        objects: Iterable[S3Object],
        include: Sequence[str],
        exclude: Sequence[str],
    ) -> dict[str, FileEntry]:
        files: dict[str, FileEntry] = {}
        listed = 0
        for obj in objects:
            listed += 1
            rel = obj.key[len(prefix) :]
            if obj.key.endswith("/") and obj.size == 0:
                continue  # a "folder" marker written by consoles and some tools
            if not is_selected(rel, include, exclude):
                continue
            try:
                safe_relpath(rel)
            except IntegrityError as exc:
                raise IntegrityError(
                    f"refusing {ref.uri}: key s3://{bucket}/{obj.key} would be written to {rel!r}, "
                    "which escapes the model directory or is malformed ('..', '.', '//', '\\', absolute)"
                ) from exc
            longest = max(len(part.encode("utf-8", "surrogatepass")) for part in rel.split("/"))
            if longest > _NAME_MAX:
                raise IntegrityError(
                    f"refusing {ref.uri}: key s3://{bucket}/{obj.key} has a path component of {longest} bytes; "
                    f"filesystems allow {_NAME_MAX}"
                )
            files[rel] = FileEntry(rel, obj.size, None, _pin(obj.etag, obj.version_id))
        for rel in files:
            parts = rel.split("/")
            for i in range(1, len(parts)):
                parent = "/".join(parts[:i])
                if parent in files:
                    raise IntegrityError(
                        f"refusing {ref.uri}: {parent!r} is both a file and a directory (keys {prefix}{parent} and "
                        f"{prefix}{rel})"
                    )
        if not files:
            what = "no objects" if listed == 0 else f"none of the {listed} objects match include/exclude"
            raise ModelNotFoundError(f"{ref.uri}: {what} under s3://{bucket}/{prefix}", scheme="s3", ref=ref.uri)
        return files

    def _list(self, deadline: Deadline, uri: str, bucket: str, prefix: str) -> list[S3Object]:
        out: list[S3Object] = []
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": _LIST_PAGE_SIZE}
        what = f"LIST s3://{bucket}/{prefix}"
        seen: set[str] = set()
        while True:
            page = self._runner.call(deadline, what, uri, self._client.list_objects_v2, **kwargs)
            objects, token = list_page(page, what)
            out.extend(objects)
            if token is None:
                return out
            _next_page(what, uri, out, seen, token)
            kwargs["ContinuationToken"] = token

    def _probe_object(self, deadline: Deadline, uri: str, bucket: str, key: str) -> S3Object | None:
        """The object ``key`` itself if it exists (the first listed key with that prefix)."""
        what = f"LIST s3://{bucket}/{key}"
        page = self._runner.call(
            deadline, what, uri, self._client.list_objects_v2, Bucket=bucket, Prefix=key, MaxKeys=1
        )
        objects, _ = list_page(page, what)
        return next((obj for obj in objects if obj.key == key), None)

    def _head(self, deadline: Deadline, uri: str, bucket: str, key: str, version_id: str | None = None) -> S3Object:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if version_id:
            kwargs["VersionId"] = version_id
        what = f"HEAD s3://{bucket}/{key}"
        head = self._runner.call(deadline, what, uri, self._client.head_object, **kwargs)
        return object_from_head(head, key, what, version_id)

    # -- fetch ------------------------------------------------------------------------

    def fetch(self, resolved: ResolvedModel, dest: Path) -> Manifest:
        """Download exactly the pinned files into the empty directory ``dest``.

        Raises:
            StaleResolutionError: An object changed since ``resolve`` (HTTP 412).
            ModelNotFoundError: An object (or its pinned version) was deleted.
            IntegrityError: A size or an S3 checksum does not match (in every download
                ``request_attempts`` allowed).
            SourceUnavailableError: Network errors, timeouts, 5xx, truncated bodies.
            CacheError: The disk is full, or the staging directory cannot be written.

        Each file is reported to ``FetchContext.current().file_done`` as soon as it is
        written and verified; files the context lists as completed are left as they are,
        and a large file it lists in ``partial`` is continued at that prefix (and checked
        whole); a large file's written prefix is reported to ``file_progress`` as it grows.
        A file that keeps failing fast is given up alone: the others complete first.
        """
        deadline, ctx = Deadline.current(), FetchContext.current()
        self._check_open()
        if resolved.source_id != self.identity or resolved.files is None:
            raise SourceError(
                f"{resolved.ref.uri} was resolved by {resolved.source_id!r}, not by this source ({self.identity!r})",
                scheme="s3",
                ref=resolved.ref.uri,
            )
        meta = resolved.meta
        bucket, prefix = meta["bucket"], meta["prefix"]
        specs = []
        kept = []
        for entry in resolved.files:
            done = ctx.completed.get(entry.path)
            if done is not None and done.size == entry.size:
                kept.append(done)  # written and verified by an earlier attempt
                continue
            etag, version_id = _unpin(entry.pin)
            specs.append(ObjectSpec(safe_relpath(entry.path), prefix + entry.path, entry.size, etag, version_id))
        try:
            for parent in sorted({os.path.dirname(s.path) for s in specs if "/" in s.path}):
                (dest / parent).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, f"creating directories in {dest}") from exc
        started = time.perf_counter()
        entries = download(
            self._runner, self._client, bucket, specs, dest, self._options, resolved.ref.uri, deadline, ctx
        )
        elapsed = time.perf_counter() - started
        total = sum(s.size for s in specs)
        logger.debug(
            "fetched %s (%s): %d files, %.1f MiB in %.2fs",
            resolved.ref.uri,
            resolved.version,
            len(specs),
            total / MiB,
            elapsed,
        )
        manifest = Manifest.of([*entries, *kept])
        expected = {e.path: e.size for e in resolved.files}
        if {e.path: e.size for e in manifest.files} != expected:
            raise IntegrityError(f"{resolved.ref.uri}: the files written do not match the files resolved")
        return manifest

    # -- lifecycle --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SourceError(f"{self!r} is closed", scheme="s3")

    def close(self) -> None:
        """Close the connection pool (not an injected client's). Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._guard.close()
        if self._owns_client:
            self._client.close()


class VersionedS3Source(S3Source):
    """An :class:`S3Source` for buckets with versioning enabled: resolutions stay fetchable.

    ``resolve`` lists object versions and pins each file's VersionId, so a model resolved
    before an overwrite keeps serving its original bytes (until that version is deleted
    or expired by a lifecycle rule: then ``ModelNotFoundError``). Needs
    ``s3:ListBucketVersions`` and ``s3:GetObjectVersion``. Objects without a version (written
    before versioning was enabled) are pinned by ETag only.
    """

    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        remote=True, immutable_versions=True, version_history=False, resumable=True
    )

    def _list(self, deadline: Deadline, uri: str, bucket: str, prefix: str) -> list[S3Object]:
        out: list[S3Object] = []
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": _LIST_PAGE_SIZE}
        what = f"LIST versions s3://{bucket}/{prefix}"
        seen: set[str] = set()
        while True:
            page = self._runner.call(deadline, what, uri, self._client.list_object_versions, **kwargs)
            objects, markers = versions_page(page, what)
            out.extend(objects)
            if markers is None:
                return out
            _next_page(what, uri, out, seen, f"{markers[0]}\0{markers[1]}")
            kwargs["KeyMarker"] = markers[0]
            kwargs.pop("VersionIdMarker", None)
            if markers[1] is not None:
                kwargs["VersionIdMarker"] = markers[1]

    def _probe_object(self, deadline: Deadline, uri: str, bucket: str, key: str) -> S3Object | None:
        try:
            return self._head(deadline, uri, bucket, key)
        except ModelNotFoundError:  # 404: no such key (a missing bucket shows when the prefix is listed)
            return None


def _next_page(what: str, uri: str, out: list[S3Object], seen: set[str], token: str) -> None:
    """Refuse a listing that loops (a token seen before) or that no model could be."""
    if token in seen:
        raise InvalidResponseError(f"{what}: the listing repeats a page ({token[:40]!r})", scheme="s3", ref=uri)
    if len(out) > MAX_OBJECTS:
        raise InvalidResponseError(
            f"{what}: more than {MAX_OBJECTS} objects; not a model directory", scheme="s3", ref=uri
        )
    seen.add(token)
