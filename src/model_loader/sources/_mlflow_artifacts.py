"""Downloading one model version's artifacts into an empty directory.

Three ways, chosen by the MLflow source from the artifact location:
:func:`fetch_proxied` (the tracking server's ``mlflow-artifacts`` API, stdlib HTTP, files
in parallel), :func:`copy_local` (``file:`` locations, stdlib) and :func:`fetch_with_mlflow`
(any other store MLflow knows, through its artifact repositories). ``s3://`` locations
go to the S3 source instead. Every path is checked with :func:`safe_relpath`; every file
is hashed while it is written (the mlflow fallback hashes right after).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from model_loader._io import CHUNK_SIZE, copy_file, hash_file, is_selected, safe_relpath, write_chunks
from model_loader._types import FileEntry, Manifest
from model_loader.errors import IntegrityError
from model_loader.sources._mlflow_http import Endpoint, RestTransport

__all__ = ["ARTIFACTS_API", "ArtifactsMissing", "copy_local", "fetch_proxied", "fetch_with_mlflow"]

ARTIFACTS_API = "/api/2.0/mlflow-artifacts/artifacts"

T = TypeVar("T")
R = TypeVar("R")


class ArtifactsMissing(LookupError):
    """The location holds no files (deleted artifacts) or none pass include/exclude."""


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


def fetch_proxied(
    http: RestTransport,
    endpoint: Endpoint,
    root: str,
    dest: Path,
    *,
    include: Sequence[str],
    exclude: Sequence[str],
    workers: int,
) -> Manifest:
    """Download everything under ``root`` (a path of the server's artifact store) into ``dest``."""
    root = root.strip("/")
    abort = threading.Event()

    def list_dir(rel: str) -> list[tuple[str, bool, int | None]]:
        path = f"{root}/{rel}" if rel else root
        found = http.get_json(endpoint, ARTIFACTS_API, {"path": path}).get("files", [])
        out = []
        for f in found:
            name = str(f["path"]).rsplit("/", 1)[-1]
            child = safe_relpath(f"{rel}/{name}" if rel else name)
            size = f.get("file_size")
            out.append((child, bool(f.get("is_dir")), int(size) if size is not None else None))
        return out

    files: list[tuple[str, int | None]] = []
    level = [""]
    while level:
        next_level = []
        for listing in run_parallel(list_dir, level, workers, abort):
            for child, is_dir, size in listing:
                if is_dir:
                    next_level.append(child)
                else:
                    files.append((child, size))
        level = next_level
    selected = [(p, s) for p, s in files if is_selected(p, include, exclude)]
    _check_selected(f"mlflow-artifacts:/{root}", len(files), len(selected))

    def download(item: tuple[str, int | None]) -> FileEntry:
        rel, expected = item
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with http.stream(endpoint, f"{ARTIFACTS_API}/{quote(f'{root}/{rel}')}") as resp:
            size, digest = write_chunks(_chunks(resp.read, abort), target)
        if expected is not None and size != expected:
            raise IntegrityError(f"{rel}: received {size} bytes, the artifact listing says {expected}")
        return FileEntry(rel, size, digest)

    selected.sort(key=lambda item: -(item[1] or 0))  # the largest first, so it does not finish last
    return Manifest.of(run_parallel(download, selected, workers, abort))


def _chunks(read: Callable[[int], bytes], abort: threading.Event) -> Iterator[bytes]:
    while chunk := read(CHUNK_SIZE):
        if abort.is_set():
            raise _Aborted("stopped: another file failed")
        yield chunk


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
    root: Path, dest: Path, *, include: Sequence[str], exclude: Sequence[str], workers: int
) -> Manifest:
    """Copy a ``file:`` artifact directory into ``dest``, hashing while copying."""
    if not root.is_dir():
        raise ArtifactsMissing(f"no artifacts at {root} (deleted?)")
    files = list(_walk(root))
    selected = [(rel, full) for rel, full in files if is_selected(rel, include, exclude)]
    _check_selected(str(root), len(files), len(selected))

    def copy(item: tuple[str, Path]) -> FileEntry:
        rel, full = item
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        size, digest = copy_file(full, target)
        return FileEntry(rel, size, digest)

    return Manifest.of(run_parallel(copy, selected, min(workers, 8), threading.Event()))


def fetch_with_mlflow(
    uri: str,
    dest: Path,
    *,
    tracking_uri: str,
    registry_uri: str,
    include: Sequence[str],
    exclude: Sequence[str],
) -> Manifest:
    """Any other artifact store, through MLflow's artifact repositories (imports mlflow).

    MLflow writes the files, so they are hashed right after each download.
    """
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(uri, tracking_uri=tracking_uri, registry_uri=registry_uri)

    def walk(path: str | None) -> Iterator[str]:
        for info in repo.list_artifacts(path):
            rel = safe_relpath(str(info.path))
            if info.is_dir:
                yield from walk(rel)
            else:
                yield rel

    files = list(walk(None))
    selected = [rel for rel in files if is_selected(rel, include, exclude)]
    _check_selected(uri, len(files), len(selected))
    entries = []
    for rel in selected:
        local: Any = repo.download_artifacts(rel, dst_path=str(dest))
        target = dest / rel
        if Path(local).resolve() != target.resolve():
            raise IntegrityError(f"MLflow wrote {rel} outside the model directory")
        entries.append(FileEntry(rel, target.stat().st_size, hash_file(target)))
    return Manifest.of(entries)
