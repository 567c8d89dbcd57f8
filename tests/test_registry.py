"""Scheme registry: entry-point discovery, register_source, lazy imports, install hints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from model_loader import MissingDependencyError, ModelSource, UnknownSchemeError, parse_ref, register_source
from model_loader.registry import _registry, create_source, get_source_class, known_schemes
from model_loader.sources.local import LocalSource
from model_loader.testing import InMemorySource


@pytest.fixture
def clean_registry() -> object:
    saved = dict(_registry)
    yield
    _registry.clear()
    _registry.update(saved)


def test_builtins_are_known_without_importing_their_sdks() -> None:
    code = (
        "import json, sys\n"
        "from model_loader.registry import known_schemes, create_source\n"
        "from model_loader import parse_ref\n"
        "create_source(parse_ref('/tmp'))\n"
        "print(json.dumps([sorted(known_schemes()), sorted(sys.modules)]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    schemes, modules = json.loads(out.stdout)
    assert {"file", "s3", "models"} <= set(schemes)
    assert "model_loader.sources.local" in modules
    for lazy in ("model_loader.sources.s3", "model_loader.sources.mlflow", "boto3", "mlflow"):
        assert lazy not in modules


def test_register_source_with_a_class(clean_registry: object) -> None:
    register_source("memx", InMemorySource)
    assert "memx" in known_schemes()
    source = create_source(parse_ref("memx://iris"))
    assert isinstance(source, InMemorySource)
    assert isinstance(source, ModelSource)


def test_register_source_refuses_to_clobber_silently(clean_registry: object) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_source("file", InMemorySource)
    register_source("file", LocalSource, clobber=True)


def test_a_source_whose_module_is_missing_names_the_install_hint(clean_registry: object) -> None:
    register_source("nosuchstore", "not_installed_pkg.gcs:GcsSource", install_hint="pip install model-loader-gcs")
    with pytest.raises(MissingDependencyError) as info:
        get_source_class("nosuchstore")
    assert "pip install model-loader-gcs" in str(info.value)
    assert isinstance(info.value, ImportError)


def test_unknown_scheme(clean_registry: object) -> None:
    with pytest.raises(UnknownSchemeError):
        get_source_class("nope")


def test_third_party_sources_are_discovered_through_entry_points(tmp_path: Path) -> None:
    site = tmp_path / "site"
    pkg = site / "acme_models"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from model_loader.testing import InMemorySource

            class AcmeSource(InMemorySource):
                scheme = "acme"
            """
        )
    )
    dist = site / "acme_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[model_loader.sources]\nacme = acme_models:AcmeSource\n")
    code = (
        "import sys\n"
        "from model_loader import parse_ref\n"
        "from model_loader.registry import create_source\n"
        "src = create_source(parse_ref('acme://iris'))\n"
        "print(type(src).__module__, type(src).__name__, 'acme_models' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["acme_models", "AcmeSource", "True"]


def test_built_in_schemes_are_found_without_reading_entry_points() -> None:
    code = (
        "import json, sys\n"
        "from model_loader import registry\n"
        "names = [registry.get_source_class(s).__name__ for s in ('file', 's3', 'models')]\n"
        "print(json.dumps([names, registry._discovered, 'importlib.metadata' in sys.modules]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    names, discovered, metadata_imported = json.loads(out.stdout)
    assert names == ["LocalSource", "S3Source", "MlflowRegistrySource"]
    assert discovered is False
    assert metadata_imported is False


def test_an_entry_point_cannot_replace_a_built_in_but_register_source_can(tmp_path: Path) -> None:
    site = tmp_path / "site"
    pkg = site / "shadow_s3"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from model_loader.testing import InMemorySource as ShadowSource\n")
    dist = site / "shadow_s3-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shadow-s3\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[model_loader.sources]\ns3 = shadow_s3:ShadowSource\n")
    code = (
        "import logging\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "from model_loader.registry import get_source_class, known_schemes, register_source\n"
        "first = get_source_class('s3').__name__\n"
        "known_schemes()  # reads the entry points\n"
        "after = get_source_class('s3').__name__\n"
        "register_source('s3', 'shadow_s3:ShadowSource', clobber=True)\n"
        "print(first, after, get_source_class('s3').__name__)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["S3Source", "S3Source", "InMemorySource"]
    assert "WARNING entry point s3 = shadow_s3:ShadowSource ignored" in out.stderr
    assert "clobber=True" in out.stderr
