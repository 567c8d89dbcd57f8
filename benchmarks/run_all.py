"""Run every benchmark suite side by side and write benchmarks/results.json.

python benchmarks/run_all.py [--runs N] [--only core,startup,s3,mlflow]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITES = {
    "core": "bench_core.py",
    "startup": "bench_startup.py",
    "s3": "bench_s3.py",
    "mlflow": "bench_mlflow.py",
    "serving": "bench_serving.py",
    "scale": "bench_scale.py",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(SUITES))
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args(argv)
    results: dict[str, object] = {}
    failed = []
    for name in args.only.split(","):
        script = HERE / SUITES[name]
        if not script.exists():
            print(f"== {name}: {script.name} not found, skipped")
            continue
        print(f"== {name}", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            proc = subprocess.run([sys.executable, str(script), "--runs", str(args.runs), "--json", out.name])
            if proc.returncode != 0:
                failed.append(name)
                continue
            results[name] = json.loads(Path(out.name).read_text())
    args.out.write_text(json.dumps(results, indent=1))
    print(f"results written to {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
