"""Shared fixtures live in tests/fixtures/, one module per real service or data source."""

pytest_plugins = [
    "tests.fixtures.paths",
    "tests.fixtures.ray_cluster",
    "tests.fixtures.mlflow_server",
    "tests.fixtures.s3_server",
    "tests.fixtures.images",
]
