"""Any fsspec filesystem as a model source: ``gs://``, ``az://``, ``abfs(s)://``, ``http(s)://``,
``hf://``, ``sftp://``, ``memory://`` and whatever else fsspec knows.

A reference names a model directory (``gs://bucket/models/iris/``; for HTTP the trailing
``/`` is required and the server must render index pages with links) or a single file
(``https://host/models/iris.onnx``). ``?include=`` and ``?exclude=`` take comma-separated
globs; any other query parameter, a fragment or a password in the URL is refused.

``resolve`` walks the directory (bounded: see :mod:`._fsspec_listing`) and pins every file
the way its backend allows (:mod:`._fsspec_backends`): a GCS generation, an Azure version
id or ETag, an HTTP ETag or Last-Modified date, the commit a Hugging Face revision points
at, else a hash of path, size and modification times. ``ResolvedModel.metadata`` says
which (``pin``), whether old resolutions stay fetchable (``immutable``) and what the bytes
are checked against (``checksum``). ``fetch`` downloads exactly the pinned content in
parallel, with bounded memory, hashing while writing (:mod:`._fsspec_transfer`).

fsspec is imported with this module (``pip install 'model-loader[fsspec]'``) and never by
``import model_loader``; a backend's own package (gcsfs, adlfs, huggingface_hub,
paramiko) is imported by fsspec when a source for its protocol is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

from model_loader._deadline import Deadline, FetchContext
from model_loader._io import safe_relpath
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
from model_loader.sources._fsspec_backends import Dialect, Pin, dialect_for, parse_entry
from model_loader.sources._fsspec_errors import disk_error, map_errors, redact
from model_loader.sources._fsspec_filesystem import (
    close_filesystem,
    filesystem_class,
    hf_commit,
    identity,
    missing_dependency,
    protocols_of,
    storage_defaults,
)
from model_loader.sources._fsspec_listing import Listed, walk
from model_loader.sources._fsspec_transfer import Backend, Job, call, download

try:
    import fsspec  # type: ignore[import-untyped]  # noqa: F401 (fail at import, naming the extra)
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without fsspec
    raise MissingDependencyError(
        f"the fsspec source needs fsspec ({exc}); install it with: pip install 'model-loader[fsspec]'", extra="fsspec"
    ) from exc

__all__ = [
    "AzureBlobSource",
    "FsspecSource",
    "GcsSource",
    "HttpSource",
    "HuggingFaceSource",
    "MemoryFsSource",
    "SftpSource",
]

logger = logging.getLogger(__name__)

_PARAMS = ("include", "exclude")


class FsspecSource:
    """Models on any filesystem fsspec implements.

    Args:
        protocol: The fsspec protocol (``"gs"``, ``"az"``, ``"https"``, ``"hf"``, ``"sftp"``,
            ``"memory"``...). The subclasses registered for those schemes set it.
        storage_options: Passed to the filesystem (credentials, endpoints, project...);
            never logged, never part of :attr:`identity` except an endpoint or account name.
        filesystem: A ready filesystem instance, used as is and not closed by :meth:`close`.
        connect_timeout: Seconds to open a connection (given to backends that take it).
        read_timeout: Seconds to wait for bytes; also caps each listing call and chunk read.
        max_concurrency: Files downloaded (and, for HTTP, files asked for their size) in parallel.
        include: Globs of relative paths to fetch (empty: all); ``*`` crosses ``/``.
        exclude: Globs of relative paths to skip.

    Example:
        >>> source = GcsSource(storage_options={"project": "ml"})
        >>> resolved = source.resolve(parse_ref("gs://models/iris/"))
    """

    scheme: ClassVar[str] = "fsspec"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(remote=True, resumable=True)
    default_protocol: ClassVar[str | None] = None

    def __init__(
        self,
        protocol: str | None = None,
        *,
        storage_options: Mapping[str, Any] | None = None,
        filesystem: Any = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_concurrency: int = 16,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> None:
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("connect_timeout and read_timeout must be positive")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        protocol = protocol or self.default_protocol
        if protocol is None and filesystem is not None:
            protocol = protocols_of(type(filesystem))[0]
        if not protocol:
            raise ValueError("FsspecSource needs a protocol (or a filesystem)")
        self._fs_class: Any = type(filesystem) if filesystem is not None else filesystem_class(protocol.lower())
        self._protocols = protocols_of(self._fs_class)
        self._dialect: Dialect = dialect_for(self._protocols)
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._workers = max_concurrency
        self._include = tuple(include)
        self._exclude = tuple(exclude)
        self._user_options = dict(storage_options or {})
        self._options = storage_defaults(
            self._dialect.family, self._protocols, self._user_options, connect_timeout, read_timeout
        )
        self._injected = filesystem
        self._filesystems: dict[str, Any] = {}
        self._identity = identity(self._protocols[0], self._dialect.family, self._user_options)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> FsspecSource:
        """Build from the loader's settings (timeouts, concurrency, include/exclude)."""
        if cls.default_protocol is None:
            raise TypeError(
                "FsspecSource serves no scheme by itself: register a subclass with default_protocol set, "
                "or build FsspecSource(protocol=...) and hand it to the loader"
            )
        return cls(**settings.as_kwargs())

    @property
    def identity(self) -> str:
        """``"fsspec+<protocol>"``, plus the endpoint or account when one is configured."""
        return self._identity

    @property
    def protocols(self) -> tuple[str, ...]:
        """The URI schemes this source resolves (its filesystem's protocols)."""
        return self._protocols

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._identity!r})"

    # -- resolve ----------------------------------------------------------------------

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        """Walk the directory (or look at the one file) and pin every file.

        Raises:
            InvalidReferenceError: A scheme this source does not serve, an unknown query
                parameter, a fragment, a password in the URL.
            ModelNotFoundError: Nothing there; nothing left after include/exclude.
            IntegrityError: A name would escape the model directory.
            AccessDeniedError: The credentials were refused.
            SourceUnavailableError: The store could not be reached, answered 5xx or
                something malformed (``InvalidResponseError``), or the deadline passed.
        """
        deadline = Deadline.current()
        self._check_open()
        include, exclude = self._filters(ref)
        url = self._url(ref)
        shown = redact(url)
        fs = self._filesystem(url, ref)
        commit = None
        if self._dialect.family == "hf":
            url, commit = hf_commit(fs, url, ref.scheme, ref.uri, deadline, self._read_timeout)
        is_http = self._dialect.family == "http"
        root = url if is_http else self._fs_class._strip_protocol(url)
        directory = ref.location.endswith("/")
        single: dict[str, Any] = {}
        if not directory:
            info = self._info(fs, root, ref, deadline, what=f"looking at {shown}")
            _, kind, _, single = parse_entry(info, f"info of {shown}")
            directory = kind == "directory"
        if directory:
            with map_errors(f"listing {shown}", ref.scheme, ref.uri, deadline):
                found, listed = walk(
                    lambda path: call(
                        fs, "ls", path, detail=True, deadline=deadline, cap=self._read_timeout, what=f"listing {shown}"
                    ),
                    root,
                    urls=is_http,
                    include=include,
                    exclude=exclude,
                    what=f"listing {shown}",
                )
            prefix = root if root.endswith("/") else root + "/"
        else:
            head, _, base = root.rpartition("/")
            prefix, base = head + "/", unquote(base) if is_http else base
            found, listed = [Listed(safe_relpath(base), root, single.get("size"), single)], 1
        if not found:
            what = "no files" if listed == 0 else f"none of the {listed} files match include/exclude"
            raise ModelNotFoundError(f"{ref.uri}: {what} under {shown}", scheme=ref.scheme, ref=ref.uri)
        pins = self._pins(fs, found, ref, deadline, commit)
        files = tuple(
            _file_entry(item, size, pin, prefix, is_http) for item, (size, pin) in zip(found, pins, strict=True)
        )
        digest = hashlib.sha256(f"{url}\n".encode("utf-8", "surrogatepass"))
        for entry in files:
            digest.update(f"{entry.path}\0{entry.size}\0{entry.pin}\n".encode("utf-8", "surrogatepass"))
        kinds = sorted({pin.kind for _, pin in pins})
        checks = sorted({pin.checksum or "none" for _, pin in pins})
        metadata = {
            "protocol": ref.scheme,
            "root": prefix,
            "kind": "directory" if directory else "file",
            "pin": ",".join(kinds),
            "immutable": "true" if self._dialect.immutable else "false",
            "checksum": ",".join(checks),
            "commit": commit,
        }
        logger.debug("resolved %s: %d files pinned by %s", shown, len(files), metadata["pin"])
        return ResolvedModel(
            ref=ref,
            source_id=self.identity,
            version="fsspec-" + digest.hexdigest()[:32],
            files=files,
            metadata=ResolvedModel.pack_metadata(metadata),
        )

    def _filters(self, ref: ModelRef) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if ref.scheme not in self._protocols:
            raise InvalidReferenceError(
                f"{type(self).__name__} resolves {', '.join(p + '://' for p in self._protocols)} references, "
                f"not {redact(ref.uri)!r}"
            )
        params = dict(ref.params)
        unknown = sorted(set(params) - set(_PARAMS))
        if unknown:
            raise InvalidReferenceError(
                f"invalid model reference {redact(ref.uri)!r}: unknown parameter(s) {', '.join(unknown)}; "
                f"{ref.scheme}:// references accept include and exclude (comma-separated globs)"
            )

        def split(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
            if name not in params:
                return default
            return tuple(p.strip() for p in params[name].split(",") if p.strip())

        return split("include", self._include), split("exclude", self._exclude)

    def _url(self, ref: ModelRef) -> str:
        """The reference without its query: what the filesystem is asked for."""
        parts = urlsplit(ref.uri)
        if parts.password is not None:
            raise InvalidReferenceError(
                f"invalid model reference {redact(ref.uri)!r}: credentials go in storage_options, not in the URL"
            )
        if parts.fragment:
            raise InvalidReferenceError(f"invalid model reference {redact(ref.uri)!r}: fragments are not accepted")
        if not ref.location.strip("/"):
            raise InvalidReferenceError(f"invalid model reference {ref.uri!r}: no path")
        return f"{ref.scheme}://{ref.location}"

    def _filesystem(self, url: str, ref: ModelRef) -> Any:
        """The filesystem for ``url`` (one per host for protocols whose URL names it: sftp)."""
        if self._injected is not None:
            return self._injected
        with map_errors(f"opening {redact(url)}", ref.scheme, ref.uri, Deadline.current()):
            url_options = self._fs_class._get_kwargs_from_urls(url)
            key = json.dumps(url_options, sort_keys=True, default=str)
            with self._lock:
                fs = self._filesystems.get(key)
                if fs is None:
                    try:
                        fs = self._fs_class(**{**url_options, **self._options})
                    except ImportError as exc:
                        raise missing_dependency(self._protocols[0], exc) from exc
                    self._filesystems[key] = fs
        return fs

    def _info(self, fs: Any, path: str, ref: ModelRef, deadline: Deadline, *, what: str) -> Any:
        with map_errors(what, ref.scheme, ref.uri, deadline):
            return call(fs, "info", path, deadline=deadline, cap=self._read_timeout, what=what)

    def _pins(
        self, fs: Any, found: list[Listed], ref: ModelRef, deadline: Deadline, commit: str | None
    ) -> list[tuple[int, Pin]]:
        """``(size, pin)`` of every file: from the listing, or each file's info when the
        listing lacks them (HTTP index pages: one HEAD per file, in parallel)."""

        def one(item: Listed) -> tuple[int, Pin]:
            entry, size = item.entry, item.size
            if self._dialect.needs_info or size is None:
                what = f"looking at {redact(item.name)}"
                info = self._info(fs, item.name, ref, deadline, what=what)
                _, _, size, entry = parse_entry(info, what)
            if size is None:
                raise InvalidResponseError(
                    f"{redact(item.name)}: the store does not say how large it is", scheme=ref.scheme, ref=ref.uri
                )
            with map_errors(f"reading the info of {redact(item.name)}", ref.scheme, ref.uri, deadline):
                pin = self._dialect.pin(entry, f"info of {redact(item.name)}")
            if commit is not None:
                pin = dataclasses.replace(pin, kind="commit", value=commit)
            return size, pin

        needs_calls = self._dialect.needs_info or any(item.size is None for item in found)
        if not needs_calls or len(found) == 1 or self._workers == 1:
            return [one(item) for item in found]
        with ThreadPoolExecutor(min(self._workers, len(found)), thread_name_prefix="model-loader-fsspec") as pool:
            return list(pool.map(one, found))  # ``one`` holds the deadline: threads get it explicitly

    # -- fetch ------------------------------------------------------------------------

    def fetch(self, resolved: ResolvedModel, dest: Path) -> Manifest:
        """Download exactly the pinned files into ``dest``.

        Raises:
            StaleResolutionError: A file changed or disappeared since ``resolve``.
            IntegrityError: A checksum the store publishes does not match the bytes.
            AccessDeniedError: The credentials were refused.
            SourceUnavailableError: Network errors, timeouts, 5xx, bodies cut short.
            CacheError: The staging directory cannot be written (disk full).

        Files listed in ``FetchContext.current().completed`` are kept; each file is
        reported to ``file_done`` as soon as it is written and checked.
        """
        deadline, ctx = Deadline.current(), FetchContext.current()
        self._check_open()
        ref = resolved.ref
        if resolved.source_id != self.identity or resolved.files is None or "root" not in resolved.meta:
            raise SourceError(
                f"{redact(ref.uri)} was resolved by {resolved.source_id!r}, not by this source ({self.identity!r})",
                scheme=ref.scheme,
                ref=ref.uri,
            )
        prefix = resolved.meta["root"]
        is_http = self._dialect.family == "http"
        fs = self._filesystem(self._url(ref), ref)
        jobs: list[Job] = []
        kept: list[FileEntry] = []
        for entry in resolved.files:
            done = ctx.completed.get(entry.path)
            if done is not None and done.size == entry.size:
                kept.append(done)
                continue
            pin = Pin.decode(entry.pin)
            name = pin.name or _name(prefix, safe_relpath(entry.path), is_http)
            jobs.append(Job(entry.path, name, entry.size, pin))
        try:
            for parent in sorted({os.path.dirname(j.rel) for j in jobs if "/" in j.rel}):
                (dest / parent).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, f"creating directories in {dest}") from exc

        def info(name: str, budget: Deadline) -> Any:
            return call(fs, "info", name, deadline=budget, cap=self._read_timeout, what=f"looking at {redact(name)}")

        backend = Backend(fs, self._dialect, ref.scheme, ref.uri, self._read_timeout, info)
        written = download(backend, jobs, dest, workers=self._workers, deadline=deadline, ctx=ctx)
        manifest = Manifest.of([*written, *kept])
        if {e.path: e.size for e in manifest.files} != {e.path: e.size for e in resolved.files}:
            raise IntegrityError(f"{redact(ref.uri)}: the files written do not match the files resolved")
        return manifest

    # -- lifecycle --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise SourceError(f"{self!r} is closed", scheme=self.scheme)

    def close(self) -> None:
        """Close the connections of the filesystems this source built. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            owned, self._filesystems = list(self._filesystems.values()), {}
        for fs in owned:
            close_filesystem(fs)


class GcsSource(FsspecSource):
    """Google Cloud Storage through gcsfs (``gs://bucket/prefix/``, ``gcs://``).

    Pins each object's generation and reads exactly that generation (an overwritten object
    in a bucket without versioning is gone: ``StaleResolutionError``); checks the MD5 GCS
    stores (not for composite objects, which have only a CRC32C). gcsfs retries 5xx
    answers itself (up to 6 tries); the deadline still caps every call.
    """

    scheme: ClassVar[str] = "gs"
    default_protocol: ClassVar[str | None] = "gs"


class AzureBlobSource(FsspecSource):
    """Azure Blob Storage / ADLS Gen2 through adlfs (``az://container/prefix/``, ``abfs(s)://``).

    Pins each blob's ``version_id`` when the filesystem is version-aware
    (``storage_options={"version_aware": True}``, blob versioning enabled), else its ETag,
    re-checked after the download; checks ``content_md5`` when the blob has one.
    """

    scheme: ClassVar[str] = "az"
    default_protocol: ClassVar[str | None] = "az"


class HttpSource(FsspecSource):
    """Plain HTTP(S) servers through fsspec's HTTP filesystem (aiohttp).

    A directory is an URL ending in ``/`` whose index page links to its files and
    subdirectories (nginx ``autoindex``, Apache, ``python -m http.server``). Each file is
    pinned by its strong ETag (``If-Match``), else its Last-Modified date
    (``If-Unmodified-Since``), else only its size; ``Content-MD5`` and ``Digest``
    (sha-256, md5) headers are checked when the server sends them.
    """

    scheme: ClassVar[str] = "https"
    default_protocol: ClassVar[str | None] = "https"


class HuggingFaceSource(FsspecSource):
    """The Hugging Face Hub through ``huggingface_hub.HfFileSystem`` (``hf://org/model@rev/``).

    The revision (branch, tag) is resolved to its commit, and every file is read at that
    commit: resolutions stay fetchable. LFS files are checked against their SHA-256,
    others against their git blob id.
    """

    scheme: ClassVar[str] = "hf"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(
        remote=True, immutable_versions=True, resumable=True
    )
    default_protocol: ClassVar[str | None] = "hf"


class SftpSource(FsspecSource):
    """SSH servers through fsspec's SFTP filesystem (paramiko): ``sftp://[user@]host/dir/``.

    Files are pinned by a hash of path, size and modification time, re-checked after the
    download; nothing beyond the size can be verified.
    """

    scheme: ClassVar[str] = "sftp"
    default_protocol: ClassVar[str | None] = "sftp"


class MemoryFsSource(FsspecSource):
    """fsspec's in-process memory filesystem (``memory://name/``): for tests."""

    scheme: ClassVar[str] = "memory"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(remote=False, resumable=True)
    default_protocol: ClassVar[str | None] = "memory"


def _file_entry(item: Listed, size: int, pin: Pin, prefix: str, is_http: bool) -> FileEntry:
    if _name(prefix, item.rel, is_http) != item.name:
        pin = dataclasses.replace(pin, name=item.name)
    return FileEntry(item.rel, size, pin.sha256, pin.encode(), None)


def _name(prefix: str, rel: str, is_http: bool) -> str:
    """The backend's name of ``rel`` under ``prefix`` (URLs: percent-encoded)."""
    if is_http:
        return prefix + "/".join(quote(part, safe="!$&'()*+,;=:@~-._") for part in rel.split("/"))
    return prefix + rel
