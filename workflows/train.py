"""Teacher and student training on Ray Train: one loop for both stages, exactly resumable.

`train_stage(cfg, stage)` runs one stage as a TorchTrainer job (DDP over gloo on CPU, NCCL on
GPU) fed by the Ray Data stream of `workflows.ingest`; `train(cfg)` runs the teacher and then a
student initialised from it. What differs between the stages is only the objective
(`lightbsr.objectives`): the loop, checkpoints, logging and validation are shared.

Epochs are 1-based, as in `lightbsr.schedule`; the data stream counts completed epochs
(0-based), so a run resumed after epoch e asks the stream for data epoch e.

Checkpoints go through `ray.train.report` to `<storage.root>/<run_name>-<stage>/checkpoint_*`,
each a folder with `model.pt` (`lightbsr.checkpoint` format: weights including the momentum
encoder and queue, optimiser, scaler, RNG states, PCA basis, redacted config) and `lightbsr.json`
(epoch, iteration, config fingerprint). A lost worker restarts from the latest one
(`train.max_failures`), on any worker count `train.num_workers` allows; rerunning the same
command (same run name and storage root) continues the run, does nothing when it is complete,
and refuses when the config the results depend on changed (`workflows.resume`).

This module is the driver: trainer construction, the MLflow run (opened here, ended on every
exit path), the command line. What runs on the workers is `workflows.train_loop`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from lightbsr.checkpoint import CheckpointError, load_checkpoint
from lightbsr.degrade import kernel_pca_basis
from workflows import storage
from workflows.config import Config, ConfigError, add_config_arguments, load_config
from workflows.errors import RuntimeFailure
from workflows.resume import (
    Found,
    check_fingerprint,
    checkpoint_record,
    checkpoint_url,
    latest_checkpoint,
    write_stream_start,
)
from workflows.train_loop import train_loop_per_worker, validation_protocol
from workflows.urls import redact, redact_text

__all__ = ["StageResult", "latest_checkpoint", "main", "train", "train_stage"]

STAGES = ("teacher", "student")


@dataclass
class StageResult:
    stage: str
    run_name: str
    checkpoint: str  # folder (local path or s3:// URI) holding model.pt
    epoch: int
    iteration: int
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None


# ============================================================================ driver side


def stage_run_name(cfg: Config, stage: str) -> str:
    return f"{cfg.train.run_name}-{stage}"


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ConfigError(f"train.stage: expected one of {STAGES} for a single stage, got {stage!r}")


def load_teacher_source(cfg: Config) -> dict[str, Any]:
    """The teacher the student stage learns from: weights, model config and PCA basis."""
    url = cfg.train.teacher_checkpoint
    if not url:
        raise ConfigError("train.teacher_checkpoint: the student stage needs a teacher checkpoint")
    from workflows.references import RegistryError, fetch_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        try:
            loaded = load_checkpoint(fetch_checkpoint(url, cfg, folder), role="teacher")
        except (CheckpointError, RegistryError) as error:
            raise ConfigError(f"train.teacher_checkpoint: {error}") from None
    mine = cfg.model
    for key in ("scale", "setting", "n_groups", "n_blocks"):
        if loaded.model_config[key] != getattr(mine, key):
            raise ConfigError(
                f"train.teacher_checkpoint {url}: teacher model.{key}={loaded.model_config[key]} but this config has "
                f"model.{key}={getattr(mine, key)}"
            )
    if loaded.pca_basis is None:
        raise ConfigError(f"train.teacher_checkpoint {url}: no PCA basis saved with the teacher")
    return {"state": loaded.model.state_dict(), "model_config": loaded.model_config, "pca_basis": loaded.pca_basis}


def stage_basis(cfg: Config, teacher_source: dict[str, Any] | None) -> torch.Tensor:
    """The teacher's saved basis for the student; a fresh seeded one for the teacher."""
    if teacher_source is not None:
        return teacher_source["pca_basis"]
    return kernel_pca_basis(cfg.model.pca_seed)


@dataclass
class ResumableStream:
    """Ray Data stream that starts after the latest stored checkpoint; built again on each (re)start.

    It records the epoch it starts after (`resume.write_stream_start`); every worker checks that
    against the checkpoint Ray Train hands it.
    """

    config: dict[str, Any]
    stage: str
    basis: torch.Tensor

    def __call__(self):
        from workflows.config import config_from_dict
        from workflows.ingest import training_dataset

        cfg = config_from_dict(self.config)
        run_name = stage_run_name(cfg, self.stage)
        found = latest_checkpoint(cfg, run_name)
        completed = found.epoch if found else 0
        write_stream_start(cfg, run_name, completed)
        return training_dataset(cfg, self.stage, self.basis, start_epoch=completed)


def _log_final_model(cfg: Config, run_id: str, checkpoint_url: str, stage: str) -> None:
    """model.pt under `checkpoint/` (a `runs:/<id>/checkpoint` teacher source); the student also as a model."""
    from workflows import tracking
    from workflows.references import fetch_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        file = str(fetch_checkpoint(checkpoint_url, cfg, folder))
        tracking.client(cfg).log_artifact(run_id, file, artifact_path="checkpoint")
        if stage == "student":
            tracking.log_model(cfg, run_id, load_checkpoint(file, role="student").model)


def _completed(cfg: Config, stage: str, run_name: str, found: Found, tracking: bool) -> StageResult:
    """The result of a stage whose last checkpoint is already the schedule's last epoch."""
    from workflows import tracking as mlflow_tracking

    print(f"[train] {run_name}: already complete at epoch {found.epoch} ({redact(found.checkpoint)})")
    run = mlflow_tracking.find_run(cfg, run_name) if tracking else None
    if run is not None and run.info.status != "FINISHED":  # finished training, crashed before closing
        mlflow_tracking.end_run(cfg, run.info.run_id, "FINISHED")
    run_id = run.info.run_id if run is not None else None
    return StageResult(stage, run_name, found.checkpoint, found.epoch, found.iteration, found.metrics, run_id)


def _trainer(
    cfg: Config,
    stage: str,
    loop_config: dict[str, Any],
    dataset,
    callbacks: list | tuple,
    workers: int | tuple[int, int],
):
    """The TorchTrainer of a stage on `workers` (`scaling_workers`): the shard stream unless a ready
    `dataset` is given."""
    from ray import LoggingConfig
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from workflows import tracking
    from workflows.runtime import worker_env

    resources = {
        "CPU": cfg.train.cpus_per_worker,
        **({"GPU": 1} if cfg.train.use_gpu else {}),
        **cfg.train.worker_resources,
    }
    trainer_kwargs: dict[str, Any] = {}
    if dataset is None:
        from workflows.ingest import training_data_config

        dataset = ResumableStream(cfg.model_dump(), stage, loop_config["basis"])
        trainer_kwargs["dataset_config"] = training_data_config()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        # mypy sees Ray Train V1's configs; V2's (the ones in use) take a (min, max) range of workers
        # (elastic training) and a worker_runtime_env
        scaling_config=ScalingConfig(
            num_workers=workers,  # type: ignore[arg-type]
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=stage_run_name(cfg, stage),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=list(callbacks),
            worker_runtime_env={"env_vars": {**worker_env(), **tracking.artifact_env(cfg)}},  # type: ignore[call-arg]
            logging_config=LoggingConfig(log_level="WARNING"),  # no per-report TrainingReport(...) lines
            **storage.ray_storage(cfg),
        ),
        datasets={"train": dataset},
        **trainer_kwargs,
    )


def _alive_nodes() -> list[dict[str, float]]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def scaling_workers(cfg: Config, with_stream: bool) -> int | tuple[int, int]:
    """`train.num_workers` as Ray Train gets it, once the cluster this run joined holds the smallest
    worker group and the data stream (`preflight.check_cpus`): a range's maximum is lowered so the
    workers always leave the stream its CPUs (`preflight.elastic_maximum`)."""
    from workflows.preflight import check_cpus, elastic_maximum, stream_cpus

    nodes = _alive_nodes()
    check_cpus(cfg, nodes, "the Ray cluster", with_stream=with_stream)
    if isinstance(cfg.train.num_workers, int) or not with_stream:
        return cfg.train.num_workers
    low, high = cfg.train.num_workers
    top = elastic_maximum(cfg, nodes)
    if top < high:
        cpus = sum(node.get("CPU", 0.0) for node in nodes)
        print(
            f"[train] train.num_workers [{low}, {high}]: at most {top} worker(s) on the {cpus:g} CPUs of this cluster, "
            f"so that the data stream keeps its {stream_cpus(cfg):g} (data.data_cpus + 1 for Ray Data's read)"
        )
    return (low, top)


def check_capacity(cfg: Config, workers: int | tuple[int, int], with_stream: bool) -> None:
    """The alive nodes hold the smallest worker group and the data stream, and the group Ray Train
    would (re)start on them, up to the maximum of `workers`, leaves the stream its CPUs."""
    from workflows.preflight import check_cpus, check_stream_left

    nodes = _alive_nodes()
    check_cpus(cfg, nodes, "the Ray cluster", with_stream=with_stream)
    if with_stream:
        maximum = workers if isinstance(workers, int) else workers[1]
        check_stream_left(cfg, nodes, maximum, "the Ray cluster")


CAPACITY_POLL_S = 2.0
#: how long a capacity loss waits for Ray Train's graceful abort before forcing it
ABORT_GRACE_S = 30.0


class CapacityLost(RuntimeFailure):
    """The cluster lacked what the smallest worker group and the data stream need for longer than
    `train.capacity_wait_s` (a lost node that did not come back)."""


def fit_watching_capacity(cfg: Config, trainer: Any, workers: int | tuple[int, int], with_stream: bool) -> Any:
    """`trainer.fit()`, failed with CapacityLost when the alive nodes lack the capacity of the smallest
    worker group (CPUs, `train.worker_resources`) plus the data stream, or the group Ray Train would
    restart leaves the stream no CPUs, for `train.capacity_wait_s`.

    Without this, Ray Train waits for a placement without end, and a restored run whose train
    workers and chunk makers took every CPU waits forever for a CPU for Ray Data's read task.

    On the main thread (the commands) `fit()` runs right here, so Ray Train's own Ctrl-C handler
    aborts the run (workers stopped, only complete checkpoints recorded) and Ctrl-C reaches the
    caller as KeyboardInterrupt; a watcher thread ends a run that lost its capacity the same way.
    Elsewhere (a Tune trial, a test's thread) no signal reaches `fit()`: it runs in a daemon thread
    that is left behind on a capacity loss (the job's actors end with the driver).
    """
    import threading

    if threading.current_thread() is threading.main_thread():
        return _fit_interruptible(cfg, trainer, workers, with_stream)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # handed to the caller's thread as is
            outcome["error"] = error

    thread = threading.Thread(target=run, name="lightbsr-fit", daemon=True)
    thread.start()

    def finished(seconds: float) -> bool:
        thread.join(seconds)
        return not thread.is_alive()

    lost = _wait_for_capacity_loss(cfg, workers, with_stream, finished)
    if lost is not None:
        raise CapacityLost(lost)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _fit_interruptible(cfg: Config, trainer: Any, workers: int | tuple[int, int], with_stream: bool) -> Any:
    """`trainer.fit()` on the main thread; a capacity loss sends this process the SIGINT of a Ctrl-C.

    Ray Train's SIGINT handler aborts the controller, then raises SystemExit(0): that becomes
    KeyboardInterrupt here, or CapacityLost when the watcher sent the signal (as does fit() failing
    on the aborted controller). A controller stuck placing workers that do not fit never gets to the
    abort; after ABORT_GRACE_S the watcher sends SIGINT again, and the third makes Ray Train's
    handler exit at once (as three Ctrl-Cs do). Ray Train leaves its handler installed: the previous
    one is restored.
    """
    import signal
    import threading

    from ray.exceptions import RayActorError

    done = threading.Event()
    lost: list[str] = []

    def watch() -> None:
        message = _wait_for_capacity_loss(cfg, workers, with_stream, done.wait)
        if message is None or done.is_set():  # no signal once fit() has returned
            return
        lost.append(message)
        os.kill(os.getpid(), signal.SIGINT)
        if done.wait(ABORT_GRACE_S):
            return
        while not done.wait(1.0):  # one at a time: signals sent together count once
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    watcher = threading.Thread(target=watch, name="lightbsr-capacity", daemon=True)
    watcher.start()
    try:
        return trainer.fit()
    except (KeyboardInterrupt, SystemExit, RayActorError) as error:
        if lost:
            raise CapacityLost(lost[0]) from None
        if isinstance(error, RayActorError):
            raise
        raise KeyboardInterrupt from None
    finally:
        done.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a signal the watcher is sending right now goes nowhere
        watcher.join()
        signal.signal(signal.SIGINT, previous)


def _wait_for_capacity_loss(
    cfg: Config, workers: int | tuple[int, int], with_stream: bool, finished: Callable[[float], bool]
) -> str | None:
    """Poll the cluster until `finished(CAPACITY_POLL_S)` says the run ended (None), or until it has
    lacked capacity for `train.capacity_wait_s` (what CapacityLost says)."""
    short_since: float | None = None
    while not finished(CAPACITY_POLL_S):
        missing = _capacity_missing(cfg, workers, with_stream)
        if missing is None:
            short_since = None
            continue
        now = time.monotonic()
        if short_since is None:
            short_since = now
            print(
                f"[train] waiting up to {cfg.train.capacity_wait_s:g} s (train.capacity_wait_s) for capacity: {missing}"
            )
        elif now - short_since > cfg.train.capacity_wait_s:
            return (
                f"the Ray cluster lacked the capacity this run needs for {now - short_since:.0f} s "
                f"(train.capacity_wait_s = {cfg.train.capacity_wait_s:g}): {missing}. The last checkpoint is kept: "
                "rerun the same command once nodes are back, or allow fewer workers (train.num_workers: [min, max])"
            )
    return None


def _capacity_missing(cfg: Config, workers: int | tuple[int, int], with_stream: bool) -> str | None:
    """What the alive nodes lack for the smallest worker group and the stream; None when they have it."""
    try:
        check_capacity(cfg, workers, with_stream)
    except ConfigError as error:
        return str(error)
    return None


def train_stage(
    cfg: Config,
    stage: str,
    *,
    dataset=None,
    callbacks: list | tuple = (),
    mlflow_tags: dict[str, str] | None = None,
    tracking: bool = True,
) -> StageResult:
    """Run (or continue) one stage on Ray Train and return where its final checkpoint is.

    `dataset`: a ready `ray.data.Dataset` with the batch-contract columns instead of the shard
    stream (tests, benchmarks); `tracking=False` logs nothing to MLflow. A rerun of a stage whose
    checkpoints were made with a different config raises ConfigChanged naming the keys.
    """
    from ray.train import TrainingFailedError

    from workflows import tracking as mlflow_tracking
    from workflows.runtime import init_ray

    _check_stage(stage)
    if validation_protocol(cfg) is None:
        print(
            f"[train] no validation: no protocol of lightbsr.protocols is x{cfg.model.scale} setting "
            f"{cfg.model.setting}; val_psnr is not logged"
        )
    run_name = stage_run_name(cfg, stage)
    teacher_source = load_teacher_source(cfg) if stage == "student" else None
    basis = stage_basis(cfg, teacher_source)
    found = latest_checkpoint(cfg, run_name)
    if found:
        stored = checkpoint_record(cfg, found.checkpoint).get("fingerprint")
        check_fingerprint(cfg, stored, f"run {run_name} (checkpoint {redact(found.checkpoint)})")
        if found.epoch >= cfg.schedule.epochs:
            return _completed(cfg, stage, run_name, found, tracking)

    init_ray(cfg.ray)
    workers = scaling_workers(cfg, with_stream=dataset is None)
    tags = {"lightbsr.stage": stage, **(mlflow_tags or {})}
    with mlflow_tracking.stage_run(cfg, run_name, tags, enabled=tracking) as run_id:
        if run_id and dataset is None:  # lineage: the shards this run reads, as its MLflow dataset input
            from workflows.lineage import log_shards_input

            log_shards_input(cfg, run_id)
        loop_config = {
            "config": cfg.model_dump(),
            "stage": stage,
            "basis": basis,
            "teacher": teacher_source,
            "tracking_uri": cfg.tracking_uri if tracking else None,
            "run_id": run_id,
            "check_stream_start": dataset is None,
        }
        try:
            trainer = _trainer(cfg, stage, loop_config, dataset, callbacks, workers)
            result = fit_watching_capacity(cfg, trainer, workers, with_stream=dataset is None)
        except TrainingFailedError as error:
            raise RuntimeFailure(f"training {run_name} failed: {_first_line(error)}") from error
        checkpoint = checkpoint_url(cfg, result.checkpoint)
        metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        if run_id:
            _log_final_model(cfg, run_id, checkpoint, stage)
    return StageResult(
        stage, run_name, checkpoint, int(metrics.get("epoch", 0)), int(metrics.get("iteration", 0)), metrics, run_id
    )


def _first_line(error: BaseException) -> str:
    return redact_text(str(error)).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def train(cfg: Config) -> list[StageResult]:
    """`train.stage`: teacher, student, or both (the student then learns from the teacher just trained)."""
    if cfg.train.stage != "both":
        return [train_stage(cfg, cfg.train.stage)]
    teacher = train_stage(cfg, "teacher")
    student_cfg = cfg.model_copy(deep=True)
    student_cfg.train.teacher_checkpoint = teacher.checkpoint
    return [teacher, train_stage(student_cfg, "student")]


# ============================================================================ command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lightbsr train", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    cfg = load_config(args.config, args.overrides)
    from workflows.preflight import check

    check(cfg)
    for result in train(cfg):
        print(json.dumps(asdict(result), default=str))
    return 0


if __name__ == "__main__":
    from workflows.cli import run

    sys.exit(run(main, prog="lightbsr train"))
