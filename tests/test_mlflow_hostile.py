"""The MLflow source against hostile and broken servers (small fakes on 127.0.0.1):
malformed answers, unbounded listings, over-long bodies, black holes and trickles,
registries pointing at local paths, and resuming an interrupted fetch."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _hostile_http import (
    ARTIFACTS_API,
    Answer,
    FakeMlflow,
    HostileServer,
    Request,
    black_hole,
    json_answer,
    trickle,
)
from helpers import read_tree
from model_loader import (
    AccessDeniedError,
    Deadline,
    FetchContext,
    FileEntry,
    IntegrityError,
    InvalidResponseError,
    ModelNotFoundError,
    SourceError,
    SourceSettings,
    SourceTimeoutError,
    parse_ref,
)
from model_loader.sources.mlflow import MlflowRegistrySource
from model_loader.sources.mlflow._artifacts import MAX_DEPTH

FILES = {"MLmodel": b"flavors: {}\n", "weights/w.bin": os.urandom(5000), "conf.txt": b"abc"}
GOOD_VERSION = {"name": "m", "version": "1", "status": "READY"}


def make_source(url: str, **kwargs: object) -> MlflowRegistrySource:
    kwargs.setdefault("environ", {})
    return MlflowRegistrySource(tracking_uri=url, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def fake() -> FakeMlflow:
    return FakeMlflow(dict(FILES))


@pytest.fixture
def server(fake: FakeMlflow) -> Iterator[HostileServer]:
    with HostileServer(fake) as srv:
        yield srv


def fetch(source: MlflowRegistrySource, dest: Path, uri: str = "models:/m@prod") -> dict[str, FileEntry]:
    dest.mkdir(parents=True, exist_ok=True)
    return {e.path: e for e in source.fetch(source.resolve(parse_ref(uri)), dest).files}


def assert_typed(exc: BaseException, kind: type[BaseException]) -> None:
    """``exc`` is exactly ``kind``, and nothing bare hides in it."""
    assert type(exc) is kind, f"{type(exc).__name__}: {exc}"
    assert exc.__cause__ is None or not isinstance(exc.__cause__, (KeyError, TypeError)), exc.__cause__


# -- malformed answers --------------------------------------------------------------------

DEEP = b"[" * 100_000
BIG = b'{"model_version": {"name": "' + b"x" * (17 * 1024 * 1024) + b'"}}'


@pytest.mark.parametrize(
    ("route", "answer", "uri"),
    [
        ("/registered-models/alias", json_answer({}), "models:/m@prod"),
        ("/registered-models/alias", json_answer({"model_version": {"name": "m", "version": "seven"}}), None),
        ("/registered-models/alias", json_answer({"model_version": {"name": "m", "version": True}}), None),
        ("/registered-models/alias", json_answer({"model_version": {"name": "m", "version": "-3"}}), None),
        ("/registered-models/alias", json_answer({"model_version": {"version": "1"}}), None),
        ("/registered-models/alias", json_answer({"model_version": []}), None),
        ("/registered-models/alias", json_answer({"model_version": {**GOOD_VERSION, "status": 7}}), None),
        ("/registered-models/alias", json_answer([GOOD_VERSION]), None),
        ("/registered-models/alias", json_answer(b"<html>a login page</html>"), None),
        ("/registered-models/alias", json_answer(b""), None),
        ("/registered-models/alias", json_answer(DEEP), None),
        ("/registered-models/alias", json_answer(BIG), None),
        ("/registered-models/alias", Answer(200, b"{}", content_length=64 * 1024 * 1024), None),
        ("/registered-models/alias", Answer(200, BIG, content_length=-1), None),
        ("/model-versions/get", json_answer({"model_version": {**GOOD_VERSION, "version": "2"}}), "models:/m/1"),
        ("/model-versions/get", json_answer({"model_version": None}), "models:/m/1"),
        ("/get-latest-versions", json_answer({"model_versions": "m"}), "models:/m/latest"),
        ("/get-latest-versions", json_answer({"model_versions": [{"name": "m"}]}), "models:/m/latest"),
        ("/get-download-uri", json_answer({}), None),
        ("/get-download-uri", json_answer({"artifact_uri": 42}), None),
        ("/get-download-uri", json_answer({"artifact_uri": ""}), None),
        ("/logged-models/m-0123", json_answer({"model": {"info": {"model_id": "m-0123"}}}), "models:/m-0123"),
        ("/logged-models/m-0123", json_answer({"model": "m-0123"}), "models:/m-0123"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_malformed_registry_answers_are_invalid_response(
    fake: FakeMlflow, server: HostileServer, route: str, answer: Answer, uri: str | None
) -> None:
    fake.overrides[route] = answer
    with pytest.raises(InvalidResponseError) as info:
        make_source(server.url).resolve(parse_ref(uri or "models:/m@prod"))
    assert_typed(info.value, InvalidResponseError)
    assert info.value.scheme == "models"
    assert "malformed answer" in str(info.value) or "unexpected answer" in str(info.value)


def test_run_indirection_answered_badly_is_invalid_response(fake: FakeMlflow, server: HostileServer) -> None:
    fake.location = "runs:/abc/model"
    fake.overrides["/runs/get"] = json_answer({"run": {"info": {}}})
    with pytest.raises(InvalidResponseError, match=r"run\.info\.artifact_uri"):
        make_source(server.url).resolve(parse_ref("models:/m@prod"))


def test_error_answers_with_hostile_bodies_keep_their_kind(fake: FakeMlflow, server: HostileServer) -> None:
    """A 404 whose body is deeply nested JSON, or not JSON: still a status, never a bare error."""
    fake.overrides["/registered-models/alias"] = json_answer(DEEP, 503)
    with pytest.raises(SourceError) as info:
        make_source(server.url).resolve(parse_ref("models:/m@prod"))
    assert type(info.value).__name__ == "SourceUnavailableError"


def test_history_search_malformed_or_paging_forever(fake: FakeMlflow, server: HostileServer) -> None:
    src = make_source(server.url)
    latest = src.resolve(parse_ref("models:/m/1"))
    newer = latest.__class__(latest.ref, latest.source_id, "m/9", None, (("name", "m"), ("version", "9")))
    fake.overrides["/model-versions/search"] = json_answer({"model_versions": [{"name": "m", "version": "x"}]})
    with pytest.raises(InvalidResponseError):
        src.previous_versions(newer, 3)
    page = {"model_versions": [{**GOOD_VERSION, "version": "10"}], "next_page_token": "again"}
    fake.overrides["/model-versions/search"] = json_answer(page)
    with pytest.raises(InvalidResponseError, match="circle"):
        src.previous_versions(newer, 3)
    assert len(server.paths("/api/2.0/mlflow/model-versions/search")) == 3  # 1 + the page and its repeat


# -- listings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "files",
    [
        [{"is_dir": False, "file_size": 3}],  # no path
        [{"path": "w.bin", "is_dir": False, "file_size": "big"}],
        [{"path": "w.bin", "is_dir": False, "file_size": -1}],
        [{"path": "w.bin", "file_size": 3}, {"path": "w.bin", "file_size": 3}],
        [{"path": "", "is_dir": True}],
        [{"path": ".", "is_dir": True}],
        [{"path": "a/b/c", "is_dir": False, "file_size": 3}],
        {"path": "w.bin"},
        "w.bin",
    ],
)
def test_malformed_listings_are_invalid_response(
    fake: FakeMlflow, server: HostileServer, files: object, tmp_path: Path
) -> None:
    fake.overrides["?path=" + fake.root.replace("/", "%2F")] = json_answer({"files": files})
    with pytest.raises(InvalidResponseError):
        fetch(make_source(server.url), tmp_path)
    assert read_tree(tmp_path) == {}


def test_listing_that_contains_itself_is_refused_within_bounds(fake: FakeMlflow, tmp_path: Path) -> None:
    """A server answering every listing with the same directory: once 7,000 requests in 40 s."""
    fake.overrides[ARTIFACTS_API] = json_answer({"files": [{"path": "loop", "is_dir": True}]})
    with HostileServer(fake) as srv:
        with pytest.raises(InvalidResponseError, match=f"deeper than {MAX_DEPTH}"):
            fetch(make_source(srv.url), tmp_path)
        assert len(srv.paths(ARTIFACTS_API)) == MAX_DEPTH

        full = f"{fake.root}/sub"  # a directory whose listing names its own full path
        fake.overrides[ARTIFACTS_API] = lambda r: json_answer(
            {"files": [{"path": full if r.query["path"] == full else "sub", "is_dir": True}]}
        )
        with pytest.raises(InvalidResponseError, match="contains the directory itself"):
            fetch(make_source(srv.url), tmp_path)


def test_listing_with_an_escaping_path_is_an_integrity_error(
    fake: FakeMlflow, server: HostileServer, tmp_path: Path
) -> None:
    fake.overrides[ARTIFACTS_API] = json_answer({"files": [{"path": "../../escape", "file_size": 3}]})
    with pytest.raises(IntegrityError):
        fetch(make_source(server.url), tmp_path / "a" / "b")
    assert not (tmp_path / "escape").exists()


# -- bodies -------------------------------------------------------------------------------


def _endless(request: Request, fake: FakeMlflow) -> Answer | None:
    if request.path.startswith(ARTIFACTS_API + "/") and request.path.endswith("conf.txt"):
        return Answer(200, b"abc", content_length=-1, endless=True)
    return fake(request)


def test_endless_artifact_body_stops_at_listed_size(fake: FakeMlflow, tmp_path: Path) -> None:
    """The listing says 3 bytes; the server sends forever. Nothing beyond 3 bytes is written."""
    with HostileServer(lambda r: _endless(r, fake)) as srv:
        src = make_source(srv.url, max_concurrency=1)
        with pytest.raises(IntegrityError, match="longer than the 3 bytes"):
            fetch(src, tmp_path / "d")
    assert not (tmp_path / "d" / "conf.txt").exists()
    assert sum(p.stat().st_size for p in (tmp_path / "d").rglob("*") if p.is_file()) <= sum(map(len, FILES.values()))


def _conf_answer(fake: FakeMlflow, answer: Answer) -> HostileServer:
    """``fake``, except that downloading ``conf.txt`` (3 bytes) gets ``answer``."""

    def behaviour(request: Request) -> Answer | None:
        if request.path == fake.file_path("conf.txt"):
            return answer
        return fake(request)

    return HostileServer(behaviour)


def test_file_listed_without_a_size_may_not_have_bytes(fake: FakeMlflow, tmp_path: Path) -> None:
    """MLflow's JSON leaves out a size of 0: a file listed so is read as empty, at most 1 byte."""
    listing = {"files": [{"path": "conf.txt"}, {"path": "MLmodel", "file_size": len(FILES["MLmodel"])}]}
    fake.overrides["?path=" + fake.root.replace("/", "%2F")] = json_answer(listing)
    endless = Answer(200, b"abc", content_length=-1, endless=True)
    with _conf_answer(fake, endless) as srv, pytest.raises(IntegrityError, match="longer than the 0 bytes"):
        fetch(make_source(srv.url, max_concurrency=1), tmp_path)
    assert not (tmp_path / "conf.txt").exists()


def test_declared_length_other_than_listed_is_refused_unread(fake: FakeMlflow, tmp_path: Path) -> None:
    lying = Answer(200, b"abc", content_length=10**12)
    with _conf_answer(fake, lying) as srv, pytest.raises(IntegrityError, match="sends 1000000000000 bytes"):
        fetch(make_source(srv.url), tmp_path)
    assert not (tmp_path / "conf.txt").exists()


def test_body_cut_mid_way_is_transient(fake: FakeMlflow, tmp_path: Path) -> None:
    cut = Answer(200, b"ab", content_length=-1, headers={"Content-Length": "3"})  # then the connection closes
    with _conf_answer(fake, cut) as srv, pytest.raises(SourceError) as info:
        fetch(make_source(srv.url), tmp_path)
    assert type(info.value).__name__ == "SourceUnavailableError"


def test_endless_presigned_body_stops_at_listed_size(fake: FakeMlflow, tmp_path: Path) -> None:
    def storage(request: Request) -> Answer | None:
        return Answer(200, b"x" * 100, content_length=-1, endless=True, headers={"Content-Type": "binary"})

    with HostileServer(storage) as store:
        fake.presigned_url = f"{store.url}/bucket/{{path}}?X-Amz-Signature=s3cr3t"
        with HostileServer(fake) as srv, pytest.raises(IntegrityError, match="longer than"):
            fetch(make_source(srv.url), tmp_path)
        assert store.requests


def test_malformed_presign_answer_streams_through_the_server(
    fake: FakeMlflow, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def presign(request: Request) -> Answer | None:
        if "/presigned/" in request.path:
            return json_answer({"url": 7, "headers": {"X-Secret": "s3cr3t"}})
        return fake(request)

    with HostileServer(presign) as srv:
        src = make_source(srv.url, max_concurrency=1)
        got = fetch(src, tmp_path)
    assert set(got) == set(FILES)
    assert not src._stores.presign.enabled
    assert "s3cr3t" not in caplog.text


# -- time ---------------------------------------------------------------------------------


def _resolve_within(url: str, seconds: float, **kwargs: object) -> tuple[BaseException, float]:
    src = make_source(url, **kwargs)
    started = time.monotonic()
    with pytest.raises(SourceTimeoutError) as info, Deadline(seconds, what="the test deadline").applied():
        src.resolve(parse_ref("models:/m@prod"))
    return info.value, time.monotonic() - started


def test_black_hole_registry_is_cut_at_the_deadline() -> None:
    with HostileServer(black_hole) as srv:
        exc, elapsed = _resolve_within(srv.url, 1.0)  # default read timeout: 60 s
    assert elapsed < 2.0
    assert "the test deadline expired" in str(exc)


def test_trickling_registry_is_cut_at_the_deadline(fake: FakeMlflow) -> None:
    """One byte a second never trips a 60 s read timeout; the budget cuts it."""
    with HostileServer(trickle(json_answer({"model_version": GOOD_VERSION}), 0.2)) as srv:
        exc, elapsed = _resolve_within(srv.url, 1.5)
    assert elapsed < 2.5
    assert "the test deadline expired" in str(exc)


def test_trickling_json_answer_is_cut_by_the_read_timeout_without_a_deadline() -> None:
    with HostileServer(trickle(json_answer({"model_version": GOOD_VERSION}), 0.1)) as srv:
        src = make_source(srv.url, read_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(SourceTimeoutError):
            src.resolve(parse_ref("models:/m@prod"))
    assert time.monotonic() - started < 2.0


def test_trickling_tls_handshake_is_cut_at_the_deadline() -> None:
    """A server that starts a TLS record and then sends a byte a second."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(b"\x16\x03\x03\x40\x00")  # a 16 KiB handshake record follows...
            while not stop.wait(0.2):
                try:
                    conn.sendall(b"\x00")  # ...one byte at a time
                except OSError:
                    return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        exc, elapsed = _resolve_within(url, 1.5)
        assert elapsed < 2.5
        assert "expired" in str(exc)
    finally:
        stop.set()
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("where", ["listing", "download"])
def test_fetch_ends_within_its_deadline(fake: FakeMlflow, where: str, tmp_path: Path) -> None:
    """Every file trickles (or the listing does): the whole parallel fetch ends at T (+1 s)."""
    big = {f"f{i}.bin": os.urandom(2000) for i in range(6)}
    fake.files = big

    def slow(request: Request) -> Answer | None:
        answer = fake(request)
        listing = request.path == ARTIFACTS_API
        if answer is not None and (listing if where == "listing" else request.path.startswith(ARTIFACTS_API + "/")):
            return Answer(answer.status, answer.body, answer.headers, trickle=0.05)
        return answer

    with HostileServer(slow) as srv:
        src = make_source(srv.url)
        resolved = src.resolve(parse_ref("models:/m@prod"))
        started = time.monotonic()
        with pytest.raises(SourceTimeoutError), Deadline(1.5, what="the test deadline").applied():
            src.fetch(resolved, tmp_path)
        elapsed = time.monotonic() - started
    assert elapsed < 2.5


# -- local artifact locations ---------------------------------------------------------------


@pytest.mark.parametrize("location", ["file:///etc", "/home/someone/model", "mlruns/0/abc/artifacts/model"])
def test_remote_registry_cannot_point_at_local_paths(fake: FakeMlflow, server: HostileServer, location: str) -> None:
    fake.location = location
    with pytest.raises(AccessDeniedError, match="allow_local_artifacts") as info:
        make_source(server.url).resolve(parse_ref("models:/m@prod"))
    assert info.value.scheme == "models"


def test_local_paths_allowed_by_the_setting(
    fake: FakeMlflow, server: HostileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    store = tmp_path / "store"
    for rel, data in FILES.items():
        (store / rel).parent.mkdir(parents=True, exist_ok=True)
        (store / rel).write_bytes(data)
    fake.location = store.as_uri()
    for src in (
        make_source(server.url, allow_local_artifacts=True),
        MlflowRegistrySource.from_settings(SourceSettings(allow_local_artifacts=True)),
    ):
        dest = tmp_path / f"d{id(src)}"
        got = fetch(src, dest)
        assert read_tree(dest) == FILES
        assert all(e.sha256 == hashlib.sha256(FILES[p]).hexdigest() for p, e in got.items())


def test_fetch_refuses_a_local_location_in_a_resolution(
    fake: FakeMlflow, server: HostileServer, tmp_path: Path
) -> None:
    src = make_source(server.url)
    resolved = src.resolve(parse_ref("models:/m@prod"))
    forged = resolved.__class__(resolved.ref, resolved.source_id, resolved.version, None, (("storage_location", "/"),))
    with pytest.raises(AccessDeniedError):
        src.fetch(forged, tmp_path)
    assert read_tree(tmp_path) == {}


def test_history_skips_versions_at_local_paths(fake: FakeMlflow, server: HostileServer) -> None:
    versions = [{**GOOD_VERSION, "version": str(v)} for v in (3, 2, 1)]
    fake.overrides["/model-versions/search"] = json_answer({"model_versions": versions})
    fake.overrides["/get-download-uri"] = lambda r: json_answer(
        {"artifact_uri": "file:///srv/v2" if r.query["version"] == "2" else fake.location}
    )
    src = make_source(server.url)
    newest = src.resolve(parse_ref("models:/m/1"))
    newest = newest.__class__(newest.ref, newest.source_id, "m/4", None, (("name", "m"), ("version", "4")))
    assert [r.version for r in src.previous_versions(newest, 5)] == ["m/3", "m/1"]


# -- resume -------------------------------------------------------------------------------


class Recorder:
    def __init__(self, completed: dict[str, FileEntry]) -> None:
        self.done: list[FileEntry] = []
        self.bytes = 0
        self._lock = threading.Lock()
        self.context = FetchContext(completed=completed, file_done=self.file_done, progress=self.progress)

    def file_done(self, entry: FileEntry) -> None:
        with self._lock:
            self.done.append(entry)

    def progress(self, n: int) -> None:
        with self._lock:
            self.bytes += n


def test_resume_keeps_completed_files_and_reports_the_rest(
    fake: FakeMlflow, server: HostileServer, tmp_path: Path
) -> None:
    src = make_source(server.url)
    assert MlflowRegistrySource.capabilities.resumable
    resolved = src.resolve(parse_ref("models:/m@prod"))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(FILES["weights/w.bin"])
    (tmp_path / "conf.txt").write_bytes(b"ab")  # a completed file the listing now sizes differently
    (tmp_path / "old.bin").write_bytes(b"gone")  # a completed file no longer wanted
    (tmp_path / "MLmodel").write_bytes(b"partial")  # an unjournaled partial file
    w_sha = hashlib.sha256(FILES["weights/w.bin"]).hexdigest()
    completed = {
        "weights/w.bin": FileEntry("weights/w.bin", 5000, w_sha),
        "conf.txt": FileEntry("conf.txt", 2, "00"),
        "old.bin": FileEntry("old.bin", 4, "00"),
    }
    rec = Recorder(completed)
    with rec.context.applied():
        manifest = src.fetch(resolved, tmp_path)
    assert read_tree(tmp_path) == FILES
    downloads = [p for p in server.paths(ARTIFACTS_API + "/")]
    assert not any(p.endswith("w.bin") for p in downloads)
    assert sorted(e.path for e in rec.done) == ["MLmodel", "conf.txt"]
    for entry in rec.done:
        assert entry.sha256 == hashlib.sha256(FILES[entry.path]).hexdigest()
        assert entry.verified is None  # the proxied listing gives sizes only
    assert rec.bytes == len(FILES["MLmodel"]) + len(FILES["conf.txt"])
    assert {e.path: e.size for e in manifest.files} == {p: len(d) for p, d in FILES.items()}


@pytest.mark.slow
def test_resume_hands_s3_only_the_missing_files(
    fake: FakeMlflow, server: HostileServer, moto_server: object, s3_client: object, tmp_path: Path
) -> None:
    from _s3_server import make_bucket, put_files

    bucket = make_bucket(s3_client)
    put_files(s3_client, bucket, "model/", FILES)
    fake.location = f"s3://{bucket}/model"
    src = make_source(server.url, s3_endpoint_url=moto_server.endpoint_url)  # type: ignore[attr-defined]
    resolved = src.resolve(parse_ref("models:/m@prod"))
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(b"\0" * 5000)  # same size, other bytes: proves it was skipped
    rec = Recorder({"weights/w.bin": FileEntry("weights/w.bin", 5000, "kept")})
    with rec.context.applied():
        manifest = src.fetch(resolved, tmp_path)
    assert (tmp_path / "weights" / "w.bin").read_bytes() == b"\0" * 5000
    assert read_tree(tmp_path)["conf.txt"] == FILES["conf.txt"]
    assert sorted(e.path for e in rec.done) == ["MLmodel", "conf.txt"]
    assert {e.path for e in manifest.files} == set(FILES)
    src.close()


# -- cost -----------------------------------------------------------------------------------


def test_rest_path_in_a_fresh_process_imports_no_mlflow(server: HostileServer, tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys, pathlib
        from model_loader import parse_ref
        from model_loader.sources.mlflow import MlflowRegistrySource
        src = MlflowRegistrySource(tracking_uri={server.url!r}, environ={{}})
        dest = pathlib.Path({str(tmp_path / "out")!r}); dest.mkdir()
        src.fetch(src.resolve(parse_ref("models:/m@prod")), dest)
        print(",".join(m for m in ("mlflow", "requests", "urllib3", "boto3") if m in sys.modules) or "none")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "none"


def test_unknown_routes_and_not_found_keep_their_meaning(fake: FakeMlflow, server: HostileServer) -> None:
    fake.overrides["/registered-models/alias"] = json_answer(
        {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no alias"}, 404
    )
    with pytest.raises(ModelNotFoundError):
        make_source(server.url).resolve(parse_ref("models:/m@prod"))
