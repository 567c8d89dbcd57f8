"""The local-directory source (``file:///abs/dir`` and plain paths); stdlib only."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

from model_loader._deadline import FetchContext
from model_loader._io import copy_file, hash_file, is_selected
from model_loader._types import FileEntry, Manifest, ModelRef, ResolvedModel
from model_loader.errors import (
    AccessDeniedError,
    IntegrityError,
    ModelLoaderError,
    ModelNotFoundError,
    SourceError,
    SourceUnavailableError,
    StaleResolutionError,
)
from model_loader.protocol import SourceCapabilities, SourceSettings

__all__ = ["LocalSource"]

logger = logging.getLogger(__name__)

_Stamp = tuple[int, int, int, int]  # (device, inode, size, mtime_ns)


class LocalSource:
    """Models in a local (or mounted) directory.

    The version is a SHA-256 over every file's relative path, size and content hash.
    Hashes are remembered per file by (device, inode, size, mtime), so re-resolving an
    unchanged directory stats it without re-reading it. Symlinks that leave the directory
    and special files (FIFOs, sockets, devices) are refused.

    Args:
        include: Globs of relative paths to serve (empty: all).
        exclude: Globs of relative paths to skip.
        max_concurrency: Files copied in parallel by ``fetch``.
        state_dir: Where to persist the hash memo, so a fresh process re-hashes only files
            whose (device, inode, size, mtime) changed. ``None``: memo in memory only.

    Example:
        >>> src = LocalSource()
        >>> resolved = src.resolve(parse_ref("/models/iris"))
    """

    scheme: ClassVar[str] = "file"
    capabilities: ClassVar[SourceCapabilities] = SourceCapabilities(remote=False, resumable=True)

    def __init__(
        self,
        *,
        include: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        max_concurrency: int = 4,
        state_dir: Path | None = None,
    ) -> None:
        self._include = tuple(include)
        self._exclude = tuple(exclude)
        self._workers = max(1, max_concurrency)
        self._hashes: dict[str, tuple[_Stamp, FileEntry]] = {}
        self._state_dir = Path(state_dir) / "local" if state_dir is not None else None
        self._loaded_memos: set[str] = set()
        self._hashed = 0  # files hashed by this instance: a change means the memo file is stale
        self._resolved: dict[ModelRef, tuple[list[tuple[str, int, int, int, int]], ResolvedModel]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: SourceSettings) -> LocalSource:
        return cls(
            include=settings.include,
            exclude=settings.exclude,
            max_concurrency=min(settings.max_concurrency, 8),
            state_dir=settings.state_dir,
        )

    @property
    def identity(self) -> str:
        return "file"

    @contextlib.contextmanager
    def _map_errors(self, ref: ModelRef, what: str) -> Iterator[None]:
        try:
            yield
        except ModelLoaderError:
            raise  # SourceError, IntegrityError, and CacheError (a full disk is not the source's fault)
        except FileNotFoundError as exc:
            raise ModelNotFoundError(
                f"{what}: {exc.filename or ref.location} does not exist", scheme="file", ref=ref.uri
            ) from exc
        except NotADirectoryError as exc:
            raise ModelNotFoundError(f"{what}: {ref.location} is not a directory", scheme="file", ref=ref.uri) from exc
        except PermissionError as exc:
            raise AccessDeniedError(
                f"{what}: permission denied reading {exc.filename}", scheme="file", ref=ref.uri
            ) from exc
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTDOWN):
                raise SourceUnavailableError(f"{what}: {exc}", scheme="file", ref=ref.uri) from exc
            raise SourceError(f"{what}: {exc}", scheme="file", ref=ref.uri) from exc

    def resolve(self, ref: ModelRef) -> ResolvedModel:
        root = Path(ref.location)
        with self._map_errors(ref, "resolve"):
            st = os.stat(root)
            if not stat.S_ISDIR(st.st_mode):
                raise ModelNotFoundError(
                    f"{root} is a file, not a model directory (point at the directory that holds it)",
                    scheme="file",
                    ref=ref.uri,
                )
            found = list(self._walk(root, ref))
            # Unchanged directory (same names, inodes, sizes, mtimes): same resolution, no hashing.
            signature = [(rel, s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for rel, _, s in found]
            memo = self._resolved.get(ref)
            if memo is not None and memo[0] == signature:
                return memo[1]
            memo_file = self._load_memo(root)
            hashed_before = self._hashed
            entries = [self._entry(rel, full, s) for rel, full, s in found]
            if memo_file is not None and (self._hashed != hashed_before or not memo_file.exists()):
                self._save_memo(memo_file, {full for _, full, _ in found})
        if not entries:
            raise ModelNotFoundError(f"{root} holds no files to serve", scheme="file", ref=ref.uri)
        entries.sort(key=lambda e: e.path)
        h = hashlib.sha256()
        for e in entries:
            h.update(f"{e.path}\0{e.size}\0{e.sha256}\n".encode())
        resolved = ResolvedModel(ref, self.identity, h.hexdigest(), tuple(entries), (("path", str(root)),))
        with self._lock:
            self._resolved[ref] = (signature, resolved)
        return resolved

    def _walk(self, root: Path, ref: ModelRef) -> Iterator[tuple[str, str, os.stat_result]]:
        """Yield ``(relative path, full path, stat)`` of every served file, in no order.

        Plain ``os`` strings and ``DirEntry`` type bits rather than pathlib: this runs on
        every warm start, once per file.
        """
        real_root = os.path.realpath(root)
        stack = [(str(root), "")]
        seen_dirs = {real_root}
        filtered = bool(self._include or self._exclude)
        while stack:
            current, prefix = stack.pop()
            with os.scandir(current) as it:
                for item in it:
                    rel = prefix + item.name
                    if item.is_symlink():
                        target = os.path.realpath(item.path)
                        if os.path.commonpath([real_root, target]) != real_root:
                            raise IntegrityError(f"{rel} is a symlink pointing outside the model directory ({target})")
                    if item.is_dir():  # follows in-tree symlinks
                        real = os.path.realpath(item.path)
                        if real not in seen_dirs:  # else a symlink loop or a second path to it
                            seen_dirs.add(real)
                            stack.append((item.path, rel + "/"))
                        continue
                    if not item.is_file():
                        raise IntegrityError(f"{rel} is not a regular file (FIFO, socket or device): refused")
                    if "\\" in item.name:
                        raise IntegrityError(f"unsafe file name {rel!r}: backslashes are not portable")
                    if filtered and not is_selected(rel, self._include, self._exclude):
                        continue
                    yield rel, item.path, item.stat()

    def _memo_path(self, root: Path) -> Path | None:
        if self._state_dir is None:
            return None
        key = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:32]
        return self._state_dir / f"{key}.json"

    def _load_memo(self, root: Path) -> Path | None:
        """Merge the persisted hash memo of ``root`` (once per process). Returns its path."""
        path = self._memo_path(root)
        if path is None or str(path) in self._loaded_memos:
            return path
        self._loaded_memos.add(str(path))
        try:
            rows = json.loads(path.read_bytes())
        except FileNotFoundError:
            return path
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable hash memo %s: %s", path, exc)
            return path
        parsed = [row for row in rows if _memo_row_ok(row)] if isinstance(rows, list) else []
        if not isinstance(rows, list) or len(parsed) != len(rows):
            logger.warning("ignoring malformed rows of the hash memo %s (the files are hashed again)", path)
        with self._lock:
            for full, dev, ino, size, mtime, rel, sha in parsed:
                self._hashes.setdefault(full, ((dev, ino, size, mtime), FileEntry(rel, size, sha)))
        return path

    def _save_memo(self, path: Path, files: set[str]) -> None:
        """Persist the memo of these files atomically; a failure costs only re-hashing later."""
        with self._lock:
            rows = [[full, *stamp, e.path, e.sha256] for full, (stamp, e) in self._hashes.items() if full in files]
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(rows))
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("could not save the hash memo %s (the next process re-hashes): %s", path, exc)
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):  # never created
                tmp.unlink()

    def _entry(self, rel: str, full: str, st: os.stat_result) -> FileEntry:
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        memo = self._hashes.get(full)
        if memo is not None and memo[0] == stamp and memo[1].path == rel:
            return memo[1]
        entry = FileEntry(rel, st.st_size, hash_file(Path(full)))
        with self._lock:
            self._hashes[full] = (stamp, entry)
            self._hashed += 1
        return entry

    def fetch(self, resolved: ResolvedModel, dest: Path) -> Manifest:
        if resolved.files is None:
            raise IntegrityError("a local resolution always lists its files")
        root = Path(resolved.meta["path"])
        ref = resolved.ref
        ctx = FetchContext.current()

        def copy(entry: FileEntry) -> FileEntry:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            size, digest = copy_file(root / entry.path, target)
            if size != entry.size or digest != entry.sha256:
                raise StaleResolutionError(f"{entry.path} changed after it was resolved", scheme="file", ref=ref.uri)
            done = FileEntry(entry.path, size, digest, None, "sha256")
            ctx.progress(size)
            ctx.file_done(done)
            return done

        with self._map_errors(ref, "fetch"):
            if len(resolved.files) == 1 or self._workers == 1:
                copied = [copy(e) for e in resolved.files]
            else:
                # largest first so one big file does not finish last
                order = sorted(resolved.files, key=lambda e: -e.size)
                with ThreadPoolExecutor(self._workers, thread_name_prefix="model-loader-copy") as pool:
                    copied = list(pool.map(copy, order))
        return Manifest.of(copied)

    def close(self) -> None:
        with self._lock:
            self._hashes.clear()
            self._resolved.clear()


def _memo_row_ok(row: object) -> bool:
    """A memo row is ``[full, dev, ino, size, mtime_ns, rel, sha256]`` with those types."""
    if not isinstance(row, list) or len(row) != 7:
        return False
    full, dev, ino, size, mtime, rel, sha = row
    ints = (dev, ino, size, mtime)
    return (
        isinstance(full, str)
        and isinstance(rel, str)
        and isinstance(sha, str)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in ints)
    )
