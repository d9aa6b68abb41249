"""Config errors fail within seconds, before any training, with a message that names the key."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.paths import REPO
from workflows.config import ConfigError, load_config
from workflows.preflight import check

pytestmark = pytest.mark.unit

# Each check is bounded in the code (preflight.MAX_PROBE_S per network call); tests print how long
# they took rather than assert a wall-clock limit.


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
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        call()
    print(f"\n[preflight] {time.monotonic() - started:.2f} s: {caught.value}")
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


@pytest.mark.parametrize(
    ("value", "problem"),
    [("{CPU: 1}", "set by train.cpus_per_worker"), ("{slot: 0}", "amounts must be positive")],
)
def test_worker_resources_must_be_custom_and_positive(value, problem):
    with pytest.raises(ConfigError) as refused:
        load_config(REPO / "workflows/configs/tiny.yaml", [f"train.worker_resources={value}"])
    assert "train.worker_resources" in str(refused.value) and problem in str(refused.value)


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
def test_s3_store_on_a_running_server_passes(tmp_path, s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    cfg = local_config(
        tmp_path, f"storage.root=s3://{s3_server.bucket}/run", f"storage.s3.endpoint_url={s3_server.endpoint}"
    )
    check(cfg)


@pytest.mark.integration
def test_s3_store_without_any_credentials_fails_saying_so(tmp_path, s3_server, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    cfg = local_config(
        tmp_path, f"storage.root=s3://{s3_server.bucket}/run", f"storage.s3.endpoint_url={s3_server.endpoint}"
    )
    fails_fast_naming(lambda: check(cfg), "storage.root", "no S3 credentials found", "AWS_ACCESS_KEY_ID")


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


ELASTIC = ("train.num_workers=[2,4]", "train.batch_size=12", "train.cpus_per_worker=1", "data.data_cpus=0.5")


@pytest.mark.parametrize(("node_cpus", "maximum"), [((2, 2, 2), 4), ((2, 2, 1), 3), ((2, 2), 2)])
def test_an_elastic_maximum_leaves_the_data_stream_its_cpus(tmp_path, node_cpus, maximum):
    from workflows.preflight import elastic_maximum

    # the stream declares 0.5 (data.data_cpus) + 1 (Ray Data's read) = 1.5 CPUs beside 1-CPU workers
    cfg = local_config(tmp_path, *ELASTIC)
    assert elastic_maximum(cfg, [{"CPU": float(n)} for n in node_cpus]) == maximum


def test_a_restart_that_would_take_the_stream_cpus_after_a_node_loss_names_the_numbers(tmp_path):
    from workflows.preflight import check_cpus, check_stream_left

    cfg = local_config(tmp_path, *ELASTIC)
    left = [{"CPU": 2.0}, {"CPU": 2.0}]  # a node of three lost; the run started with a maximum of 4
    check_cpus(cfg, left, "the Ray cluster")  # the smallest group (2) and the stream (1.5) fit in 4 CPUs ...
    message = fails_fast_naming(lambda: check_stream_left(cfg, left, 4, "the Ray cluster"), "train.num_workers")
    # ... but Ray Train would restart with 4 workers and leave the stream nothing
    assert "(re)start 4 worker(s)" in message and "= 4 of its 4 CPUs, leaving 0" in message, message
    assert "data.data_cpus (0.5) + 1 for Ray Data's read = 1.5" in message, message
    check_stream_left(cfg, left, 2, "the Ray cluster")  # a maximum of 2 leaves it its 1.5


@pytest.mark.integration
def test_gpu_asked_for_on_a_ray_cluster_without_one_fails_naming_the_key(tmp_path, ray_local):
    if ray_local.cluster_resources().get("GPU", 0):
        pytest.skip("this Ray cluster has GPUs")
    cfg = local_config(tmp_path, "train.use_gpu=true")
    message = fails_fast_naming(lambda: check(cfg), "train.use_gpu")
    assert "Ray cluster" in message


def test_pipeline_stops_before_any_step_on_an_unreachable_store(tmp_path, capsys):
    from workflows.cli import run
    from workflows.errors import EXIT_USAGE
    from workflows.pipeline import main

    started = time.monotonic()
    code = run(
        main,
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
        ],
        prog="lightbsr pipeline",
    )
    print(f"\n[preflight] pipeline stopped after {time.monotonic() - started:.2f} s")
    assert code == EXIT_USAGE
    assert "storage.s3.endpoint_url" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_gpu_run_against_an_unreachable_ray_cluster_fails_naming_the_address(tmp_path):
    """In a fresh interpreter (no Ray up yet), as `ray job submit` or a user's shell would run it."""
    port = closed_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    started = time.monotonic()
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
    print(f"\n[preflight] {time.monotonic() - started:.2f} s, interpreter start and imports included")
    assert run.returncode != 0
    assert "ray.address" in run.stderr and f"127.0.0.1:{port}" in run.stderr, run.stderr[-2000:]


# ---- real S3 (SeaweedFS), a stopped MLflow server, a three-node cluster -------------------


def timed_failure(call, *keys: str, secrets: tuple[str, ...] = ()) -> str:
    """The ConfigError's message; it names every key, holds no secret, and its time is printed."""
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        call()
    message = str(caught.value)
    print(f"\n[preflight] {time.monotonic() - started:.2f} s: {message}")
    for key in keys:
        assert key in message, message
    for secret in secrets:
        assert secret not in message, message
    return message


def s3_config(tmp_path, server, *overrides: str):
    return local_config(
        tmp_path, f"storage.root=s3://{server.bucket}/run", f"storage.s3.endpoint_url={server.endpoint}", *overrides
    )


@pytest.mark.integration
def test_wrong_s3_secret_fails_naming_the_key_and_the_credentials_without_them(tmp_path, s3_server, monkeypatch):
    wrong = "wrong-" + s3_server.secret_key[::-1]
    for name, value in {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": wrong}.items():
        monkeypatch.setenv(name, value)
    cfg = s3_config(tmp_path, s3_server)
    message = timed_failure(
        lambda: check(cfg),
        "storage.root",
        "access denied",
        "AWS_SECRET_ACCESS_KEY",
        secrets=(wrong, s3_server.secret_key),
    )
    assert s3_server.bucket in message


@pytest.mark.integration
def test_missing_bucket_fails_naming_the_key_and_the_bucket(tmp_path, s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    cfg = s3_config(tmp_path, s3_server, "storage.root=s3://no-such-bucket-here/run")
    message = timed_failure(lambda: check(cfg), "storage.root", "'no-such-bucket-here'", "does not exist")
    assert s3_server.secret_key not in message


@pytest.mark.integration
def test_missing_s3_image_folder_fails_naming_the_key(tmp_path, s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="preflight/hr/a.png", Body=b"png")
    check(s3_config(tmp_path, s3_server, f"data.train_images=s3://{s3_server.bucket}/preflight/hr"))
    cfg = s3_config(tmp_path, s3_server, f"data.train_images=s3://{s3_server.bucket}/preflight/hr-typo")
    timed_failure(lambda: check(cfg), "data.train_images", "does not exist")


@pytest.mark.integration
def test_stopped_s3_server_fails_naming_the_endpoint(tmp_path, s3_server_factory, monkeypatch):
    server = s3_server_factory("stopped")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    cfg = s3_config(tmp_path, server)
    check(cfg)
    server.stop()
    message = timed_failure(lambda: check(cfg), "storage.root", "storage.s3.endpoint_url", "not reachable")
    assert server.endpoint in message


@pytest.mark.integration
def test_stopped_mlflow_server_fails_naming_tracking_uri_without_its_password(tmp_path):
    from tests.fixtures.mlflow_server import free_port, start_mlflow_server, stop_process, wait_http

    port = free_port()
    server = start_mlflow_server(tmp_path / "mlflow", port)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=server)
        password = "pw-" + os.urandom(6).hex()
        cfg = local_config(tmp_path, f"tracking.uri=http://alice:{password}@127.0.0.1:{port}")
        check(cfg)
    finally:
        stop_process(server)
    message = timed_failure(lambda: check(cfg), "tracking.uri", "not reachable", secrets=(password, "alice:"))
    assert f"127.0.0.1:{port}" in message


# Runs `check` on the tiny config with each case's overrides, in a fresh interpreter joined to
# the cluster (RAY_ADDRESS), as `ray job submit` would; prints case -> [error or null, seconds].
CHECK_CASES = """
import json, sys, time
from workflows.config import ConfigError, load_config
from workflows.preflight import check
out = {}
for name, overrides in json.loads(sys.argv[1]).items():
    started = time.monotonic()
    try:
        check(load_config("workflows/configs/tiny.yaml", overrides))
        out[name] = [None, time.monotonic() - started]
    except ConfigError as error:
        out[name] = [str(error), time.monotonic() - started]
print(json.dumps(out))
"""


@pytest.mark.integration
def test_on_a_three_node_cluster_local_storage_sqlite_and_missing_cpus_fail_before_any_work(
    tmp_path, multinode_cluster, s3_server, mlflow_server
):
    images = tmp_path / "images"
    base = [f"data.train_images={images}", f"data.eval_images={images}"]
    images.mkdir()
    s3 = [f"storage.root=s3://{s3_server.bucket}/cluster-run", f"storage.s3.endpoint_url={s3_server.endpoint}"]
    tracking = f"tracking.uri={mlflow_server}"
    shared = [*base, *s3, tracking]
    cases = {
        "local_root": [*base, f"storage.root={tmp_path / 'store'}", f"tracking.uri={mlflow_server}"],
        "sqlite": [*base, *s3, f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
        "no_tracking_uri": [*base, *s3, "tracking.uri=null"],
        "shared": shared,
        "shared_mount": [*base, f"storage.root={tmp_path / 'store'}", "storage.shared_filesystem=true", tracking],
        "too_few_slots": [*shared, "train.num_workers=3", "train.batch_size=6", "train.worker_resources={slot: 1}"],
        "too_few_cpus": [*shared, "train.num_workers=2", "train.cpus_per_worker=2", "data.data_cpus=3"],
        "worker_larger_than_a_node": [*shared, "train.cpus_per_worker=3"],
        "gpu": [*shared, "train.use_gpu=true"],
    }
    run = subprocess.run(
        [sys.executable, "-c", CHECK_CASES, json.dumps(cases)],
        cwd=REPO,
        env=multinode_cluster.driver_env(PYTHONPATH=str(REPO), **s3_server.env()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (message, seconds) in results.items():
        print(f"[preflight on 3 nodes] {name}: {seconds:.2f} s: {message}")
    assert results["shared"][0] is None
    message = results["local_root"][0]
    assert "storage.root" in message and "3 nodes" in message and "s3://" in message
    assert "storage.shared_filesystem=true" in message  # a shared mount is accepted only when the user says so
    assert results["shared_mount"][0] is None
    message = results["too_few_slots"][0]
    assert "train.worker_resources ({'slot': 1.0})" in message and "only 2 such worker(s)" in message, message
    assert "tracking.uri" in results["sqlite"][0] and "mlflow server" in results["sqlite"][0]
    assert "tracking.uri must be set" in results["no_tracking_uri"][0]
    message = results["too_few_cpus"][0]
    assert "train.num_workers (2)" in message and "data.data_cpus (3)" in message and "2 CPU(s) missing" in message
    assert "train.cpus_per_worker (3)" in results["worker_larger_than_a_node"][0]
    assert "train.use_gpu" in results["gpu"][0] and "Ray cluster" in results["gpu"][0]
    for message, _ in results.values():
        assert message is None or s3_server.secret_key not in message


@pytest.mark.integration
def test_pipeline_with_a_local_store_on_a_three_node_cluster_stops_before_any_step(tmp_path, multinode_cluster):
    store = tmp_path / "store"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "workflows.pipeline",
            "--config",
            "workflows/configs/tiny.yaml",
            "--set",
            f"storage.root={store}",
        ],
        cwd=REPO,
        env=multinode_cluster.driver_env(PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "storage.root" in run.stderr and "3 nodes" in run.stderr, run.stderr[-3000:]
    assert not (store / "pipeline").exists() and not (store / "mlflow.db").exists()
