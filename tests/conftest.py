"""Shared fixtures. Real servers live in their own modules, loaded as plugins."""

from __future__ import annotations

pytest_plugins = ["_s3_server", "_mlflow_server"]
