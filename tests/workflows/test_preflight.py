"""Config errors fail before any training or cluster work, with a message that names the key."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.paths import REPO
from workflows.config import ConfigError, load_config
from workflows.preflight import check

pytestmark = pytest.mark.unit


def closed_port() -> int:
    """A local port nothing listens on: bound once to pick it, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def local_config(tmp_path: Path, *overrides: str):
    """A valid config whose folders exist and whose MLflow store is a local sqlite file."""
    images = tmp_path / "images"
    (images / "train").mkdir(parents=True, exist_ok=True)
    (images / "eval").mkdir(parents=True, exist_ok=True)
    return load_config(
        REPO / "workflows/configs/tiny.yaml",
        [
            f"storage.root={tmp_path / 'store'}",
            f"data.train_images={images / 'train'}",
            f"data.eval_images={images / 'eval'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            *overrides,
        ],
    )


def fails_fast_naming(call, *keys: str) -> str:
    with pytest.raises(ConfigError) as caught:
        call()
    for key in keys:
        assert key in str(caught.value), str(caught.value)
    return str(caught.value)


@pytest.fixture(autouse=True)
def no_cluster_or_endpoint_env(monkeypatch):
    for name in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)


def test_unknown_key_fails_naming_it(tmp_path):
    path = write_yaml(tmp_path, "train:\n  batch_size: 8\n  num_wrokers: 2\n")
    message = fails_fast_naming(lambda: load_config(path), "train.num_wrokers")
    assert "unknown key" in message


def test_wrong_type_fails_naming_the_key(tmp_path):
    path = write_yaml(tmp_path, "train:\n  batch_size: sixty-four\n")
    fails_fast_naming(lambda: load_config(path), "train.batch_size")


def test_wrong_type_in_an_override_fails_naming_the_key():
    fails_fast_naming(lambda: load_config(None, ["train.use_gpu=maybe"]), "train.use_gpu")


def test_valid_local_config_passes(tmp_path):
    check(local_config(tmp_path))


def test_s3_store_with_unreachable_endpoint_fails_naming_the_keys(tmp_path):
    cfg = local_config(
        tmp_path, "storage.root=s3://lightbsr-test/run", f"storage.s3.endpoint_url=http://127.0.0.1:{closed_port()}"
    )
    message = fails_fast_naming(lambda: check(cfg), "storage.root", "storage.s3.endpoint_url")
    assert "not reachable" in message


def test_s3_endpoint_from_the_environment_is_named_when_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    cfg = local_config(tmp_path, "data.train_images=s3://lightbsr-test/hr")
    fails_fast_naming(lambda: check(cfg), "data.train_images", "AWS_ENDPOINT_URL")


@pytest.mark.integration
def test_s3_store_on_a_running_server_passes(tmp_path, s3_server):
    cfg = local_config(
        tmp_path, f"storage.root=s3://{s3_server.bucket}/run", f"storage.s3.endpoint_url={s3_server.endpoint}"
    )
    check(cfg)


def test_missing_data_folder_fails_naming_the_key(tmp_path):
    cfg = local_config(tmp_path, f"data.eval_images={tmp_path / 'no-such-folder'}")
    fails_fast_naming(lambda: check(cfg), "data.eval_images")


def test_skipped_keys_are_not_checked(tmp_path):
    cfg = local_config(tmp_path, f"data.train_images={tmp_path / 'made-later' / 'train'}")
    check(cfg, skip={"data.train_images"})


def test_missing_teacher_checkpoint_fails_naming_the_key(tmp_path):
    cfg = local_config(tmp_path, f"train.teacher_checkpoint={tmp_path / 'teacher.pt'}")
    fails_fast_naming(lambda: check(cfg), "train.teacher_checkpoint")


def test_teacher_checkpoint_in_the_mlflow_store_is_not_taken_for_a_path(tmp_path):
    check(local_config(tmp_path, "train.teacher_checkpoint=runs:/0123abcd/teacher"))


def test_unreachable_mlflow_server_fails_naming_tracking_uri(tmp_path):
    cfg = local_config(tmp_path, f"tracking.uri=http://127.0.0.1:{closed_port()}")
    fails_fast_naming(lambda: check(cfg), "tracking.uri")


def test_unreachable_mlflow_server_from_the_environment_is_named(tmp_path, monkeypatch):
    cfg = local_config(tmp_path, "tracking.uri=null")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    fails_fast_naming(lambda: check(cfg), "tracking.uri", "MLFLOW_TRACKING_URI")


def test_remote_store_without_any_tracking_uri_fails_naming_it(tmp_path):
    cfg = local_config(tmp_path, "storage.root=s3://lightbsr-test/run", "tracking.uri=null")
    fails_fast_naming(lambda: check(cfg, skip={"storage.root"}), "tracking.uri")


@pytest.mark.integration
def test_running_mlflow_server_passes(tmp_path, mlflow_server):
    check(local_config(tmp_path, f"tracking.uri={mlflow_server}"))


def test_more_gpus_than_this_machine_has_fails_naming_the_key(tmp_path):
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    workers = have + 1
    cfg = local_config(
        tmp_path, "train.use_gpu=true", f"train.num_workers={workers}", f"train.batch_size={2 * workers}"
    )
    fails_fast_naming(lambda: check(cfg), "train.use_gpu" if have == 0 else "train.num_workers")


@pytest.mark.integration
def test_gpu_asked_for_on_a_ray_cluster_without_one_fails_naming_the_key(tmp_path, ray_local):
    if ray_local.cluster_resources().get("GPU", 0):
        pytest.skip("this Ray cluster has GPUs")
    cfg = local_config(tmp_path, "train.use_gpu=true")
    message = fails_fast_naming(lambda: check(cfg), "train.use_gpu")
    assert "Ray cluster" in message


def test_pipeline_stops_before_any_step_on_an_unreachable_store(tmp_path, capsys):
    from workflows.pipeline import main

    code = main(
        [
            "--config",
            str(REPO / "workflows/configs/tiny.yaml"),
            "--set",
            "storage.root=s3://lightbsr-test/run",
            "--set",
            f"storage.s3.endpoint_url=http://127.0.0.1:{closed_port()}",
            "--set",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "--set",
            f"data.train_images={tmp_path}",
            "--set",
            f"data.eval_images={tmp_path}",
        ]
    )
    assert code != 0
    assert "storage.s3.endpoint_url" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_gpu_run_against_an_unreachable_ray_cluster_fails_naming_the_address(tmp_path):
    """In a fresh interpreter (no Ray up yet), as `ray job submit` or a user's shell would run it."""
    port = closed_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "workflows.pipeline",
            "--config",
            "workflows/configs/tiny.yaml",
            "--set",
            "train.use_gpu=true",
            "--set",
            f"ray.address=127.0.0.1:{port}",
            "--set",
            f"storage.root={tmp_path / 'store'}",
            "--set",
            f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
            "--set",
            f"data.train_images={tmp_path}",
            "--set",
            f"data.eval_images={tmp_path}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "ray.address" in run.stderr and f"127.0.0.1:{port}" in run.stderr, run.stderr[-2000:]
