"""MLflow set-up shared by train, tune, evaluate and register.

The driver configures the tracking URI (`cfg.tracking_uri`: a server, or a sqlite file under a
local storage root), creates the experiment once (never concurrently from workers) and opens or
finds again the run (`stage_run` also ends it, on every exit path); workers only log to a run id
they are given, through `RunLogger`, which sends from a background thread so that a slow or
absent tracking server never stalls training. Everything logged has its URLs redacted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from workflows import storage
from workflows.config import Config, flatten_config
from workflows.urls import redact_text

__all__ = [
    "RUN_KEY_TAG",
    "SENDER_ENV",
    "RunLogger",
    "artifact_env",
    "client",
    "end_run",
    "experiment_id",
    "find_run",
    "log_model",
    "log_params",
    "open_run",
    "redacted_config",
    "stage_run",
]

log = logging.getLogger(__name__)

RUN_KEY_TAG = "lightbsr.run"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
#: for a process whose MLflow calls all go through a `RunLogger` (a train worker): one short
#: attempt per call, the logger retries itself, instead of MLflow's minutes of backoff per call.
SENDER_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def artifact_env(cfg: Config) -> dict[str, str]:
    """Environment MLflow's S3 artifact client needs to use the configured endpoint (driver and workers)."""
    endpoint = storage.s3_endpoint(cfg.storage.s3)
    return {"MLFLOW_S3_ENDPOINT_URL": endpoint} if endpoint else {}


def client(cfg: Config):
    from mlflow import MlflowClient

    from workflows.runtime import set_quiet_env

    set_quiet_env()  # among others: no run links that carry the tracking URI's credentials
    for key, value in artifact_env(cfg).items():
        os.environ.setdefault(key, value)
    return MlflowClient(tracking_uri=cfg.tracking_uri)


def _artifact_location(cfg: Config) -> str | None:
    """Artifacts beside a local sqlite store; a server decides for itself (proxied artifacts)."""
    if cfg.tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    return cfg.url("mlflow-artifacts")


def experiment_id(cfg: Config) -> str:
    """The id of `cfg.tracking.experiment`, created on first use (call in the driver only)."""
    mlflow_client = client(cfg)
    experiment = mlflow_client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.create_experiment(cfg.tracking.experiment, artifact_location=_artifact_location(cfg))
    except MlflowException:  # created meanwhile by another driver
        return mlflow_client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def find_run(cfg: Config, run_key: str):
    """The latest run tagged `run_key` in the experiment, or None."""
    found = client(cfg).search_runs(
        [experiment_id(cfg)],
        filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0] if found else None


def open_run(cfg: Config, run_key: str, tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """(run id, resumed): the latest run tagged `run_key` (marked RUNNING again), or a new one named so."""
    found = find_run(cfg, run_key)
    if found:
        if found.info.status != "RUNNING":
            client(cfg).update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id, True
    run = client(cfg).create_run(experiment_id(cfg), run_name=run_key, tags={RUN_KEY_TAG: run_key, **(tags or {})})
    return run.info.run_id, False


def log_params(cfg: Config, run_id: str, params: dict[str, str]) -> None:
    """Log parameters in batches (values cut to MLflow's limit)."""
    from mlflow.entities import Param

    items = [Param(k, redact_text(str(v))[:MAX_PARAM_CHARS]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client(cfg).log_batch(run_id, params=items[start : start + 100])


def redacted_config(cfg: Config) -> dict[str, Any]:
    """`cfg.model_dump()` with the userinfo of every URL in it removed (for MLflow and checkpoints)."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return redact_text(value) if isinstance(value, str) else value

    return walk(cfg.model_dump())


def log_config(cfg: Config, run_id: str) -> None:
    """The flattened config as params and the whole config as `config.json` (URLs redacted)."""
    log_params(cfg, run_id, flatten_config(cfg))
    client(cfg).log_dict(run_id, redacted_config(cfg), "config.json")


def end_run(cfg: Config, run_id: str, status: str) -> None:
    """Mark the run ended; a tracking outage here is a warning (a rerun reopens the run)."""
    from mlflow.exceptions import MlflowException

    try:
        client(cfg).set_terminated(run_id, status=status)
    except (MlflowException, OSError) as error:
        log.warning("could not mark MLflow run %s %s: %s", run_id, status, redact_text(str(error)))


@contextmanager
def stage_run(cfg: Config, run_key: str, tags: dict[str, str], enabled: bool = True) -> Iterator[str | None]:
    """Open (or reopen) the run tagged `run_key`; it is ended FINISHED, KILLED (Ctrl-C) or FAILED on exit."""
    if not enabled:
        yield None
        return
    run_id, resumed = open_run(cfg, run_key, tags)
    status = "FAILED"
    try:
        if not resumed:
            log_config(cfg, run_id)
        yield run_id
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        end_run(cfg, run_id, status)


def image_signature():
    """(-1, 3, -1, -1) float32 in and out: any batch and size (a pt2 example would freeze them)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    spec = TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))
    return ModelSignature(inputs=Schema([spec]), outputs=Schema([spec]))


def log_model(cfg: Config, run_id: str, model, name: str = "model") -> str:
    """Log an image-to-image torch model (pickle format, pinned torch) with a signature; returns its URI."""
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(cfg.tracking_uri)
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        info = mlflow.pytorch.log_model(
            model.cpu().eval(),
            name=name,
            signature=image_signature(),
            serialization_format="pickle",
            pip_requirements=["torch==2.13.0"],
        )
    return info.model_uri


class RunLogger:
    """Metrics and images of one run, sent to MLflow from a background thread.

    The training thread only appends to a bounded buffer (`buffer` items; beyond that new items
    are dropped and counted). The sender retries an item until the server takes it, so a
    tracking outage costs a warning with a count, never a stall; `flush` waits for the buffer
    to drain only while the server answers. Steps at or below the last step the run already
    holds (its latest `iteration` metric, read once by the sender) are not sent again: after a
    restore, iterations replayed since the checkpoint do not log their steps twice.
    A logger with `run_id=None` (other ranks, tracking off) is silent.
    """

    RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # waits between attempts during an outage

    def __init__(self, tracking_uri: str, run_id: str | None, *, buffer: int = 10_000) -> None:
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._items: deque[tuple[str, Any, int, bool]] = deque()
        self._buffer = buffer
        self._cond = threading.Condition()
        self._busy = False  # the sender holds an item it has not delivered yet
        self._stop = False
        self._outage = False
        self._thread: threading.Thread | None = None
        self._logged_through: int | None = None  # None until read from the run
        self.dropped = 0  # items not sent because the buffer was full
        self.failures = 0  # failed attempts to send

    @property
    def active(self) -> bool:
        return self.run_id is not None

    # ---- training-thread side

    def metrics(self, values: dict[str, float], step: int, *, replayed_ok: bool = False) -> None:
        """Queue `values` at `step`; `replayed_ok` sends them even at a step the run already holds."""
        if self.active:
            self._put(("metrics", {k: float(v) for k, v in values.items()}, step, replayed_ok))

    def image(self, pixels: np.ndarray, artifact_file: str, step: int) -> None:
        """uint8 (H, W, 3) as a PNG artifact at `artifact_file` (e.g. strips/teacher_00000500.png)."""
        if self.active:
            self._put(("image", (pixels.copy(), artifact_file), step, False))

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until everything queued is sent (True); returns at once during an outage (False)."""
        if not self.active or self._thread is None:
            return True
        with self._cond:
            self._cond.wait_for(lambda: self._outage or not (self._items or self._busy), timeout=timeout_s)
            return not (self._items or self._busy)

    def close(self, timeout_s: float = 60.0) -> None:
        """Flush, stop the sender, and warn with the counts of what was not sent."""
        if not self.active or self._thread is None:
            return
        self.flush(timeout_s)
        with self._cond:
            self._stop = True
            left = len(self._items) + self._busy
            self._cond.notify_all()
        self._thread.join(timeout=max(self.RETRY_S))
        if left or self.dropped:
            log.warning(
                "MLflow run %s: %d item(s) not sent (tracking unreachable), %d dropped (buffer full), "
                "%d failed attempt(s)",
                self.run_id,
                left,
                self.dropped,
                self.failures,
            )

    def _put(self, item: tuple[str, Any, int, bool]) -> None:
        with self._cond:
            if len(self._items) >= self._buffer:
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("MLflow buffer full (%d items): dropping new metrics until it drains", self._buffer)
                return
            self._items.append(item)
            self._cond.notify_all()
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_all, name="mlflow-sender", daemon=True)
                self._thread.start()

    # ---- sender thread

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _send_all(self) -> None:
        from mlflow.exceptions import MlflowException

        mlflow_client = self._client()
        attempt = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or bool(self._items))
                if not self._items:
                    return
                item = self._items[0]
                self._busy = True
            try:
                self._send(mlflow_client, item)
            except (MlflowException, OSError) as error:
                self.failures += 1
                with self._cond:
                    self._busy = False
                    if not self._outage:
                        log.warning("MLflow unreachable, buffering (%s)", redact_text(str(error)).splitlines()[0])
                    self._outage = True
                    self._cond.notify_all()
                    if self._stop:
                        return
                    self._cond.wait(self.RETRY_S[min(attempt, len(self.RETRY_S) - 1)])
                attempt += 1
                continue
            with self._cond:
                self._items.popleft()
                self._busy = False
                if self._outage:
                    log.warning("MLflow reachable again after %d failed attempt(s)", self.failures)
                self._outage, attempt = False, 0
                self._cond.notify_all()

    def _send(self, mlflow_client, item: tuple[str, Any, int, bool]) -> None:
        kind, payload, step, replayed_ok = item
        if self._logged_through is None:
            self._logged_through = int(mlflow_client.get_run(self.run_id).data.metrics.get("iteration", 0))
        if step <= self._logged_through and not replayed_ok:
            return  # replayed after a restore: the run holds this step already
        if kind == "image":
            pixels, artifact_file = payload
            mlflow_client.log_image(self.run_id, pixels, artifact_file=artifact_file)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = payload if replayed_ok else {**payload, "iteration": float(step)}
        mlflow_client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
