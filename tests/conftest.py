"""Shared fixtures live in tests/fixtures/, one module per real service or data source."""

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.s3_server",
    "tests.fixtures.images",
    "tests.fixtures.cluster",
]

import pytest


@pytest.fixture(autouse=True)
def _default_mlflow_store(monkeypatch):
    """Each test starts without MLFLOW_TRACKING_URI, and whatever a test sets is undone after it
    (mlflow.set_tracking_uri exports the variable, which would redirect later tests' runs)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
