"""Beyond one machine: many processes on many hosts sharing one cache, and tiered caches.

1. ``N`` simulated hosts x ``M`` processes start at once on one cold model in S3 (moto
   behind a shaped link: ``--bandwidth-mib`` per connection). Side by side in one run:
   - *shared*: one cache directory, seen by each host through its own bindfs mount (flock
     is not forwarded between mounts, as on many shared volumes), ``shared=True``;
   - *alone*: every process with a cache of its own (what each pod downloading for itself
     costs).
   Reported: bytes pulled from the origin (in model copies) and wall time until every
   process has served.
2. A hit in a shared tier promoted into an empty local tier (hard links on one filesystem,
   copies across filesystems) vs a fresh fetch of the same model.

    python benchmarks/bench_scale.py [--hosts 2] [--procs 4] [--runs 3] [--json out.json]
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from chaos import Rig, _origin_bytes  # noqa: E402 - the same moto + shaped-proxy rig

MiB = 1024 * 1024

_CHILD = """
import json, sys, time
from model_loader import CacheConfig, LoaderConfig, ResilientLoader
cfg = LoaderConfig(cache=CacheConfig(dir=sys.argv[2], shared=sys.argv[3] == "shared", tiers=tuple(sys.argv[4:])))
t0 = time.monotonic()
with ResilientLoader(sys.argv[1], config=cfg) as loader:
    r = loader.fetch()
print(json.dumps({"seconds": time.monotonic() - t0, "from_cache": r.from_cache}), flush=True)
"""


def _run(rig: Rig, caches: list[tuple[str, Path]], mode: str, extra: tuple[str, ...] = ()) -> tuple[float, float]:
    """Start one process per ``(host id, cache dir)`` at once; (wall seconds, origin copies)."""
    before = rig.proxy.body_bytes
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, "s3://chaos/m/", str(cache), mode, *extra],
            env={**rig.env(), "MODEL_LOADER_HOST_ID": host},
            stdout=subprocess.PIPE,
            text=True,
        )
        for host, cache in caches
    ]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"a process failed: {out}")
    wall = time.monotonic() - t0
    return wall, _origin_bytes(rig, before) / rig.size


def _mounts(backing: Path, hosts: int) -> list[Path] | None:
    if shutil.which("bindfs") is None or not os.path.exists("/dev/fuse"):
        return None
    mounts = []
    for i in range(hosts):
        mnt = backing.parent / f"host-{i}"
        mnt.mkdir()
        if subprocess.run(["bindfs", str(backing), str(mnt)], capture_output=True).returncode != 0:
            for m in mounts:
                subprocess.run(["fusermount", "-u", str(m)], check=False)
            return None
        mounts.append(mnt)
    return mounts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--bandwidth-mib", type=float, default=64.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rig = Rig()
    rig.proxy.bandwidth = args.bandwidth_mib * MiB
    scratch = Path(tempfile.mkdtemp(prefix="ml-scale-"))
    rows: dict[str, list[tuple[float, float]]] = {"shared": [], "alone": [], "promoted": [], "fresh": []}
    note = ""
    try:
        for run in range(args.runs):
            backing = scratch / f"r{run}" / "volume"
            backing.mkdir(parents=True)
            mounts = _mounts(backing, args.hosts)
            if mounts is None:
                note = "bindfs unavailable: the hosts share one mount (flock shared)"
                mounts = [backing] * args.hosts
            try:
                caches = [(f"host-{h}", mounts[h]) for h in range(args.hosts) for _ in range(args.procs)]
                rows["shared"].append(_run(rig, caches, "shared"))
            finally:
                for m in mounts:
                    if m != backing:
                        subprocess.run(["fusermount", "-u", str(m)], check=False)
            alone = [(f"host-{i}", scratch / f"r{run}" / f"alone-{i}") for i in range(args.hosts * args.procs)]
            rows["alone"].append(_run(rig, alone, "local"))
            # a shared tier pre-warmed above (the backing volume), promoted into empty local tiers
            rows["promoted"].append(_run(rig, [("p", scratch / f"r{run}" / "local")], "local", (str(backing),)))
            rows["fresh"].append(_run(rig, [("f", scratch / f"r{run}" / "fresh")], "local"))
    finally:
        rig.close()
        shutil.rmtree(scratch, ignore_errors=True)
    summary: dict[str, Any] = {
        name: {
            "wall_s": round(statistics.median(w for w, _ in vals), 3),
            "origin_copies": round(statistics.median(c for _, c in vals), 3),
        }
        for name, vals in rows.items()
    }
    n = args.hosts * args.procs
    print(
        f"scale benchmark: {args.hosts} hosts x {args.procs} processes, {rig.size / MiB:.0f} MiB model, "
        f"{args.bandwidth_mib:g} MiB/s per connection, median of {args.runs} runs. {note}"
    )
    print(
        f"  one shared cache (shared=True)    {summary['shared']['wall_s']:7.2f} s  "
        f"{summary['shared']['origin_copies']:5.2f} copies from the origin"
    )
    print(
        f"  a cache per process               {summary['alone']['wall_s']:7.2f} s  "
        f"{summary['alone']['origin_copies']:5.2f} copies ({n} processes)"
    )
    ratio = summary["promoted"]["wall_s"] / summary["fresh"]["wall_s"]
    print(
        f"  shared-tier hit promoted locally  {summary['promoted']['wall_s']:7.2f} s  "
        f"{summary['promoted']['origin_copies']:5.2f} copies  ({ratio:.2f}x a fresh fetch)"
    )
    print(
        f"  fresh fetch                       {summary['fresh']['wall_s']:7.2f} s  "
        f"{summary['fresh']['origin_copies']:5.2f} copies"
    )
    machine = {"python": platform.python_version(), "cpus": os.cpu_count()}
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": vars(args) | {"json": None}, **summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
