"""``model-loader bench URI...``: how long your model takes to load, cold and warm, step by step.

Every run is a fresh Python process, as a (re)started service is: cold runs load into a
fresh temporary cache each (resolve, download, verify, deserialize); warm runs load from the
last cold run's cache (resolve, verify the disk entry, deserialize). ``import`` is the time
to import mlflow.pyfunc; ``deserialize`` includes importing the model's flavor (sklearn...),
as it does after a restart; ``process`` is the whole run, interpreter start-up included.
The temporary caches are made under ``--cache-dir`` (default: the system's temporary
directory), so pointing it at the cache's volume measures that disk; the real cache is
never read or written. Prints a table, or one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["add_parser", "run"]

_STEPS = ("import", "resolve", "fetch", "verify", "deserialize", "total", "process")
_MIB = 1024 * 1024


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    """Add the ``bench`` command; ``common`` carries ``--cache-dir``, ``-v``, ``--debug``, ``-q``."""
    parser = subparsers.add_parser(
        "bench",
        parents=[common],
        help="time cold and warm loads of a model: resolve, fetch, verify, deserialize",
        description=__doc__.split("\n\n", 1)[1].replace("``", "") if __doc__ else None,
    )
    parser.add_argument("uris", nargs="+", metavar="URI", help="sources, tried in order (models:/, s3://, paths)")
    parser.add_argument(
        "--loader-fn",
        choices=["pyfunc", "none"],
        default="pyfunc",
        help="deserialize with mlflow.pyfunc (default), or only fetch the files (none)",
    )
    parser.add_argument("--repeat", type=_positive, default=3, metavar="N", help="cold and warm runs each (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` and print it.

    Returns:
        0, or the failing run's exit code (1: no source delivered; 2: bad input; 3: cache
        unusable) after its one-line error on stderr.
    """
    parent = Path(args.cache_dir) if args.cache_dir is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    cache = Path(tempfile.mkdtemp(prefix="model-loader-bench-", dir=parent))
    try:
        for phase in ("cold", "warm"):
            for i in range(args.repeat):
                if phase == "cold" and i:
                    shutil.rmtree(cache, ignore_errors=True)
                    cache = Path(tempfile.mkdtemp(prefix="model-loader-bench-", dir=parent))
                row = _run_child(args, cache)
                if "error" in row:
                    print(f"model-loader: bench: {phase} run {i + 1}: {row['error']}", file=sys.stderr)
                    return int(row["exit"])
                runs.append({"phase": phase, "run": i + 1, **row})
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    last = runs[-1]
    report = {
        "sources": list(args.uris),
        "source": last["source"],
        "version": last["version"],
        "digest": last["digest"],
        "size": last["size"],
        "loader_fn": args.loader_fn,
        "runs": [{k: v for k, v in r.items() if k not in ("source", "version", "digest", "size")} for r in runs],
        "median": {phase: _median([r for r in runs if r["phase"] == phase]) for phase in ("cold", "warm")},
    }
    print(json.dumps(report, sort_keys=True) if args.json else _table(report))
    return 0


def _run_child(args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    spec = {"uris": list(args.uris), "cache": str(cache), "loader_fn": args.loader_fn}
    level = "DEBUG" if args.debug else "INFO" if args.verbose else "CRITICAL"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "model_loader._bench_cli", json.dumps(spec), level],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    process = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if not lines:
        return {"error": f"the run exited with {proc.returncode} and no result", "exit": 1}
    row: dict[str, Any] = json.loads(lines[-1])
    row["process"] = process
    return row


def _child(spec: dict[str, Any], level: str) -> int:
    """One run, in its own process: print one JSON line describing it."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        t0 = time.perf_counter()
        fn = None
        if spec["loader_fn"] == "pyfunc":
            fn = _import_pyfunc()
        imported = time.perf_counter() - t0 if fn is not None else 0.0
        from model_loader.config import LoaderConfig
        from model_loader.loader import ResilientLoader

        base = LoaderConfig.from_env()
        config = base.model_copy(update={"cache": base.cache.model_copy(update={"dir": Path(spec["cache"])})})
        with ResilientLoader(spec["uris"], config=config) as loader:
            result = loader.load_with_result(fn).result if fn is not None else loader.fetch()
    except Exception as exc:
        if level == "DEBUG":
            logging.getLogger(__name__).exception("the run failed")
        print(json.dumps({"error": _one_line(exc), "exit": _exit_code(exc)}))
        return 1
    t = result.timings
    out: dict[str, Any] = {"import": imported, **t.as_dict()}
    out.update(
        source=result.source,
        version=result.version,
        digest=result.digest,
        size=result.size,
        from_cache=result.from_cache,
        degraded=result.degraded,
        downloaded=result.downloaded,
        mib_per_s=result.downloaded / _MIB / t.fetch if result.downloaded and t.fetch > 0 else None,
    )
    print(json.dumps(out))
    return 0


def _import_pyfunc() -> Any:
    from model_loader.errors import MissingDependencyError

    try:
        import mlflow.pyfunc  # noqa: F401 - timed on its own
    except ImportError as exc:
        raise MissingDependencyError(
            "--loader-fn pyfunc needs mlflow: pip install 'model-loader[mlflow]', or use --loader-fn none",
            extra="mlflow",
        ) from exc
    from model_loader.loader import default_model_loader

    return default_model_loader


def _one_line(exc: BaseException) -> str:
    from model_loader.errors import AllSourcesFailedError

    if isinstance(exc, AllSourcesFailedError):
        detail = "; ".join(f"{uri}: {type(err).__name__}: {_first(err)}" for uri, err in exc.failures)
        return f"every source failed: {detail}"
    return f"{type(exc).__name__}: {_first(exc)}"


def _first(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _exit_code(exc: BaseException) -> int:
    """The ``model-loader`` exit codes: 2 bad input, 3 cache unusable, else 1."""
    from pydantic import ValidationError

    from model_loader.errors import CacheError, InvalidReferenceError

    if isinstance(exc, ValidationError | InvalidReferenceError):
        return 2
    if isinstance(exc, CacheError):
        return 3
    return 1


def _median(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {step: statistics.median(r[step] for r in rows) for step in _STEPS}
    speeds = [r["mib_per_s"] for r in rows if r["mib_per_s"] is not None]
    out["mib_per_s"] = statistics.median(speeds) if speeds else None
    return out


def _table(report: dict[str, Any]) -> str:
    size = report["size"] / _MIB
    lines = [
        f"{report['source']}  version {report['version']}  {size:.2f} MiB  loader: {report['loader_fn']}",
        "",
        f"{'run':<13}" + "".join(f"{s:>12}" for s in _STEPS) + f"{'MiB/s':>10}",
    ]

    def line(label: str, row: dict[str, Any]) -> str:
        speed = f"{row['mib_per_s']:.3g}" if row["mib_per_s"] is not None else "-"
        return f"{label:<13}" + "".join(f"{row[s]:>12.4f}" for s in _STEPS) + f"{speed:>10}"

    for row in report["runs"]:
        lines.append(line(f"{row['phase']} {row['run']}", row))
    for phase, row in report["median"].items():
        lines.append(line(f"median {phase}", row))
    lines += [
        "",
        "Seconds; each run is a fresh process. cold: a fresh cache (download); warm: the filled cache, as after a",
        "restart. total: resolve to deserialized; process: the whole run. MiB/s: download rate.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(_child(json.loads(sys.argv[1]), sys.argv[2]))
