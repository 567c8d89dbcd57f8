from __future__ import annotations

import os
import random

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
        # read as MLflow's client reads them (split_models_uri, then _parse_model_uri)
        ("models:/iris/3/", "models", "iris", "3", "version", "models:/iris/3"),
        ("models:/iris@champion/", "models", "iris", "champion", "alias", "models:/iris@champion"),
        ("models:/m-0a1b2c/", "models", "m-0a1b2c", "m-0a1b2c", "logged_model", "models:/m-0a1b2c"),
        ("models:///iris/3", "models", "iris", "3", "version", "models:/iris/3"),
        ("MODELS:/iris/LATEST", "models", "iris", "latest", "latest", "models:/iris/latest"),
        ("models:/iris@chämpion", "models", "iris", "chämpion", "alias", "models:/iris@chämpion"),
        ("models:/iris@生产", "models", "iris", "生产", "alias", "models:/iris@生产"),
        ("models:/team@fraud@champion", "models", "team@fraud", "champion", "alias", "models:/team@fraud@champion"),
        ("models:/iris#1/3", "models", "iris#1", "3", "version", "models:/iris#1/3"),
        ("models:/what?/3", "models", "what?", "3", "version", "models:/what?/3"),
        ("models:/a%20b/3", "models", "a%20b", "3", "version", "models:/a%20b/3"),
        ("models:/ iris/3", "models", " iris", "3", "version", "models:/ iris/3"),
        ("models:/iris:v1/3", "models", "iris:v1", "3", "version", "models:/iris:v1/3"),
        ("  models:/iris/3  ", "models", "iris", "3", "version", "models:/iris/3"),
        ("runs:/0123abcd/model", "runs", "0123abcd", None, "none", "runs:/0123abcd/model"),
        ("runs:/0123abcd/model/", "runs", "0123abcd", None, "none", "runs:/0123abcd/model"),
        ("runs:///0123abcd/a/b", "runs", "0123abcd", None, "none", "runs:/0123abcd/a/b"),
        ("runs:/0123abcd", "runs", "0123abcd", None, "none", "runs:/0123abcd"),
        # S3 keys are literal, as in the AWS CLI and s3fs
        ("s3://bucket/a%20b", "s3", "bucket/a%20b", None, "none", "s3://bucket/a%20b"),
        ("s3://bucket//k", "s3", "bucket//k", None, "none", "s3://bucket//k"),
        ("s3://bucket/a#b", "s3", "bucket/a#b", None, "none", "s3://bucket/a#b"),
        ("s3://bucket/a?b", "s3", "bucket/a?b", None, "none", "s3://bucket/a?b"),
        ("s3://bucket/what?.txt", "s3", "bucket/what?.txt", None, "none", "s3://bucket/what?.txt"),
        ("s3://bucket/a b/", "s3", "bucket/a b/", None, "none", "s3://bucket/a b/"),
        ("s3://bucket/what??versionId=1", "s3", "bucket/what?", "1", "version_id", "s3://bucket/what??versionId=1"),
        ("s3://bucket", "s3", "bucket/", None, "none", "s3://bucket/"),
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


@pytest.mark.parametrize(
    ("uri", "location", "selector", "kind", "path", "canonical"),
    [
        ("models:/iris/3/MLmodel", "iris", "3", "version", "MLmodel", "models:/iris/3/MLmodel"),
        ("models:/iris@champion/sub/dir/", "iris", "champion", "alias", "sub/dir", "models:/iris@champion/sub/dir"),
        ("models:/iris/latest/a#b", "iris", "latest", "latest", "a#b", "models:/iris/latest/a#b"),
        ("models:/iris/production/x", "iris", "Production", "stage", "x", "models:/iris/Production/x"),
        # MLflow's split: a first segment holding '@' is name@alias, so this is file "3" of alias "fraud"
        ("models:/team@fraud/3", "team", "fraud", "alias", "3", "models:/team@fraud/3"),
        ("models:/team@fraud@champion/MLmodel", "team@fraud", "champion", "alias", "MLmodel", None),
        ("runs:/0123abcd/model/MLmodel", "0123abcd", None, "none", "model/MLmodel", None),
    ],
)
def test_paths_inside_a_model_are_kept_as_the_path_parameter(
    uri: str, location: str, selector: str | None, kind: str, path: str, canonical: str | None
) -> None:
    ref = parse_ref(uri)
    assert (ref.location, ref.selector, ref.selector_kind, ref.params) == (location, selector, kind, (("path", path),))
    assert ref.uri == (canonical or uri)
    assert parse_ref(ref.uri) == ref


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
        ("models:/iris/", "name the version"),  # MLflow: the same as models:/iris
        ("models:/", "names no model"),
        ("models:///", "names no model"),
        ("models:/ /3", "blank"),
        ("models:/iris/ ", "name the version"),  # the reference is stripped first
        ("models:/iris/ /x", "is empty"),
        ("models://iris/1", "reads 'iris' as a host"),
        ("models://prof@databricks/iris/1", "Databricks profile"),
        ("models://databricks/iris/1", "databricks://<profile>"),
        ("models:/iris/3//MLmodel", "empty segment"),
        ("models:/iris/3/../x", "'..' segment"),
        ("models:/iris/3/./x", "'.' segment"),
        ("models:/iris/99999999999999999999", "out of range"),
        ("models:/iris@" + "a" * 256, "at most 255"),
        ("models:/iris\n@prod", "control character U+000A"),
        ("models:/iris@prod?x=1", "take no query"),
        ("models:/m-0a1b/MLmodel", "files inside a logged model"),
        ("runs:/", "no run id"),
        ("runs:/-abc/model", "run id"),
        ("runs:/abc/model//x", "empty segment"),
        ("runs://host/abc/model", "as a host"),
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
        ("s3://[x/", "malformed URL"),
        ("s3://bucket]/k", "malformed URL"),
        ("s3:bucket/k", "no bucket"),
        ("file://[::1/srv/m", "malformed URL"),
        ("/srv/models/\udcff", "byte 0xff at position 12 is not valid UTF-8"),
        ("s3://bucket/k\ud800", "lone surrogate U+D800"),
        ("models:/iris/\u00b2", "not a version number"),  # a digit to str.isdigit, not to int()
        ("models:/iris/\u0663", "ASCII digits"),  # Arabic-Indic 3: not version 3
        ("models:/iris/\u00b2/", "not a version number"),
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


def test_a_path_that_is_not_utf8_is_an_invalid_reference(tmp_path: os.PathLike[str]) -> None:
    path = os.fsdecode(os.fsencode(tmp_path) + b"/model-\xe9")  # latin-1 bytes on disk, as os.listdir gives them
    with pytest.raises(InvalidReferenceError, match=r"byte 0xe9 .* not valid UTF-8"):
        parse_ref(path)


def test_a_malformed_plugin_url_is_an_invalid_reference() -> None:
    with pytest.raises(InvalidReferenceError, match="malformed URL"):
        parse_ref("mem://[iris", check_scheme=False)


def test_bytes_are_not_a_reference() -> None:
    with pytest.raises(TypeError, match="str"):
        parse_ref(b"/srv/models/iris")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("uri", "key", "version_id"),
    [
        ("s3://bucket//abs/key", "/abs/key", None),  # a key that starts with '/'
        ("s3://bucket/%2Fabs/key", "%2Fabs/key", None),  # literal: '%' is part of the key
        ("s3://bucket/a#b?versionId=1", "a#b", "1"),
        ("s3://bucket/k?1?versionId=1", "k?1", "1"),
        ("s3://bucket/p/?exclude=model?.bin", "p/", None),
        ("s3://bucket/k?versionId=3HL4kqtJ%2Brm", "k", "3HL4kqtJ+rm"),  # '+' in a VersionId
        ("s3://bucket/k?versionId=a%26b%3Dc", "k", "a&b=c"),
    ],
)
def test_canonical_s3_uris_round_trip_what_they_name(uri: str, key: str, version_id: str | None) -> None:
    ref = parse_ref(uri)
    assert (ref.location, ref.selector) == (f"bucket/{key}", version_id)
    assert parse_ref(ref.uri) == ref


# A corpus of hostile references: every outcome is a ModelRef whose canonical URI parses back to
# it, or InvalidReferenceError (UnknownSchemeError is one) naming the problem. Never a bare
# ValueError, UnicodeError, IndexError...
HOSTILE = [
    "s3://[x/", "s3://]", "s3://bucket:99999/k", "s3://bucket:abc/k", "s3://bucket/%", "s3://bucket/%zz",
    "s3://bucket/k?versionId=%", "s3://bucket/k?&&==&", "s3://bucket/k#frag", "s3:bucket", "s3:/bucket/k",
    "models:/", "models:/@", "models:/a@b@c", "models:/a/b/c/1", "models:/a/99999999999999999999999",
    "models:/a/-1", "models:/a/+1", "models:/a/1.0", "models:/a/%31", "models:/m-", "models:/m-xyz",
    "file:", "file:/", "file://", "file:///", "file://user@host/x", "file:///a%00b", "file:///%ff",
    "file:///a?", "file:///a#", "~nosuchuser/x", "~", ".", "..", "C:\\models", "c:/m", "\\\\server\\share",
    "mem://", "mem://[", "mem://a?b=%", "x:", "x+y.z-w://host", "\udcff", "/\udcff", "models:/\udcff/1",
    "s3://bucket/\udcff", "\u202e/etc", "\x00", "   \t\n ", "models:/iris\n@prod", "s3://bucket/k?versionId=\udcff",
]  # fmt: skip


def _hostile_corpus() -> list[str]:
    rng = random.Random(20261128)
    prefixes = ["", "models:/", "models:", "s3://", "s3://bucket/", "file://", "file:///", "mem://", "/", "./", "~"]
    pieces = [
        *"abcXYZ019-_.~/@:?#&=%[] \t\n\0+,;",
        "\udcff", "\u00b2", "\u0663", "\u00e9", "%zz", "%2F", "%00", "%ff", "?versionId=", "//", "..",
        "latest", "Production", "m-0a", "[::1]", "\ud800",
    ]  # fmt: skip
    generated = [
        rng.choice(prefixes) + "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(3000)
    ]
    return HOSTILE + generated


def test_parse_ref_raises_only_invalid_reference_errors() -> None:
    wrong = []
    for uri in _hostile_corpus():
        for check_scheme in (True, False):
            try:
                ref = parse_ref(uri, check_scheme=check_scheme)
            except InvalidReferenceError as exc:
                if not str(exc).startswith(
                    ("invalid model reference", "empty model reference", "no source for scheme")
                ):
                    wrong.append((uri, repr(exc)))
                continue
            except Exception as exc:
                wrong.append((uri, repr(exc)))
                continue
            if parse_ref(ref.uri, check_scheme=False) != ref:
                wrong.append((uri, f"{ref.uri!r} does not parse back to {ref!r}"))
    assert wrong == []
