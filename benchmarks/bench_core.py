"""Core benchmarks: import cost, local cold/warm fetch vs copytree/stat, memory hits.

Every figure is compared with its baseline in the same run; ratios are what to quote.

    python benchmarks/bench_core.py [--runs 5] [--json out.json] [--big-mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def make_big(root: Path, big_mib: int, small: int = 200) -> Path:
    """One ``big_mib`` MiB file and ``small`` 4 KiB files (the "big" model of BASELINES.md)."""
    model = root / "big"
    (model / "small").mkdir(parents=True)
    chunk = os.urandom(1024 * 1024)
    with open(model / "weights.bin", "wb") as f:
        for _ in range(big_mib):
            f.write(chunk)
    for i in range(small):
        (model / "small" / f"part-{i:03d}.bin").write_bytes(os.urandom(4096))
    return model


def median_time(fn: Callable[[], Any], runs: int, setup: Callable[[], Any] | None = None) -> float:
    times = []
    for _ in range(runs):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fresh_process_seconds(code: str, runs: int) -> float:
    """Median wall time of ``code`` measured inside fresh interpreters (import cost)."""
    out = []
    for _ in range(runs):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        out.append(float(res.stdout.strip()))
    return statistics.median(out)


def stat_every_file(root: Path) -> int:
    n = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            os.stat(os.path.join(dirpath, name))
            n += 1
    return n


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def run(runs: int, big_mib: int) -> dict[str, Any]:
    from model_loader import CacheConfig, LoaderConfig, ResilientLoader

    results: dict[str, Any] = {"machine": machine(), "runs": runs, "model": f"{big_mib} MiB + 200 x 4 KiB"}
    imp = fresh_process_seconds(
        "import time; t=time.perf_counter(); import model_loader; print(time.perf_counter()-t)", runs
    )
    results["import_model_loader_s"] = imp

    with tempfile.TemporaryDirectory(prefix="ml-bench-core-") as tmp:
        work = Path(tmp)
        model = make_big(work, big_mib)
        stat_every_file(model)  # warm the page cache for both contenders

        dest = work / "copy"

        def copytree() -> None:
            shutil.copytree(model, dest)

        t_copy = median_time(copytree, runs, setup=lambda: shutil.rmtree(dest, ignore_errors=True))

        cache_dir = work / "cache"

        def cold() -> None:
            with ResilientLoader([str(model)], config=LoaderConfig(cache=CacheConfig(dir=cache_dir))) as loader:
                assert loader.fetch().from_cache is False

        t_cold = median_time(cold, runs, setup=lambda: shutil.rmtree(cache_dir, ignore_errors=True))

        loader = ResilientLoader([str(model)], config=LoaderConfig(cache=CacheConfig(dir=cache_dir)))
        loader.fetch()
        warm_runs = max(runs * 20, 50)
        t_warm = median_time(lambda: loader.fetch(), warm_runs)
        t_stat = median_time(lambda: stat_every_file(model), warm_runs)
        cached = loader.fetch().path
        t_stat_cached = median_time(lambda: stat_every_file(cached), warm_runs)

        def read_model(path: Path) -> int:
            return len((path / "small" / "part-000.bin").read_bytes())

        loader.load(read_model)
        t_load_resolving = median_time(lambda: loader.load(read_model), warm_runs)
        ttl_loader = ResilientLoader(
            [str(model)], config=LoaderConfig(cache=CacheConfig(dir=cache_dir), resolve_ttl=3600)
        )
        ttl_loader.load(read_model)
        n = 100_000
        t0 = time.perf_counter()
        for _ in range(n):
            ttl_loader.load(read_model)
        t_memory_hit = (time.perf_counter() - t0) / n
        loader.close()
        ttl_loader.close()

    results.update(
        {
            "cold_fetch_s": t_cold,
            "copytree_s": t_copy,
            "cold_vs_copytree": t_cold / t_copy,
            "warm_fetch_s": t_warm,
            "stat_every_file_s": t_stat,
            "stat_every_cached_file_s": t_stat_cached,
            "warm_vs_stat": t_warm / t_stat,
            "load_memory_hit_resolving_s": t_load_resolving,
            "load_memory_hit_within_ttl_s": t_memory_hit,
        }
    )
    return results


def table(r: dict[str, Any]) -> str:
    rows = [
        ("import model_loader (fresh process)", f"{r['import_model_loader_s'] * 1000:.1f} ms", "goal < 100 ms"),
        ("cold fetch (local dir, into cache)", f"{r['cold_fetch_s']:.3f} s", ""),
        ("shutil.copytree of the same", f"{r['copytree_s']:.3f} s", f"ratio {r['cold_vs_copytree']:.2f}x"),
        ("warm fetch (resolve + disk hit)", f"{r['warm_fetch_s'] * 1000:.2f} ms", ""),
        (
            "os.stat of every file (walk)",
            f"{r['stat_every_file_s'] * 1000:.2f} ms",
            f"ratio {r['warm_vs_stat']:.2f}x (goal <= 2x)",
        ),
        (
            "load() memory hit, re-resolving",
            f"{r['load_memory_hit_resolving_s'] * 1e6:.0f} us",
            "resolve_ttl=0 (default)",
        ),
        ("load() memory hit within resolve_ttl", f"{r['load_memory_hit_within_ttl_s'] * 1e6:.2f} us", "goal < 20 us"),
    ]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"core benchmarks ({r['model']}, median of {r['runs']} runs, {r['machine']['cpus']} CPUs)"]
    lines += [f"  {a:<{width}}  {b:>12}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = run(args.runs, args.big_mib)
    print(json.dumps(results, indent=1))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
