"""The ``model-loader`` command: fetch models (init containers), care for the cache, benchmark, demo.

Exit codes: 0 success; 1 failure (no source delivered, corrupt cache found, a server answered
with something malformed); 2 bad input (usage, reference, configuration); 3 cache unusable
(full, locked, not writable).

Start-up is most of a warm ``fetch``, so this module imports only the standard library and
model_loader's light modules: references are parsed before the loader, pydantic or any SDK is
imported, and logging is set up only as far as the flags ask.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model_loader import __version__
from model_loader._redact import RedactingFilter, redact
from model_loader._redact import environment_secrets as _environment_secrets
from model_loader.errors import AllSourcesFailedError, CacheError, InvalidReferenceError, ModelLoaderError

if TYPE_CHECKING:
    from model_loader._settings import Settings
    from model_loader.config import LoaderConfig

__all__ = ["main"]

_FETCH_EPILOG = """\
output: the model directory's path, or with --json one object with
  path, source, ref, version, digest  what was served (version is immutable; digest is
                                      sha256 over the files' paths, sizes and hashes)
  from_cache, degraded, offline       served without downloading / as last-known-good
                                      because every source failed / in offline mode
  verified                            every file checked against a hash or checksum its
                                      origin published (not only its size)
  size, downloaded                    bytes of the model / bytes downloaded for this run
  timings                             seconds: resolve, fetch, verify, deserialize, total
  retries                             {source: retries it needed}
  failures                            [{source, error}] of the sources that failed first

exit codes: 0 served; 1 every source failed; 2 bad reference, option or configuration;
3 cache unusable (full, locked, not writable)
"""

# SDK loggers whose wire logs --debug-sdk turns on (they log headers, signing steps and URLs).
_SDK_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "requests", "mlflow")


class _UsageError(Exception):
    """A command line that cannot be run as given (exit 2)."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def _size(text: str) -> int:
    from model_loader.config import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (top-level options take no values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _parser(bench: Any = None) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir", type=Path, help="cache root (default: $MODEL_LOADER_CACHE_DIR or ~/.cache/model_loader)"
    )
    common.add_argument(
        "--debug", action="store_true", help="log model_loader's debug details and show tracebacks (no SDK logs)"
    )
    common.add_argument(
        "--debug-sdk",
        action="store_true",
        help="--debug plus the SDKs' wire logs (botocore, urllib3, mlflow), credentials redacted",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log retries, fallbacks and cache events")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar or warnings")

    parser = argparse.ArgumentParser(
        prog="model-loader", description="Load ML models: pinned, cached, verified, resilient."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fetch = sub.add_parser(
        "fetch",
        parents=[common],
        help="fetch a model into the cache and print its path",
        description="Fetch a model into the cache (or find it there) and print where it is.",
        epilog=_FETCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fetch.add_argument(
        "uris", nargs="*", metavar="URI", help="sources, tried in order (models:/, s3://, file://, paths)"
    )
    fetch.add_argument(
        "--lock",
        type=Path,
        metavar="FILE",
        help="serve exactly the versions a lock file records (made by `model-loader lock`), instead of URIs",
    )
    fetch.add_argument(
        "--timeout",
        type=_seconds,
        metavar="SECONDS",
        help="deadline for the whole fetch, every source and retry included (default: MODEL_LOADER_DEADLINE)",
    )
    fetch.add_argument("--offline", action="store_true", help="serve only from the cache; no network")
    fetch.add_argument("--json", action="store_true", help="print one JSON object describing what was served")
    fetch.add_argument("--verify", choices=["fast", "full"], help="cache-hit verification (default: fast)")
    fetch.add_argument(
        "--require-verified",
        action="store_true",
        help="refuse a model unless every file was checked against a hash or checksum its origin published",
    )
    fetch.add_argument(
        "--include", action="append", default=[], metavar="GLOB", help="only files matching (repeatable)"
    )
    fetch.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="skip files matching (repeatable)"
    )
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")

    lock = sub.add_parser(
        "lock",
        parents=[common],
        help="record what references resolve to now, as a lock file",
        description="Fetch each model and print a lock file recording its source, version, digest and files. "
        "Each argument is one model; separate a model's sources, in order, with commas.",
    )
    lock.add_argument("models", nargs="+", metavar="URI[,URI...]", help="one model: its sources, comma-separated")
    lock.add_argument("-o", "--output", type=Path, metavar="FILE", help="write here instead of standard output")
    lock.add_argument("--timeout", type=_seconds, metavar="SECONDS", help="deadline for each model")

    cache = sub.add_parser("cache", help="inspect, verify or prune the cache")
    csub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    ls = csub.add_parser("ls", parents=[common], help="list cached models")
    ls.add_argument("--json", action="store_true")
    csub.add_parser("verify", parents=[common], help="hash every cached file; quarantine corrupt entries")
    prune = csub.add_parser("prune", parents=[common], help="evict least recently used entries")
    prune.add_argument(
        "--max-size",
        type=_size,
        metavar="SIZE",
        help="target size (e.g. 20GiB; default: MODEL_LOADER_MAX_CACHE_SIZE)",
    )

    _add_bench(sub, common, bench)
    sub.add_parser("demo", parents=[common], help="run the self-contained demo (no server needed)")
    return parser


_BENCH_HELP = "time loading URIs: cold, warm, and against what users do today"
_BENCH_MODULE = "model_loader._bench_cli"


def _bench_module() -> Any:
    """``model_loader._bench_cli`` (imported only when ``bench`` runs), or None if it is not installed."""
    import importlib

    try:
        return importlib.import_module(_BENCH_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != _BENCH_MODULE:
            raise
        return None


def _add_bench(sub: Any, common: argparse.ArgumentParser, bench: Any) -> None:
    if bench is not None:
        bench.add_parser(sub, common)
    else:  # listed in --help; main() answers before parsing when it is asked for
        sub.add_parser("bench", help=_BENCH_HELP, add_help=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``model-loader`` console script."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    wants_bench = _command_of(arguments) == "bench"
    bench: Any = _bench_module() if wants_bench else None
    if wants_bench and bench is None:
        return _report(_UsageError(f"the bench command is not available in this installation ({_BENCH_MODULE})"))
    args = _parser(bench).parse_args(arguments)
    args.debug_sdk = getattr(args, "debug_sdk", False)
    args.debug = getattr(args, "debug", False) or args.debug_sdk
    args.verbose = getattr(args, "verbose", False)
    _setup_logging(args)
    try:
        if args.command == "fetch":
            return _fetch_locked(args) if args.lock is not None else _fetch(args)
        if args.command == "lock":
            return _lock(args)
        if args.command == "cache":
            return _cache(args)
        if args.command == "bench":
            result: int = bench.run(args)
            return result
        from model_loader.demo import run_demo

        return run_demo(cache_dir=args.cache_dir)
    except Exception as exc:  # one clear line on stderr; the traceback too with --debug
        return _report(exc, debug=args.debug)


# -- logging -----------------------------------------------------------------------------------


def _setup_logging(args: argparse.Namespace) -> None:
    """Our one-line outcome by default; model_loader's logs with -v / --debug; SDK logs with --debug-sdk."""
    import logging

    root = logging.getLogger()
    if not (args.verbose or args.debug):
        # A handler that drops everything: without one, Python prints WARNING records itself.
        root.addHandler(logging.NullHandler())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(logging.WARNING)  # other libraries: warnings only
    logging.getLogger("model_loader").setLevel(logging.DEBUG if args.debug else logging.INFO)
    if args.debug_sdk:
        for name in _SDK_LOGGERS:
            logging.getLogger(name).setLevel(logging.DEBUG)


# -- reporting ---------------------------------------------------------------------------------


def _report(exc: BaseException, *, debug: bool = False) -> int:
    code, line = _outcome(exc)
    secrets = _environment_secrets()
    if debug:
        import traceback

        sys.stderr.write(redact("".join(traceback.format_exception(exc)), secrets))
    print(redact(line, secrets), file=sys.stderr)
    return code


def _outcome(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line for an error. Exit 2 is for the user's input only."""
    pydantic_core = sys.modules.get("pydantic_core")
    if pydantic_core is not None and isinstance(exc, pydantic_core.ValidationError):
        from model_loader.config import validation_message

        return 2, f"model-loader: invalid configuration: {validation_message(exc)}"
    if isinstance(exc, AllSourcesFailedError):
        detail = "; ".join(f"{uri}: {type(err).__name__}: {_first_line(err)}" for uri, err in exc.failures)
        return 1, f"model-loader: {_first_line(exc)}" + (f": {detail}" if detail else "")
    if isinstance(exc, InvalidReferenceError | _UsageError):
        return 2, f"model-loader: {_first_line(exc)}"
    if isinstance(exc, CacheError):
        return 3, f"model-loader: cache error: {_first_line(exc)}"
    if isinstance(exc, ModelLoaderError):
        return 1, f"model-loader: {type(exc).__name__}: {_first_line(exc)}"
    return 1, f"model-loader: unexpected {type(exc).__name__}: {_first_line(exc)} (rerun with --debug)"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- commands ----------------------------------------------------------------------------------


def _config(args: argparse.Namespace, **overrides: Any) -> LoaderConfig | Settings:
    """The loader's settings from the environment, with the command line's cache settings
    taking the variables' place (plain values skip pydantic: see model_loader._settings)."""
    from model_loader._settings import settings_from_env

    environ = dict(os.environ)
    flags = {
        "MODEL_LOADER_CACHE_DIR": getattr(args, "cache_dir", None),
        "MODEL_LOADER_VERIFY": getattr(args, "verify", None),
    }
    for name, value in flags.items():
        if value is not None:
            for key in [k for k in environ if k.upper() == name]:
                del environ[key]
            environ[name] = os.fspath(value)
    return settings_from_env(environ, **overrides)


def _lock(args: argparse.Namespace) -> int:
    from model_loader._uri import parse_ref

    models = [[part.strip() for part in arg.split(",") if part.strip()] for arg in args.models]
    for sources in models:
        if not sources:
            raise _UsageError("an empty model: give each model one or more URIs, comma-separated")
        for uri in sources:
            parse_ref(uri)
    overrides = {"deadline": args.timeout} if args.timeout is not None else {}
    from model_loader.lockfile import lock

    text = lock(models, _config(args, **overrides)).dumps()
    if args.output is not None:
        args.output.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _fetch_locked(args: argparse.Namespace) -> int:
    if args.uris:
        raise _UsageError("give either URIs or --lock FILE, not both")
    from model_loader.lockfile import LockFile

    try:
        text = args.lock.read_text()
    except OSError as exc:
        raise _UsageError(f"cannot read the lock file {args.lock}: {exc.strerror or exc}") from exc
    locked = LockFile.loads(text)
    overrides: dict[str, Any] = {}
    if args.timeout is not None:
        overrides["deadline"] = args.timeout
    if args.offline:
        overrides["offline"] = True
    config = _config(args, **overrides)
    from model_loader.loader import ResilientLoader

    results = []
    for model in locked.models:
        with ResilientLoader.from_lock(model, config=config) as loader:
            results.append(loader.fetch())
    if args.json:
        import json

        print(json.dumps([r.to_dict() for r in results], sort_keys=True))
    else:
        for r in results:
            print(r.path)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from model_loader._uri import parse_ref

    if not args.uris:
        raise _UsageError("give one or more URIs, or --lock FILE")
    refs = [parse_ref(uri) for uri in args.uris]  # bad input fails here, before anything heavy is imported
    overrides: dict[str, Any] = {}
    if args.timeout is not None:
        overrides["deadline"] = args.timeout
    if args.offline:
        overrides["offline"] = True
    if args.require_verified:
        overrides["require_verified"] = True
    if args.include:
        overrides["include"] = tuple(args.include)
    if args.exclude:
        overrides["exclude"] = tuple(args.exclude)
    config = _config(args, **overrides)
    from model_loader.loader import ResilientLoader

    observer = _Progress() if (sys.stderr.isatty() and not args.no_progress and not args.quiet) else None
    with ResilientLoader(refs, config=config, observer=observer) as loader:
        result = loader.fetch()
    if args.json:
        import json

        out = result.to_dict()
        if result.failures:
            secrets = _environment_secrets()
            out["failures"] = [{"source": s, "error": redact(e, secrets)} for s, e in result.failures]
        print(json.dumps(out, sort_keys=True))
    else:
        print(result.path)
    if result.degraded:
        print(
            f"model-loader: warning: degraded: served last-known-good {result.source} version {result.version}",
            file=sys.stderr,
        )
    return 0


def _cache(args: argparse.Namespace) -> int:
    import json

    from model_loader._cache import DiskCache

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
    limit = args.max_size if args.max_size is not None else config.cache.max_size
    if limit is None:
        raise _UsageError("cache prune needs --max-size or MODEL_LOADER_MAX_CACHE_SIZE")
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
    """A progress bar on stderr, fed with the bytes of a download as they arrive.

    The loader calls :meth:`fetch_progress` from download threads; a drawing thread redraws
    every ``interval`` seconds and once more when the download ends, so the bar ends on its
    final count. Files on disk are never looked at (preallocated files would read as done).
    """

    def __init__(self, interval: float = 0.2) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = 0
        self._expected: int | None = None
        self._source = ""
        self._start = 0.0

    def fetch_started(self, source: str, staging: Path, expected_bytes: int | None) -> None:
        with self._lock:
            self._done, self._expected, self._source, self._start = 0, expected_bytes, source, time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="model-loader-progress", daemon=True)
        self._thread.start()

    def fetch_progress(self, source: str, nbytes: int) -> None:
        with self._lock:
            self._done += nbytes

    def fetch_finished(self, source: str) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        sys.stderr.write("\n")
        sys.stderr.flush()

    def _run(self) -> None:
        last = False
        while not last:
            last = self._stop.wait(self._interval)  # a final draw after the end: the bar shows the total
            sys.stderr.write(self._line())
            sys.stderr.flush()

    def _line(self) -> str:
        with self._lock:
            done, expected, source, start = self._done, self._expected, self._source, self._start
        rate = done / max(time.monotonic() - start, 1e-6)
        if expected:
            done = min(done, expected)  # a retried part counts twice; the bar never passes the total
            width = 30
            filled = int(width * done / expected)
            bar = "#" * filled + "-" * (width - filled)
            return f"\r{source} [{bar}] {_human(done)}/{_human(expected)} {_human(rate)}/s"
        return f"\r{source} {_human(done)} {_human(rate)}/s"
