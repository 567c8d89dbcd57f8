"""S3 benchmark: model_loader against what users do today, side by side, on one moto server.

Starts a moto server on 127.0.0.1, uploads "big" (one 256 MiB file + 200 x 4 KiB files),
then runs each contender in a fresh process, round-robin, ``--runs`` times:

- ``model_loader``: ``ResilientLoader(["s3://..."]).fetch()`` into an empty disk cache (the
  user's path: resolve, parallel fetch, verify, one syncfs, atomic publish). Default
  settings; the endpoint comes from ``AWS_ENDPOINT_URL_S3`` as for any boto3 user.
- ``model_loader warm``: the same loader in a new process, cache already filled: the
  prefix is listed again and the entry checked (``fetch()`` timed; building the loader,
  i.e. the boto3 client, is reported separately).
- ``S3Source <mode>``: ``S3Source(range_split=mode)`` resolve + fetch into a temporary
  directory (no cache, no sync). ``auto`` is the default; ``eager`` always splits large
  objects into ranges (as TransferManager does); ``off`` never does.
- ``boto3 TransferManager``: ``client.download_file`` per file, default ``TransferConfig``.
- ``boto3 thread pool``: ``get_object`` streamed to disk, 16 files at once.
- ``s3fs``: ``fs.get(prefix, dest, recursive=True)``, run with ``--s3fs-python`` (or
  ``$BENCH_S3FS_PYTHON``; default: this interpreter) because s3fs pins its own botocore.
  Skipped, with the reason, when that interpreter has no s3fs.

A second scenario ("wan", skip with ``--no-wan``) puts the fault proxy of the tests in
front of moto as a shaped link (``--wan-bandwidth-mib`` per connection, ``--wan-latency-ms``
per request), the regime of real S3 where one connection is slow and parallel ranges pay.

Times are measured inside the child from just before the client or loader is built
(imports excluded) to the last byte on disk. Peak RSS growth is the child's peak RSS at
the end minus its RSS at that start (``VmHWM``, ``VmRSS`` in ``/proc/self/status``).
Medians of ``--runs``; ratios against the fastest baseline of the same scenario.

    python benchmarks/bench_s3.py [--runs 3] [--json out.json] [--big-mib 256] [--no-wan]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUCKET = "bench"
MiB = 1024 * 1024

BASELINES = ("boto3 TransferManager", "boto3 thread pool", "s3fs")
CONTENDERS = (
    "model_loader",
    "S3Source auto",
    "S3Source eager",
    "S3Source off",
    "boto3 TransferManager",
    "boto3 thread pool",
    "s3fs",
)


# -- children: one contender, one run, in a fresh process ------------------------------------


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory figure in bytes (``VmRSS`` now, ``VmHWM`` peak).

    ``ru_maxrss`` is not used: Linux carries it over from the parent across fork and exec,
    so a child would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    url, dest, prefix = spec["endpoint"], Path(spec["dest"]), spec["prefix"]
    uri = f"s3://{BUCKET}/{prefix}"
    extra: dict[str, Any] = {}
    # imports first: their cost is measured by the core benchmark, not here
    if name.startswith("model_loader") or name.startswith("S3Source"):
        from model_loader import CacheConfig, LoaderConfig, ResilientLoader
        from model_loader._uri import parse_ref
        from model_loader.sources.s3 import S3Source
    elif name == "s3fs":
        import s3fs
    else:
        import boto3
    rss0 = _proc_status("VmRSS")
    t0 = time.perf_counter()
    if name in ("model_loader", "model_loader warm"):
        config = LoaderConfig(cache=CacheConfig(dir=spec["cache"]))
        loader = ResilientLoader([uri], config=config)
        t1 = time.perf_counter()
        result = loader.fetch()
        extra = {"from_cache": result.from_cache, "build_s": t1 - t0, "path": str(result.path)}
        if name == "model_loader warm":
            t0 = t1  # the warm figure is fetch(): the loader (boto3 client) exists at start-up anyway
        loader.close()
    elif name.startswith("S3Source"):
        mode = name.split()[-1]
        source = S3Source(endpoint_url=url, range_split=mode)  # type: ignore[arg-type]
        resolved = source.resolve(parse_ref(uri))
        source.fetch(resolved, dest)
        source.close()
    elif name == "boto3 TransferManager":
        client = boto3.client("s3", endpoint_url=url)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for obj in page.get("Contents", []):
                target = dest / obj["Key"][len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(BUCKET, obj["Key"], str(target))
    elif name == "boto3 thread pool":
        from concurrent.futures import ThreadPoolExecutor

        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=url, config=Config(max_pool_connections=16))
        keys = [
            obj["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for obj in page.get("Contents", [])
        ]

        def get(key: str) -> None:
            target = dest / key[len(prefix) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            body = client.get_object(Bucket=BUCKET, Key=key)["Body"]
            with open(target, "wb") as out:
                for chunk in body.iter_chunks(MiB):
                    out.write(chunk)

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(get, keys))
    elif name == "s3fs":
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": url})
        fs.get(f"{BUCKET}/{prefix}", str(dest) + "/", recursive=True)
    else:
        raise SystemExit(f"unknown contender {name!r}")
    seconds = time.perf_counter() - t0
    peak = _proc_status("VmHWM")
    return {"seconds": seconds, "rss_growth_mib": max(0, peak - rss0) / MiB, **extra}


# -- parent: server, data, rounds, report ------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_moto(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.05)


def _upload(url: str, prefix: str, big_mib: int, small: int) -> int:
    import boto3

    client = boto3.client("s3", endpoint_url=url)
    blob = os.urandom(big_mib * MiB)
    client.put_object(Bucket=BUCKET, Key=prefix + "weights.bin", Body=blob)
    size = len(blob)
    del blob
    for i in range(small):
        client.put_object(Bucket=BUCKET, Key=f"{prefix}small/part-{i:03d}.bin", Body=os.urandom(4096))
    return size + small * 4096


def _has_s3fs(python: str) -> str | None:
    """None if ``python`` can import s3fs, else the reason."""
    proc = subprocess.run([python, "-c", "import s3fs"], capture_output=True, text=True)
    if proc.returncode == 0:
        return None
    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
    return f"s3fs not importable by {python} ({last}); pass --s3fs-python"


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 1024**2, 1)
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    for pkg in ("boto3", "botocore", "moto"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = None
    return info


def _run_child(python: str, name: str, spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run(
        [python, __file__, "--child", name, "--spec", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _tree_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def _scenario(
    runs: int, endpoint: str, prefix: str, total: int, small: int, contenders: list[str], s3fs_python: str, work: Path
) -> dict[str, Any]:
    """Every contender ``runs`` times, round-robin, each run in a fresh process; medians and ratios."""
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint}
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    if "model_loader" in contenders:
        samples["model_loader warm"] = []
    for i in range(runs):
        for name in contenders:
            dest, cache = work / f"dest-{i}", work / f"cache-{i}"
            dest.mkdir()
            spec = {"endpoint": endpoint, "prefix": prefix, "dest": str(dest), "cache": str(cache)}
            python = s3fs_python if name == "s3fs" else sys.executable
            sample = _run_child(python, name, spec, env)
            count, size = _tree_size(Path(sample.get("path", dest)))
            if count != small + 1 or size != total:
                raise RuntimeError(f"{name} wrote {size} bytes in {count} files, expected {total}")
            samples[name].append(sample)
            print(f"  {prefix} run {i + 1}/{runs} {name:<24} {sample['seconds']:.3f}s", file=sys.stderr, flush=True)
            if name == "model_loader":  # warm: a new process on the filled cache
                warm = _run_child(sys.executable, "model_loader warm", spec, env)
                if not warm.get("from_cache"):
                    raise RuntimeError("the warm load did not hit the cache")
                samples["model_loader warm"].append(warm)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.rmtree(cache, ignore_errors=True)
    medians: dict[str, dict[str, Any]] = {}
    for name, got in samples.items():
        medians[name] = {
            "seconds": statistics.median(s["seconds"] for s in got),
            "rss_growth_mib": statistics.median(s["rss_growth_mib"] for s in got),
        }
        if "build_s" in got[0]:
            medians[name]["build_s"] = statistics.median(s["build_s"] for s in got)
    fastest = min((n for n in BASELINES if n in medians), key=lambda n: medians[n]["seconds"])
    for name, med in medians.items():
        med["mib_per_s"] = None if "warm" in name else total / MiB / med["seconds"]
        med["ratio_vs_fastest_baseline"] = med["seconds"] / medians[fastest]["seconds"]
    return {"fastest_baseline": fastest, "medians": medians, "samples": samples}


def run(runs: int, big_mib: int, small: int, s3fs_python: str, wan: dict[str, float] | None) -> dict[str, Any]:
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(key, None)
    os.environ.clear()
    os.environ.update(env)
    contenders = list(CONTENDERS)
    skipped: dict[str, str] = {}
    reason = _has_s3fs(s3fs_python)
    if reason:
        skipped["s3fs"] = reason
        contenders.remove("s3fs")
    server, url = _start_moto(env)
    work = Path(tempfile.mkdtemp(prefix="bench-s3-"))
    results: dict[str, Any] = {"machine": _machine(), "s3fs_python": s3fs_python, "runs": runs, "skipped": skipped}
    try:
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        total = _upload(url, "big/", big_mib, small)
        results["loopback"] = {
            "model": f"{big_mib} MiB + {small} x 4 KiB ({total} bytes)",
            **_scenario(runs, url, "big/", total, small, contenders, s3fs_python, work),
        }
        med = results["loopback"]["medians"]
        fastest = med[results["loopback"]["fastest_baseline"]]["seconds"]
        results["goals"] = {
            "cold_at_least_as_fast_as_fastest": med["model_loader"]["seconds"] <= fastest,
            "rss_growth_under_128_mib": med["model_loader"]["rss_growth_mib"] < 128,
            "warm_under_50_ms": med["model_loader warm"]["seconds"] < 0.05,
        }
        if wan:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
            from _fault_proxy import FaultProxy

            wan_total = _upload(url, "wan/", int(wan["big_mib"]), small)
            link = FaultProxy(url, latency=wan["latency"], bandwidth=wan["bandwidth_mib"] * MiB)
            with link:
                results["wan"] = {
                    "model": f"{int(wan['big_mib'])} MiB + {small} x 4 KiB ({wan_total} bytes)",
                    "link": f"{wan['bandwidth_mib']:g} MiB/s per connection, +{wan['latency'] * 1000:g} ms per request",
                    **_scenario(runs, link.url, "wan/", wan_total, small, contenders, s3fs_python, work),
                }
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    return results


def _table(results: dict[str, Any]) -> str:
    lines = []
    for key, title in (("loopback", "moto on 127.0.0.1"), ("wan", "moto behind a shaped link")):
        if key not in results:
            continue
        sc = results[key]
        link = f" ({sc['link']})" if "link" in sc else ""
        lines += [
            f"S3 {sc['model']} from {title}{link}; medians of {results['runs']} fresh processes; "
            f"ratio = time / fastest baseline ({sc['fastest_baseline']})",
            f"{'contender':<24} {'median':>9} {'MiB/s':>7} {'ratio':>6} {'RSS growth':>11}",
        ]
        for name, med in sc["medians"].items():
            rate = f"{med['mib_per_s']:.0f}" if med.get("mib_per_s") else "-"
            lines.append(
                f"{name:<24} {med['seconds']:>8.3f}s {rate:>7} {med['ratio_vs_fastest_baseline']:>6.2f} "
                f"{med['rss_growth_mib']:>8.0f} MiB"
            )
        if "model_loader warm" in sc["medians"]:
            build = sc["medians"]["model_loader warm"]["build_s"]
            lines.append(
                f"(model_loader warm times fetch() only; building the loader and its boto3 client: {build:.3f}s)"
            )
        lines.append("")
    for name, why in results["skipped"].items():
        lines.append(f"{name} skipped: {why}")
    lines.append("goals: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in results["goals"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--no-wan", action="store_true", help="skip the shaped-link scenario")
    parser.add_argument("--wan-big-mib", type=int, default=64)
    parser.add_argument("--wan-bandwidth-mib", type=float, default=24.0)
    parser.add_argument("--wan-latency-ms", type=float, default=25.0)
    parser.add_argument("--s3fs-python", default=os.environ.get("BENCH_S3FS_PYTHON") or sys.executable)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, json.loads(args.spec))))
        return 0
    wan = None
    if not args.no_wan:
        wan = {
            "big_mib": args.wan_big_mib,
            "bandwidth_mib": args.wan_bandwidth_mib,
            "latency": args.wan_latency_ms / 1000,
        }
    results = run(args.runs, args.big_mib, args.small, args.s3fs_python, wan)
    summary = {k: v for k, v in results.items() if k not in ("loopback", "wan")}
    for key in ("loopback", "wan"):
        if key in results:
            summary[key] = {k: v for k, v in results[key].items() if k != "samples"}
    print(json.dumps(summary, indent=1))
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
