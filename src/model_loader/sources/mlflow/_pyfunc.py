"""Loading an MLflow model directory with ``mlflow.pyfunc``, and saying exactly what is
missing when it cannot be.

``pip install 'model-loader[mlflow]'`` installs what ``mlflow.pyfunc`` needs; the model's
flavor library (scikit-learn, torch...) is the user's to install. When an import fails,
the error names the module that is really missing (``pandas``, ``sklearn``), and the
package to install for it, instead of blaming mlflow when mlflow is there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from model_loader.errors import MissingDependencyError

__all__ = ["load_pyfunc", "missing_dependency"]

# import name -> pip name, where they differ (the flavors MLflow ships and what they import)
_PIP_NAMES = {
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "cv2": "opencv-python",
    "google": "protobuf",
    "skops": "skops",
    "tensorflow": "tensorflow",
    "torch": "torch",
    "xgboost": "xgboost",
    "lightgbm": "lightgbm",
    "catboost": "catboost",
    "statsmodels": "statsmodels",
    "prophet": "prophet",
    "onnxruntime": "onnxruntime",
    "transformers": "transformers",
    "sentence_transformers": "sentence-transformers",
}
_EXTRA_PROVIDES = ("mlflow", "pandas", "numpy", "scipy", "pyarrow", "cloudpickle", "yaml", "packaging")


def missing_dependency(exc: ImportError, path: Path | None = None) -> MissingDependencyError:
    """``exc`` as a :class:`MissingDependencyError` naming the module really missing.

    Args:
        exc: The ``ImportError`` raised while importing ``mlflow.pyfunc`` or loading a model.
        path: The model directory (named in the message).
    """
    name = (exc.name or "").split(".")[0]
    where = f" to load {path}" if path is not None else ""
    if not name:
        return MissingDependencyError(
            f"loading an MLflow model{where} failed on an import: {exc}; pip install 'model-loader[mlflow]' "
            "and the model's flavor library, or pass loader_fn=...",
            extra="mlflow",
        )
    if name == "mlflow" and importlib.util.find_spec("mlflow") is None:
        return MissingDependencyError(
            f"loading an MLflow model{where} needs mlflow, which is not installed: "
            "pip install 'model-loader[mlflow]', or pass loader_fn=...",
            extra="mlflow",
        )
    pip = _PIP_NAMES.get(name, name.replace("_", "-"))
    hint = "pip install 'model-loader[mlflow]'" if name in _EXTRA_PROVIDES else f"pip install {pip}"
    kind = "" if name in _EXTRA_PROVIDES else " (the model's flavor needs it)"
    return MissingDependencyError(
        f"loading an MLflow model{where} needs the module {name!r}, which is not installed{kind}: {hint} "
        f"({type(exc).__name__}: {exc})",
        extra="mlflow" if name in _EXTRA_PROVIDES else None,
    )


def load_pyfunc(path: Path) -> Any:
    """``mlflow.pyfunc.load_model(path)``; an import that fails names its module.

    Raises:
        MissingDependencyError: mlflow, a module mlflow needs (pandas...), or the flavor's
            library (scikit-learn...) is not installed; the message names which.
    """
    try:
        import mlflow.pyfunc
    except ImportError as exc:
        raise missing_dependency(exc, path) from exc
    try:
        return mlflow.pyfunc.load_model(str(path))
    except ImportError as exc:  # the flavor's library, or something it imports
        raise missing_dependency(exc, path) from exc
