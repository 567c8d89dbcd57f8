"""MLflow registry benchmarks: model_loader vs MLflow's own download and load, side by side.

Starts its own moto S3 server and two ``mlflow server`` processes (sqlite backend,
artifacts proxied to moto, and artifacts directly in moto), publishes the "big" model
(one 256 MiB file + 200 x 4 KiB) and a scikit-learn iris model, then measures:

1. warm start in-process (cache hit, registry up): ``ResilientLoader.fetch()`` vs
   ``mlflow.artifacts.download_artifacts``;
2. warm start in a fresh process: ``model-loader fetch --json models:/big@prod`` vs a
   fresh process running ``download_artifacts`` (whole process, wall clock);
3. cold fetch through the proxy and directly from S3, with each process's peak RSS;
4. ``mlflow.pyfunc.load_model`` vs ``ResilientLoader.load()``, first call and repeat;
5. registry down (connection refused), warm cache: time until a model is served vs
   MLflow's time to fail with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0``.

Medians of ``--runs`` runs; ratios are what to quote (absolute times drift).

    python benchmarks/bench_mlflow.py [--runs 3] [--json out.json] [--big-mib 256]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_core  # the same "big" model in every suite (benchmarks/ is on sys.path when run)

PY = sys.executable
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server's whole process group (``mlflow server`` runs uvicorn as a child)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


class Servers:
    """moto plus the two MLflow layouts, each a subprocess on a free loopback port."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            port = free_port()
            self.s3_endpoint = f"http://127.0.0.1:{port}"
            self._spawn("moto", [PY, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], {})
            wait_http(self.s3_endpoint + "/moto-api/", self.procs[-1])
            import boto3

            s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1")
            s3.create_bucket(Bucket="bench")
            self.proxied = self._mlflow("proxied", ["--artifacts-destination", "s3://bench/proxied"])
            self.direct = self._mlflow("s3", ["--default-artifact-root", "s3://bench/direct", "--no-serve-artifacts"])
        except BaseException:
            self.close()
            raise

    def env(self, tracking_uri: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODEL_LOADER_", "AWS_"))}
        env.update(AWS)
        env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint
        if tracking_uri:
            env["MLFLOW_TRACKING_URI"] = tracking_uri
        return env

    def _spawn(self, name: str, cmd: list[str], extra: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(
            cmd,
            cwd=self.work,
            env={**self.env(), **extra},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def _mlflow(self, name: str, flags: list[str]) -> str:
        port = free_port()
        db = self.work / f"{name}.db"
        cmd = [PY, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}"]
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "2", *flags]
        proc = self._spawn(f"mlflow-{name}", cmd, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/health", proc)
        return url

    def stop_proxied(self) -> None:
        stop(self.procs[1])

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


def make_big(root: Path, big_mib: int) -> Path:
    """The "big" model of bench_core, plus an MLmodel file so MLflow treats it as a model."""
    model = bench_core.make_big(root, big_mib)
    (model / "MLmodel").write_text("flavors: {}\n")
    return model


def publish(url: str, name: str, directory: Path, alias: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url, registry_uri=url)
    run = client.create_run("0")
    client.log_artifacts(run.info.run_id, str(directory))
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    mv = client.create_model_version(name, run.info.artifact_uri, run_id=run.info.run_id)
    client.set_registered_model_alias(name, alias, mv.version)


def publish_iris(url: str) -> None:
    import mlflow
    import mlflow.sklearn
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 4))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 1).astype(int)
    mlflow.set_tracking_uri(url)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            LogisticRegression(max_iter=300).fit(x, y), name="model", registered_model_name="iris", input_example=x[:2]
        )
    mlflow.MlflowClient(url).set_registered_model_alias("iris", "champion", info.registered_model_version)
    mlflow.set_tracking_uri(None)  # back to "unset" (an empty string would mean ./mlruns)


# peak RSS of the child itself: VmHWM (ru_maxrss would carry the parent's high-water mark across exec)
_RSS_LINE = """
import json as _j
_hwm = [_l for _l in open("/proc/self/status") if _l.startswith("VmHWM")][0].split()[1]
print(_j.dumps({"rss_mib": int(_hwm) / 1024}))
"""


def child(code: str, env: dict[str, str]) -> tuple[dict[str, Any], float, float]:
    """Run ``code`` in a fresh interpreter -> (its JSON output, wall seconds, its peak RSS in MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.run([PY, "-c", textwrap.dedent(code) + _RSS_LINE], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-2]), wall, float(json.loads(lines[-1])["rss_mib"])


def median(values: list[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


OURS_FETCH = """
import json, time
t0 = time.perf_counter()
from model_loader import CacheConfig, LoaderConfig, ResilientLoader
config = LoaderConfig(cache=CacheConfig(dir={cache!r}){extra})
with ResilientLoader([{uri!r}], config=config) as loader:
    r = loader.fetch()
print(json.dumps({{"seconds": time.perf_counter() - t0, "version": r.version, "from_cache": r.from_cache,
                  "degraded": r.degraded}}))
"""

MLFLOW_DOWNLOAD = """
import json, time
import mlflow
t0 = time.perf_counter()
mlflow.artifacts.download_artifacts(artifact_uri={uri!r}, dst_path={dst!r})
print(json.dumps({{"seconds": time.perf_counter() - t0}}))
"""

MLFLOW_FAIL = """
import json, time
import mlflow
t0 = time.perf_counter()
try:
    mlflow.artifacts.download_artifacts(artifact_uri={uri!r}, dst_path={dst!r})
except Exception as exc:
    print(json.dumps({{"seconds": time.perf_counter() - t0, "error": type(exc).__name__}}))
"""

MLFLOW_PYFUNC = """
import json, time
import mlflow.pyfunc
t0 = time.perf_counter()
mlflow.pyfunc.load_model("models:/iris@champion")
first = time.perf_counter() - t0
t0 = time.perf_counter()
mlflow.pyfunc.load_model("models:/iris@champion")
print(json.dumps({{"first": first, "repeat": time.perf_counter() - t0}}))
"""

OURS_PYFUNC = """
import json, time
import mlflow.pyfunc
from model_loader import CacheConfig, LoaderConfig, ResilientLoader
config = LoaderConfig(cache=CacheConfig(dir={cache!r}))
t0 = time.perf_counter()
loader = ResilientLoader(["models:/iris@champion"], config=config)
loader.load()
first = time.perf_counter() - t0
t0 = time.perf_counter()
loader.load()
repeat = time.perf_counter() - t0
t0 = time.perf_counter()
ResilientLoader(["models:/iris@champion"], config=config).load()
print(json.dumps({{"first": first, "repeat": repeat, "new_loader": time.perf_counter() - t0,
                  "from_cache": loader.last_result.from_cache}}))
"""


def cli_command() -> list[str]:
    script = Path(PY).parent / "model-loader"
    return [str(script)] if script.exists() else [PY, "-m", "model_loader"]


def run(runs: int, big_mib: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    os.environ.update(AWS)
    servers = Servers(work)
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = servers.s3_endpoint
    res: dict[str, Any] = {"runs": runs, "model": f"{big_mib} MiB + 200 x 4 KiB", "machine": machine()}
    try:
        big = make_big(work / "data", big_mib)
        for url in (servers.proxied, servers.direct):
            publish(url, "big", big, "prod")
        publish_iris(servers.proxied)
        shutil.rmtree(big.parent)
        uri = "models:/big@prod"
        env_proxied, env_direct = servers.env(servers.proxied), servers.env(servers.direct)

        def scratch() -> str:
            return tempfile.mkdtemp(dir=work)

        # 3. cold fetches (fresh processes; each run a new cache / destination)
        for layout, env in (("proxied", env_proxied), ("s3", env_direct)):
            ours = [child(OURS_FETCH.format(cache=scratch(), uri=uri, extra=""), env) for _ in range(runs)]
            theirs = [child(MLFLOW_DOWNLOAD.format(uri=uri, dst=scratch()), env) for _ in range(runs)]
            assert all(not o[0]["from_cache"] for o in ours)
            res[f"cold_{layout}"] = {
                "model_loader_s": median([o[0]["seconds"] for o in ours]),
                "mlflow_s": median([t[0]["seconds"] for t in theirs]),
                "model_loader_peak_rss_mib": median([o[2] for o in ours]),
                "mlflow_peak_rss_mib": median([t[2] for t in theirs]),
            }
            _progress(res, f"cold_{layout}")
            _cleanup(work)

        # 1. warm start in-process (registry up, cache hit; a new loader each time: it resolves)
        import mlflow

        from model_loader import CacheConfig, LoaderConfig, ResilientLoader

        cache = work / "cache"
        os.environ["MLFLOW_TRACKING_URI"] = servers.proxied
        config = LoaderConfig(cache=CacheConfig(dir=cache))

        def ours_warm() -> None:
            with ResilientLoader([uri], config=config) as loader:
                assert loader.fetch().from_cache

        with ResilientLoader([uri], config=config) as loader:
            loader.fetch()  # fill the cache
        ours_inproc = median([timed(ours_warm) for _ in range(max(runs, 5))])
        mlflow_inproc = median(
            [
                timed(lambda: mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch()))
                for _ in range(runs)
            ]
        )
        _cleanup(work)
        res["warm_in_process"] = {"model_loader_s": ours_inproc, "mlflow_s": mlflow_inproc}
        _progress(res, "warm_in_process")

        # 2. warm start, fresh process, whole process
        cli = [*cli_command(), "fetch", "--json", "--cache-dir", str(cache), uri]
        ours_fresh = []
        for _ in range(runs):
            t0 = time.perf_counter()
            out = subprocess.run(cli, env=env_proxied, capture_output=True, text=True, check=True)
            ours_fresh.append(time.perf_counter() - t0)
            assert json.loads(out.stdout)["from_cache"]
        theirs_fresh = [child(MLFLOW_DOWNLOAD.format(uri=uri, dst=scratch()), env_proxied)[1] for _ in range(runs)]
        _cleanup(work)
        res["warm_fresh_process"] = {"model_loader_s": median(ours_fresh), "mlflow_s": median(theirs_fresh)}
        _progress(res, "warm_fresh_process")

        # 4. pyfunc load of the iris model
        theirs_py = [child(MLFLOW_PYFUNC.format(), env_proxied)[0] for _ in range(runs)]
        ours_cold = [child(OURS_PYFUNC.format(cache=scratch()), env_proxied)[0] for _ in range(runs)]
        warm_cache = scratch()
        child(OURS_PYFUNC.format(cache=warm_cache), env_proxied)
        ours_warm_py = [child(OURS_PYFUNC.format(cache=warm_cache), env_proxied)[0] for _ in range(runs)]
        res["pyfunc"] = {
            "mlflow_first_s": median([t["first"] for t in theirs_py]),
            "mlflow_repeat_s": median([t["repeat"] for t in theirs_py]),
            "model_loader_first_cold_cache_s": median([o["first"] for o in ours_cold]),
            "model_loader_first_warm_cache_s": median([o["first"] for o in ours_warm_py]),
            "model_loader_repeat_s": median([o["repeat"] for o in ours_warm_py]),
            "model_loader_new_loader_s": median([o["new_loader"] for o in ours_warm_py]),
        }

        # 5. registry down (connection refused), warm cache
        servers.stop_proxied()

        def down(extra: str) -> list[dict[str, Any]]:
            code = OURS_FETCH.format(cache=str(cache), uri=uri, extra=extra)
            return [child(code, env_proxied)[0] for _ in range(runs)]

        defaults = down("")
        single, double = down(", retry={'attempts': 1}"), down(", retry={'attempts': 2}")
        assert all(d["degraded"] and d["from_cache"] for d in defaults + single + double)
        cli_down = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(cli, env=env_proxied, capture_output=True, text=True, check=True)
            cli_down.append(time.perf_counter() - t0)
        no_retry = {**env_proxied, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        fails = [child(MLFLOW_FAIL.format(uri=uri, dst=scratch()), no_retry)[0] for _ in range(runs)]
        res["registry_down"] = {
            "model_loader_default_retry_s": median([d["seconds"] for d in defaults]),
            "model_loader_one_attempt_s": median([d["seconds"] for d in single]),
            "model_loader_two_attempts_s": median([d["seconds"] for d in double]),
            "model_loader_cli_fresh_process_s": median(cli_down),
            "mlflow_fail_no_retries_s": median([f["seconds"] for f in fails]),
            "mlflow_fail_default_settings_s": 246.0,  # BASELINES.md: 7 retries, backoff 2, 120 s timeout
        }
    finally:
        servers.close()
        shutil.rmtree(work, ignore_errors=True)
    return res


def _progress(res: dict[str, Any], key: str) -> None:
    print(f"[bench_mlflow] {key}: {json.dumps(res[key])}", file=sys.stderr, flush=True)


def _cleanup(work: Path) -> None:
    for entry in work.iterdir():
        if entry.is_dir() and entry.name.startswith("tmp"):
            shutil.rmtree(entry, ignore_errors=True)


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "mlflow": md.version("mlflow"),
        "moto": md.version("moto"),
    }


def table(r: dict[str, Any]) -> str:
    def ratio(a: float, b: float) -> str:
        return f"{b / a:,.1f}x" if a > 0 else "-"

    rows = [("what", "model_loader", "MLflow", "ratio")]
    w, f = r["warm_in_process"], r["warm_fresh_process"]
    rows.append(
        (
            "warm, in-process (cache hit)",
            f"{w['model_loader_s'] * 1000:.1f} ms",
            f"{w['mlflow_s']:.2f} s",
            ratio(w["model_loader_s"], w["mlflow_s"]),
        )
    )
    rows.append(
        (
            "warm, fresh process (CLI)",
            f"{f['model_loader_s']:.2f} s",
            f"{f['mlflow_s']:.2f} s",
            ratio(f["model_loader_s"], f["mlflow_s"]),
        )
    )
    for layout in ("proxied", "s3"):
        c = r[f"cold_{layout}"]
        rows.append(
            (
                f"cold, {layout}",
                f"{c['model_loader_s']:.2f} s",
                f"{c['mlflow_s']:.2f} s",
                ratio(c["model_loader_s"], c["mlflow_s"]),
            )
        )
        rows.append(
            (
                f"cold, {layout}: peak RSS",
                f"{c['model_loader_peak_rss_mib']:.0f} MiB",
                f"{c['mlflow_peak_rss_mib']:.0f} MiB",
                ratio(c["model_loader_peak_rss_mib"], c["mlflow_peak_rss_mib"]),
            )
        )
    p = r["pyfunc"]
    rows.append(
        (
            "pyfunc load, first call (cold cache)",
            f"{p['model_loader_first_cold_cache_s']:.2f} s",
            f"{p['mlflow_first_s']:.2f} s",
            ratio(p["model_loader_first_cold_cache_s"], p["mlflow_first_s"]),
        )
    )
    rows.append(
        (
            "pyfunc load, first call (warm cache)",
            f"{p['model_loader_first_warm_cache_s']:.2f} s",
            f"{p['mlflow_first_s']:.2f} s",
            ratio(p["model_loader_first_warm_cache_s"], p["mlflow_first_s"]),
        )
    )
    rows.append(
        (
            "pyfunc load, repeat",
            f"{p['model_loader_repeat_s'] * 1000:.2f} ms",
            f"{p['mlflow_repeat_s']:.2f} s",
            ratio(p["model_loader_repeat_s"], p["mlflow_repeat_s"]),
        )
    )
    rows.append(
        (
            "pyfunc load, new loader, same process",
            f"{p['model_loader_new_loader_s'] * 1000:.1f} ms",
            f"{p['mlflow_repeat_s']:.2f} s",
            ratio(p["model_loader_new_loader_s"], p["mlflow_repeat_s"]),
        )
    )
    d = r["registry_down"]
    rows.append(
        (
            "registry down: served / failed (default retry)",
            f"{d['model_loader_default_retry_s']:.2f} s",
            f"{d['mlflow_fail_default_settings_s']:.0f} s (BASELINES)",
            "served vs failed",
        )
    )
    rows.append(
        (
            "registry down: two attempts / no retries",
            f"{d['model_loader_two_attempts_s'] * 1000:.0f} ms",
            f"{d['mlflow_fail_no_retries_s'] * 1000:.0f} ms",
            "served vs failed",
        )
    )
    rows.append(
        (
            "registry down: one attempt / no retries",
            f"{d['model_loader_one_attempt_s'] * 1000:.0f} ms",
            f"{d['mlflow_fail_no_retries_s'] * 1000:.0f} ms",
            "served vs failed",
        )
    )
    rows.append(("registry down: CLI, fresh process", f"{d['model_loader_cli_fresh_process_s']:.2f} s", "-", ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    m = r["machine"]
    head = (
        f"MLflow benchmarks ({r['model']}, median of {r['runs']} runs; {m['cpus']} CPUs, {m['memory_gib']} GiB, "
        f"Python {m['python']}, mlflow {m['mlflow']}, moto {m['moto']})"
    )
    lines = [head] + ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)) for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = run(args.runs, args.big_mib)
    text = json.dumps(results, indent=1)
    print(text)
    print(table(results))
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
