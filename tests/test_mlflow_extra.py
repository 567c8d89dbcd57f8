"""``pip install 'model-loader[mlflow]'`` plus a model's flavor library loads an MLflow
pyfunc model, in a fresh virtualenv built here; a missing module is named by its real name.

The wheel is built once per content of ``pyproject.toml`` and ``src/`` (kept in pytest's
cache); packages come from pip's own cache, pinned to the versions of this environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import venv
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PINNED = ("mlflow-skinny", "pandas", "numpy", "scipy", "scikit-learn", "skops", "pydantic", "pyarrow")

LOAD = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from model_loader import MissingDependencyError, ResilientLoader, CacheConfig, LoaderConfig
    from model_loader.sources.mlflow._pyfunc import load_pyfunc

    model, cache, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    config = LoaderConfig(cache=CacheConfig(dir=cache))
    try:
        with ResilientLoader(str(model), config=config) as loader:
            loaded = loader.load(load_pyfunc) if how == "helper" else loader.load()
        print(json.dumps({"ok": loaded.predict(np.zeros((2, 3))).tolist()}))
    except MissingDependencyError as exc:
        print(json.dumps({"missing": str(exc), "extra": exc.extra}))
    """
)


def _pins() -> list[str]:
    pins = []
    for name in PINNED:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return pins


def _content_hash() -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes())
    for path in sorted((ROOT / "src").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="module")
def wheel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model-loader wheel of this checkout, built once per content."""
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    base = cache.mkdir("model-loader-wheel") if cache is not None else tmp_path_factory.mktemp("wheel")
    out = base / _content_hash()
    found = sorted(out.glob("model_loader-*.whl")) if out.is_dir() else []
    if found:
        return found[0]
    out.mkdir(parents=True, exist_ok=True)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)]
    done = subprocess.run(build, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return sorted(out.glob("model_loader-*.whl"))[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same scikit-learn model saved by this environment's mlflow, pickled and with skops."""
    import mlflow.sklearn
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    model = LogisticRegression().fit(x, (x[:, 0] > 0).astype(int))
    root = tmp_path_factory.mktemp("models")
    (root / "expected.json").write_text(json.dumps(model.predict(np.zeros((2, 3))).tolist()))
    out = {"expected": root / "expected.json"}
    for fmt in ("cloudpickle", "skops"):
        mlflow.sklearn.save_model(model, str(root / fmt), serialization_format=fmt)
        out[fmt] = root / fmt
    return out


class FreshEnv:
    def __init__(self, root: Path) -> None:
        venv.create(root, with_pip=True, clear=True)
        self.python = str(root / "bin" / "python")
        self.constraints = root / "constraints.txt"
        self.constraints.write_text("\n".join(_pins()) + "\n")
        self._env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MODEL_LOADER_", "PYTHON"))}

    def pip(self, *args: str) -> None:
        cmd = [self.python, "-m", "pip", *args]
        if args[0] == "install":
            cmd += ["-q", "-c", str(self.constraints)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=self._env)
        assert done.returncode == 0, done.stderr[-3000:]

    def has(self, module: str) -> bool:
        code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
        return subprocess.run([self.python, "-c", code], env=self._env, timeout=60).returncode == 0

    def load(self, model: Path, cache: Path, how: str = "helper") -> dict[str, object]:
        done = subprocess.run(
            [self.python, "-c", LOAD, str(model), str(cache), how],
            capture_output=True,
            text=True,
            timeout=300,
            env=self._env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        answer: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return answer


def test_the_mlflow_extra_loads_a_pyfunc_model_and_names_what_is_missing(
    wheel: Path, models: dict[str, Path], tmp_path: Path
) -> None:
    ok = {"ok": json.loads(models["expected"].read_text())}
    env = FreshEnv(tmp_path / "venv")
    env.pip("install", f"{wheel}[mlflow]", "scikit-learn")
    cache = tmp_path / "cache"

    if not env.has("pandas"):  # an [mlflow] extra of mlflow-skinny alone: mlflow.pyfunc cannot import
        missing = env.load(models["cloudpickle"], cache)
        assert "needs the module 'pandas'" in str(missing["missing"]), missing
        assert "needs mlflow" not in str(missing["missing"])
        env.pip("install", "pandas")

    assert env.load(models["cloudpickle"], cache) == ok  # mlflow-skinny + pandas + scikit-learn
    assert env.load(models["cloudpickle"], tmp_path / "cache2", how="default") == ok

    missing = env.load(models["skops"], cache)  # scikit-learn models MLflow 3 saves by default need skops too
    assert "needs the module 'skops'" in str(missing["missing"]), missing
    assert "pip install skops" in str(missing["missing"])
    env.pip("install", "skops")
    assert env.load(models["skops"], cache) == ok

    env.pip("uninstall", "-y", "pandas")
    missing = env.load(models["cloudpickle"], tmp_path / "cache3")
    assert "needs the module 'pandas'" in str(missing["missing"]), missing  # mlflow is there: not blamed
    assert missing["extra"] == "mlflow"
