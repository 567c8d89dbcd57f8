"""A staging directory that survives retries and killed processes: fetches resume.

Layout of one staging directory (``<cache>/.staging/<key>.<id>/``)::

    files/...          what the source writes (becomes the entry's files/)
    journal.jsonl      one line per file completed and checked by the source, and one per
                       contiguous prefix written of a large file still in progress

A file is kept across attempts only once it is in the journal; anything else in
``files/`` is a partial write and is removed before the next attempt, except the
journalled prefix of a large file, which the source continues (and checks whole at the
end: the prefix is hashed again with the rest). When a process
dies, the next process that takes the entry's lock adopts its staging directory,
checks every journalled file again (size and SHA-256: the page cache may not have
reached the disk) and asks the source only for the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any

from model_loader._deadline import FetchContext
from model_loader._io import cache_errors, hash_file, safe_relpath
from model_loader._types import FileEntry, Manifest, ResolvedModel
from model_loader.errors import CacheError, IntegrityError
from model_loader.protocol import ModelSource

__all__ = ["Staging"]

logger = logging.getLogger("model_loader.cache")

JOURNAL = "journal.jsonl"


def _parse_prefix(line: str) -> tuple[str, int] | None:
    try:
        data = json.loads(line)
        if not isinstance(data, dict) or set(data) != {"path", "prefix"}:
            return None
        path, prefix = data["path"], data["prefix"]
        if not isinstance(path, str) or type(prefix) is not int or prefix <= 0:
            return None
        return safe_relpath(path), prefix
    except (ValueError, IntegrityError):
        return None


def _parse_line(line: str) -> FileEntry | None:
    try:
        data = json.loads(line)
        if not isinstance(data, dict) or "prefix" in data:
            return None
        path, size, sha = data.get("path"), data.get("size"), data.get("sha256")
        verified = data.get("verified")
        if not isinstance(path, str) or not isinstance(size, int) or size < 0 or not isinstance(sha, str):
            return None
        if verified is not None and not isinstance(verified, str):
            return None
        return FileEntry(safe_relpath(path), size, sha, None, verified)
    except (ValueError, IntegrityError):
        return None  # a line cut by a kill, or garbage: that file is fetched again


class Staging:
    """One staging directory of a cache entry, owned by this process while it fills it.

    Args:
        root: The staging directory (created with ``files/`` inside if missing).
        progress: Called with the bytes each attempt reports (progress bars).
    """

    def __init__(self, root: Path, progress: Any = None) -> None:
        self.root = root
        self.files_dir = root / "files"
        self._journal_path = root / JOURNAL
        self._lock = threading.Lock()
        self._done: dict[str, FileEntry] = {}
        self._prefix: dict[str, int] = {}  # large files in progress: bytes written contiguously
        self._progress = progress
        self.attempts = 0
        self.progressed = False  # the last attempt completed at least one file
        self.owner = root / "owner.json"  # host, pid; its mtime is the owner's heartbeat
        with cache_errors(f"creating staging directory {root}"):
            self.files_dir.mkdir(parents=True, exist_ok=True)

    @property
    def completed(self) -> dict[str, FileEntry]:
        with self._lock:
            return dict(self._done)

    @property
    def partial(self) -> dict[str, int]:
        with self._lock:
            return {p: n for p, n in self._prefix.items() if p not in self._done}

    # -- resuming ---------------------------------------------------------------------

    def adopt(self) -> int:
        """Take over what an earlier process left here: keep journalled files that still
        check out, remove everything else. Returns the number of files kept."""
        try:
            lines = self._journal_path.read_text("utf-8", errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        except OSError as exc:
            logger.warning("cannot read the journal of %s (%s); starting this staging afresh", self.root, exc)
            lines = []
        kept: dict[str, FileEntry] = {}
        prefixes: dict[str, int] = {}
        for line in lines:
            prefix = _parse_prefix(line)
            if prefix is not None:
                prefixes[prefix[0]] = max(prefix[1], prefixes.get(prefix[0], 0))
                continue
            entry = _parse_line(line)
            if entry is None:
                continue
            path = self.files_dir / entry.path
            try:
                if path.is_symlink() or not path.is_file() or path.stat().st_size != entry.size:
                    continue
                if hash_file(path) != entry.sha256:
                    continue
            except OSError:
                continue
            kept[entry.path] = entry
        for rel, n in list(prefixes.items()):
            try:
                size = (self.files_dir / rel).stat().st_size if rel not in kept else 0
            except OSError:
                size = 0
            if rel in kept or size <= 0:
                del prefixes[rel]
            else:
                prefixes[rel] = min(n, size)
        with self._lock:
            self._done = kept
            self._prefix = prefixes
        self._rewrite_journal()
        self.discard_partial()
        if kept or prefixes:
            logger.info(
                "resuming %s: %d files already fetched and verified, %d MiB of %d more",
                self.root.name,
                len(kept),
                sum(prefixes.values()) // (1024 * 1024),
                len(prefixes),
            )
        return len(kept)

    def _rewrite_journal(self) -> None:
        lines = "".join(json.dumps(_entry_json(e)) + "\n" for e in self.completed.values())
        lines += "".join(json.dumps({"path": p, "prefix": n}) + "\n" for p, n in self.partial.items())
        tmp = self.root / f".{JOURNAL}.tmp"
        with cache_errors(f"writing the journal of {self.root}"):
            tmp.write_text(lines)
            os.replace(tmp, self._journal_path)

    def discard_partial(self) -> None:
        """Remove every file and directory under ``files/`` that is not journalled; cut a
        large file in progress back to its journalled prefix."""
        done = self.completed
        prefixes = self.partial
        keep_dirs = {""}
        for rel in [*done, *prefixes]:
            parts = rel.split("/")
            keep_dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        with cache_errors(f"cleaning staging directory {self.root}"):
            for dirpath, dirnames, names in os.walk(self.files_dir, topdown=False):
                rel_dir = os.path.relpath(dirpath, self.files_dir)
                rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
                for name in names:
                    rel = f"{rel_dir}/{name}" if rel_dir else name
                    full = os.path.join(dirpath, name)
                    if rel in prefixes and not os.path.islink(full):
                        if os.stat(full).st_size > prefixes[rel]:
                            os.truncate(full, prefixes[rel])
                    elif rel not in done:
                        os.unlink(full)
                for name in dirnames:
                    rel = f"{rel_dir}/{name}" if rel_dir else name
                    full = os.path.join(dirpath, name)
                    if os.path.islink(full):
                        os.unlink(full)
                    elif rel not in keep_dirs:
                        shutil.rmtree(full)

    def wipe(self) -> None:
        """Start from an empty ``files/`` (for sources that cannot resume)."""
        with self._lock:
            self._done = {}
            self._prefix = {}
        with cache_errors(f"cleaning staging directory {self.root}"):
            shutil.rmtree(self.files_dir, ignore_errors=True)
            self.files_dir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self._journal_path.unlink()

    # -- one attempt ------------------------------------------------------------------

    def _file_progress(self, path: str, n: int) -> None:
        """Journal that the first ``n`` bytes of ``path`` are written (0: forget its prefix,
        the file starts again)."""
        with self._lock:
            if path in self._done or (n > 0 and n <= self._prefix.get(path, 0)):
                return
            if n <= 0:
                if self._prefix.pop(path, None) is None:
                    return
                rewrite = True
            else:
                self._prefix[path] = n
                rewrite = False
        if rewrite:
            try:
                self._rewrite_journal()
            except CacheError as exc:
                logger.warning("cannot rewrite the journal of %s (%s)", self.root, exc)
        else:
            self._append(json.dumps({"path": path, "prefix": n}) + "\n")

    def _file_done(self, entry: FileEntry) -> None:
        with self._lock:
            self._done[entry.path] = entry
        self._append(json.dumps(_entry_json(entry)) + "\n")

    def _append(self, line: str) -> None:
        """One journal line. O_APPEND writes of one short line are atomic; no fsync: adopt()
        re-hashes. A journal that cannot be written costs only resuming (logged)."""
        try:
            with self._lock, open(self._journal_path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError as exc:
            logger.warning("cannot journal progress in %s (%s): a retry starts that file again", self.root, exc)

    def attempt(self, source: ModelSource, resolved: ResolvedModel) -> Manifest:
        """Run one ``source.fetch`` into ``files/``, resuming after the files completed so far.

        Returns the manifest of every file (earlier attempts' and this one's).
        """
        self.attempts += 1
        resumable = type(source).capabilities.resumable
        if resumable:
            self.discard_partial()
        else:
            self.wipe()
        before = self.completed
        prefixes_before = self.partial
        if resumable and resolved.files is not None and before:
            wanted = {(f.path, f.size) for f in resolved.files}
            stale = [e.path for e in before.values() if (e.path, e.size) not in wanted]
            if stale:  # fetched for another selection (include/exclude changed): not this model's
                with self._lock:
                    for path in stale:
                        self._done.pop(path, None)
                self._rewrite_journal()
                self.discard_partial()
                before = self.completed
        todo = resolved
        if resumable and resolved.files is not None and before:
            todo = dataclasses.replace(resolved, files=tuple(f for f in resolved.files if f.path not in before))
        if todo.files is not None and not todo.files and before:
            self.progressed = False
            return Manifest.of(before.values())  # an adopted staging that was already complete
        ctx = FetchContext(
            completed=MappingProxyType(before if resumable else {}),
            file_done=self._file_done,
            partial=MappingProxyType(self.partial if resumable else {}),
            file_progress=self._file_progress,
            progress=self._progress or FetchContext().progress,
        )
        try:
            with ctx.applied():
                manifest = source.fetch(todo, self.files_dir)
        finally:
            grew = len(self.completed) > len(before) or any(
                n > prefixes_before.get(p, 0) for p, n in self.partial.items()
            )
            self.progressed = resumable and grew
        merged = {p: e for p, e in before.items() if (self.files_dir / p).is_file()} if resumable else {}
        merged.update((e.path, e) for e in manifest.files)  # files the source removed are not kept
        return Manifest.of(merged.values())


def _entry_json(entry: FileEntry) -> dict[str, Any]:
    return {"path": entry.path, "size": entry.size, "sha256": entry.sha256, "verified": entry.verified}
