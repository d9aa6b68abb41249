"""The Ray Train loop on a real local Ray: workers in lockstep, a killed worker, MLflow records.

Small networks (1 group x 1 block), tiny patches cut from the real sample photographs, and an
in-memory Ray Dataset in the batch-contract format standing in for the shard stream.
"""

import contextlib
import os
import re
import signal
import tempfile
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lightbsr.checkpoint import load_checkpoint, save_checkpoint
from lightbsr.degrade import kernel_pca_basis
from lightbsr.small_runs import degraded_examples
from lightbsr.teacher import Teacher
from workflows.cli import run
from workflows.config import load_config
from workflows.resume import ConfigChanged, ResumeError, latest_checkpoint
from workflows.train import main, stage_run_name, train_stage

pytestmark = pytest.mark.integration

PATCH, SCALE, QUEUE = 12, 4, 64


def tiny_config(tmp_path, sample_images, *overrides):
    return load_config(
        None,
        [
            f"storage.root={tmp_path / 'store'}",
            f"data.eval_images={sample_images / 'eval'}",
            "model.n_groups=1",
            "model.n_blocks=1",
            f"model.queue_size={QUEUE}",
            f"data.patch_size={PATCH}",
            "data.tile_size=64",
            "train.cpus_per_worker=0.5",
            "schedule.warmup_epochs=0",
            "train.batch_size=4",
            *overrides,
        ],
    )


def in_memory_dataset(ray, sample_images, views, n=32, seed=0):
    examples = degraded_examples(sample_images / "train", n, views, PATCH, SCALE, kernel_pca_basis(0), seed=seed)
    return ray.data.from_items([{k: v[i] for k, v in examples.items()} for i in range(n)])


def random_teacher_checkpoint(path):
    torch.manual_seed(1)
    teacher = Teacher(SCALE, 1, 1, 1, QUEUE)
    model_config = {
        "scale": SCALE,
        "setting": 1,
        "n_groups": 1,
        "n_blocks": 1,
        "queue_size": QUEUE,
        "momentum": 0.999,
        "pca_seed": 0,
    }
    save_checkpoint(path, teacher, role="teacher", model_config=model_config, pca_basis=kernel_pca_basis(0))
    return path


def test_two_workers_train_in_lockstep_and_share_one_queue(ray_local, tmp_path, sample_images):
    cfg = tiny_config(
        tmp_path,
        sample_images,
        "train.num_workers=2",
        "schedule.epochs=2",
        "schedule.phase1_epochs=1",
        "schedule.iters_per_epoch=4",
    )
    result = train_stage(cfg, "teacher", dataset=in_memory_dataset(ray_local, sample_images, views=4), tracking=False)

    assert (result.epoch, result.iteration) == (2, 8)
    # per-tensor sums of every parameter and buffer (BN statistics, momentum encoder, queue) agree
    assert result.metrics["replica_divergence"] == 0.0
    saved = load_checkpoint(result.checkpoint, role="teacher")
    # 8 steps x 2 workers x 2 items: the keys of BOTH workers went into the queue
    assert int(saved.model.queue_ptr) == (8 * 2 * 2) % QUEUE
    assert torch.equal(saved.pca_basis, kernel_pca_basis(0))
    assert saved.raw["train_state"]["optimizer"]["state"], "optimiser state is saved for an exact resume"

    # a rerun with harmless changes continues (here: is complete); a changed loss is refused, naming the key
    harmless = cfg.model_copy(deep=True)
    harmless.train.log_every_steps, harmless.train.num_workers = 7, 1
    again = train_stage(
        harmless, "teacher", dataset=in_memory_dataset(ray_local, sample_images, views=4), tracking=False
    )
    assert (again.checkpoint, again.iteration) == (result.checkpoint, 8)
    changed = cfg.model_copy(deep=True)
    changed.loss.kd_temperature, changed.schedule.lr = 0.3, 1e-3
    with pytest.raises(ConfigChanged) as refused:
        train_stage(changed, "teacher", dataset=in_memory_dataset(ray_local, sample_images, views=4), tracking=False)
    message = str(refused.value)
    assert "loss.kd_temperature: 0.15 -> 0.3" in message and "schedule.lr: 0.0002 -> 0.001" in message
    assert "train.run_name" in message and "log_every_steps" not in message


def _train_worker_pid(ray, timeout=120):
    """PID of the (single) live Ray Train worker of OUR cluster (others may run on this machine)."""
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        if alive and alive[0].pid:
            return alive[0].pid
        time.sleep(0.5)
    raise TimeoutError("no Ray Train worker came up")


def _wait_for_checkpoint(cfg, stage, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = latest_checkpoint(cfg, stage_run_name(cfg, stage))
        except ResumeError:  # Ray is writing its record of the run right now
            found = None
        if found:
            return found.metrics
        time.sleep(0.1)
    raise TimeoutError("no checkpoint was written")


def test_killed_worker_resumes_from_its_last_checkpoint_and_mlflow_holds_the_run(
    ray_local, tmp_path, sample_images, mlflow_server
):
    teacher = random_teacher_checkpoint(tmp_path / "teacher")
    epochs, iters = 4, 8
    cfg = tiny_config(
        tmp_path,
        sample_images,
        f"tracking.uri={mlflow_server}",
        f"train.teacher_checkpoint={teacher}",
        f"schedule.epochs={epochs}",
        "schedule.phase1_epochs=0",
        f"schedule.iters_per_epoch={iters}",
        "train.log_every_steps=1",
        f"train.image_every_steps={iters}",
        "train.max_failures=2",
    )
    dataset = in_memory_dataset(ray_local, sample_images, views=1)
    outcome = {}
    run = threading.Thread(target=lambda: outcome.setdefault("result", train_stage(cfg, "student", dataset=dataset)))
    run.start()
    pid = _train_worker_pid(ray_local)
    killed_after = _wait_for_checkpoint(cfg, "student")
    os.kill(pid, signal.SIGKILL)
    print(f"\nkilled Ray Train worker pid {pid} after the checkpoint of epoch {killed_after['epoch']}")
    run.join(timeout=400)
    result = outcome["result"]
    assert killed_after["epoch"] < epochs, "the worker must die before the end for this test to mean anything"
    assert (result.epoch, result.iteration) == (epochs, epochs * iters)

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server)
    run_id = result.mlflow_run_id
    resumed = client.get_metric_history(run_id, "resumed_at_iteration")
    assert len(resumed) == 1
    restored = int(resumed[0].value)
    assert restored % iters == 0 and iters <= restored < epochs * iters
    # steps replayed after the restore (between the checkpoint and the kill) are not logged twice
    history = sorted(client.get_metric_history(run_id, "total"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, epochs * iters + 1))
    before = [m.value for m in history[restored - iters : restored]]
    first_after = history[restored].value
    print(
        f"\nloss before the kill (last epoch checkpointed): {min(before):.2f}..{max(before):.2f}; "
        f"first step after restore: {first_after:.2f}"
    )
    assert min(before) / 2 <= first_after <= 2 * max(before)

    run_data = client.get_run(run_id).data
    assert run_data.params["train.batch_size"] == "4" and run_data.params["loss.kd_temperature"] == "0.15"
    for name in ("l1", "channel", "spatial", "lr", "samples_per_s", "data_wait_s", "epoch/val_psnr"):
        assert name in run_data.metrics, name
    strips = [a.path for a in client.list_artifacts(run_id, "strips")]
    assert len(strips) >= epochs - 1
    strip = np.asarray(Image.open(client.download_artifacts(run_id, strips[0], str(tmp_path))))
    assert strip.shape == (PATCH * SCALE, 3 * PATCH * SCALE, 3) and strip.std() > 0
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == ["checkpoint/model.pt"]

    import mlflow.pytorch

    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert model(torch.rand(2, 3, 10, 14)).shape == (2, 3, 40, 56)

    # the same command again continues the same run: here it is complete, so nothing is retrained
    again = train_stage(cfg, "student", dataset=dataset)
    assert (again.iteration, again.mlflow_run_id, again.checkpoint) == (result.iteration, run_id, result.checkpoint)


def test_command_line_rejects_a_bad_override_before_ray_starts(capsys):
    assert run(main, ["--set", "train.batch_size=0"], prog="lightbsr train") == 2
    err = capsys.readouterr().err
    assert "train.batch_size" in err and len(err.strip().splitlines()) == 1


def test_validation_reads_eval_images_from_s3_as_from_a_folder(s3_server, tmp_path, sample_images):
    from workflows import storage
    from workflows.train_loop import validation_set

    local = tiny_config(tmp_path, sample_images)
    names = sorted(p.name for p in (sample_images / "eval").iterdir() if p.suffix.lower() == ".png")
    remote_url = f"s3://{s3_server.bucket}/validation-test/eval"
    with s3_server.environment():
        for name in names:
            storage.atomic_write_bytes(f"{remote_url}/{name}", (sample_images / "eval" / name).read_bytes())
        remote = tiny_config(tmp_path, sample_images, f"data.eval_images={remote_url}")
        from_s3 = validation_set(remote, kernel_pca_basis(0), torch.device("cpu"))
    from_folder = validation_set(local, kernel_pca_basis(0), torch.device("cpu"))
    assert from_s3 is not None and from_folder is not None and len(from_folder["lr"]) > 0
    for key in ("lr", "hr", "prior"):
        assert torch.equal(from_s3[key], from_folder[key]), key


def test_a_validation_protocol_of_another_setting_is_refused_before_training(tmp_path, sample_images):
    from workflows.config import ConfigError

    cfg = tiny_config(tmp_path, sample_images, "model.setting=2", "tune.protocol=iso_x4")
    with pytest.raises(ConfigError, match=r"tune\.protocol: iso_x4 .* set tune\.protocol to one of aniso_x4"):
        train_stage(cfg, "teacher", tracking=False)
    assert not (tmp_path / "store").exists(), "refused before any work"


def test_a_run_killed_on_two_workers_continues_from_its_checkpoint_on_a_range_of_one(
    ray_local, tmp_path, sample_images
):
    from ray.train import Result

    from workflows.errors import RuntimeFailure

    common = ["schedule.epochs=3", "schedule.phase1_epochs=1", "schedule.iters_per_epoch=4", "train.keep_checkpoints=3"]
    two = tiny_config(tmp_path, sample_images, "train.num_workers=2", "train.max_failures=0", *common)
    outcome = {}

    def first_run():
        try:
            train_stage(two, "teacher", dataset=in_memory_dataset(ray_local, sample_images, views=4), tracking=False)
        except RuntimeFailure as error:
            outcome["error"] = error

    run = threading.Thread(target=first_run)
    run.start()
    pid = _train_worker_pid(ray_local)
    killed_after = _wait_for_checkpoint(two, "teacher")
    os.kill(pid, signal.SIGKILL)
    run.join(timeout=400)
    assert "error" in outcome, "with max_failures=0 the killed run fails"
    assert killed_after["epoch"] < 3 and killed_after["workers"] == 2

    # the same run, now elastic with at most one worker (the global batch stays 4: 4 per worker)
    one = tiny_config(tmp_path, sample_images, "train.num_workers=[1,1]", *common)
    result = train_stage(one, "teacher", dataset=in_memory_dataset(ray_local, sample_images, views=4), tracking=False)
    assert (result.epoch, result.iteration) == (3, 12)
    kept = Result.from_path(str(tmp_path / "store" / stage_run_name(one, "teacher"))).best_checkpoints
    reported = sorted((m["epoch"], m["iteration"], m["workers"]) for _, m in kept)
    resumed = [(e, 4 * e, 1) for e in range(killed_after["epoch"] + 1, 4)]
    assert reported[-len(resumed) :] == resumed, "continued after the killed run's checkpoint, on one worker"


def test_more_cpus_than_the_cluster_has_is_an_error_naming_the_keys(ray_local, tmp_path, sample_images):
    from workflows.config import ConfigError

    total = ray_local.cluster_resources()["CPU"]
    cfg = tiny_config(tmp_path, sample_images, "train.num_workers=[1,2]", f"train.cpus_per_worker={total}")
    with pytest.raises(ConfigError) as refused:
        train_stage(cfg, "teacher", tracking=False)
    message = str(refused.value)
    assert f"train.num_workers (1) x train.cpus_per_worker ({total:g}) + data.data_cpus (1) + 1 for" in message
    assert f"the Ray cluster has {total:g}" in message


def test_a_wrong_s3_secret_is_one_line_without_the_secret(s3_server, mlflow_server, sample_images, capsys, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-9f3a")
    argv = [
        f"storage.root=s3://{s3_server.bucket}/wrong-secret",
        f"storage.s3.endpoint_url={s3_server.endpoint}",
        "storage.s3.retries=1",
        f"tracking.uri={mlflow_server}",
        f"data.train_images={sample_images / 'train'}",
        f"data.eval_images={sample_images / 'eval'}",
        "train.stage=teacher",
    ]
    # preflight asks the store before any work: refused credentials are a configuration error (exit 2)
    assert run(main, [a for o in argv for a in ("--set", o)], prog="lightbsr train") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lightbsr train: error:") and "access denied" in err[0]
    assert "wrong-secret-9f3a" not in err[0]


def test_the_shard_stream_restarts_after_the_checkpoint_the_workers_restore(ray_local, tmp_path, sample_images):
    """A killed worker: the stream is rebuilt after the restored epoch (the workers check it) and the run ends.

    The range of workers could take every CPU (two workers of half the cluster each); the run keeps
    the stream's CPUs free by starting, and restarting, one worker.
    """
    import shutil

    from workflows.resume import read_stream_start
    from workflows.shards import write_shards

    (tmp_path / "src").mkdir()
    shutil.copy(sample_images / "train" / "chelsea.png", tmp_path / "src")
    half = ray_local.cluster_resources()["CPU"] / 2
    assert half >= 1.5, "the stream's CPUs (0.5 + 1 for the read) must fit beside one worker"
    cfg = tiny_config(
        tmp_path,
        sample_images,
        "train.num_workers=[1,2]",
        f"train.cpus_per_worker={half}",
        "data.tiles_per_shard=10",
        "data.data_cpus=0.5",
        "schedule.epochs=3",
        "schedule.phase1_epochs=1",
        "schedule.iters_per_epoch=3",
        "train.max_failures=1",
    )
    write_shards(str(tmp_path / "src"), cfg.shards_url, cfg, progress=False)
    outcome = {}
    run = threading.Thread(target=lambda: outcome.setdefault("result", train_stage(cfg, "teacher", tracking=False)))
    run.start()
    pid = _train_worker_pid(ray_local)
    killed_after = _wait_for_checkpoint(cfg, "teacher")
    os.kill(pid, signal.SIGKILL)
    run.join(timeout=600)
    result = outcome["result"]
    assert killed_after["epoch"] < 3, "the worker must die before the end for this test to mean anything"
    assert (result.epoch, result.iteration) == (3, 9)
    assert result.metrics["workers"] == 1, "two workers would have left the stream no CPU"
    # the last stream was built after a restore (not from epoch 0), as the workers asserted
    assert read_stream_start(cfg, stage_run_name(cfg, "teacher")) >= killed_after["epoch"] >= 1


def test_train_with_mlflow_down_at_start_fails_at_once_with_one_line(tmp_path, sample_images, capsys):
    from tests.fixtures.mlflow_server import free_port

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    argv = [
        f"storage.root={tmp_path / 'store'}",
        f"tracking.uri={down}",
        f"data.train_images={sample_images / 'train'}",
        f"data.eval_images={sample_images / 'eval'}",
    ]
    assert run(main, [a for o in argv for a in ("--set", o)], prog="lightbsr train") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tracking.uri" in err[0] and "not reachable" in err[0]
    assert not (tmp_path / "store").exists(), "nothing was started"


RAY_PROCESS_PREFIX = re.compile(r"^(?:\x1b\[\d+m)?\([^()]*pid=\d+[^()]*\)")  # "(Actor pid=12, ip=...)"


def driver_output(output: str) -> str:
    """The lines the command itself printed, without the lines Ray forwards from its processes.

    Those can hold Ray's own tracebacks from its shutdown (e.g. its placement group cleaner finding
    another Ray instance on this machine, as a concurrent test session's is)."""
    return "\n".join(line for line in output.splitlines() if not RAY_PROCESS_PREFIX.match(line))


@pytest.mark.e2e
def test_ctrl_c_during_train_aborts_the_run_and_ends_it_killed(tmp_path, sample_images):
    """Ctrl-C once Ray Train has recorded the first checkpoint: the run is aborted, the MLflow run ends
    KILLED with nothing logged after it ended, exit code 130 with one line, and the checkpoint is whole."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tests.fixtures.paths import REPO
    from workflows.references import fetch_checkpoint

    sets = [
        f"storage.root={tmp_path / 'store'}",
        f"data.train_images={sample_images / 'train'}",
        f"data.eval_images={sample_images / 'eval'}",
        "train.stage=teacher",
        "train.run_name=interrupted",
        "schedule.epochs=50",  # far more than it gets through before the signal
    ]
    config = str(REPO / "workflows/configs/tiny.yaml")
    args = ["--config", config, *(a for s in sets for a in ("--set", s))]
    cfg = load_config(config, sets)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    subprocess.run([sys.executable, "-m", "workflows.shards", *args, "--quiet"], cwd=REPO, env=env, check=True)
    with open(tmp_path / "train.log", "w") as log:  # a file, not a pipe: an unread pipe would block the run
        train = subprocess.Popen(
            [sys.executable, "-m", "workflows.train", *args], cwd=REPO, env=env, stdout=log, stderr=log
        )
        recorded = None
        while recorded is None and train.poll() is None:  # the event: Ray Train recorded a checkpoint
            with contextlib.suppress(ResumeError):  # Ray is writing its record of the run right now
                recorded = latest_checkpoint(cfg, stage_run_name(cfg, "teacher"))
            time.sleep(0.2)
        assert recorded is not None, (tmp_path / "train.log").read_text()[-4000:]
        train.send_signal(signal.SIGINT)
        code = train.wait()
    output = (tmp_path / "train.log").read_text()
    assert code == 130, output[-4000:]
    own = [line for line in output.splitlines() if line.startswith("lightbsr train:")]
    assert own == ["lightbsr train: interrupted; rerun the same command to resume"], output[-4000:]
    assert "Traceback" not in driver_output(output), output[-4000:]

    client = MlflowClient(cfg.tracking_uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
        filter_string="attributes.run_name = 'interrupted-teacher'",
    )
    assert run.info.status == "KILLED"
    logged = [m.timestamp for name in run.data.metrics for m in client.get_metric_history(run.info.run_id, name)]
    assert logged and max(logged) <= run.info.end_time, "the workers logged after the run was ended"
    found = latest_checkpoint(cfg, stage_run_name(cfg, "teacher"))
    assert found is not None and recorded.epoch <= found.epoch < 50
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = load_checkpoint(fetch_checkpoint(found.checkpoint, cfg, folder), role="teacher")
    assert checkpoint.model is not None
