"""MLflow set-up shared by train, tune, evaluate and register.

The driver configures the tracking URI (`cfg.tracking_uri`: a server, or a sqlite file under a
local storage root), creates the experiment once (never concurrently from workers) and opens or
finds again the run; workers only log to a run id they are given, through `RunLogger`.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from workflows.config import Config, flatten_config

__all__ = ["RUN_KEY_TAG", "RunLogger", "client", "experiment_id", "find_run", "log_model", "log_params", "open_run"]

RUN_KEY_TAG = "lightbsr.run"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


def client(cfg: Config):
    from mlflow import MlflowClient

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

    items = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client(cfg).log_batch(run_id, params=items[start : start + 100])


def log_config(cfg: Config, run_id: str) -> None:
    """The flattened config as params and the whole config as `config.json`."""
    log_params(cfg, run_id, flatten_config(cfg))
    client(cfg).log_dict(run_id, cfg.model_dump(), "config.json")


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


@dataclass
class RunLogger:
    """Metrics and images of one run; a logger with `run_id=None` (other ranks, tracking off) is silent."""

    tracking_uri: str
    run_id: str | None
    _client: Any = field(default=None, init=False, repr=False)

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _mlflow(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def metrics(self, values: dict[str, float], step: int) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._mlflow().log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def image(self, pixels: np.ndarray, artifact_file: str) -> None:
        """uint8 (H, W, 3) as a PNG artifact at `artifact_file` (e.g. strips/step_00000500.png)."""
        if not self.active:
            return
        from PIL import Image

        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            Image.fromarray(pixels).save(os.path.join(tmp, name), format="PNG")
            self._mlflow().log_artifact(self.run_id, os.path.join(tmp, name), artifact_path=folder or None)

    def file(self, path: str, artifact_path: str | None = None) -> None:
        if self.active:
            self._mlflow().log_artifact(self.run_id, path, artifact_path=artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.active:
            self._mlflow().set_terminated(self.run_id, status=status)
