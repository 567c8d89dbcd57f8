"""Start-up benchmark: the ``model-loader`` command as init containers run it, a fresh process each time.

Every case is the median wall time of N fresh processes, measured side by side with
``python -c pass`` in the same run (the cases are interleaved, so drift hits them alike);
ratios to it are what to quote. With ``--baseline-src DIR`` (a ``src`` directory of another
checkout, e.g. ``git archive HEAD~3 src | tar -x -C /tmp/before``) every case also runs
against that code, interleaved, for a before/after comparison.

    python benchmarks/bench_startup.py [--runs 21] [--json out.json] [--big-mib 256] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_core import machine, make_big  # the script's directory is on sys.path

# What the console script does, without depending on where it is installed.
CLI = "import sys; from model_loader.cli import main; sys.exit(main())"
GOAL_S = 0.2


def cases(model: Path, cache: Path) -> dict[str, tuple[list[str], int]]:
    """name -> (argv after the interpreter, expected exit code)."""
    fetch = ["-c", CLI, "fetch", "--cache-dir", str(cache)]
    return {
        "python -c pass": (["-c", "pass"], 0),
        "import model_loader": (["-c", "import model_loader"], 0),
        "model-loader --version": (["-c", CLI, "--version"], 0),
        "fetch, invalid reference": ([*fetch, "models:/iris"], 2),
        "fetch, warm (big model)": ([*fetch, str(model)], 0),
        "fetch --offline, warm": ([*fetch, "--offline", str(model)], 0),
    }


def run_once(argv: list[str], expected: int, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != expected:
        raise RuntimeError(f"{argv[2:] or argv} exited {proc.returncode}, not {expected}: {proc.stderr.strip()}")
    return elapsed


def import_ms(env: dict[str, str], runs: int) -> float:
    """``import model_loader`` timed inside the process (the < 100 ms goal), median."""
    code = "import time; t = time.perf_counter(); import model_loader; print(time.perf_counter() - t)"
    out = [
        float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
        for _ in range(runs)
    ]
    return statistics.median(out) * 1000


def run(runs: int, big_mib: int, baseline_src: Path | None) -> dict[str, Any]:
    variants = {"after": dict(os.environ)}
    if baseline_src is not None:
        before = dict(os.environ)
        before["PYTHONPATH"] = os.pathsep.join(filter(None, [str(baseline_src), os.environ.get("PYTHONPATH")]))
        variants = {"before": before, **variants}
    results: dict[str, Any] = {"machine": machine(), "runs": runs, "model": f"{big_mib} MiB + 200 x 4 KiB"}
    with tempfile.TemporaryDirectory(prefix="ml-bench-startup-") as tmp:
        work = Path(tmp)
        model = make_big(work, big_mib)
        table = {name: cases(model, work / f"cache-{name}") for name in variants}
        for name, env in variants.items():  # a cold fetch fills each variant's cache (caches may differ in layout)
            argv, _ = table[name]["fetch, warm (big model)"]
            run_once(argv, 0, env)
        times: dict[str, dict[str, list[float]]] = {name: {case: [] for case in table[name]} for name in variants}
        for _ in range(runs):
            for name, env in variants.items():
                for case, (argv, code) in table[name].items():
                    times[name][case].append(run_once(argv, code, env))
        for name, env in variants.items():
            medians = {case: statistics.median(ts) for case, ts in times[name].items()}
            floor = medians["python -c pass"]
            results[name] = {
                "median_s": medians,
                "ratio_to_python": {case: t / floor for case, t in medians.items()},
                "import_model_loader_in_process_ms": import_ms(env, runs),
            }
    return results


def render(r: dict[str, Any]) -> str:
    names = [n for n in ("before", "after") if n in r]
    cases_ = list(r[names[-1]]["median_s"])
    width = max(len(c) for c in cases_)
    head = "".join(f"  {n + ' (s)':>12} {'x python':>9}" for n in names)
    lines = [
        f"start-up, whole process ({r['model']}; median of {r['runs']} fresh processes, {r['machine']['cpus']} CPUs)",
        f"  {'case':<{width}}{head}",
    ]
    for case in cases_:
        cells = "".join(f"  {r[n]['median_s'][case]:>12.3f} {r[n]['ratio_to_python'][case]:>8.1f}x" for n in names)
        lines.append(f"  {case:<{width}}{cells}")
    for n in names:
        lines.append(
            f"  import model_loader in-process ({n}): {r[n]['import_model_loader_in_process_ms']:.1f} ms (goal < 100)"
        )
    warm = r["after"]["median_s"]["fetch, warm (big model)"]
    lines.append(f"  warm fetch goal: <= {GOAL_S:.1f} s whole process; now {warm:.3f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--big-mib", type=int, default=256)
    parser.add_argument("--baseline-src", type=Path, help="a src/ directory to compare with (before)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = run(args.runs, args.big_mib, args.baseline_src)
    print(json.dumps(results, indent=1))
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
