"""`lightbsr pipeline` then `lightbsr tune` as a Ray job on three nodes, with every input and output
on S3 and MLflow over HTTP: the production shape, on one machine (issue 12, must-show 1).

The run is the session fixture `production_run` (tests/fixtures/cluster.py): a head and two worker
nodes of 2 CPUs each, SeaweedFS with a custom endpoint, a real `mlflow server`; two train workers,
one per worker node (`train.worker_resources={slot: 1}`). tests/workflows/test_secrets.py inspects
the same run for leaked credentials.
"""

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # the cluster jobs take minutes on 2 loaded cores
EPOCHS = 2  # workflows/configs/tiny.yaml


def test_pipeline_and_sweep_as_a_ray_job_with_everything_on_s3(production_run, s3_server):
    from mlflow import MlflowClient
    from ray.util.state import list_actors

    run = production_run
    assert run.status == "SUCCEEDED", run.logs[-6000:]
    mlflow = MlflowClient(run.tracking_uri)
    experiment = mlflow.get_experiment_by_name(run.key)
    assert experiment is not None
    runs = {r.info.run_name: r for r in mlflow.search_runs([experiment.experiment_id])}

    # Teacher and student: finished, validation PSNR every epoch.
    for stage in ("teacher", "student"):
        stage_run = runs[f"lightbsr-tiny-{stage}"]
        assert stage_run.info.status == "FINISHED"
        history = mlflow.get_metric_history(stage_run.info.run_id, "epoch/val_psnr")
        assert sorted(m.step for m in history) == sorted({m.step for m in history}), history
        assert len(history) == EPOCHS, history

    # Two train workers at once, each on its own worker node.
    workers = list_actors(
        address=run.cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000
    )
    labels = {entry["node_id"]: entry["labels"] for entry in run.cluster.node_states()}
    worker_nodes = {tuple(labels[w.node_id]) for w in workers}
    assert worker_nodes == {("node_a",), ("node_b",)}, worker_nodes

    # Shards, checkpoints and the evaluation table on S3, under the configured root.
    s3 = s3_server.client()
    names = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=f"{run.key}/store/"):
        names += [item["Key"] for item in page.get("Contents", [])]
    store = f"{run.key}/store"
    assert any(n.startswith(f"{store}/shards/train/") for n in names), names[:20]
    assert any(n.startswith(f"{store}/lightbsr-tiny-student/checkpoint_") for n in names), names[:20]
    table = s3.get_object(Bucket=s3_server.bucket, Key=f"{store}/evaluation/lightbsr-tiny/table.csv")["Body"].read()
    assert b"Set5" in table and b"iso_x4" in table, table[:500]

    # The student registered, with the alias pointing at it.
    version = mlflow.get_model_version_by_alias(run.key, "champion")
    assert version.run_id

    # The sweep: 2 trials on the same S3 storage, each reporting val_psnr, the best config stored there.
    sweep = runs["sweep-sweep"]
    assert sweep.info.status == "FINISHED"
    trials = [r for r in runs.values() if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id]
    assert len(trials) == 2, [t.info.run_name for t in trials]
    for trial in trials:
        assert mlflow.get_metric_history(trial.info.run_id, "epoch/val_psnr"), trial.info.run_name
    assert f"{store}/tune/sweep-sweep/best_config.yaml" in names, [n for n in names if "/tune/" in n][:20]
    assert "best_val_psnr" in sweep.data.metrics
