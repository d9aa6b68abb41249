"""Credentials appear nowhere the project writes (issue 12, must-show 3).

The run is the session fixture `production_run` (tests/fixtures/cluster.py): `lightbsr pipeline`
and `lightbsr tune` as a Ray job on three nodes, with distinctive credentials planted in the job's
environment (the S3 secret, MLFLOW_TRACKING_PASSWORD) and in the tracking URI's userinfo. After it,
none of them is in the MLflow store (database and artifacts), in any object the run wrote on S3
(checkpoints, manifests, records, tables, Tune state, best_config.yaml), in the Ray logs of the
job's driver and workers, or in the output of commands that fail with the same credentials.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.paths import REPO

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # the cluster jobs take minutes on 2 loaded cores


def hits(secrets: dict[str, str], data: bytes) -> list[str]:
    return [name for name, value in secrets.items() if value.encode() in data]


def s3_objects(s3_server, prefix: str):
    s3 = s3_server.client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"], s3.get_object(Bucket=s3_server.bucket, Key=item["Key"])["Body"].read()


def files_under(folder: Path):
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path, path.read_bytes()


def failing_command(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python -m workflows.<command> ...` as a user runs it, outside Ray (preflight refuses it)."""
    full_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
    full_env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=full_env, capture_output=True, text=True)


def test_planted_credentials_appear_nowhere(production_run, s3_server):
    run = production_run
    assert run.status == "SUCCEEDED", run.logs[-6000:]
    secrets = run.secrets
    found: list[tuple[str, list[str]]] = []

    # The MLflow store: its database, its artifact folder and its log.
    stored = list(files_under(run.mlflow_root))
    assert any(path.name == "mlflow.db" for path, _ in stored)
    assert any("artifacts" in path.parts for path, _ in stored)
    found += [(str(path), names) for path, data in stored if (names := hits(secrets, data))]

    # Everything the run wrote on S3.
    written = list(s3_objects(s3_server, f"{run.key}/store/"))
    kinds = {"checkpoint_": 0, "manifest": 0, "best_config.yaml": 0, "pipeline/": 0}
    for name, data in written:
        kinds = {kind: count + (kind in name) for kind, count in kinds.items()}
        if names := hits(secrets, data):
            found.append((name, names))
    assert all(kinds.values()), kinds  # each kind of file was written and searched

    # The job's logs, and the logs of every Ray worker process on every node (driver, train
    # workers, Ray Data, Tune trials).
    found += [("job logs", names)] if (names := hits(secrets, run.logs.encode())) else []
    worker_logs = [
        (path, data)
        for node in run.cluster.nodes
        for path, data in files_under(node.temp_dir)
        if "logs" in path.parts and path.name.startswith(("worker-", "job-driver-"))
    ]
    assert worker_logs
    found += [(str(path), names) for path, data in worker_logs if (names := hits(secrets, data))]

    # Commands that fail with the same credentials: a missing bucket, a refused secret, MLflow down.
    tiny = ["--config", "workflows/configs/tiny.yaml"]
    for setting in (
        f"storage.s3.endpoint_url={s3_server.endpoint}",
        f"data.train_images={run.root}/images/train",
        f"data.eval_images={run.root}/images/eval",
    ):
        tiny += ["--set", setting]
    dead_mlflow = f"http://lbsr-user:{secrets['tracking URI password']}@127.0.0.1:9"
    cases = {
        "missing bucket": (
            ["workflows.train", *tiny, "--set", "storage.root=s3://no-such-bucket-lbsr/x", "--set",
             f"tracking.uri={run.tracking_uri}"],
            run.env,
            "does not exist",
        ),
        "refused secret": (
            ["workflows.pipeline", *tiny, "--set", f"storage.root={run.root}/other", "--set",
             f"tracking.uri={run.tracking_uri}"],
            {**run.env, "AWS_SECRET_ACCESS_KEY": secrets["MLFLOW_TRACKING_PASSWORD"]},
            "credentials",
        ),
        "MLflow down": (
            ["workflows.tune", *tiny, "--set", f"storage.root={run.root}/other", "--set", f"tracking.uri={dead_mlflow}",
             "--set", "tune.stage=teacher"],
            run.env,
            "not reachable",
        ),
    }  # fmt: skip
    for case, (args, env, problem) in cases.items():
        result = failing_command(args, env)
        assert result.returncode == 2, (case, result.returncode, result.stderr[-3000:])
        assert problem in result.stderr, (case, result.stderr[-3000:])
        assert "Traceback" not in result.stderr, (case, result.stderr[-3000:])
        found += (
            [(f"{case}: output", names)] if (names := hits(secrets, (result.stdout + result.stderr).encode())) else []
        )

    assert not found, found
