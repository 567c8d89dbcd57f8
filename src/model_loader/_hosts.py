"""Who is using a cache entry or a staging directory, in a way several hosts can see.

``flock`` is not shared between hosts on many shared volumes (some NFS setups, FUSE
mounts, SMB), so a cache that several hosts share also records, as plain files that
every host can read:

- the **owner** of a staging directory (``owner.json``: host, pid, boot id), whose mtime
  is a heartbeat refreshed while the fetch runs;
- the **users** of a published entry (``entries/<key>/.users/<host>.<pid>``), refreshed
  while the process may serve it.

A record is alive when it is this host's and its process runs, or another host's and
its heartbeat is fresher than ``stale_after``; a host that died stops refreshing, so its
records expire. One daemon thread per process refreshes every record it holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

__all__ = ["HEARTBEAT_EVERY", "STALE_AFTER", "Heartbeat", "host_id", "is_alive", "write_owner"]

logger = logging.getLogger("model_loader.cache")

HEARTBEAT_EVERY = 10.0
"""Seconds between two refreshes of a record this process holds."""
STALE_AFTER = 60.0
"""Seconds after which another host's record that was not refreshed counts as dead."""

_HOST: str | None = None


def host_id() -> str:
    """This host's name in records: ``$MODEL_LOADER_HOST_ID``, else hostname and boot id."""
    global _HOST
    if _HOST is None:
        explicit = os.environ.get("MODEL_LOADER_HOST_ID")
        if explicit:
            _HOST = explicit
        else:
            boot = ""
            with contextlib.suppress(OSError):
                boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
            _HOST = f"{socket.gethostname()}-{boot}" if boot else socket.gethostname()
    return _HOST


def _pid_runs(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill()
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def is_alive(record: Path, *, stale_after: float = STALE_AFTER) -> bool:
    """Whether the owner or user ``record`` (a file written by :func:`write_owner` or a
    user marker named ``<host>.<pid>``) belongs to a process that still runs."""
    try:
        age = time.time() - record.stat().st_mtime
    except OSError:
        return False
    host, pid = _identify(record)
    if host == host_id() and pid is not None:
        return _pid_runs(pid)
    return age < stale_after


def _identify(record: Path) -> tuple[str | None, int | None]:
    if record.name == "owner.json":
        try:
            data = json.loads(record.read_text())
            return str(data["host"]), int(data["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None, None
    host, _, pid = record.name.rpartition(".")
    return (host, int(pid)) if pid.isdigit() else (None, None)


def write_owner(stage: Path) -> Path:
    """Mark ``stage`` as this process's; returns the owner file (refresh it with :class:`Heartbeat`)."""
    path = stage / "owner.json"
    tmp = stage / f".owner.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps({"host": host_id(), "pid": os.getpid(), "started": time.time()}))
    os.replace(tmp, path)
    return path


def user_marker(entry_root: Path) -> Path:
    return entry_root / ".users" / f"{host_id()}.{os.getpid()}"


class Heartbeat:
    """Refreshes the mtime of every registered file every :data:`HEARTBEAT_EVERY` seconds."""

    _instance: Heartbeat | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self._paths: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def shared(cls) -> Heartbeat:
        with cls._instance_lock:
            if cls._instance is None or cls._instance._pid != os.getpid():
                cls._instance = cls()
                cls._instance._pid = os.getpid()
            return cls._instance

    _pid = 0

    def add(self, path: Path) -> None:
        with self._lock:
            self._paths[path] = self._paths.get(path, 0) + 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="model-loader-heartbeat", daemon=True)
                self._thread.start()

    def remove(self, path: Path) -> None:
        with self._lock:
            count = self._paths.get(path, 0) - 1
            if count > 0:
                self._paths[path] = count
            else:
                self._paths.pop(path, None)

    def _run(self) -> None:
        while not self._wake.wait(HEARTBEAT_EVERY):
            with self._lock:
                paths = list(self._paths)
            for path in paths:
                try:
                    os.utime(path)
                except FileNotFoundError:
                    self.remove(path)  # published (staging renamed) or evicted: nothing to refresh
                except OSError as exc:
                    logger.debug("heartbeat of %s failed: %s", path, exc)
