"""`ray job submit` against a real `ray start --head` cluster on 127.0.0.1 runs the tiny pipeline."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures.mlflow_server import free_port, stop_process, wait_http
from tests.fixtures.paths import REPO

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@pytest.fixture()
def ray_head():
    """A private `ray start --head --block` cluster; stopping it never touches other Ray clusters."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob", dir="/tmp")  # short: Ray's socket paths are length-limited
    dash = free_port()
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--num-cpus=4",
            f"--object-store-memory={384 * 2**20}",
            "--disable-usage-stats",
            f"--temp-dir={temp_dir}",
            f"--ray-client-server-port={free_port()}",
            # Ports of our own, so this cluster's agents never collide with another Ray on the machine
            # (the test session's own local Ray holds the defaults).
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        wait_http(f"{address}/api/version", timeout=120, proc=proc)
        yield address, env
    finally:
        stop_process(proc, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_tiny_pipeline_succeeds_through_ray_job_submit(ray_head, sample_images, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    address, env = ray_head
    store = tmp_path / "store"
    job_id = f"lightbsr-test-{os.getpid()}"
    runtime_env = {"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}}
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        address,
        "--submission-id",
        job_id,
        "--no-wait",
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "-m",
        "workflows.pipeline",
        "--config",
        "workflows/configs/tiny.yaml",
        "--set",
        f"storage.root={store}",
        "--set",
        f"data.train_images={sample_images / 'train'}",
        "--set",
        f"data.eval_images={sample_images / 'eval'}",
    ]
    deadline = time.monotonic() + 120
    while True:  # the dashboard answers before its job agent has registered: retry that one error
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        if submit.returncode == 0 or "No available agent" not in submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + 540  # the job's wait, inside pytest's 900 s timeout with the start-up above
    status = client.get_job_status(job_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.monotonic() < deadline:
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]
    for step in ("shards", "teacher", "student", "evaluate", "register"):
        assert f"[pipeline] {step}: done" in logs, logs[-3000:]
        assert (store / "pipeline" / "lightbsr-tiny" / f"{step}.json").is_file()
