"""Serving benchmarks: the FastAPI example under load, steady versus while it reloads.

Starts a moto S3 server and an ``mlflow server`` (sqlite, artifacts in moto S3), publishes
an iris-like scikit-learn model in ``--reloads + 1`` versions, runs
``examples/fastapi_app.py`` under uvicorn, and measures, side by side in one run:

1. ``POST /predict`` from ``--clients`` concurrent keep-alive clients: throughput, p50 and
   p99 latency, failed requests, in steady segments and in the windows from each alias
   move to the first answer from the new version (fetch, deserialize and swap happen
   there), interleaved so both see the same machine; the app runs on a CPU of its own
   (``--no-pin`` to share), as it would with the registry and S3 on other machines;
2. the handle's hot path in-process: ``ServedModel.get()`` and ``use()`` against
   ``ResilientLoader.load()`` with ``resolve_ttl`` (the earlier way to serve per request);
3. a cold start of the same model with ``model-loader bench`` (fresh processes): how much
   of it is deserialization.

Goals: no failed request; p99 during reloads within 2x of steady state. Ratios are what to
quote (absolute figures drift with the machine).

    python benchmarks/bench_serving.py [--runs 3] [--json out.json] [--steady 20] [--reloads 10] [--no-pin]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_mlflow import free_port, machine, stop, wait_http

PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
NAME = "iris"


class Stack:
    """moto, one ``mlflow server`` (artifacts directly in S3) and the example app, as subprocesses."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.registry = ""
        port = free_port()
        self.s3 = f"http://127.0.0.1:{port}"
        os.environ.update(AWS, MLFLOW_S3_ENDPOINT_URL=self.s3)  # this process publishes to S3 through MLflow
        self._spawn("moto", [PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
        wait_http(self.s3 + "/moto-api/", self.procs[-1])
        import boto3

        boto3.client("s3", endpoint_url=self.s3, region_name="us-east-1").create_bucket(Bucket="bench")
        port = free_port()
        self.registry = f"http://127.0.0.1:{port}"
        cmd = [PY, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{work / 'mlflow.db'}"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        cmd += ["--default-artifact-root", "s3://bench/artifacts", "--no-serve-artifacts"]
        self._spawn("mlflow", cmd, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_http(self.registry + "/health", self.procs[-1])

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODEL_LOADER_", "AWS_"))}
        env.update(AWS, MLFLOW_S3_ENDPOINT_URL=self.s3, MLFLOW_TRACKING_URI=self.registry, **extra)
        return env

    def _spawn(self, name: str, cmd: list[str], extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.work / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=self.work, env=self.env(**(extra or {})), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.procs.append(proc)
        return proc

    def start_app(self, interval: float) -> str:
        port = free_port()
        cmd = [PY, "-m", "uvicorn", "--app-dir", str(ROOT / "examples"), "fastapi_app:app"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        env = {
            "MODEL_LOADER_SOURCES": f"models:/{NAME}@prod",
            "MODEL_LOADER_CACHE_DIR": str(self.work / "app-cache"),
            "MODEL_LOADER_RELOAD_INTERVAL": str(interval),
        }
        proc = self._spawn("app", cmd, env)
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", proc)
        deadline = time.monotonic() + 120
        import httpx

        while httpx.get(url + "/readyz").status_code != 200:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the app did not become ready:\n{(self.work / 'app.log').read_text()[-3000:]}")
            time.sleep(0.1)
        return url

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


def publish(registry: str, shift: int) -> str:
    """An iris-like model (150 x 4 features, 3 classes); ``shift`` permutes its classes."""
    import mlflow
    import mlflow.sklearn
    import numpy as np
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 4))
    y = ((x[:, 0] > 0).astype(int) + (x[:, 1] > 1).astype(int) + shift) % 3
    model = LogisticRegression(max_iter=300).fit(x, y)
    mlflow.set_tracking_uri(registry)
    try:
        with contextlib.redirect_stdout(io.StringIO()), mlflow.start_run():  # no "View run at" lines
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                registered_model_name=NAME,
                signature=infer_signature(x, model.predict(x)),
                pip_requirements=["scikit-learn"],  # inferring them runs the model in a subprocess
            )
    finally:
        mlflow.set_tracking_uri(None)  # back to unset
    return str(info.registered_model_version)


@dataclass
class Sample:
    start: float
    seconds: float
    ok: bool
    version: str | None


@dataclass
class Load:
    """``clients`` threads sending /predict back to back, each on its own keep-alive connection."""

    url: str
    clients: int
    samples: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in self._threads:
            t.start()

    def _client(self) -> None:
        import httpx

        body = {"inputs": [[0.1, -0.3, 1.2, 0.5], [1.0, 0.2, -0.7, 0.0]]}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    resp = client.post("/predict", json=body)
                    ok, version = resp.status_code == 200, resp.json().get("version")
                except (httpx.HTTPError, ValueError):
                    ok, version = False, None
                sample = Sample(t0, time.perf_counter() - t0, ok, version)
                with self._lock:
                    self.samples.append(sample)

    def since(self, t0: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.start >= t0]

    def first_with(self, version: str, after: float, timeout: float = 120.0) -> float:
        """When the first answer from ``version`` came back (started after ``after``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done = [s.start + s.seconds for s in self.samples if s.start >= after and s.version == version]
            if done:
                return min(done)
            time.sleep(0.01)
        raise RuntimeError(f"version {version} was never served")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def summary(samples: list[Sample], seconds: float) -> dict[str, Any]:
    latencies = sorted(s.seconds for s in samples if s.ok)
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "requests": len(samples),
        "failed": sum(not s.ok for s in samples),
        "seconds": seconds,
        "rps": len(samples) / seconds if seconds else 0.0,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
    }


def measure_serving(
    stack: Stack, steady: float, reloads: int, clients: int, interval: float, pin: bool
) -> dict[str, Any]:
    """Steady segments and reloads interleaved, so both see the same machine."""
    import httpx
    from mlflow import MlflowClient

    versions = [publish(stack.registry, shift) for shift in range(reloads + 1)]
    registry = MlflowClient(tracking_uri=stack.registry, registry_uri=stack.registry)
    registry.set_registered_model_alias(NAME, "prod", versions[0])
    url = stack.start_app(interval)
    cpus = sorted(os.sched_getaffinity(0))
    if pin and len(cpus) >= 2:  # the app gets a core to itself, as it would with the registry elsewhere
        os.sched_setaffinity(stack.procs[-1].pid, {cpus[-1]})
        for proc in stack.procs[:-1]:
            os.sched_setaffinity(proc.pid, set(cpus[:-1]))
        os.sched_setaffinity(0, set(cpus[:-1]))
    load = Load(url, clients)
    segments: list[tuple[float, float]] = []
    windows: list[tuple[float, float]] = []
    try:
        time.sleep(2.0)  # warm-up: connections, the first predictions
        before = httpx.get(url + "/metrics").text
        for version in versions[1:]:
            start = time.perf_counter()
            time.sleep(steady / reloads)
            segments.append((start, time.perf_counter()))
            moved = time.perf_counter()
            registry.set_registered_model_alias(NAME, "prod", version)
            windows.append((moved, load.first_with(f"{NAME}/{version}", moved)))
            time.sleep(0.3)  # the requests in flight at the swap finish (excluded from both)
        everything = load.since(0)
    finally:
        load.stop()
        os.sched_setaffinity(0, set(cpus))
    after = httpx.get(url + "/metrics").text

    def within(spans: list[tuple[float, float]]) -> list[Sample]:
        return [s for s in everything if any(a <= s.start <= b for a, b in spans)]

    return {
        "clients": clients,
        "reload_interval": interval,
        "reloads": reloads,
        "pinned": pin and len(cpus) >= 2,
        "steady": summary(within(segments), sum(b - a for a, b in segments)),
        "during_reload": summary(within(windows), sum(b - a for a, b in windows)),
        "failed_total": sum(not s.ok for s in everything),
        "requests_total": len(everything),
        "reload_windows_s": [b - a for a, b in windows],
        "reload_seconds_mean": _mean_between(before, after, "model_loader_load_duration_seconds"),
        "reload_deserialize_seconds_mean": _mean_between(before, after, "model_loader_deserialize_duration_seconds"),
    }


def _mean_between(before: str, after: str, name: str) -> float | None:
    """The mean of a histogram's observations between two scrapes."""
    (s0, c0), (s1, c1) = _sum_count(before, name), _sum_count(after, name)
    return (s1 - s0) / (c1 - c0) if c1 > c0 else None


def _sum_count(text: str, name: str) -> tuple[float, float]:
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name + "_sum":
                total += s.value
            elif s.name == name + "_count":
                count += s.value
    return total, count


def measure_hot_path(work: Path, n: int = 200_000) -> dict[str, float]:
    """ns per call: ServedModel.get() / use() versus ResilientLoader.load() with resolve_ttl."""
    from model_loader import CacheConfig, LoaderConfig, ResilientLoader
    from model_loader.serving import ServedModel

    model = work / "toy"
    model.mkdir(exist_ok=True)
    (model / "weights.bin").write_bytes(b"w" * 1024)
    config = LoaderConfig(cache=CacheConfig(dir=work / "hot-cache"), resolve_ttl=3600)

    def toy(path: Path) -> object:
        return object()

    def per_call(fn: Any) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e9

    with ServedModel([str(model)], config=config, loader_fn=toy, reload_interval=0) as served:
        served.load()

        def use() -> None:
            with served.use():
                pass

        get_ns, use_ns = per_call(served.get), per_call(use)
    with ResilientLoader([str(model)], config=config, loader_fn=toy) as loader:
        ttl_ns = per_call(loader.load)
    return {"get_ns": get_ns, "use_ns": use_ns, "loader_load_ttl_ns": ttl_ns}


def measure_cold_start(stack: Stack, runs: int) -> dict[str, Any]:
    """``model-loader bench --json`` (each run a fresh process) on the served model."""
    from model_loader import _bench_cli

    common = argparse.ArgumentParser(add_help=False)
    for flag in ("--debug", "--verbose", "--quiet"):
        common.add_argument(flag, action="store_true")
    common.add_argument("--cache-dir", type=Path)
    parser = argparse.ArgumentParser()
    _bench_cli.add_parser(parser.add_subparsers(dest="command"), common)
    args = parser.parse_args(["bench", f"models:/{NAME}@prod", "--repeat", str(runs), "--json"])
    saved = dict(os.environ)
    os.environ.update(stack.env())
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            if _bench_cli.run(args) != 0:
                raise RuntimeError("model-loader bench failed")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    report: dict[str, Any] = json.loads(out.getvalue())
    cold = report["median"]["cold"]
    report["deserialize_share"] = cold["deserialize"] / cold["total"]
    report["import_and_deserialize_share_of_process"] = (cold["import"] + cold["deserialize"]) / cold["process"]
    return report


def run(runs: int, steady: float, reloads: int, clients: int, interval: float, pin: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        work = Path(tmp)
        stack = Stack(work)
        try:
            serving = measure_serving(stack, steady, reloads, clients, interval, pin)
            cold = measure_cold_start(stack, runs)
        finally:
            stack.close()
        hot = measure_hot_path(work)
    return {"machine": machine(), "serving": serving, "hot_path": hot, "cold_start": cold}


def table(r: dict[str, Any]) -> str:
    s, d = r["serving"]["steady"], r["serving"]["during_reload"]
    sv = r["serving"]
    lines = [
        f"/predict, {sv['clients']} clients, reload interval {sv['reload_interval']}s, {sv['reloads']} reloads, "
        f"app {'on a CPU of its own' if sv['pinned'] else 'sharing the CPUs'}; steady segments between reloads",
        f"{'':<16}{'requests':>10}{'failed':>8}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}",
    ]
    for label, row in (("steady", s), ("during reload", d)):
        lines.append(
            f"{label:<16}{row['requests']:>10}{row['failed']:>8}{row['rps']:>9.0f}"
            f"{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['max_ms']:>9.1f}"
        )
    lines.append(
        f"p99 during reload / steady: {d['p99_ms'] / s['p99_ms']:.2f}x (goal <= 2x); "
        f"failed requests in all: {sv['failed_total']} of {sv['requests_total']} (goal 0)"
    )
    windows = sv["reload_windows_s"]
    lines += [
        f"alias move -> first answer from the new version: median {statistics.median(windows):.2f}s "
        "(includes up to one interval)",
        f"loading a new version in the app (resolve..deserialize): {(sv['reload_seconds_mean'] or 0) * 1000:.0f} ms "
        f"mean, of which deserialize {(sv['reload_deserialize_seconds_mean'] or 0) * 1000:.0f} ms",
    ]
    h = r["hot_path"]
    lines += [
        "",
        f"hot path: ServedModel.get() {h['get_ns']:.0f} ns, use() {h['use_ns']:.0f} ns, "
        f"ResilientLoader.load() with resolve_ttl {h['loader_load_ttl_ns']:.0f} ns "
        f"({h['loader_load_ttl_ns'] / h['get_ns']:.1f}x get())",
    ]
    c = r["cold_start"]
    m = c["median"]["cold"]
    lines += [
        "",
        f"cold start of {c['version']} ({c['size'] / 1024:.0f} KiB), median of {len(c['runs']) // 2} fresh processes:",
        f"  import mlflow.pyfunc {m['import']:.2f}s; resolve {m['resolve']:.3f}s, fetch {m['fetch']:.3f}s, "
        f"verify {m['verify']:.3f}s, deserialize {m['deserialize']:.3f}s = load {m['total']:.3f}s; "
        f"whole process {m['process']:.2f}s",
        f"  deserialize share of the load: {c['deserialize_share']:.0%}; import + deserialize share of the "
        f"process: {c['import_and_deserialize_share_of_process']:.0%}",
        f"  warm (filled cache) load: {c['median']['warm']['total']:.3f}s, "
        f"process {c['median']['warm']['process']:.2f}s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="cold/warm start runs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of steady-state load, in segments")
    parser.add_argument("--reloads", type=int, default=10, help="alias moves to new versions")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.25, help="the app's reload interval")
    parser.add_argument("--no-pin", action="store_true", help="do not give the app a CPU of its own")
    args = parser.parse_args(argv)
    result = run(args.runs, args.steady, args.reloads, args.clients, args.interval, not args.no_pin)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(table(result))
    ok = result["serving"]["failed_total"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
