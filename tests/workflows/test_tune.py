"""Sweeps: bad search spaces are refused before any trial; a small real sweep stops trials early,
records the best config in MLflow (children under the parent) and resumes after an interruption."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.paths import REPO
from workflows.config import ConfigError, load_config
from workflows.tune import best_config_text, paper_point, run_sweep, search_space

pytestmark = pytest.mark.unit

TINY = REPO / "workflows" / "configs" / "tiny.yaml"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("tune.space={loss.contrastive_temperature: {low: 0.5, high: 0.1}}", "loss.contrastive_temperature"),
        ("tune.space={train.batch_size: {low: 1, high: 8}}", "train.batch_size"),
        ("tune.space={loss.distillation: {low: 0, high: 1}}", "loss.distillation"),
        ("tune.space={loss.contrastive_temperature: {low: -0.1, high: 0.1}}", "loss.contrastive_temperature"),
        ("tune.space={loss.kd_temperature: {low: 0.1, high: 0.2}}", "loss.kd_temperature"),  # not a teacher knob
    ],
)
def test_bad_search_space_is_rejected_before_any_trial(tmp_path, override, named):
    overrides = [f"storage.root={tmp_path}", "tune.stage=teacher", override]
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        cfg = load_config(TINY, overrides)
        run_sweep(cfg)
    assert not (tmp_path / "tune").exists()


def test_student_sweep_needs_a_fixed_teacher(tmp_path):
    cfg = load_config(TINY, [f"storage.root={tmp_path}", "tune.stage=student"])
    with pytest.raises(ConfigError, match=r"train\.teacher_checkpoint"):
        search_space(cfg)


def test_the_papers_values_are_the_first_point():
    cfg = load_config(TINY, ["tune.stage=student", "train.teacher_checkpoint=/x"])
    point = paper_point(cfg, search_space(cfg))
    assert point == {
        "loss.kd_temperature": 0.15,
        "loss.channel_kl_weight": 1.0,
        "loss.channel_l1_weight": 0.1,
        "loss.spatial_weight": 1.0,
    }


def _mlflow_children(tracking_uri, parent_id):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def _sweep_command(tmp_path, sample_images):
    return [
        sys.executable,
        "-m",
        "workflows.tune",
        "--config",
        str(TINY),
        "--set",
        f"storage.root={tmp_path / 'store'}",
        "--set",
        f"data.train_images={sample_images / 'train'}",
        "--set",
        f"data.eval_images={sample_images / 'eval'}",
        "--set",
        f"tracking.uri=sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
        # One trial at a time and L1 from the first epoch: ASHA then compares every trial with
        # the finished ones at each rung, so early stops do not depend on which trial reports first.
        "--set",
        "tune.stage=teacher",
        "--set",
        "tune.num_samples=4",
        "--set",
        "tune.max_concurrent=1",
        "--set",
        "tune.grace_period=1",
        "--set",
        "tune.reduction_factor=2",
        "--set",
        "schedule.epochs=4",
        "--set",
        "schedule.phase1_epochs=0",
        "--set",
        "schedule.warmup_epochs=0",
        "--set",
        "train.cpus_per_worker=0.5",
    ]


def _ended_trial_runs(tracking_uri, statuses=("FINISHED", "KILLED")):
    """MLflow runs of ended sweep trials (finished or stopped early): run id -> (end, val_psnr count)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("lightbsr-tiny") if tracking_uri else None
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id])
    return {
        run.info.run_id: (run.info.end_time, len(client.get_metric_history(run.info.run_id, "epoch/val_psnr")))
        for run in runs
        if "sweep.trial" in run.data.tags and run.info.status in statuses
    }


@pytest.mark.e2e
def test_sweep_stops_trials_early_resumes_and_records_the_best(tmp_path, sample_images):
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    command = _sweep_command(tmp_path, sample_images)
    trial_root = tmp_path / "store" / "tune" / "lightbsr-tiny-sweep"
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"

    # First run: interrupted (Ctrl-C) once at least one trial has finished.
    with open(tmp_path / "first.log", "w") as log:  # a file, not a pipe: an unread pipe would block the sweep
        first = subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 840  # one budget for every wait below, inside pytest's 900 s timeout
        before = {}
        while first.poll() is None and not before and time.monotonic() < deadline:
            time.sleep(3)
            # The sweep prints this line once it has created the sqlite store; opening the store earlier
            # from here would race with its creation (two processes migrating one fresh database).
            if "MLflow parent run" in (tmp_path / "first.log").read_text():
                before = _ended_trial_runs(uri, ("FINISHED",))
        assert before, "no trial finished before the interruption"
        first.send_signal(signal.SIGINT)
        try:
            first.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            first.kill()
            first.wait()
    out_first = (tmp_path / "first.log").read_text()
    assert first.returncode == 130, out_first[-3000:]
    assert "unfinished; its state is kept under" in out_first and "rerun the same command to resume" in out_first

    # Second run: the same command resumes; finished trials keep their runs untouched (not rerun).
    second = subprocess.run(
        command, env=env, cwd=REPO, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic())
    )
    assert second.returncode == 0, (out_first[-2000:], second.stdout[-4000:], second.stderr[-4000:])
    assert "resuming sweep" in second.stdout
    after = _ended_trial_runs(uri)
    for run_id, finished in before.items():
        assert after[run_id] == finished, f"finished trial run {run_id} was rerun"
    assert len(after) == 4

    best_config = trial_root / "best_config.yaml"
    assert best_config.is_file()
    best = load_config(best_config)
    assert 0.02 <= best.loss.contrastive_temperature <= 0.25

    import mlflow

    client = mlflow.MlflowClient(uri)
    parents = client.search_runs(
        [client.get_experiment_by_name("lightbsr-tiny").experiment_id],
        filter_string="tags.`sweep.name` = 'lightbsr-tiny-sweep'",
    )
    assert len(parents) == 1
    parent = parents[0]
    assert "best_val_psnr" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "trials.md", "trials.png"} <= artifacts
    children = _mlflow_children(uri, parent.info.run_id)
    assert len({c.data.tags.get("sweep.trial") for c in children}) == 4
    rows = json.loads(Path(client.download_artifacts(parent.info.run_id, "trials.json", str(tmp_path))).read_text())
    assert any(row["stopped_early"] for row in rows), rows
    assert max(row["val_psnr"] for row in rows) == pytest.approx(parent.data.metrics["best_val_psnr"])


@pytest.mark.e2e
def test_a_sweep_on_s3_uses_the_configured_endpoint(s3_server, mlflow_server, sample_images, tmp_path):
    """Two trials with storage.root on SeaweedFS, its endpoint only in storage.s3.endpoint_url (no
    AWS_ENDPOINT_URL), MLflow over HTTP: Tune's state, the trials' checkpoints and best_config.yaml
    land in the bucket."""
    env = {**os.environ, **s3_server.env()}
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "RAY_ADDRESS"):
        env.pop(name, None)
    prefix = f"tune-s3-{tmp_path.name}"
    uri = mlflow_server
    overrides = {
        "storage.root": f"s3://{s3_server.bucket}/{prefix}",
        "storage.s3.endpoint_url": s3_server.endpoint,
        "storage.s3.retries": 2,
        "tracking.uri": uri,
        "tracking.experiment": prefix,
        "data.train_images": sample_images / "train",
        "data.eval_images": sample_images / "eval",
        "tune.stage": "teacher",
        "tune.num_samples": 2,
        "tune.max_concurrent": 1,
        "schedule.epochs": 1,
        "schedule.phase1_epochs": 0,
        "schedule.warmup_epochs": 0,
        "train.cpus_per_worker": 0.5,
    }
    command = [sys.executable, "-m", "workflows.tune", "--config", str(TINY)]
    command += [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    done = subprocess.run(
        command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=840
    )  # inside pytest's 900 s
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-4000:])

    client = s3_server.client()
    keys = [
        item["Key"][len(prefix) + 1 :]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix + "/")
        for item in page.get("Contents", [])
    ]
    sweep = "tune/lightbsr-tiny-sweep/"
    assert f"{sweep}best_config.yaml" in keys and f"{sweep}tuner.pkl" in keys, keys  # Tune's own state
    trial_runs = {
        key.split("/")[0] for key in keys if re.fullmatch(r"lightbsr-tiny-\w+-teacher/checkpoint_[^/]+/model.pt", key)
    }
    assert len(trial_runs) == 2, keys  # each trial's training checkpoints
    body = client.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/{sweep}best_config.yaml")["Body"].read()
    (tmp_path / "best.yaml").write_bytes(body)
    best = load_config(tmp_path / "best.yaml")
    assert best.storage.s3.endpoint_url == s3_server.endpoint
    assert not (tmp_path / s3_server.bucket).exists()  # the scheme-less path was not taken for a local folder

    import mlflow

    mlflow_client = mlflow.MlflowClient(uri)
    (parent,) = mlflow_client.search_runs(
        [mlflow_client.get_experiment_by_name(prefix).experiment_id],
        filter_string="tags.`sweep.name` = 'lightbsr-tiny-sweep'",
    )
    assert "best_val_psnr" in parent.data.metrics
    assert len(_mlflow_children(uri, parent.info.run_id)) == 2


def test_the_best_config_carries_no_url_credentials(tmp_path):
    cfg = load_config(
        TINY,
        [
            f"storage.root={tmp_path}",
            "tracking.uri=https://alice:tracking-s3cret@mlflow.example.com:5000",
            "storage.s3.endpoint_url=http://bob:endpoint-s3cret@127.0.0.1:8333",
        ],
    )
    text = best_config_text(cfg)
    assert "s3cret" not in text and "alice" not in text and "bob" not in text
    (tmp_path / "best.yaml").write_text(text)
    again = load_config(tmp_path / "best.yaml")
    assert again.tracking.uri == "https://mlflow.example.com:5000"
    assert again.storage.s3.endpoint_url == "http://127.0.0.1:8333"
    assert again.loss == cfg.loss and again.model == cfg.model
