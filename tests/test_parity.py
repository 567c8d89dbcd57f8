"""Parity with MLflow's own client.

1. A corpus of ``models:/`` and ``runs:/`` references, read by MLflow's client (the path
   ``mlflow.artifacts.download_artifacts`` and ``mlflow.pyfunc.load_model`` take:
   ``ModelsArtifactRepository.split_models_uri``, ``_parse_model_uri``, then what the
   registry server validates; ``RunsArtifactRepository.parse_runs_uri``) and by
   ``parse_ref``. Every disagreement is listed in :data:`DISAGREEMENTS` with the row of
   docs/mlflow.md's parity table that gives its reason, and the test fails on any other
   disagreement, on a listed one that no longer is, and on a row missing from the docs.
2. Each accepted form against real ``mlflow server`` processes (both layouts): the files
   served are exactly those ``mlflow.artifacts.download_artifacts`` writes (where MLflow
   can read the form at all; otherwise the bytes that were logged).
"""

from __future__ import annotations

import re
import urllib.parse
import uuid
from pathlib import Path

import pytest

from _mlflow_server import IRIS, MlflowServer, use_tracking_uri
from helpers import read_tree
from model_loader import InvalidReferenceError, ModelRef, parse_ref
from model_loader.sources.mlflow import MlflowRegistrySource, MlflowRunsSource

DOCS = Path(__file__).resolve().parent.parent / "docs" / "mlflow.md"

NAMES = ["iris", "Ads Model 1", "catalog.schema.model", "12345", "A!&$%;{}()[]CrazyName", "ünïcode", "iris#1"]
CORPUS = [
    # versions, stages, latest: MLflow's own test cases first
    *(f"models:/{n}/{s}" for n in NAMES for s in ("3", "latest", "Production")),
    "models:/AdsModel1/0", "models:/AdsModel1/007", "models:/AdsModel1/pROduction", "models:/AdsModel1/None",
    "models:/AdsModel1/LATEST", "models:/AdsModel1/Latest", "models:/AdsModel1/Stage", "models:/Name/Stage@Alias",
    "models:/AdsModel1/\u00b2", "models:/AdsModel1/\u0663", "models:/AdsModel1/99999999999999999999",
    # aliases
    "models:/AdsModel1@Champion", "models:/AdsModel1@cHAmpion", "models:/Ads Model 1@challenger",
    "models:/catalog.schema.model@None", "models:/A!&$%;{}()[]CrazyName@Alias", "models:/NameWith@IntheMiddle@Alias",
    "models:/team@fraud@champion", "models:/iris@chämpion", "models:/iris@生产", "models:/iris@v2",
    "models:/iris@latest",
    "models:/iris@bad alias", "models:/iris@a.b", "models:/iris@" + "a" * 256, "models:/Name@Alias/Stage",
    # trailing slashes, empty authority, case of the scheme, whitespace
    "models:/iris/3/", "models:/iris/3//", "models:/iris@champion/", "models:/m-0a1b2c3d/", "models:///iris/3",
    "models:///iris@champion", "MODELS:/iris/3", "models:/ lead/3", "models:/trail /3", " models:/iris/3",
    "models:/iris/3 ", "models:/iris@champion ",
    # logged models
    "models:/m-0a1b2c3d", "models:/m-0A1B2C3D", "models:/m-0a1b2c3d/MLmodel", "models:/iris", "models:/m-xyz",
    # sub-paths
    "models:/iris/3/MLmodel", "models:/iris/3/sub/dir", "models:/iris/3/sub/dir/", "models:/iris@champion/MLmodel",
    "models:/iris/latest/a b/c.txt", "models:/team@fraud/3", "models:/iris/Production/x",
    "models:/iris/3/a#b", "models:/iris/3/a?b", "models:/iris/3/../x", "models:/iris/3/./x", "models:/iris/3/a//b",
    # '?', '#', '%' and ':' in names
    "models:/what?/3", "models:/what?@champion", "models:/iris#1/3/MLmodel", "models:/iris#1@champion",
    "models:/a%20b/3", "models:/iris:v1/3",
    "models:/iris/3?x=1", "models:/iris@champion?x=1", "models:/iris@champion#x",
    # malformed
    "models:/", "models:", "models:iris/3", "models:/ /3", "models:/Name/", "models:/Name@", "models:/@alias",
    "models:/Name/Stage/0", "models://Name/Stage", "models://iris/1", "models://Name@te#ty;", "models:////iris/3",
    "models://////Ads Model 1/12345", "models://scope:key/Ads Model 1@None", "models://profile@databricks/iris/1",
    "models://databricks/iris/1", "models:/iris\n@prod", "models:/ir\tis/3", "models:/./3", "models:/../3",
    # runs
    "runs:/0123abcd/model", "runs:/0123abcd/model/", "runs:/0123abcd", "runs:/0123abcd/", "runs:///0123abcd/model",
    "runs:/0123abcd/model/MLmodel", "runs:/0123abcd/a#b", "runs:/0123abcd/a?b", "runs:/0123abcd/a//b", "runs:/",
    "runs:/-bad/model", "runs://host/0123abcd/model", "runs:/0123abcd/../x", "RUNS:/0123abcd/model",
]  # fmt: skip

# reference -> the row of docs/mlflow.md's parity table (its example, in backticks) giving the reason
DISAGREEMENTS = {
    # the version is not ASCII digits: MLflow asks the server, whose int() reads '٣' as 3 (and fails on '²')
    "models:/AdsModel1/\u0663": "models:/iris/٣",
    "models:/AdsModel1/99999999999999999999": "models:/iris/99999999999999999999",
    # names MLflow's registry refuses today (':') but older registries hold
    "models:/iris:v1/3": "models:/iris:v1/3",
    # surrounding whitespace: stripped here (copied from a shell or a YAML file)
    "models:/iris/3 ": "models:/iris/3 ",
    "models:/iris@champion ": "models:/iris/3 ",
    # MLflow reads a one-segment reference as a logged model id, whatever it is
    "models:/iris": "models:/iris",
    "models:/Name/": "models:/iris",
    "models:/m-xyz": "models:/iris",
    # '#' and '?' in a path inside the model: MLflow cuts the path there
    "models:/iris/3/a#b": "models:/iris/3/a#b",
    "models:/iris/3/a?b": "models:/iris/3/a#b",
    "models:/what?/3": "models:/what?/3",
    "models:/iris#1/3/MLmodel": "models:/iris#1/3/MLmodel",
    "models:/what?@champion": "models:/what?/3",
    "models:/iris/3?x=1": "models:/iris/3?x=1",
    "models:/iris@champion?x=1": "models:/iris/3?x=1",
    # '..', '.' and empty segments in a path inside the model
    "models:/iris/3/../x": "models:/iris/3/../x",
    "models:/iris/3/./x": "models:/iris/3/../x",
    "models:/iris/3/a//b": "models:/iris/3/../x",
    "runs:/0123abcd/../x": "models:/iris/3/../x",
    "runs:/0123abcd/a//b": "models:/iris/3/../x",
    "runs:/0123abcd/a#b": "models:/iris/3/a#b",
    "runs:/0123abcd/a?b": "models:/iris/3/a#b",
    # an authority: MLflow ignores one that is not a Databricks profile, reads a profile
    "models://scope:key/Ads Model 1@None": "models://iris/1",
    "models://iris/1": "models://iris/1",
    "models://Name/Stage": "models://iris/1",
    "models://profile@databricks/iris/1": "models://profile@databricks/iris/1",
    "models://databricks/iris/1": "models://profile@databricks/iris/1",
    "runs://host/0123abcd/model": "models://iris/1",
    # control characters: Python's URL parser deletes tabs and newlines, so MLflow reads another name
    "models:/iris\n@prod": "models:/iris\\n@prod",
    "models:/ir\tis/3": "models:/iris\\n@prod",
}


def mlflow_reads(uri: str) -> tuple[str, ...]:
    """What MLflow's client asks the server for ``uri``, with the server's own checks."""
    from mlflow.entities.model_registry.model_version_stages import get_canonical_stage
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.store.artifact.utils.models import _parse_model_uri
    from mlflow.utils import validation
    from mlflow.utils.uri import get_databricks_profile_uri_from_artifact_uri

    try:
        scheme = urllib.parse.urlparse(uri).scheme
        if scheme == "runs":
            run_id, path = RunsArtifactRepository.parse_runs_uri(uri)
            validation._validate_run_id(run_id)
            return ("run", run_id, (path or "").rstrip("/"))
        if scheme != "models":
            return ("refused",)
        root, sub = ModelsArtifactRepository.split_models_uri(uri)
        if get_databricks_profile_uri_from_artifact_uri(root):
            return ("databricks profile",)
        parsed = _parse_model_uri(root)
        if parsed.model_id is not None:
            return ("logged", parsed.model_id, sub)
        assert parsed.name is not None
        validation._validate_model_name(parsed.name)
        if parsed.version is not None:
            number = validation._validate_model_version(parsed.version)
            return ("version", parsed.name, str(number), sub) if number >= 1 else ("refused",)
        if parsed.alias is not None:
            validation._validate_model_alias_name(parsed.alias)
            return ("alias", parsed.name, parsed.alias, sub)
        if parsed.stage is not None:
            return ("stage", parsed.name, get_canonical_stage(parsed.stage), sub)
        return ("latest", parsed.name, sub)
    except (MlflowException, ValueError):
        return ("refused",)


def ours(uri: str) -> tuple[str, ...]:
    try:
        ref = parse_ref(uri)
    except InvalidReferenceError:
        return ("refused",)
    sub = dict(ref.params).get("path", "")
    if ref.scheme == "runs":
        return ("run", ref.location, sub)
    kind = {"logged_model": "logged"}.get(ref.selector_kind, ref.selector_kind)
    if kind in ("latest", "logged"):
        return (kind, ref.location, sub)
    return (kind, ref.location, ref.selector or "", sub)


def test_the_corpus_reads_as_mlflow_reads_it_or_the_docs_say_why() -> None:
    found = {uri: (mlflow_reads(uri), ours(uri)) for uri in CORPUS}
    differ = {uri for uri, (theirs, mine) in found.items() if theirs != mine}
    unexplained = {uri: found[uri] for uri in sorted(differ - DISAGREEMENTS.keys())}
    stale = sorted(DISAGREEMENTS.keys() - differ)
    assert unexplained == {}, "disagreements not listed in DISAGREEMENTS (fix them or document them)"
    assert stale == [], "listed disagreements that agree now: drop them from DISAGREEMENTS and the docs"
    docs = DOCS.read_text()
    table = docs[docs.index("## Parity with MLflow's client") :]
    missing = sorted({row for row in DISAGREEMENTS.values() if f"`{row}`" not in table})
    assert missing == [], "rows missing from docs/mlflow.md's parity table"


def test_every_accepted_reference_round_trips_and_refusals_name_the_problem() -> None:
    wrong = []
    for uri in CORPUS:
        try:
            ref = parse_ref(uri)
        except InvalidReferenceError as exc:
            message = str(exc)
            if not message.startswith(f"invalid model reference {uri.strip()!r}: ") or "accepted:" not in message:
                wrong.append((uri, message))
            continue
        if parse_ref(ref.uri) != ref:
            wrong.append((uri, ref.uri))
    assert wrong == []


def test_a_name_holding_both_quote_kinds_is_searched_with_a_filter_mlflow_parses() -> None:
    from mlflow.utils.search_utils import SearchModelVersionUtils

    from model_loader.sources.mlflow._registry import name_filter

    for name in ["plain", "it's", 'say "hi"', 'it\'s "both"', 'back\\slash\'s "x"', "100% _sure_ 'n' \"y\""]:
        search, exact = name_filter(name)
        (clause,) = SearchModelVersionUtils.parse_search_filter(search)
        assert clause["key"] == "name"
        if exact:
            assert (clause["comparator"], clause["value"]) == ("=", name)
        else:
            assert clause["comparator"] == "LIKE"
            pattern = (
                "^" + "".join("." if c == "_" else ".*" if c == "%" else re.escape(c) for c in clause["value"]) + "$"
            )
            assert re.match(pattern, name, re.DOTALL), (name, clause["value"])


# -- behaviour against real servers ---------------------------------------------------------

pytest_slow = pytest.mark.slow

FILES = {
    "MLmodel": b"flavors: {}\n",
    "model.pkl": b"\x80\x04pickled",
    "sub/a.txt": b"a",
    "sub/deeper/b.bin": bytes(range(256)) * 40,
    "odd name.txt": b"odd",
}


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _source(server: MlflowServer, cls: type[MlflowRegistrySource] | type[MlflowRunsSource] = MlflowRegistrySource):
    return cls(tracking_uri=server.url, environ={"MLFLOW_S3_ENDPOINT_URL": server.env["MLFLOW_S3_ENDPOINT_URL"]})


def served(source: MlflowRegistrySource | MlflowRunsSource, uri: str, dest: Path) -> dict[str, bytes]:
    resolved = source.resolve(parse_ref(uri))
    dest.mkdir(parents=True)
    source.fetch(resolved, dest)
    return read_tree(dest)


def mlflow_downloads(server: MlflowServer, uri: str, dest: Path) -> dict[str, bytes]:
    import mlflow.artifacts

    dest.mkdir(parents=True)
    with use_tracking_uri(server.url):
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    if got.is_file():
        return {got.name: got.read_bytes()}
    files = read_tree(got)
    files.pop("registered_model_meta", None)  # MLflow's own note of what it downloaded, not an artifact
    return files


@pytest.fixture(scope="module", params=["proxied", "s3"])
def published(request: pytest.FixtureRequest) -> tuple[MlflowServer, dict[str, str]]:
    """Models with awkward names on each session server, version 1 with FILES, aliases champion and chämpion."""
    mlflow_server: MlflowServer = request.getfixturevalue(f"mlflow_{request.param}_server")
    tag = uuid.uuid4().hex[:6]
    names = {
        "plain": f"plain-{tag}",
        "at": f"team@fraud-{tag}",
        "hash": f"iris#1-{tag}",
        "space": f" lead-{tag}",
        "question": f"what?-{tag}",
    }
    client = mlflow_server.client()
    for name in names.values():
        mlflow_server.publish_files(name, FILES, alias="champion")
        client.set_registered_model_alias(name, "chämpion", "1")
    return mlflow_server, names


def _expected(sub: str) -> dict[str, bytes]:
    if not sub:
        return dict(FILES)
    if sub in FILES:
        return {sub.rpartition("/")[2]: FILES[sub]}
    return {k[len(sub) + 1 :]: v for k, v in FILES.items() if k.startswith(sub + "/")}


FORMS = [  # (reference with {name}, the path inside the model, whether MLflow's client reads it the same)
    ("models:/{name}/1", "", True),
    ("models:/{name}/1/", "", True),
    ("models:///{name}/1", "", True),
    ("models:/{name}@champion/", "", True),
    ("models:/{name}@chämpion", "", True),
    ("models:/{name}/latest", "", True),
    ("models:/{name}/1/MLmodel", "MLmodel", True),
    ("models:/{name}/1/sub", "sub", True),
    ("models:/{name}@champion/sub/deeper/", "sub/deeper", True),
    ("models:/{name}/1/sub/deeper/b.bin", "sub/deeper/b.bin", True),
    ("models:/{name}/1/odd name.txt", "odd name.txt", True),
]


@pytest_slow
@pytest.mark.parametrize(("form", "sub", "mlflow_agrees"), FORMS)
@pytest.mark.parametrize("which", ["plain", "at", "hash", "space", "question"])
def test_each_accepted_form_serves_what_mlflow_downloads(
    published: tuple[MlflowServer, dict[str, str]],
    tmp_path: Path,
    form: str,
    sub: str,
    mlflow_agrees: bool,
    which: str,
) -> None:
    server, names = published
    name = names[which]
    if which == "at":
        # MLflow's split: a first segment holding '@' is name@alias, so versions of such a model have no reference
        form = re.sub(r"\{name\}/(1|latest)", "{name}@champion", form)
    uri = form.format(name=name)
    source = _source(server)
    try:
        mine = served(source, uri, tmp_path / "ours")
    finally:
        source.close()
    assert mine == _expected(sub), uri
    # MLflow reads '?' as a query, and cannot split a path off a name holding '#': it cannot name these
    if mlflow_agrees and which != "question" and not (which == "hash" and sub):
        assert mlflow_downloads(server, uri, tmp_path / "mlflow") == mine, uri


@pytest_slow
def test_logged_model_and_run_references_serve_what_mlflow_downloads(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    client = mlflow_server.client()
    mv = client.get_model_version(IRIS, "1")
    found = re.search(r"m-[0-9a-f]+", mlflow_server.iris_versions[1])
    assert found is not None, mlflow_server.iris_versions[1]
    # mlflow.sklearn.log_model(name="model") keeps its files with the logged model, not in the run's
    # directory: runs:/<run>/model is served from that model, as MLflow 3's client does
    uris = [f"models:/{found.group()}/", f"runs:/{mv.run_id}/model", f"runs:/{mv.run_id}/model/MLmodel"]
    for i, uri in enumerate(uris):
        cls = MlflowRunsSource if uri.startswith("runs:") else MlflowRegistrySource
        source = _source(mlflow_server, cls)
        try:
            mine = served(source, uri, tmp_path / f"ours{i}")
        finally:
            source.close()
        assert mine, uri
        assert mlflow_downloads(mlflow_server, uri, tmp_path / f"mlflow{i}") == mine, uri


@pytest_slow
def test_a_path_holding_a_hash_is_served_whole(mlflow_s3_server: MlflowServer, tmp_path: Path) -> None:
    """MLflow cuts ``models:/m/1/a#b.txt`` at the '#' (its proxied upload does too, so the
    S3 layout, where boto3 writes the key as it is, holds such a file)."""
    name = _unique("hash-path")
    mlflow_s3_server.publish_files(name, {"a#b.txt": b"hash", "a": b"not this"}, alias=None)
    source = _source(mlflow_s3_server)
    try:
        assert served(source, f"models:/{name}/1/a#b.txt", tmp_path / "ours") == {"a#b.txt": b"hash"}
    finally:
        source.close()


def test_model_names_holding_both_quote_kinds_fall_back_to_earlier_versions(
    mlflow_proxied_server: MlflowServer,
) -> None:
    server = mlflow_proxied_server
    name = _unique('it\'s "both" \\ 100%_')
    decoy = name.replace("'", "x", 1)  # what the LIKE pattern also matches
    for files in ({"v": b"1"}, {"v": b"2"}, {"v": b"3"}):
        server.publish_files(name, files, alias=None)
    server.publish_files(decoy, {"v": b"decoy"}, alias=None)
    source = _source(server)
    try:
        newest = source.resolve(parse_ref(f"models:/{name}/3"))
        earlier = source.previous_versions(newest, 5)
    finally:
        source.close()
    assert [r.version for r in earlier] == [f"{name}/2", f"{name}/1"]
    assert all(isinstance(r.ref, ModelRef) and r.ref.location == name for r in earlier)
