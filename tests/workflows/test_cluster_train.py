"""`lightbsr train` as a Ray job on three nodes, with data, shards and checkpoints on S3 and MLflow
over HTTP: the production shape, on one machine (issue 12).

The cluster is `tests/fixtures/cluster.py` (a head and two workers, 2 CPUs each), the object store
SeaweedFS with a custom endpoint, the tracking store a real `mlflow server`. Credentials travel
only in the job's runtime_env environment. Each train worker takes 2 CPUs, a whole node, so the
two workers run on different nodes.
"""

import shlex
import time
import uuid

import pytest

from tests.fixtures.paths import REPO

pytestmark = pytest.mark.e2e
JOB_DEADLINE_S = 600  # plus ~1-2 min of cluster start: inside pytest's 900 s
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def upload_folder(client, bucket: str, folder, prefix: str) -> int:
    count = 0
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() == ".png":
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
            count += 1
    return count


def submit(client, **kwargs) -> str:
    """submit_job, retrying the one error a just-started head gives before its job agent is up."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as error:
            if "No available agent" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(3)


def wait_for_job(client, job_id: str) -> str:
    deadline = time.monotonic() + JOB_DEADLINE_S
    status = str(client.get_job_status(job_id).value)
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(3)
        status = str(client.get_job_status(job_id).value)
    return status


def test_tiny_train_on_three_nodes_with_s3_storage_and_mlflow_over_http(
    multinode_cluster, s3_server, mlflow_server, sample_images, monkeypatch
):
    from mlflow import MlflowClient
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    monkeypatch.setenv("RAY_AUTH_MODE", multinode_cluster.env["RAY_AUTH_MODE"])
    key = f"cluster-train-{uuid.uuid4().hex[:8]}"
    root = f"s3://{s3_server.bucket}/{key}"
    s3 = s3_server.client()
    assert upload_folder(s3, s3_server.bucket, sample_images / "train", f"{key}/images/train") > 0
    assert upload_folder(s3, s3_server.bucket, sample_images / "eval", f"{key}/images/eval") > 0

    experiment = key
    overrides = [
        f"storage.root={root}/store",
        f"storage.s3.endpoint_url={s3_server.endpoint}",
        f"data.train_images={root}/images/train",
        f"data.eval_images={root}/images/eval",
        f"tracking.uri={mlflow_server}",
        f"tracking.experiment={experiment}",
        "train.stage=teacher",
        "train.num_workers=2",
        "train.cpus_per_worker=2",
        "train.batch_size=4",
        "data.data_cpus=1",
    ]
    common = "--config workflows/configs/tiny.yaml " + " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    entrypoint = f"python -m workflows.shards {common} --quiet && python -m workflows.train {common}"
    runtime_env = {
        "working_dir": str(REPO),
        "excludes": [".git", "runs", "mlruns", "data"],
        "env_vars": {
            **s3_server.env(),
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        },
    }
    jobs = JobSubmissionClient(multinode_cluster.dashboard)
    started = time.monotonic()
    job_id = submit(jobs, entrypoint=entrypoint, runtime_env=runtime_env, submission_id=key)
    status = wait_for_job(jobs, job_id)
    logs = jobs.get_job_logs(job_id)
    print(f"\n[cluster train] job {status} after {time.monotonic() - started:.0f} s")
    assert status == "SUCCEEDED", logs[-6000:]
    assert s3_server.secret_key not in logs

    # Two train workers, on two different nodes.
    workers = list_actors(
        address=multinode_cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True
    )
    assert len({w.node_id for w in workers}) >= 2, [(w.node_id, w.state) for w in workers]

    # Checkpoints on S3, under the configured root.
    listed = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{key}/store/")
    names = [item["Key"] for item in listed.get("Contents", [])]
    assert any("/checkpoint_" in name for name in names), names[:20]

    # Losses and validation PSNR per epoch, in the MLflow server.
    mlflow = MlflowClient(mlflow_server)
    found = mlflow.get_experiment_by_name(experiment)
    assert found is not None
    (run,) = mlflow.search_runs([found.experiment_id])
    assert run.info.status == "FINISHED"
    epochs = 2  # tiny.yaml
    assert len(mlflow.get_metric_history(run.info.run_id, "epoch/loss_total")) == epochs
    for param in run.data.params.values():
        assert s3_server.secret_key not in param
    assert len(mlflow.get_metric_history(run.info.run_id, "epoch/val_psnr")) == epochs
