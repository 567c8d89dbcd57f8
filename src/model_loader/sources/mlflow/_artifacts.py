"""Listing and downloading one model's artifacts into an empty directory.

Three stores handled here, chosen by :mod:`._stores` from the artifact location: the
tracking server's ``mlflow-artifacts`` API (:func:`list_proxied`, :func:`download_proxied`:
stdlib HTTP, files in parallel, presigned URLs), ``file:`` locations (:func:`list_local`,
:func:`copy_local`) and any other store MLflow knows, through its artifact repositories
(:func:`list_with_mlflow`, :func:`download_with_mlflow`). Locations whose scheme has a
registered source (``s3://``, ``gs://``...) go to that source instead.

Each ``list_*`` takes the location and a path inside it (a sub-path of the model, which
may name one file or a directory) and returns a :class:`Listing`: where the files are,
and each file's path relative to that place with its listed size.

Nothing the server says is trusted: listings are parsed against a schema and bounded
(entries, depth, requests, files; a listing that contains itself is refused), every path
is checked with :func:`safe_relpath`, and a body is read up to its listed size plus one
byte, so a longer one is an ``IntegrityError`` and never fills the disk. Every file is
hashed while it is written (the mlflow fallback hashes right after), reported to the
:class:`FetchContext` as it completes, and skipped when an earlier attempt completed it.
"""

from __future__ import annotations

import http.client as http_client
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from model_loader._deadline import Deadline, FetchContext
from model_loader._io import CHUNK_SIZE, copy_file, hash_file, safe_relpath, write_chunks
from model_loader._types import FileEntry, Manifest
from model_loader.errors import IntegrityError, ModelLoaderError
from model_loader.sources.mlflow._errors import ArtifactsMissing, HttpStatusError, MalformedResponse
from model_loader.sources.mlflow._http import Endpoint, RestTransport, check_deadline

__all__ = [
    "ARTIFACTS_API",
    "MAX_DEPTH",
    "MAX_FILES",
    "MAX_LISTINGS",
    "ArtifactsMissing",
    "Listing",
    "Presign",
    "Resume",
    "copy_local",
    "download_proxied",
    "download_with_mlflow",
    "list_local",
    "list_proxied",
    "list_with_mlflow",
    "run_parallel",
]

logger = logging.getLogger("model_loader.sources.mlflow")

ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"
PRESIGNED_API = "/api/2.0/mlflow-artifacts/presigned"
MAX_DEPTH = 64
"""Directories nested deeper than this in one model are refused (a listing that contains
itself would otherwise be crawled without end)."""
MAX_LISTINGS = 10_000
"""Listing requests one fetch may make."""
MAX_FILES = 100_000
"""Files one model may have."""

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Listing:
    """The files of one model (or of a path inside it) in one store.

    Attributes:
        root: Where the files are: a path of the server's artifact store, a local
            directory, or an artifact path of an MLflow repository (``""``: its root).
        files: ``(path relative to root, listed size)``, sorted by path.
        shown: The location to name in messages.
    """

    root: str
    files: tuple[tuple[str, int], ...]
    shown: str


@dataclass
class Presign:
    """Download proxied artifacts straight from storage through presigned URLs.

    The tracking server hands out a presigned URL (``/mlflow-artifacts/presigned/...``,
    MLflow >= 3 with an S3, GCS or Azure destination) and the bytes skip the server, which
    would otherwise download each file to its own disk before streaming it on. Presigning
    costs the server no storage call, so even 4 KiB files are cheaper this way (see
    docs/mlflow.md). Servers that cannot presign (older versions, local destinations), or
    answer with something unusable, turn it off for this source.

    Attributes:
        min_size: Files at least this large (per the listing) use presigned URLs.
        enabled: Cleared after the server says it cannot presign, or storage is unreachable.
    """

    min_size: int = 0
    enabled: bool = True


class _Aborted(Exception):
    """Another download failed; this one stops early."""


def run_parallel(fn: Callable[[T], R], items: Sequence[T], workers: int, abort: threading.Event) -> list[R]:
    """``[fn(x) for x in items]`` on up to ``workers`` threads; the first error wins.

    On an error ``abort`` is set so running downloads stop between chunks, queued ones
    are cancelled, and the error is raised once every thread has stopped.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="model-loader-mlflow") as pool:
        futures: list[Future[R]] = [pool.submit(fn, x) for x in items]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            abort.set()
            for f in futures:
                f.cancel()
            wait(futures)
            errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
            first = next((e for e in errors if not isinstance(e, _Aborted)), failed.exception())
            assert first is not None
            raise first
        return [f.result() for f in futures]


def _parent_and_leaf(path: str) -> tuple[str, str]:
    parent, _, leaf = path.rstrip("/").rpartition("/")
    return parent, leaf


class Resume:
    """The files an earlier attempt completed, applied to this attempt's list."""

    def __init__(self, dest: Path, context: FetchContext) -> None:
        self._dest = dest
        self.context = context
        self.kept: list[FileEntry] = []

    def todo(self, wanted: Sequence[tuple[str, T]], size_of: Callable[[T], int | None]) -> list[tuple[str, T]]:
        """The items of ``wanted`` still to fetch; completed ones whose listed size matches are kept.

        A completed file this attempt does not want (another size, or no longer selected)
        is removed, so ``dest`` ends up with exactly the wanted files.
        """
        completed = self.context.completed
        if not completed:
            return list(wanted)
        out = []
        keep: set[str] = set()
        for rel, item in wanted:
            prior = completed.get(rel)
            if prior is not None and prior.size == size_of(item):
                self.kept.append(prior)
                keep.add(rel)
            else:
                out.append((rel, item))
        for rel in completed:
            if rel not in keep:
                (self._dest / safe_relpath(rel)).unlink(missing_ok=True)
        if self.kept:
            logger.debug("resuming: %d of %d files were already complete", len(self.kept), len(wanted))
        return out

    def done(self, entry: FileEntry) -> FileEntry:
        self.context.file_done(entry)
        return entry


def _crawl(
    http: RestTransport, endpoint: Endpoint, root: str, workers: int, abort: threading.Event, deadline: Deadline
) -> list[tuple[str, int]]:
    """Every file under ``root`` as ``(relative path, listed size)``, breadth first, bounded."""
    from model_loader.sources.mlflow._schema import ListingAnswer, parse

    requests = 0

    def list_dir(rel: str) -> list[tuple[str, bool, int]]:
        path = f"{root}/{rel}" if rel else root
        check_deadline(deadline, f"listing {path!r}")
        body = http.get_json(endpoint, ARTIFACTS_API, {"path": path}, deadline=deadline)
        listing = parse(ListingAnswer, body, f"the artifact listing of {path!r}")
        out: list[tuple[str, bool, int]] = []
        names: set[str] = set()
        for f in listing.files:
            name = f.path
            for parent in (f"{path}/", f"{rel}/"):  # some servers answer with longer paths
                if "/" in name and parent != "/" and name.startswith(parent):
                    name = name[len(parent) :]
            if name == "." or ("/" in name and name in (path, rel)):
                raise MalformedResponse(f"the artifact listing of {path!r} contains the directory itself")
            if "/" in name:
                safe_relpath(name)  # "../x": an escape, IntegrityError
                raise MalformedResponse(f"the artifact listing of {path!r} names {name!r}, which is not a plain name")
            child = safe_relpath(f"{rel}/{name}" if rel else name)
            if name in names:
                raise MalformedResponse(f"the artifact listing of {path!r} names {name!r} twice")
            names.add(name)
            out.append((child, f.is_dir, f.file_size or 0))  # MLflow's JSON leaves out a size of 0
        return out

    files: list[tuple[str, int]] = []
    level = [""]
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise MalformedResponse(f"the artifacts under {root!r} nest deeper than {MAX_DEPTH} directories")
        requests += len(level)
        if requests > MAX_LISTINGS:
            raise MalformedResponse(f"listing the artifacts under {root!r} takes more than {MAX_LISTINGS} requests")
        next_level = []
        for listing in run_parallel(list_dir, level, workers, abort):
            for child, is_dir, size in listing:
                if is_dir:
                    next_level.append(child)
                else:
                    files.append((child, size))
            if len(files) > MAX_FILES:
                raise MalformedResponse(f"the artifacts under {root!r} are more than {MAX_FILES} files")
        level = next_level
    return files


def list_proxied(
    http: RestTransport, endpoint: Endpoint, root: str, sub: str, *, workers: int, deadline: Deadline
) -> Listing:
    """Every file under ``root/sub`` in the server's artifact store, or that one file.

    A listing of a file's path is empty (MLflow lists directories), so an empty listing
    of a sub-path looks the name up in its parent: a file there is the whole listing.
    """
    root = root.strip("/")
    path = f"{root}/{sub}" if sub and root else (sub or root)
    abort = threading.Event()
    files = _crawl(http, endpoint, path, workers, abort, deadline)
    if not files and sub:
        parent, leaf = _parent_and_leaf(path)
        for rel, size, is_dir in _list_one(http, endpoint, parent, deadline):
            if rel == leaf and not is_dir:
                return Listing(parent, ((leaf, size),), f"mlflow-artifacts:/{path}")
    return Listing(path, tuple(sorted(files)), f"mlflow-artifacts:/{path}")


def _list_one(http: RestTransport, endpoint: Endpoint, path: str, deadline: Deadline) -> list[tuple[str, int, bool]]:
    from model_loader.sources.mlflow._schema import ListingAnswer, parse

    check_deadline(deadline, f"listing {path!r}")
    body = http.get_json(endpoint, ARTIFACTS_API, {"path": path}, deadline=deadline)
    out = []
    for f in parse(ListingAnswer, body, f"the artifact listing of {path!r}").files:
        name = f.path.rpartition("/")[2] if "/" in f.path and f.path.startswith(f"{path}/") else f.path
        out.append((name, f.file_size or 0, f.is_dir))
    return out


def download_proxied(
    http: RestTransport,
    endpoint: Endpoint,
    listing: Listing,
    dest: Path,
    *,
    workers: int,
    deadline: Deadline,
    context: FetchContext,
    presign: Presign | None = None,
) -> Manifest:
    """Download ``listing``'s files into ``dest``, each checked against its listed size.

    Every request is capped by ``deadline``; files ``context`` lists as completed (same
    path and size) are kept as they are, and each new file is reported to it.
    """
    abort = threading.Event()
    resume = Resume(dest, context)
    todo = resume.todo(list(listing.files), lambda size: size)
    root = listing.root

    def download(item: tuple[str, int]) -> FileEntry:
        rel, expected = item
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a partial file of an interrupted attempt
        path = quote(f"{root}/{rel}" if root else rel)
        try:
            got = None
            if presign is not None and presign.enabled and expected >= presign.min_size:
                got = _presigned(http, endpoint, path, rel, target, expected, presign, abort, deadline, context)
            if got is None:
                check_deadline(deadline, f"downloading {rel}")
                with http.stream(endpoint, f"{ARTIFACTS_API}/{path}", deadline=deadline) as resp:
                    got = _write_body(resp, target, rel, expected, abort, context)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return resume.done(FileEntry(rel, got[0], got[1], verified=None))  # the listing gives sizes only

    todo.sort(key=lambda item: -item[1])  # the largest first, so it does not finish last
    return Manifest.of(resume.kept + run_parallel(download, todo, workers, abort))


def _write_body(
    resp: http_client.HTTPResponse,
    target: Path,
    rel: str,
    expected: int,
    abort: threading.Event,
    context: FetchContext,
) -> tuple[int, str]:
    """Write a response body of exactly ``expected`` bytes to ``target``; read at most one more.

    Raises:
        IntegrityError: The body is longer or shorter than listed.
        http.client.IncompleteRead: The connection ended before its ``Content-Length``.
    """
    declared = resp.length
    if declared is not None and declared != expected:
        raise IntegrityError(f"{rel}: the server sends {declared} bytes, the artifact listing says {expected}")

    def chunks() -> Iterator[bytes]:
        left = expected
        while True:
            if abort.is_set():
                raise _Aborted("stopped: another file failed")
            chunk = resp.read(min(CHUNK_SIZE, left + 1))
            if not chunk:
                break
            if len(chunk) > left:
                raise IntegrityError(f"{rel}: the body is longer than the {expected} bytes the artifact listing says")
            left -= len(chunk)
            context.progress(len(chunk))
            yield chunk
        if resp.length:
            raise http_client.IncompleteRead(b"", resp.length)

    size, digest = write_chunks(chunks(), target)
    if size != expected:
        raise IntegrityError(f"{rel}: received {size} bytes, the artifact listing says {expected}")
    return size, digest


def _presigned(
    http: RestTransport,
    endpoint: Endpoint,
    path: str,
    rel: str,
    target: Path,
    expected: int,
    presign: Presign,
    abort: threading.Event,
    deadline: Deadline,
    context: FetchContext,
) -> tuple[int, str] | None:
    """``(size, sha256)`` through a presigned URL, or ``None`` to stream through the server."""
    from model_loader.sources.mlflow._schema import PresignedAnswer, parse

    check_deadline(deadline, f"presigning {rel}")
    try:
        info = parse(PresignedAnswer, http.get_json(endpoint, f"{PRESIGNED_API}/{path}", deadline=deadline), rel)
    except HttpStatusError as exc:
        if exc.status not in (400, 404, 405, 501) or exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise  # a 404 from MLflow itself means the file is gone, not that presigning is
        presign.enabled = False
        logger.info("%s cannot presign downloads (HTTP %d); streaming through it", endpoint, exc.status)
        return None
    except MalformedResponse as exc:
        presign.enabled = False  # the listing and the server's own stream still work
        logger.warning("%s answered a presign request with %s; streaming through it", endpoint, exc)
        return None
    parts = urlsplit(info.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        presign.enabled = False
        logger.warning("%s presigned %s to a URL this client cannot use; streaming through it", endpoint, rel)
        return None
    host_ep = Endpoint(parts.scheme, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    target_path = parts.path + (f"?{parts.query}" if parts.query else "")
    what = f"presigned download of {rel}"
    try:
        with http.stream(host_ep, target_path, headers=info.headers, what=what, deadline=deadline) as resp:
            return _write_body(resp, target, rel, expected, abort, context)
    except ModelLoaderError:
        raise  # a longer body (IntegrityError), disk full (CacheError)
    except HttpStatusError as exc:
        if exc.status == 404:
            raise ArtifactsMissing(f"{rel} is listed but gone from storage") from exc
        reason = f"HTTP {exc.status}"  # 403: a bucket policy or clock skew; 5xx: let the server try
    except (OSError, http_client.HTTPException) as exc:
        if deadline.expired():
            raise
        reason = type(exc).__name__  # storage unreachable from here (network policy), or cut mid-way
    presign.enabled = False
    target.unlink(missing_ok=True)
    logger.warning("presigned download of %s failed (%s); streaming through %s", rel, reason, endpoint)
    return None


def _walk(root: Path) -> Iterator[tuple[str, Path]]:
    real_root = os.path.realpath(root)
    for dirpath, dirnames, names in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(names):
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            if os.path.commonpath([real_root, os.path.realpath(full)]) != real_root:
                raise IntegrityError(f"{rel} is a symlink pointing outside the artifact directory")
            if not full.is_file():
                raise IntegrityError(f"{rel} is not a regular file: refused")
            yield safe_relpath(rel), full


def list_local(root: Path, sub: str) -> Listing:
    """Every file under ``root/sub`` (a directory), or that one file."""
    path = root / sub if sub else root
    if sub and path.is_file() and not path.is_symlink():
        return Listing(str(path.parent), ((path.name, path.stat().st_size),), str(path))
    if not path.is_dir():
        return Listing(str(path), (), str(path))
    files = tuple(sorted((rel, full.stat().st_size) for rel, full in _walk(path)))
    return Listing(str(path), files, str(path))


def copy_local(
    listing: Listing,
    dest: Path,
    *,
    workers: int,
    deadline: Deadline,
    context: FetchContext,
) -> Manifest:
    """Copy a ``file:`` listing's files into ``dest``, hashing while copying."""
    root = Path(listing.root)
    resume = Resume(dest, context)
    todo = resume.todo(list(listing.files), lambda size: size)

    def copy(item: tuple[str, int]) -> FileEntry:
        rel, expected = item
        check_deadline(deadline, f"copying {rel}")
        source = root / rel
        if source.is_symlink() or not source.is_file():
            raise ArtifactsMissing(f"{rel} is gone from {listing.shown}")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        size, digest = copy_file(source, target)
        if size != expected:
            raise IntegrityError(f"{rel}: copied {size} bytes, {expected} were listed (changed while copying?)")
        context.progress(size)
        return resume.done(FileEntry(rel, size, digest))

    return Manifest.of(resume.kept + run_parallel(copy, todo, min(workers, 8), threading.Event()))


def _repository(uri: str, tracking_uri: str, registry_uri: str) -> Any:
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(uri, tracking_uri=tracking_uri, registry_uri=registry_uri)


def list_with_mlflow(
    uri: str, sub: str, *, tracking_uri: str, registry_uri: str, deadline: Deadline
) -> tuple[Any, Listing]:
    """MLflow's artifact repository for ``uri`` (imports mlflow) and the listing of ``sub`` in it.

    MLflow's calls cannot be cut: the deadline is checked between them.
    """
    repo = _repository(uri, tracking_uri, registry_uri)

    def walk(path: str, depth: int) -> Iterator[tuple[str, int]]:
        check_deadline(deadline, f"listing {uri}")
        if depth > MAX_DEPTH:
            raise MalformedResponse(f"the artifacts at {uri} nest deeper than {MAX_DEPTH} directories")
        for info in repo.list_artifacts(path or None):
            full = str(info.path)
            if info.is_dir:
                yield from walk(full, depth + 1)
            else:
                yield full, int(info.file_size or 0)

    prefix = f"{sub}/" if sub else ""
    files = []
    for full, size in walk(sub, 1):
        rel = full[len(prefix) :] if full.startswith(prefix) else full.rpartition("/")[2]
        files.append((safe_relpath(rel), size))
    shown = f"{uri.rstrip('/')}/{sub}" if sub else uri
    if not files and sub:
        parent, leaf = _parent_and_leaf(sub)
        for info in repo.list_artifacts(parent or None):
            if str(info.path).rpartition("/")[2] == leaf and not info.is_dir:
                return repo, Listing(parent, ((leaf, int(info.file_size or 0)),), shown)
    return repo, Listing(sub, tuple(sorted(files)), shown)


def download_with_mlflow(
    repo: Any, listing: Listing, dest: Path, *, deadline: Deadline, context: FetchContext
) -> Manifest:
    """Download ``listing``'s files through MLflow's repository ``repo``; each file is hashed
    right after MLflow wrote it."""
    import tempfile

    resume = Resume(dest, context)
    entries = list(resume.kept)
    for rel, expected in resume.todo(list(listing.files), lambda size: size):
        check_deadline(deadline, f"downloading {rel}")
        remote = f"{listing.root}/{rel}" if listing.root else rel
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest, prefix=".mlflow-") as tmp:
            local: Any = repo.download_artifacts(remote, dst_path=tmp)
            written = Path(local).resolve()
            if os.path.commonpath([os.path.realpath(tmp), str(written)]) != os.path.realpath(tmp):
                raise IntegrityError(f"MLflow wrote {rel} outside the model directory")
            if not written.is_file():
                raise ArtifactsMissing(f"{rel} is gone from {listing.shown}")
            os.replace(written, target)
        size = target.stat().st_size
        if size != expected:
            raise IntegrityError(f"{rel}: received {size} bytes, the listing says {expected}")
        context.progress(size)
        entries.append(resume.done(FileEntry(rel, size, hash_file(target))))
    return Manifest.of(entries)
