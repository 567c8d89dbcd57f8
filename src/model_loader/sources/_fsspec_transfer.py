"""Downloading pinned objects from an fsspec filesystem into a staging directory.

Files go in parallel (one thread each, ``max_concurrency`` at a time); each streams to
disk in chunks of :data:`CHUNK` (memory stays at most ``workers * CHUNK``), hashed while
written (SHA-256 always; MD5 or a git blob SHA-1 when the backend publishes one to
compare with). Between chunks the deadline is checked, and every blocking call of an
async backend runs under ``asyncio.wait_for`` with what is left of it, so a server that
trickles a byte at a time is cut when the budget ends.

Three ways to read, chosen by the filesystem:

- HTTP(S): one streamed GET with ``If-Match`` (strong ETag) or ``If-Unmodified-Since``,
  and the answer's ``ETag`` / ``Last-Modified`` / ``Content-Length`` compared with the
  pin (servers that ignore conditional headers are caught too);
- other async backends (gcsfs, adlfs): ranged reads of one chunk each, pinned by
  generation / version id where the backend has one;
- sync backends (memory, sftp, Hugging Face): the backend's file object.

Objects whose read is not pinned by the backend are asked for their info again after
the download; a different pin means the object changed meanwhile: ``StaleResolutionError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_loader._deadline import Deadline, FetchContext
from model_loader._types import FileEntry
from model_loader.errors import (
    AccessDeniedError,
    CacheError,
    IntegrityError,
    InvalidResponseError,
    ModelNotFoundError,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.sources._fsspec_backends import Dialect, Pin
from model_loader.sources._fsspec_errors import disk_error, map_errors, redact

__all__ = ["CHUNK", "Backend", "Job", "call", "download"]

CHUNK = 4 * 1024 * 1024
"""Bytes per read (and per ranged request on object stores)."""

_FATAL = (CacheError, IntegrityError, StaleResolutionError, AccessDeniedError, ModelNotFoundError)


@dataclass(frozen=True, slots=True)
class Job:
    """One file to fetch: where it goes, where it comes from, what was resolved."""

    rel: str
    name: str
    size: int
    pin: Pin


@dataclass(frozen=True)
class Backend:
    """What a download needs to know about the source that runs it."""

    fs: Any  # fsspec.AbstractFileSystem (untyped)
    dialect: Dialect
    scheme: str
    uri: str
    read_timeout: float
    info: Callable[[str, Deadline], Any]  # the object's info dict, for re-checking a pin


class _Stopped(Exception):
    """Another file failed for good: stop this one between chunks."""


def call(fs: Any, method: str, *args: Any, deadline: Deadline, cap: float | None, what: str, **kwargs: Any) -> Any:
    """``fs.<method>(*args, **kwargs)``, capped by ``deadline`` (and ``cap``) when the
    backend is async: the coroutine is cancelled when the time is up, not abandoned."""
    timeout = deadline.timeout(cap, what=what)
    if getattr(fs, "async_impl", False) and not getattr(fs, "asynchronous", False):
        coroutine = getattr(fs, "_" + method, None)
        if coroutine is not None:
            return _sync(fs.loop, coroutine, *args, timeout=timeout, **kwargs)
    return getattr(fs, method)(*args, **kwargs)


def _sync(loop: Any, fn: Any, *args: Any, timeout: float | None = None, **kwargs: Any) -> Any:
    """Run the coroutine ``fn(*args, **kwargs)`` on fsspec's loop from this thread;
    with ``timeout``, it is cancelled (``asyncio.wait_for``) when the time is up."""
    from fsspec.asyn import sync  # type: ignore[import-untyped]

    # fsspec reads a timeout of 0 as "none": never pass one that rounds to it
    return sync(loop, fn, *args, timeout=None if timeout is None else max(timeout, 0.001), **kwargs)


def download(
    backend: Backend, jobs: Sequence[Job], dest: Path, *, workers: int, deadline: Deadline, ctx: FetchContext
) -> list[FileEntry]:
    """Fetch every job into ``dest``; report each file to ``ctx`` as it completes.

    A failure that retrying cannot fix (the object changed, a checksum mismatch, access
    refused, a full disk) stops the other files between chunks; a transient one lets
    them finish first, so the loader's retry resumes with less to do.
    """
    stop = threading.Event()
    results: list[FileEntry] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(job: Job) -> None:
        try:
            entry = _fetch_one(backend, job, dest, deadline, ctx, stop)
        except _Stopped:
            return
        except BaseException as exc:
            if isinstance(exc, _FATAL) or deadline.expired():
                stop.set()
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(entry)

    order = sorted(jobs, key=lambda j: -j.size)  # the largest first: it must not finish last
    if len(order) <= 1 or workers <= 1:
        for job in order:
            run(job)
    else:
        with ThreadPoolExecutor(min(workers, len(order)), thread_name_prefix="model-loader-fsspec") as pool:
            list(pool.map(run, order))
    if errors:
        fatal = [e for e in errors if isinstance(e, _FATAL)]
        raise (fatal or errors)[0]
    return results


def _fetch_one(
    backend: Backend, job: Job, dest: Path, deadline: Deadline, ctx: FetchContext, stop: threading.Event
) -> FileEntry:
    what = f"reading {redact(job.name)}"
    target = dest / job.rel
    sha256 = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False) if job.pin.md5 else None
    git = hashlib.sha1(f"blob {job.size}\0".encode(), usedforsecurity=False) if job.pin.git_sha1 else None
    size = 0
    try:
        out = open(target, "wb")  # noqa: SIM115 (closed below; a partial file from an earlier attempt is replaced)
    except OSError as exc:
        raise disk_error(exc, f"writing {target}") from exc
    try:
        with out, map_errors(what, backend.scheme, backend.uri, deadline, missing="stale"):
            for chunk in _chunks(backend, job, deadline):
                if stop.is_set():
                    raise _Stopped
                deadline.check(what, scheme=backend.scheme, ref=backend.uri)
                size += len(chunk)
                if size > job.size:
                    raise StaleResolutionError(
                        f"{what}: more than the {job.size} bytes resolved (the object changed)",
                        scheme=backend.scheme,
                        ref=backend.uri,
                    )
                sha256.update(chunk)
                if md5 is not None:
                    md5.update(chunk)
                if git is not None:
                    git.update(chunk)
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise disk_error(exc, f"writing {target}") from exc
                ctx.progress(len(chunk))
            if size < job.size:
                raise SourceUnavailableError(
                    f"{what}: the body ended after {size} of {job.size} bytes", scheme=backend.scheme, ref=backend.uri
                )
            if not backend.dialect.pinned_read(job.pin) and backend.dialect.family != "http":
                _recheck(backend, job, deadline)
    except BaseException:
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    _compare(job, "sha256", job.pin.sha256, sha256.hexdigest())
    if md5 is not None:
        _compare(job, "md5", job.pin.md5, md5.hexdigest())
    if git is not None:
        _compare(job, "git blob SHA-1", job.pin.git_sha1, git.hexdigest())
    entry = FileEntry(job.rel, size, sha256.hexdigest(), None, job.pin.checksum)
    ctx.file_done(entry)
    return entry


def _compare(job: Job, algo: str, expected: str | None, actual: str) -> None:
    if expected is not None and expected != actual:
        raise IntegrityError(
            f"{job.rel}: the {algo} of the bytes received ({actual}) is not the one the store publishes ({expected}); "
            f"the copy was discarded"
        )


def _recheck(backend: Backend, job: Job, deadline: Deadline) -> None:
    """Ask for the object's info again: a different pin means it changed while read."""
    info = backend.info(job.name, deadline)
    now = backend.dialect.pin(info, f"info of {redact(job.name)}")
    if (now.kind, now.value) != (job.pin.kind, job.pin.value):
        raise StaleResolutionError(
            f"{redact(job.name)} changed while it was fetched ({job.pin.kind} {job.pin.value!r} -> {now.value!r})",
            scheme=backend.scheme,
            ref=backend.uri,
        )


def _chunks(backend: Backend, job: Job, deadline: Deadline) -> Iterator[bytes]:
    fs, dialect = backend.fs, backend.dialect
    if dialect.family == "http":
        yield from _http_chunks(backend, job, deadline)
    elif getattr(fs, "async_impl", False):
        yield from _ranged_chunks(backend, job, deadline)
    else:
        path = dialect.read_path(job.name, job.pin)
        options = dialect.read_kwargs(job.pin)
        if dialect.family == "hf":
            options["block_size"] = 0  # a streamed GET, not cached ranges
        with fs.open(path, "rb", **options) as f:
            while data := f.read(CHUNK):
                yield data


def _ranged_chunks(backend: Backend, job: Job, deadline: Deadline) -> Iterator[bytes]:
    path = backend.dialect.read_path(job.name, job.pin)
    options = backend.dialect.read_kwargs(job.pin)
    what = f"reading {redact(job.name)}"
    if job.size == 0:  # nothing to read; still make sure the pinned object is there
        call(backend.fs, "info", path, deadline=deadline, cap=backend.read_timeout, what=what, **options)
        return
    for start in range(0, job.size, CHUNK):
        end = min(job.size, start + CHUNK)
        data = call(
            backend.fs,
            "cat_file",
            path,
            start=start,
            end=end,
            deadline=deadline,
            cap=backend.read_timeout,
            **options,
            what=what,
        )
        if not isinstance(data, (bytes, bytearray)) or len(data) != end - start:
            got = len(data) if isinstance(data, (bytes, bytearray)) else type(data).__name__
            raise InvalidResponseError(
                f"{what}: bytes {start}-{end} came back as {got}", scheme=backend.scheme, ref=backend.uri
            )
        yield bytes(data)


def _http_chunks(backend: Backend, job: Job, deadline: Deadline) -> Iterator[bytes]:
    """One streamed GET on the filesystem's session, conditional on the pin, its answer
    checked against the pin. (Not ``open_async``: its stream file drops request headers.)"""
    fs, pin = backend.fs, job.pin
    what = f"GET {redact(job.name)}"

    def budget() -> float:
        return deadline.timeout(backend.read_timeout, what=what, scheme=backend.scheme, ref=backend.uri)

    options = dict(fs.kwargs)  # the filesystem's request options (headers, auth, proxy...)
    headers = {**options.pop("headers", {}), "Accept-Encoding": "identity"}
    if pin.kind == "etag":
        headers["If-Match"] = pin.value
    elif pin.kind == "last-modified":
        headers["If-Unmodified-Since"] = pin.value
    session = _sync(fs.loop, fs.set_session, timeout=budget())
    response = _sync(fs.loop, _get, session, fs.encode_url(job.name), headers, options, timeout=budget())
    try:
        _check_answer(backend, job, response)
        while data := _sync(fs.loop, response.content.read, CHUNK, timeout=budget()):
            yield data
    finally:
        with contextlib.suppress(Exception):  # closing a cancelled response must not hide the error
            _sync(fs.loop, _close, response, timeout=1.0)


async def _get(session: Any, url: Any, headers: dict[str, str], options: dict[str, Any]) -> Any:
    """The response of a GET, its headers read; a 4xx/5xx raised as aiohttp does."""
    response = await session.get(url, headers=headers, **options)
    if response.status == 404:
        response.release()
        raise FileNotFoundError(f"HTTP 404 for {redact(str(url))}")
    response.raise_for_status()  # releases the connection first
    return response


async def _close(response: Any) -> None:
    response.close()  # not release(): a body left unread (cut short) must not be reused


def _check_answer(backend: Backend, job: Job, response: Any) -> None:
    """The GET's status and validators must match what resolve pinned."""
    if response is None:
        return
    status = getattr(response, "status", None)
    headers = getattr(response, "headers", None) or {}
    what = f"GET {redact(job.name)}"
    if status != 200:
        raise InvalidResponseError(
            f"{what}: HTTP {status} where 200 was expected", scheme=backend.scheme, ref=backend.uri
        )
    pin = job.pin
    changed = None
    if pin.kind == "etag" and headers.get("ETag") not in (None, pin.value):
        changed = f"ETag {pin.value} -> {headers.get('ETag')}"
    elif pin.kind == "last-modified" and headers.get("Last-Modified") not in (None, pin.value):
        changed = f"Last-Modified {pin.value!r} -> {headers.get('Last-Modified')!r}"
    length = headers.get("Content-Length")
    if changed is None and length is not None and length.isdigit() and int(length) != job.size:
        changed = f"size {job.size} -> {length}"
    if changed is not None:
        raise StaleResolutionError(
            f"{what}: the object changed since it was resolved ({changed})", scheme=backend.scheme, ref=backend.uri
        )
