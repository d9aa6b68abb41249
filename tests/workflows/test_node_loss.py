"""Node loss during `lightbsr train` as a Ray job on three nodes, checkpoints on S3 (issue 12, must-show 2).

One cluster (tests/fixtures/cluster.py: a head and two worker nodes with one `slot` each; train
workers ask for a slot, so each runs on its own worker node) and three runs of the teacher stage.
In each, once the first checkpoint is on S3, the raylet of a node holding a train worker is
SIGKILLed (a crashed machine):

* `train.num_workers=[1, 2]`: the run continues on the one node left;
* `train.num_workers=2` and a replacement node started by the test: it resumes there;
* `train.num_workers=2` and no capacity coming back: the driver fails the run with a message naming
  what is missing once `train.capacity_wait_s` has passed, instead of waiting forever.

The first two finish with every step in MLflow exactly once; the recovery time (kill -> first step
logged after the restart) is printed. The test waits for events (a checkpoint object, a job state), never a fixed time.
"""

import shlex
import time
import uuid

import pytest

from tests.fixtures.cluster import SLOT, job_runtime_env, submit_job, upload_folder, wait_for_job

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # the cluster jobs take minutes on 2 loaded cores
EPOCHS, ITERS = 2, 30  # the kill lands in epoch 2, after the first checkpoint


def first_checkpoint(s3, bucket: str, prefix: str, job_status) -> str:
    """The first `checkpoint_*` object under `prefix`, once it exists (or the job ended without one)."""
    while True:
        listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
        found = [item["Key"] for item in listed if "/checkpoint_" in item["Key"]]
        if found:
            return found[0]
        status = job_status()
        assert status in ("PENDING", "RUNNING"), f"job {status} before any checkpoint"
        time.sleep(1)  # polling S3 for the event, not waiting a fixed time


def train_worker_node(cluster) -> tuple[str, str]:
    """(label, node id) of a worker node that holds an alive train worker now."""
    from ray.util.state import list_actors

    while True:
        alive = list_actors(
            address=cluster.dashboard,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
            detail=True,
        )
        labels = {entry["node_id"]: entry["labels"] for entry in cluster.node_states()}
        held = sorted((label, actor.node_id) for actor in alive for label in labels.get(actor.node_id, []))
        if held:
            return held[0]
        time.sleep(1)


def wait_dead(cluster, node_id: str) -> None:
    """Until the GCS declares this node (not merely one with its label: replacements share it) dead."""
    while not any(n["node_id"] == node_id and n["state"] == "DEAD" for n in cluster.node_states()):
        time.sleep(1)


def step_history(mlflow, experiment: str, run_name: str):
    found = mlflow.get_experiment_by_name(experiment)
    (run,) = mlflow.search_runs([found.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    return run, mlflow.get_metric_history(run.info.run_id, "lr")


@pytest.fixture
def node_loss_env(multinode_cluster, s3_server, mlflow_server, sample_images, monkeypatch):
    """Images on S3 and a function that submits `lightbsr train` with a run name and extra overrides."""
    from ray.job_submission import JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", multinode_cluster.env["RAY_AUTH_MODE"])
    key = f"node-loss-{uuid.uuid4().hex[:8]}"
    root = f"s3://{s3_server.bucket}/{key}"
    s3 = s3_server.client()
    for split in ("train", "eval"):
        assert upload_folder(s3, s3_server.bucket, sample_images / split, f"{key}/images/{split}") > 0
    base = [
        f"storage.root={root}/store",
        f"storage.s3.endpoint_url={s3_server.endpoint}",
        f"data.train_images={root}/images/train",
        f"data.eval_images={root}/images/eval",
        "data.data_cpus=0.5",
        f"tracking.uri={mlflow_server}",
        f"tracking.experiment={key}",
        "train.stage=teacher",
        "train.cpus_per_worker=1",
        f"train.worker_resources={{{SLOT}: 1}}",
        "train.batch_size=4",
        f"schedule.epochs={EPOCHS}",
        f"schedule.iters_per_epoch={ITERS}",
    ]
    jobs = JobSubmissionClient(multinode_cluster.dashboard)

    def submit(run_name: str, *extra: str) -> str:
        sets = [*base, f"train.run_name={run_name}", *extra]
        args = " ".join(f"--set {shlex.quote(s)}" for s in sets)
        entrypoint = f"python -m workflows.shards --config workflows/configs/tiny.yaml {args} --quiet && "
        entrypoint += f"python -m workflows.train --config workflows/configs/tiny.yaml {args}"
        return submit_job(
            jobs,
            entrypoint=entrypoint,
            runtime_env=job_runtime_env(multinode_cluster, s3_server.env()),
            submission_id=f"{key}-{run_name}",
        )

    return multinode_cluster, s3, s3_server.bucket, key, jobs, submit, mlflow_server


def kill_after_first_checkpoint(cluster, s3, bucket, key, jobs, job_id, run_name) -> tuple[str, str, float]:
    """Wait for the run's first S3 checkpoint, SIGKILL the raylet of a train worker's node.

    Returns that node's label and id, and the time of the kill."""
    first_checkpoint(s3, bucket, f"{key}/store/{run_name}-teacher/", lambda: str(jobs.get_job_status(job_id).value))
    label, node_id = train_worker_node(cluster)
    pid = cluster.kill_node(label)
    killed_at = time.time()
    print(f"\n[node loss] {run_name}: killed the raylet of {label} (pid {pid})")
    return label, node_id, killed_at


def check_finished_without_lost_steps(mlflow, jobs, job_id, key, run_name, killed_at) -> None:
    status = wait_for_job(jobs, job_id)
    logs = jobs.get_job_logs(job_id)
    assert status == "SUCCEEDED", logs[-6000:]
    run, history = step_history(mlflow, key, f"{run_name}-teacher")
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in history)
    assert steps == list(range(1, EPOCHS * ITERS + 1)), steps  # tiny.yaml logs every step
    after = sorted(m.timestamp / 1000 for m in history if m.timestamp / 1000 > killed_at)
    assert after, "no step logged after the kill: it landed after training ended"
    print(
        f"[node loss] {run_name}: recovery (kill -> first step after the restart) {restart_delay(killed_at, after):.1f} s"
    )


def restart_delay(killed_at: float, logged_after: list[float]) -> float:
    """Seconds from the kill to the first step logged after the longest pause that follows it.

    A surviving worker can still log a step or two before the failure reaches it; the restart is
    the longest silence after the kill, so the step that ends it marks the recovery."""
    times = [killed_at, *logged_after]
    resumed = max(range(1, len(times)), key=lambda i: times[i] - times[i - 1])
    return times[resumed] - killed_at


def test_node_loss_continues_resumes_or_fails_clearly(node_loss_env):
    from mlflow import MlflowClient

    cluster, s3, bucket, key, jobs, submit, tracking_uri = node_loss_env
    mlflow = MlflowClient(tracking_uri)

    # A range of workers: the run continues on the node that is left.
    job = submit("elastic", "train.num_workers=[1, 2]")
    label, node_id, killed_at = kill_after_first_checkpoint(cluster, s3, bucket, key, jobs, job, "elastic")
    check_finished_without_lost_steps(mlflow, jobs, job, key, "elastic", killed_at)
    wait_dead(cluster, node_id)
    cluster.add_node(label)

    # A fixed count: it resumes on the replacement node the test starts.
    job = submit("fixed", "train.num_workers=2")
    label, node_id, killed_at = kill_after_first_checkpoint(cluster, s3, bucket, key, jobs, job, "fixed")
    wait_dead(cluster, node_id)
    cluster.add_node(label)
    check_finished_without_lost_steps(mlflow, jobs, job, key, "fixed", killed_at)

    # A fixed count and no capacity coming back: a clear error once train.capacity_wait_s has passed.
    job = submit("stranded", "train.num_workers=2", "train.capacity_wait_s=20")
    kill_after_first_checkpoint(cluster, s3, bucket, key, jobs, job, "stranded")
    status = wait_for_job(jobs, job)
    logs = jobs.get_job_logs(job)
    assert status == "FAILED", logs[-6000:]
    (failure,) = [line for line in logs.splitlines() if line.startswith("lightbsr train: failed:")]
    assert "lacked the capacity" in failure and "train.capacity_wait_s = 20" in failure, failure
    assert "train.worker_resources" in failure and "hold only 1 such worker(s)" in failure, failure
    # One line from the driver, no traceback of its own (Ray's actors' lines carry a "(name pid=...)" prefix).
    assert not any(line.startswith("Traceback") for line in logs.splitlines()), logs[-6000:]
    run, _ = step_history(mlflow, key, "stranded-teacher")
    assert run.info.status == "FAILED"
