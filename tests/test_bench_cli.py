"""``model-loader bench``: cold and warm runs, per-step timings, table and JSON output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from _mlflow_server import IRIS, MlflowServer
from helpers import write_tree
from model_loader import _bench_cli


def _parse(argv: list[str]) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)  # what cli.py hands over
    common.add_argument("--cache-dir", type=Path)
    common.add_argument("--debug", action="store_true")
    common.add_argument("-v", "--verbose", action="store_true")
    common.add_argument("-q", "--quiet", action="store_true")
    parser = argparse.ArgumentParser(prog="model-loader")
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_cli.add_parser(sub, common)
    return parser.parse_args(argv)


def _bench(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert _bench_cli.run(_parse(["bench", *argv])) == 0
    return capsys.readouterr().out


def test_files_only_cold_then_warm_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "model"
    write_tree(model, {"weights.bin": b"w" * 300_000, "conf/a.json": b"{}"})
    scratch = tmp_path / "scratch"
    report = json.loads(
        _bench([str(model), "--loader-fn", "none", "--repeat", "2", "--json", "--cache-dir", str(scratch)], capsys)
    )
    assert (report["size"], report["loader_fn"]) == (300_002, "none")
    runs = report["runs"]
    assert [(r["phase"], r["run"], r["from_cache"]) for r in runs] == [
        ("cold", 1, False),
        ("cold", 2, False),
        ("warm", 1, True),
        ("warm", 2, True),
    ]
    assert all(r["downloaded"] == 300_002 and r["mib_per_s"] > 0 for r in runs[:2])
    assert all(r["downloaded"] == 0 and r["mib_per_s"] is None and r["deserialize"] == 0 for r in runs[2:])
    assert all(r["import"] == 0 and r["process"] > r["total"] > 0 for r in runs)
    assert set(report["median"]) == {"cold", "warm"}
    assert report["median"]["cold"]["total"] >= report["median"]["cold"]["fetch"]
    assert list(scratch.iterdir()) == []  # the temporary caches are gone


def test_a_failed_run_is_one_line_and_an_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", str(tmp_path / "missing"), "--repeat", "1", "--loader-fn", "none"]
    assert _bench_cli.run(_parse(argv)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("model-loader: bench: cold run 1: every source failed:")
    assert "ModelNotFoundError" in err
    assert len(err.splitlines()) == 1


def test_rejects_a_repeat_below_one() -> None:
    with pytest.raises(SystemExit):
        _parse(["bench", "/m", "--repeat", "0"])


@pytest.mark.slow
def test_a_registry_model_deserialized_with_pyfunc(
    mlflow_s3_server: MlflowServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_s3_server.url)
    lines = _bench([f"models:/{IRIS}@champion", "--repeat", "1"], capsys).splitlines()
    assert lines[0].startswith(f"models:/{IRIS}@champion  version {IRIS}/2  ")
    assert lines[0].endswith("loader: pyfunc")
    header = ["run", "import", "resolve", "fetch", "verify", "deserialize", "total", "process", "MiB/s"]
    assert lines[2].split() == header
    rows = {" ".join(line.split()[:2]): dict(zip(header[1:], line.split()[2:], strict=True)) for line in lines[3:7]}
    assert set(rows) == {"cold 1", "warm 1", "median cold", "median warm"}
    for row in rows.values():
        assert float(row["import"]) > 0  # each run is a fresh process
        assert float(row["resolve"]) > 0
        assert float(row["deserialize"]) > 0
    assert float(rows["cold 1"]["MiB/s"]) > 0
    assert rows["warm 1"]["MiB/s"] == "-"  # nothing downloaded
