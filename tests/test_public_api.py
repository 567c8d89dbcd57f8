"""The public surface: exact __all__, lazy imports, a cheap `import model_loader`."""

from __future__ import annotations

import json
import subprocess
import sys

import model_loader
from model_loader import errors


def test_all_is_exact_and_sorted() -> None:
    public = {name for name in dir(model_loader) if not name.startswith("_")} | {"__version__"}
    assert set(model_loader.__all__) == public
    assert list(model_loader.__all__) == sorted(model_loader.__all__)
    for name in model_loader.__all__:
        assert getattr(model_loader, name) is not None


def test_every_error_derives_from_the_base_error() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.ModelLoaderError)
    assert issubclass(errors.SourceTimeoutError, TimeoutError)
    assert issubclass(errors.SourceUnavailableError, ConnectionError)
    assert issubclass(errors.ModelNotFoundError, LookupError)
    assert issubclass(errors.AccessDeniedError, PermissionError)
    assert issubclass(errors.CacheError, OSError)
    assert issubclass(errors.MissingDependencyError, ImportError)
    assert issubclass(errors.UnknownSchemeError, errors.InvalidReferenceError)


def _fresh(code: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_import_pulls_no_sdk_and_no_heavy_dependency() -> None:
    mods = _fresh("import json, sys, model_loader; print(json.dumps(sorted(sys.modules)))")
    for heavy in ("mlflow", "boto3", "botocore", "pydantic", "pydantic_settings", "fsspec", "tenacity", "requests"):
        assert heavy not in mods, f"import model_loader imported {heavy}"


def test_building_a_loader_for_files_imports_no_sdk(tmp_path: object) -> None:
    code = (
        "import json, sys, pathlib, tempfile\n"
        "d = pathlib.Path(tempfile.mkdtemp()); (d / 'm').mkdir(); (d / 'm' / 'f').write_text('x')\n"
        "from model_loader import ResilientLoader, LoaderConfig, CacheConfig\n"
        "l = ResilientLoader([str(d / 'm')], config=LoaderConfig(cache=CacheConfig(dir=d / 'c')))\n"
        "l.fetch(); l.fetch()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    mods = _fresh(code)
    for heavy in ("mlflow", "boto3", "botocore", "pydantic_settings", "fsspec"):
        assert heavy not in mods, f"a local fetch imported {heavy}"


def test_importing_the_command_line_pulls_nothing_heavy() -> None:
    code = "import json, sys, model_loader.cli; print(json.dumps(sorted(sys.modules)))"
    mods = _fresh(code)
    for heavy in ("pydantic", "model_loader.config", "model_loader.loader", "importlib.metadata", "boto3", "mlflow"):
        assert heavy not in mods, f"import model_loader.cli imported {heavy}"


def test_configuration_from_the_environment_needs_no_pydantic_settings() -> None:
    code = (
        "import json, sys\n"
        "from model_loader import LoaderConfig\n"
        "LoaderConfig.from_env({'MODEL_LOADER_DEADLINE': '5', 'MODEL_LOADER_VERIFY': 'full'})\n"
        "LoaderConfig.from_env({'MODEL_LOADER_DEADLINE': '1e1'})  # the pydantic-validated path\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    assert "pydantic_settings" not in _fresh(code)
