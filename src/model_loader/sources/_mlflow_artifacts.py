"""Downloading one model version's artifacts into an empty directory.

Three ways, chosen by the MLflow source from the artifact location:
:func:`fetch_proxied` (the tracking server's ``mlflow-artifacts`` API, stdlib HTTP, files
in parallel), :func:`copy_local` (``file:`` locations, stdlib) and :func:`fetch_with_mlflow`
(any other store MLflow knows, through its artifact repositories). ``s3://`` locations
go to the S3 source instead.

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
from model_loader._io import CHUNK_SIZE, copy_file, hash_file, is_selected, safe_relpath, write_chunks
from model_loader._types import FileEntry, Manifest
from model_loader.errors import IntegrityError, ModelLoaderError
from model_loader.sources._mlflow_errors import ArtifactsMissing, HttpStatusError, MalformedResponse
from model_loader.sources._mlflow_http import Endpoint, RestTransport, check_deadline

__all__ = [
    "ARTIFACTS_API",
    "MAX_DEPTH",
    "MAX_FILES",
    "MAX_LISTINGS",
    "ArtifactsMissing",
    "Presign",
    "Resume",
    "copy_local",
    "fetch_proxied",
    "fetch_with_mlflow",
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


def _check_selected(location: str, listed: int, selected: int) -> None:
    if listed == 0:
        raise ArtifactsMissing(f"no artifacts at {location} (deleted?)")
    if selected == 0:
        raise ArtifactsMissing(f"none of the {listed} files at {location} matches include/exclude")


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
    from model_loader.sources._mlflow_schema import ListingAnswer, parse

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


def fetch_proxied(
    http: RestTransport,
    endpoint: Endpoint,
    root: str,
    dest: Path,
    *,
    include: Sequence[str],
    exclude: Sequence[str],
    workers: int,
    deadline: Deadline,
    context: FetchContext,
    presign: Presign | None = None,
) -> Manifest:
    """Download everything under ``root`` (a path of the server's artifact store) into ``dest``.

    Every request is capped by ``deadline``; files ``context`` lists as completed (same
    path and size) are kept as they are, and each new file is reported to it.
    """
    root = root.strip("/")
    abort = threading.Event()
    files = _crawl(http, endpoint, root, workers, abort, deadline)
    selected = [(p, s) for p, s in files if is_selected(p, include, exclude)]
    _check_selected(f"mlflow-artifacts:/{root}", len(files), len(selected))
    resume = Resume(dest, context)
    todo = resume.todo(selected, lambda size: size)

    def download(item: tuple[str, int]) -> FileEntry:
        rel, expected = item
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)  # a partial file of an interrupted attempt
        path = quote(f"{root}/{rel}")
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
    from model_loader.sources._mlflow_schema import PresignedAnswer, parse

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


def copy_local(
    root: Path,
    dest: Path,
    *,
    include: Sequence[str],
    exclude: Sequence[str],
    workers: int,
    deadline: Deadline,
    context: FetchContext,
) -> Manifest:
    """Copy a ``file:`` artifact directory into ``dest``, hashing while copying."""
    if not root.is_dir():
        raise ArtifactsMissing(f"no artifacts at {root} (deleted?)")
    files = list(_walk(root))
    selected = [(rel, full) for rel, full in files if is_selected(rel, include, exclude)]
    _check_selected(str(root), len(files), len(selected))
    resume = Resume(dest, context)
    todo = resume.todo(selected, lambda full: full.stat().st_size)

    def copy(item: tuple[str, Path]) -> FileEntry:
        rel, full = item
        check_deadline(deadline, f"copying {rel}")
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        size, digest = copy_file(full, target)
        context.progress(size)
        return resume.done(FileEntry(rel, size, digest))

    return Manifest.of(resume.kept + run_parallel(copy, todo, min(workers, 8), threading.Event()))


def fetch_with_mlflow(
    uri: str,
    dest: Path,
    *,
    tracking_uri: str,
    registry_uri: str,
    include: Sequence[str],
    exclude: Sequence[str],
    deadline: Deadline,
    context: FetchContext,
) -> Manifest:
    """Any other artifact store, through MLflow's artifact repositories (imports mlflow).

    MLflow writes the files, so they are hashed right after each download. MLflow's calls
    cannot be cut: the deadline is checked between them.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo: Any = get_artifact_repository(uri, tracking_uri=tracking_uri, registry_uri=registry_uri)

    def walk(path: str | None, depth: int) -> Iterator[tuple[str, int | None]]:
        check_deadline(deadline, f"listing {uri}")
        if depth > MAX_DEPTH:
            raise MalformedResponse(f"the artifacts at {uri} nest deeper than {MAX_DEPTH} directories")
        for info in repo.list_artifacts(path):
            rel = safe_relpath(str(info.path))
            if info.is_dir:
                yield from walk(rel, depth + 1)
            else:
                yield rel, info.file_size

    files = list(walk(None, 1))
    selected = [(rel, size) for rel, size in files if is_selected(rel, include, exclude)]
    _check_selected(uri, len(files), len(selected))
    resume = Resume(dest, context)
    entries = list(resume.kept)
    for rel, _ in resume.todo(selected, lambda size: size):
        check_deadline(deadline, f"downloading {rel}")
        local: Any = repo.download_artifacts(rel, dst_path=str(dest))
        target = dest / rel
        if Path(local).resolve() != target.resolve():
            raise IntegrityError(f"MLflow wrote {rel} outside the model directory")
        size = target.stat().st_size
        context.progress(size)
        entries.append(resume.done(FileEntry(rel, size, hash_file(target))))
    return Manifest.of(entries)
