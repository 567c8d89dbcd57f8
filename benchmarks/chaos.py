"""The long form of the resilience tests: many trials of real faults, default settings.

Scenarios (each trial is a fresh load unless said):

- ``s3-transient``: 30% of requests to a moto S3 server fail (500, 503 SlowDown, resets,
  bodies cut short) on a 24 MiB + 40-file model; every load must succeed.
- ``s3-altered``: 20% of requests fail, half of them with a body altered in flight (a byte
  flipped), the rest 500s and resets; no altered byte may be served, and a file whose
  download was altered is downloaded again.
- ``kill-9``: a process fetching through a slowed link is killed at a random moment; a
  second process then fetches the same model: it must serve exact bytes, and no torn
  entry may ever be visible in ``entries/``.
- ``herd-kill``: 8 processes start on one cold model; the one downloading is killed
  mid-way; origin bytes must stay under 1.3 copies and every survivor serves exact bytes.
- ``hung-store``: with a warm cache, the store accepts connections and never answers,
  or trickles one byte a second; the cached copy must be served, degraded, within 5 s.
- ``cache-damage``: a random kind of damage to the cached entry; with the store up the
  exact bytes are served again, with it down a typed error or the exact bytes.

    python benchmarks/chaos.py [--trials 20] [--only s3-transient,kill-9] [--json out.json]

Prints one row per scenario: trials, failures (loads that raised), wrong bytes served
(must be 0), degraded, median and max seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

MiB = 1024 * 1024
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _model(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    files = {"weights.bin": rng.randbytes(24 * MiB)}
    files.update({f"shards/part-{i:02}.bin": rng.randbytes(16 * 1024) for i in range(40)})
    return files


def _digest(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
    return h.hexdigest()


def _tree_digest(root: Path) -> str:
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    return _digest(files)


class Rig:
    """A moto server, a bucket with the model, and a fault proxy in front."""

    def __init__(self) -> None:
        os.environ.update(AWS)
        for key in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(key, None)
        import boto3
        from moto.server import ThreadedMotoServer

        from _fault_proxy import FaultProxy

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.upstream = f"http://127.0.0.1:{port}"
        self.client = boto3.client("s3", endpoint_url=self.upstream, region_name="us-east-1")
        self.client.create_bucket(Bucket="chaos")
        self.files = _model(1)
        for path, data in self.files.items():
            self.client.put_object(Bucket="chaos", Key=f"m/{path}", Body=data)
        self.expected = _digest(self.files)
        self.size = sum(len(b) for b in self.files.values())
        self.proxy = FaultProxy(self.upstream).start()

    def fresh_proxy(self) -> None:
        """A new proxy for each scenario: kills in one leave none of its connections behind."""
        from _fault_proxy import FaultProxy

        self.proxy.stop()  # idempotent
        self.proxy = FaultProxy(self.upstream).start()

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        return {**os.environ, **AWS, "AWS_ENDPOINT_URL_S3": endpoint or self.proxy.url}

    def close(self) -> None:
        self.proxy.stop()
        self.server.stop()


_CHILD = """
import json, sys, time
from model_loader import CacheConfig, LoaderConfig, ResilientLoader
t0 = time.monotonic()
try:
    with ResilientLoader(sys.argv[1], config=LoaderConfig(cache=CacheConfig(dir=sys.argv[2]))) as loader:
        r = loader.fetch()
    out = {"ok": True, "path": str(r.path), "degraded": r.degraded, "downloaded": r.downloaded}
except Exception as exc:
    out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
out["seconds"] = time.monotonic() - t0
print(json.dumps(out), flush=True)
"""


def _child(rig: Rig, cache: Path, endpoint: str | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, "s3://chaos/m/", str(cache)],
        env=rig.env(endpoint),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _row(name: str, outcomes: list[dict[str, Any]], goal: str, **extra: Any) -> dict[str, Any]:
    seconds = [o["seconds"] for o in outcomes if "seconds" in o]
    return {
        "scenario": name,
        "trials": len(outcomes),
        "failures": sum(not o["ok"] for o in outcomes),
        "wrong_bytes_served": sum(o.get("wrong", False) for o in outcomes),
        "degraded": sum(bool(o.get("degraded")) for o in outcomes),
        "median_s": round(statistics.median(seconds), 3) if seconds else None,
        "max_s": round(max(seconds), 3) if seconds else None,
        "goal": goal,
        "errors": sorted({o["error"].split(":")[0] for o in outcomes if not o["ok"]}),
        **extra,
    }


def _load_in_process(rig: Rig, cache: Path) -> dict[str, Any]:
    from model_loader import CacheConfig, LoaderConfig, ResilientLoader

    os.environ["AWS_ENDPOINT_URL_S3"] = rig.proxy.url
    t0 = time.monotonic()
    try:
        with ResilientLoader("s3://chaos/m/", config=LoaderConfig(cache=CacheConfig(dir=cache))) as loader:
            r = loader.fetch()
        wrong = _tree_digest(r.path) != rig.expected
        return {"ok": True, "wrong": wrong, "degraded": r.degraded, "seconds": time.monotonic() - t0}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "seconds": time.monotonic() - t0}


def s3_transient(rig: Rig, trials: int, scratch: Path) -> dict[str, Any]:
    rig.proxy.randomize(0.3, seed=7, kinds=("500", "503", "reset", "truncate"))
    try:
        outcomes = [_load_in_process(rig, scratch / f"t{i}") for i in range(trials)]
    finally:
        rig.proxy.clear()
    return _row("s3-transient (30%)", outcomes, "0 failures, 0 wrong bytes", faults=dict(rig.proxy.faults))


def s3_altered(rig: Rig, trials: int, scratch: Path) -> dict[str, Any]:
    rig.proxy.randomize(0.2, seed=11, kinds=("corrupt", "corrupt", "500", "reset"))
    try:
        outcomes = [_load_in_process(rig, scratch / f"a{i}") for i in range(trials)]
    finally:
        rig.proxy.clear()
    return _row("s3-altered (20%)", outcomes, "0 wrong bytes (failures allowed)")


def kill_9(rig: Rig, trials: int, scratch: Path) -> dict[str, Any]:
    from model_loader._cache import DiskCache

    rig.proxy.bandwidth = 16 * MiB  # a slow link: the fetch takes a few seconds, kills land mid-way
    outcomes = []
    torn = 0
    rng = random.Random(3)
    try:
        for i in range(trials):
            cache = scratch / f"k{i}"
            victim = _child(rig, cache)
            time.sleep(rng.uniform(0.2, 2.0))  # the kill lands at a random moment: that is the experiment
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            if (cache / "entries").exists():
                torn += len(DiskCache(cache).verify_all("full"))
            survivor = _child(rig, cache)
            out = json.loads(survivor.communicate(timeout=300)[0])
            if out["ok"]:
                out["wrong"] = _tree_digest(Path(out["path"])) != rig.expected
            outcomes.append(out)
    finally:
        rig.proxy.bandwidth = None
    return _row("kill-9 mid-fetch", outcomes, "0 torn entries, 0 wrong bytes", torn_entries=torn)


def herd_kill(rig: Rig, trials: int, scratch: Path) -> dict[str, Any]:
    rig.proxy.bandwidth = 16 * MiB
    outcomes, copies = [], []
    try:
        for i in range(max(1, trials // 4)):
            cache = scratch / f"h{i}"
            before = rig.proxy.body_bytes
            downloader = _child(rig, cache)
            deadline = time.monotonic() + 60
            while not list((cache / ".staging").glob("*/journal.jsonl")) and time.monotonic() < deadline:
                time.sleep(0.05)  # polling for the download to be under way
            herd = [_child(rig, cache) for _ in range(7)]
            time.sleep(0.5)  # the herd queues on the lock while the downloader goes on
            downloader.send_signal(signal.SIGKILL)
            downloader.wait()
            for p in herd:
                out = json.loads(p.communicate(timeout=300)[0])
                if out["ok"]:
                    out["wrong"] = _tree_digest(Path(out["path"])) != rig.expected
                outcomes.append(out)
            copies.append(round(_origin_bytes(rig, before) / rig.size, 3))
    finally:
        rig.proxy.bandwidth = None
    return _row("herd of 8, downloader killed", outcomes, "< 1.3 copies, 0 wrong bytes", copies=copies)


def _origin_bytes(rig: Rig, since: int) -> int:
    """Body bytes the proxy really sent since ``since`` (a cut-short GET counts what it sent)."""
    return rig.proxy.body_bytes - since


def hung_store(rig: Rig, trials: int, scratch: Path) -> dict[str, Any]:
    """The store the cache was filled from (same endpoint, so the same cache identity) stops
    answering (the proxy holds every request), or trickles one byte a second."""
    outcomes = []
    cache = scratch / "warm"
    warm = _child(rig, cache)
    assert json.loads(warm.communicate(timeout=300)[0])["ok"]
    rig.proxy.stall_seconds = 120.0
    try:
        for i in range(trials):
            rig.proxy.randomize(1.0, kinds=("stall",) if i % 2 == 0 else ("trickle",))
            out = json.loads(_child(rig, cache).communicate(timeout=120)[0])
            if out["ok"]:
                out["wrong"] = _tree_digest(Path(out["path"])) != rig.expected
                out["ok"] = out["degraded"] and out["seconds"] < 5.0
                if not out["ok"]:
                    out["error"] = f"TooSlow: {out['seconds']:.1f}s"
            outcomes.append(out)
    finally:
        rig.proxy.clear()
    return _row("hung store, warm cache", outcomes, "degraded within 5 s")


def _damage(kind: str, entry: Path) -> None:
    """One kind of damage to a published entry (``*-full`` kinds only a full check sees)."""
    files = sorted(p for p in (entry / "files").rglob("*") if p.is_file())
    victim = files[len(files) // 2]
    if kind == "no-manifest":
        (entry / "manifest.json").unlink()
    elif kind == "garbage-manifest":
        (entry / "manifest.json").write_bytes(b"[{]")
    elif kind == "manifest-of-another-key":
        data = json.loads((entry / "manifest.json").read_text())
        data["key"] = "0" * 32
        (entry / "manifest.json").write_text(json.dumps(data))
    elif kind == "file-removed":
        victim.unlink()
    elif kind == "file-truncated":
        victim.write_bytes(victim.read_bytes()[:-1])
    elif kind == "directory-where-a-file-belongs":
        victim.unlink()
        victim.mkdir()
    elif kind == "file-where-the-entry-belongs":
        shutil.rmtree(entry)
        entry.write_bytes(b"x")
    elif kind == "same-size-other-bytes-full":
        data = bytearray(victim.read_bytes())
        data[0] ^= 0xFF
        victim.write_bytes(bytes(data))
    elif kind == "extra-file-full":
        (entry / "files" / "intruder.py").write_text("print('hi')")


DAMAGE = [
    "no-manifest",
    "garbage-manifest",
    "manifest-of-another-key",
    "file-removed",
    "file-truncated",
    "directory-where-a-file-belongs",
    "file-where-the-entry-belongs",
    "same-size-other-bytes-full",
    "extra-file-full",
]


def cache_damage(rig: Rig, trials: int, scratch: Path) -> dict[str, Any]:
    from model_loader import CacheConfig, LoaderConfig, ModelLoaderError, ResilientLoader

    rng = random.Random(5)
    outcomes = []
    os.environ["AWS_ENDPOINT_URL_S3"] = rig.proxy.url
    for i in range(trials):
        cache = scratch / f"d{i}"
        kind = DAMAGE[i % len(DAMAGE)]
        verify = "full" if kind.endswith("-full") else rng.choice(["fast", "full"])
        cfg = LoaderConfig(cache=CacheConfig(dir=cache, verify=verify))
        with ResilientLoader("s3://chaos/m/", config=cfg) as loader:
            entry = loader.fetch().path.parent
        _damage(kind, entry)
        down = rng.random() < 0.5
        if down:
            rig.proxy.randomize(1.0, kinds=("500",))
        t0 = time.monotonic()
        try:
            with ResilientLoader("s3://chaos/m/", config=cfg) as loader:
                r = loader.fetch()
            out = {"ok": True, "wrong": _tree_digest(r.path) != rig.expected, "degraded": r.degraded}
        except ModelLoaderError as exc:
            out = {"ok": down, "error": f"{type(exc).__name__}: {kind}"}  # a typed error is right only when down
        finally:
            rig.proxy.clear()
        out["seconds"] = time.monotonic() - t0
        outcomes.append(out)
    return _row("cache damage (store up or down)", outcomes, "exact bytes, or a typed error when down")


SCENARIOS: dict[str, Callable[[Rig, int, Path], dict[str, Any]]] = {
    "s3-transient": s3_transient,
    "s3-altered": s3_altered,
    "kill-9": kill_9,
    "herd-kill": herd_kill,
    "hung-store": hung_store,
    "cache-damage": cache_damage,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--runs", type=int, help="ignored (run_all.py passes it)")
    args = parser.parse_args(argv)
    rig = Rig()
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="ml-chaos-"))
    try:
        for name in args.only.split(","):
            t0 = time.monotonic()
            rig.fresh_proxy()
            row = SCENARIOS[name](rig, args.trials, scratch / name)
            row["wall_s"] = round(time.monotonic() - t0, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        rig.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(f"{'scenario':<34} {'trials':>6} {'failed':>6} {'wrong':>5} {'degr.':>5} {'median s':>8} {'max s':>7}  goal")
    for r in rows:
        print(
            f"{r['scenario']:<34} {r['trials']:>6} {r['failures']:>6} {r['wrong_bytes_served']:>5} {r['degraded']:>5} "
            f"{r['median_s'] or 0:>8.2f} {r['max_s'] or 0:>7.2f}  {r['goal']}"
        )
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 1 if any(r["wrong_bytes_served"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
