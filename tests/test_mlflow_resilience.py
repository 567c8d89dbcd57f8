"""ResilientLoader with DEFAULT settings against an MLflow registry that turns hostile:
a black hole, a trickle, malformed answers, a location on the loader's own disk.

The registry is a small scripted fake on 127.0.0.1; "replaced" means the fake is closed
and a hostile server takes over the same port, so the tracking URI does not change.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _hostile_http import (
    ARTIFACTS_API,
    Answer,
    Behaviour,
    FakeMlflow,
    HostileServer,
    Request,
    black_hole,
    json_answer,
    trickle,
)
from helpers import read_tree, write_tree
from model_loader import (
    AccessDeniedError,
    AllSourcesFailedError,
    CacheConfig,
    InvalidResponseError,
    LoaderConfig,
    ResilientLoader,
    SourceTimeoutError,
)

FILES = {"MLmodel": b"flavors: {}\n", "weights/w.bin": b"w" * 4096, "conf.txt": b"abc"}
REF = "models:/m@prod"
SERVED_WITHIN = 5.0  # the promise: a warm start survives a hung registry within 5 s

HOSTILE: dict[str, Behaviour] = {
    "black-hole": black_hole,
    "trickle": trickle(json_answer({"model_version": {"name": "m", "version": "1"}}), 1.0),
    "empty-object": lambda r: json_answer({}),
    "version-seven": lambda r: json_answer({"model_version": {"name": "m", "version": "seven"}}),
    "not-json": lambda r: json_answer(b"<html>maintenance</html>"),
}
EXPECTED = {"black-hole": SourceTimeoutError, "trickle": SourceTimeoutError}


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileServer]:
    """A healthy fake registry, reached through ``MLFLOW_TRACKING_URI`` as in production."""
    with HostileServer(FakeMlflow(dict(FILES))) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        yield server


def default_config(cache: Path, **changes: object) -> LoaderConfig:
    return LoaderConfig(cache=CacheConfig(dir=cache), **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_warm_cache_serves_last_known_good_when_registry_turns_hostile(
    registry: HostileServer, kind: str, tmp_path: Path
) -> None:
    with ResilientLoader([REF], config=default_config(tmp_path)) as loader:
        first = loader.fetch()
        assert (first.version, first.degraded) == ("m/1", False)

        registry.close()
        with HostileServer(HOSTILE[kind], port=registry.port) as hostile:
            started = time.monotonic()
            served = loader.fetch()
            elapsed = time.monotonic() - started
            assert hostile.requests  # it was asked, and did not answer usefully
    assert elapsed < SERVED_WITHIN
    assert (served.degraded, served.from_cache, served.version, served.path) == (True, True, "m/1", first.path)
    assert read_tree(served.path) == FILES
    error = EXPECTED.get(kind, InvalidResponseError).__name__
    assert any(error in message for _, message in served.failures), served.failures


@pytest.mark.parametrize("kind", ["black-hole", "version-seven"])
def test_healthy_second_source_serves_when_registry_is_hostile(
    registry: HostileServer, kind: str, tmp_path: Path
) -> None:
    local = tmp_path / "mirror"
    write_tree(local, FILES)
    registry.behaviour = HOSTILE[kind]
    started = time.monotonic()
    with ResilientLoader([REF, str(local)], config=default_config(tmp_path / "cache")) as loader:
        served = loader.fetch()
    assert time.monotonic() - started < SERVED_WITHIN
    assert served.source == local.as_uri()
    assert not served.degraded
    assert read_tree(served.path) == FILES
    assert served.failures[0][0] == REF
    assert EXPECTED.get(kind, InvalidResponseError).__name__ in served.failures[0][1]


@pytest.mark.parametrize(
    ("route", "answer"),
    [
        ("/registered-models/alias", json_answer({})),
        ("/get-download-uri", json_answer({"artifact_uri": None})),
        (ARTIFACTS_API, json_answer({"files": [{"is_dir": False, "file_size": 3}]})),  # an entry without a path
        (ARTIFACTS_API, json_answer({"files": [{"path": "loop", "is_dir": True}]})),  # a listing containing itself
    ],
    ids=["alias", "download-uri", "listing-entry", "listing-loop"],
)
def test_cold_cache_and_malformed_registry_fail_naming_invalid_response(
    route: str, answer: Answer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake = FakeMlflow(dict(FILES), overrides={route: answer})
    with HostileServer(fake) as server:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        loader = ResilientLoader([REF], config=default_config(tmp_path))
        with loader, pytest.raises(AllSourcesFailedError) as info:
            loader.fetch()
    assert type(info.value.failures[0][1]) is InvalidResponseError
    assert "InvalidResponseError" in str(info.value)


def test_remote_registry_pointing_at_a_local_path_is_refused(
    registry: HostileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "home" / "someone"
    write_tree(secret, {"id_rsa": b"-----BEGIN PRIVATE KEY-----"})
    fake = FakeMlflow(dict(FILES), location=secret.as_uri())
    registry.behaviour = fake
    cache = tmp_path / "cache"
    with ResilientLoader([REF], config=default_config(cache)) as loader, pytest.raises(AllSourcesFailedError) as info:
        loader.fetch()
    refused = info.value.failures[0][1]
    assert isinstance(refused, AccessDeniedError)
    assert "allow_local_artifacts" in str(refused)
    assert not any(p.name == "id_rsa" for p in cache.rglob("*"))

    with ResilientLoader([REF], config=default_config(cache, allow_local_artifacts=True)) as loader:
        assert read_tree(loader.fetch().path) == {"id_rsa": b"-----BEGIN PRIVATE KEY-----"}


def test_every_fetch_ends_within_the_deadline(registry: HostileServer, tmp_path: Path) -> None:
    """Artifacts trickling at a byte a second, cold cache, ``deadline=T``: over by T + 1 s."""
    fake = FakeMlflow(dict(FILES))

    def slow_artifacts(request: Request) -> Answer | None:
        answer = fake(request)
        if answer is not None and request.path.startswith(ARTIFACTS_API + "/"):
            return Answer(answer.status, answer.body, answer.headers, trickle=1.0)
        return answer

    registry.behaviour = slow_artifacts
    deadline = 2.0
    started = time.monotonic()
    loader = ResilientLoader([REF], config=default_config(tmp_path, deadline=deadline))
    with loader, pytest.raises(AllSourcesFailedError) as info:
        loader.fetch()
    assert time.monotonic() - started < deadline + 1.0
    assert isinstance(info.value.failures[0][1], SourceTimeoutError)
