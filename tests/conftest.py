"""Shared fixtures live in tests/fixtures/, one module per real service or data source.

Every test carries a tier marker (unit, integration, e2e; see pyproject.toml): collection fails
for a test without one, so a new test cannot forget it, and for a test marked only `unit` that
uses a server fixture.
"""

import pytest

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.s3_server",
    "tests.fixtures.images",
    "tests.fixtures.cluster",
    "tests.fixtures.models",
]

TIERS = ("unit", "integration", "e2e")  # lightest to heaviest
SERVER_FIXTURES = {"ray_local", "s3_server", "s3_server_factory", "mlflow_server", "multinode_cluster"}


def tier_of(item: pytest.Item) -> str | None:
    """The heaviest tier marker on the test, its module or its class; None without one."""
    names = {mark.name for mark in item.iter_markers()}
    carried = [tier for tier in TIERS if tier in names]
    return carried[-1] if carried else None


def tier_problem(item: pytest.Item) -> str | None:
    tier = tier_of(item)
    if tier is None:
        return f"{item.nodeid}: no tier marker; add `pytestmark = pytest.mark.<{'|'.join(TIERS)}>` to its module"
    servers = sorted(SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    if tier == "unit" and servers:
        return f"{item.nodeid}: marked unit but uses {', '.join(servers)}; mark it integration or e2e"
    return None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    problems = [problem for item in items if (problem := tier_problem(item))]
    if problems:
        raise pytest.UsageError("tests without a valid tier:\n  " + "\n  ".join(problems))


@pytest.fixture(autouse=True)
def _default_mlflow_store(monkeypatch):
    """Each test starts without MLFLOW_TRACKING_URI, and whatever a test sets is undone after it
    (mlflow.set_tracking_uri exports the variable, which would redirect later tests' runs)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
