from __future__ import annotations

import os

import pytest

from model_loader import InvalidReferenceError, UnknownSchemeError, parse_ref


@pytest.mark.parametrize(
    ("uri", "scheme", "location", "selector", "kind", "canonical"),
    [
        ("models:/iris@champion", "models", "iris", "champion", "alias", "models:/iris@champion"),
        ("models:/iris/3", "models", "iris", "3", "version", "models:/iris/3"),
        ("models:/iris/007", "models", "iris", "7", "version", "models:/iris/7"),
        ("models:/iris/production", "models", "iris", "Production", "stage", "models:/iris/Production"),
        ("models:/iris/Staging", "models", "iris", "Staging", "stage", "models:/iris/Staging"),
        ("models:/iris/latest", "models", "iris", "latest", "latest", "models:/iris/latest"),
        ("models:/m-0a1b2c", "models", "m-0a1b2c", "m-0a1b2c", "logged_model", "models:/m-0a1b2c"),
        ("models:/my model/2", "models", "my model", "2", "version", "models:/my model/2"),
        ("s3://bucket/prefix/", "s3", "bucket/prefix/", None, "none", "s3://bucket/prefix/"),
        ("s3://bucket/key.pkl", "s3", "bucket/key.pkl", None, "none", "s3://bucket/key.pkl"),
        ("s3://my.bucket-1/a/b", "s3", "my.bucket-1/a/b", None, "none", "s3://my.bucket-1/a/b"),
        ("s3://bucket/k?versionId=abc", "s3", "bucket/k", "abc", "version_id", "s3://bucket/k?versionId=abc"),
        ("file:///srv/models/iris", "file", "/srv/models/iris", None, "none", "file:///srv/models/iris"),
        ("file://localhost/srv/m", "file", "/srv/m", None, "none", "file:///srv/m"),
        ("/srv/models/iris/", "file", "/srv/models/iris", None, "none", "file:///srv/models/iris"),
    ],
)
def test_valid_references(
    uri: str, scheme: str, location: str, selector: str | None, kind: str, canonical: str
) -> None:
    ref = parse_ref(uri)
    assert (ref.scheme, ref.location, ref.selector, ref.selector_kind, ref.uri) == (
        scheme,
        location,
        selector,
        kind,
        canonical,
    )
    assert parse_ref(ref.uri) == ref  # canonical form round-trips


def test_relative_and_home_paths_become_absolute(tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_ref("./m").location == os.path.join(str(tmp_path), "m")
    assert parse_ref("m").location == os.path.join(str(tmp_path), "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_ref("~/x").location == os.path.join(str(tmp_path), "x")


def test_pinned_refs() -> None:
    assert parse_ref("models:/iris/3").pinned
    assert parse_ref("models:/m-abc").pinned
    assert parse_ref("s3://bucket/k?versionId=1").pinned
    assert not parse_ref("models:/iris@prod").pinned
    assert not parse_ref("s3://bucket/p/").pinned


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("models:iris@x", "one slash"),
        ("models://iris/1", "one slash"),
        ("models:/iris", "name the version"),
        ("models:/iris/", "empty"),
        ("models:/iris/0", "start at 1"),
        ("models:/iris/Prod", "not a version number"),
        ("models:/@alias", "model name"),
        ("models:/iris@bad alias", "alias"),
        ("models:/iris@", "alias"),
        ("models:/iris/1?x=1", "no query"),
        ("s3://", "no bucket"),
        ("s3:///key", "no bucket"),
        ("s3://Bad_Bucket/k", "not a valid bucket"),
        ("s3://ab/k", "not a valid bucket"),
        ("s3://bucket/p/?versionId=1", "single object"),
        ("s3://bucket/k?versionId=", "single object"),
        ("file://remote-host/dir", "host"),
        ("file:///dir?x=1", "no query"),
        ("/a\0b", "NUL"),
    ],
)
def test_invalid_references_name_the_problem_and_the_accepted_forms(uri: str, fragment: str) -> None:
    with pytest.raises(InvalidReferenceError) as info:
        parse_ref(uri)
    assert fragment in str(info.value)
    assert "accepted:" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        parse_ref("gopher://x/y")
    message = str(info.value)
    assert "'gopher'" in message
    for known in ("file", "models", "s3"):
        assert known in message


def test_unknown_scheme_allowed_when_caller_brings_the_source() -> None:
    ref = parse_ref("mem://iris?alias=prod", check_scheme=False)
    assert (ref.scheme, ref.location, ref.params) == ("mem", "iris", (("alias", "prod"),))
