"""``model-loader demo``: a self-contained tour, no server to set up.

A toy model is published to an in-memory "registry" and mirrored to a directory. It is
loaded cold, warm, with the registry down (fallback to the mirror), and with every source
down (last-known-good, degraded). S3 and MLflow steps follow when their extras are present.
"""

from __future__ import annotations

import importlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model_loader._types import FetchResult

__all__ = ["Report", "run_demo"]

Report = Callable[[str, "FetchResult | None", float, str], None]

_TOY_MODEL = {"kind": "linear", "weights": [0.4, -1.2, 0.7], "bias": 0.1}


def _load_toy(path: Path) -> Callable[[list[float]], float]:
    spec = json.loads((path / "model.json").read_text())

    def predict(x: list[float]) -> float:
        return float(sum(w * v for w, v in zip(spec["weights"], x, strict=True)) + spec["bias"])

    return predict


class _Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, ...]] = []
        print(f"{'STEP':<36} {'SOURCE':<30} {'VERSION':<12} {'CACHE':<5} {'DEGRADED':<8} {'TIME':>9}  NOTE")
        sys.stdout.flush()

    def report(self, step: str, result: FetchResult | None, seconds: float, note: str = "") -> None:
        if result is None:
            row: tuple[str, ...] = (step, "-", "-", "-", "-", "-", note)
        else:
            if not note and result.failures:
                note = f"{len(result.failures)} source(s) failed first"
            row = (
                step,
                _clip(result.source, 30),
                _clip(result.version, 12),
                "hit" if result.from_cache else "miss",
                "yes" if result.degraded else "no",
                f"{seconds * 1000:.1f} ms",
                note,
            )
        self.rows.append(row)
        print(f"{row[0]:<36} {row[1]:<30} {row[2]:<12} {row[3]:<5} {row[4]:<8} {row[5]:>9}  {row[6]}")
        sys.stdout.flush()


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _core_demo(work: Path, cache_dir: Path, report: Report) -> None:
    from model_loader.config import CacheConfig, LoaderConfig, RetryPolicy
    from model_loader.loader import ResilientLoader
    from model_loader.testing import InMemorySource

    files = {"model.json": json.dumps(_TOY_MODEL).encode(), "README.txt": b"a toy linear model\n"}
    registry = InMemorySource("demo-registry")
    ref = registry.publish("toy", files, alias="prod")
    mirror = work / "mirror" / "toy"
    mirror.mkdir(parents=True)
    for name, data in files.items():
        (mirror / name).write_bytes(data)

    config = LoaderConfig(
        cache=CacheConfig(dir=cache_dir),
        retry=RetryPolicy(attempts=2, initial_backoff=0.05, max_backoff=0.1, jitter=0.0),
    )

    def load(step: str) -> None:
        with ResilientLoader([(registry, ref), str(mirror)], config=config, loader_fn=_load_toy) as loader:
            t0 = time.perf_counter()
            model = loader.load()
            elapsed = time.perf_counter() - t0
            assert loader.last_result is not None
            report(step, loader.last_result, elapsed, "")
            model([1.0, 2.0, 3.0])

    load("cold: registry")
    load("warm: registry, disk cache hit")
    registry.set_available(False)
    load("registry down: fallback to mirror")
    shutil.rmtree(mirror)
    load("all sources down: last-known-good")


def run_demo(cache_dir: Path | None = None) -> int:
    """Run every demo step and print one table row per load."""
    work = Path(tempfile.mkdtemp(prefix="model-loader-demo-"))
    cache = cache_dir or work / "cache"
    table = _Table()
    try:
        _core_demo(work, cache, table.report)
        for module, func in (
            ("model_loader._demo_s3", "run_s3_demo"),
            ("model_loader._demo_mlflow", "run_mlflow_demo"),
        ):
            try:
                step: Any = getattr(importlib.import_module(module), func)
            except ImportError as exc:
                table.report(module.rsplit("_", 1)[-1] + ": skipped", None, 0.0, f"not available: {exc}")
                continue
            sub = work / module.rsplit("_", 1)[-1]
            sub.mkdir()
            step(sub, cache, table.report)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{len(table.rows)} steps; cache was {cache if cache_dir else 'a temporary directory (removed)'}")
    return 0
