"""The ``model-loader`` command: fetch models (init containers), care for the cache, demo.

Exit codes: 0 success; 1 failure (no source delivered, corrupt cache found); 2 bad input
(usage, reference, configuration); 3 cache unusable (full, locked, not writable).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_loader import __version__
from model_loader.errors import AllSourcesFailedError, CacheError, InvalidReferenceError, ModelLoaderError

if TYPE_CHECKING:
    from model_loader.config import LoaderConfig

__all__ = ["main"]

logger = logging.getLogger("model_loader.cli")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir", type=Path, help="cache root (default: $MODEL_LOADER_CACHE_DIR or ~/.cache/model_loader)"
    )
    common.add_argument("--debug", action="store_true", help="log debug details and show tracebacks")
    common.add_argument("-v", "--verbose", action="store_true", help="log retries, fallbacks and cache events")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar or warnings")

    parser = argparse.ArgumentParser(
        prog="model-loader", description="Load ML models: pinned, cached, verified, resilient."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = sub.add_parser("fetch", parents=[common], help="fetch a model into the cache and print its path")
    fetch.add_argument(
        "uris", nargs="+", metavar="URI", help="sources, tried in order (models:/, s3://, file://, paths)"
    )
    fetch.add_argument("--timeout", type=float, metavar="SECONDS", help="overall deadline for the fetch")
    fetch.add_argument("--offline", action="store_true", help="serve only from the cache; no network")
    fetch.add_argument("--json", action="store_true", help="print one JSON object describing what was served")
    fetch.add_argument("--verify", choices=["fast", "full"], help="cache-hit verification (default: fast)")
    fetch.add_argument(
        "--include", action="append", default=[], metavar="GLOB", help="only files matching (repeatable)"
    )
    fetch.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="skip files matching (repeatable)"
    )
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")

    cache = sub.add_parser("cache", help="inspect, verify or prune the cache")
    csub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = csub.add_parser("ls", parents=[common], help="list cached models")
    ls.add_argument("--json", action="store_true")
    csub.add_parser("verify", parents=[common], help="hash every cached file; quarantine corrupt entries")
    prune = csub.add_parser("prune", parents=[common], help="evict least recently used entries")
    prune.add_argument(
        "--max-size", metavar="SIZE", help="target size (e.g. 20GiB; default: MODEL_LOADER_MAX_CACHE_SIZE)"
    )

    sub.add_parser("demo", parents=[common], help="run the self-contained demo (no server needed)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``model-loader`` console script."""
    args = _parser().parse_args(argv)
    # Default: the command's own one-line outcome on stderr; library logs with -v / --debug.
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.CRITICAL
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "fetch":
            return _fetch(args)
        if args.command == "cache":
            return _cache(args)
        from model_loader.demo import run_demo

        return run_demo(cache_dir=args.cache_dir)
    except Exception as exc:  # one clear line on stderr; the traceback only with --debug
        if args.debug:
            raise
        return _report(exc)


def _report(exc: BaseException) -> int:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        from model_loader.config import validation_message

        print(f"model-loader: invalid configuration: {validation_message(exc)}", file=sys.stderr)
        return 2
    if isinstance(exc, AllSourcesFailedError):
        detail = "; ".join(f"{uri}: {type(err).__name__}: {_first_line(err)}" for uri, err in exc.failures)
        print(f"model-loader: {_first_line(exc)}" + (f": {detail}" if detail else ""), file=sys.stderr)
        return 1
    if isinstance(exc, InvalidReferenceError | ValueError):
        print(f"model-loader: {_first_line(exc)}", file=sys.stderr)
        return 2
    if isinstance(exc, CacheError):
        print(f"model-loader: cache error: {_first_line(exc)}", file=sys.stderr)
        return 3
    if isinstance(exc, ModelLoaderError):
        print(f"model-loader: {type(exc).__name__}: {_first_line(exc)}", file=sys.stderr)
        return 1
    print(f"model-loader: unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --debug)", file=sys.stderr)
    return 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _config(args: argparse.Namespace, **overrides: Any) -> LoaderConfig:
    from model_loader.config import CacheConfig, LoaderConfig

    base = LoaderConfig.from_env()
    cache_changes: dict[str, Any] = {}
    if getattr(args, "cache_dir", None) is not None:
        cache_changes["dir"] = args.cache_dir
    if getattr(args, "verify", None):
        cache_changes["verify"] = args.verify
    if cache_changes:
        overrides["cache"] = CacheConfig(**{**base.cache.model_dump(), **cache_changes})
    return LoaderConfig(**{**base.model_dump(), **overrides}) if overrides else base


def _fetch(args: argparse.Namespace) -> int:
    from model_loader.loader import ResilientLoader

    overrides: dict[str, Any] = {}
    if args.timeout is not None:
        overrides["deadline"] = args.timeout
    if args.offline:
        overrides["offline"] = True
    if args.include:
        overrides["include"] = tuple(args.include)
    if args.exclude:
        overrides["exclude"] = tuple(args.exclude)
    config = _config(args, **overrides)
    observer = _Progress() if (sys.stderr.isatty() and not args.no_progress and not args.quiet) else None
    with ResilientLoader(args.uris, config=config, observer=observer) as loader:
        result = loader.fetch()
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True))
    else:
        print(result.path)
    if result.degraded:
        print(
            f"model-loader: warning: degraded: served last-known-good {result.source} version {result.version}",
            file=sys.stderr,
        )
    return 0


def _cache(args: argparse.Namespace) -> int:
    from model_loader._cache import DiskCache
    from model_loader.config import parse_size

    config = _config(args)
    cache = DiskCache(config.cache.dir, max_size=config.cache.max_size, lock_timeout=config.cache.lock_timeout)
    if args.cache_command == "ls":
        rows = cache.entries()
        refs: dict[str, list[str]] = {}
        for rec in cache.refs():
            refs.setdefault(rec.key, []).append(rec.ref)
        if args.json:
            out = [
                {
                    "key": e.key,
                    "path": str(e.path),
                    "source": e.source,
                    "version": e.version,
                    "digest": e.digest,
                    "size": e.size,
                    "files": len(e.manifest.files),
                    "last_used": used,
                    "refs": refs.get(e.key, []),
                }
                for e, used in rows
            ]
            print(json.dumps(out, indent=1))
            return 0
        print(f"{'KEY':<12} {'SIZE':>10} {'LAST USED':<19} {'VERSION':<24} SOURCE")
        for e, used in rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(used))
            version = e.version if len(e.version) <= 24 else e.version[:21] + "..."
            print(f"{e.key[:12]:<12} {_human(e.size):>10} {when:<19} {version:<24} {e.source}")
        print(f"{len(rows)} entries, {_human(sum(e.size for e, _ in rows))} in {cache.root}")
        return 0
    if args.cache_command == "verify":
        problems = cache.verify_all("full")
        for key, problem in problems:
            print(f"corrupt: {key}: {problem} (quarantined)")
        print(f"verified {len(cache.entries()) + len(problems)} entries: {len(problems)} corrupt")
        return 1 if problems else 0
    limit = parse_size(args.max_size) if args.max_size else config.cache.max_size
    if limit is None:
        raise ValueError("cache prune needs --max-size or MODEL_LOADER_MAX_CACHE_SIZE")
    evicted = cache.prune(limit)
    for e in evicted:
        print(f"evicted {e.key[:12]} {e.version} ({_human(e.size)})")
    print(f"cache is {_human(cache.total_size())} (limit {_human(limit)}); evicted {len(evicted)}")
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


class _Progress:
    """A progress bar on stderr, fed by polling the staging directory's size."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fetch_started(self, source: str, staging: Path, expected_bytes: int | None) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._draw, args=(source, staging, expected_bytes), daemon=True)
        self._thread.start()

    def fetch_finished(self, source: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        sys.stderr.write("\n")

    def _draw(self, source: str, staging: Path, expected: int | None) -> None:
        start = time.monotonic()
        last = False
        while not last:
            last = self._stop.wait(0.2)  # one final draw after the download ends: the bar shows 100%
            done = 0
            for dirpath, _, names in os.walk(staging):
                for name in names:
                    try:
                        done += os.stat(os.path.join(dirpath, name)).st_size
                    except FileNotFoundError:
                        continue  # the staging is being cleaned between attempts
            rate = done / max(time.monotonic() - start, 1e-6)
            if expected:
                width = 30
                filled = int(width * min(done / expected, 1.0))
                bar = "#" * filled + "-" * (width - filled)
                text = f"\r{source} [{bar}] {_human(done)}/{_human(expected)} {_human(rate)}/s"
            else:
                text = f"\r{source} {_human(done)} {_human(rate)}/s"
            sys.stderr.write(text)
            sys.stderr.flush()
