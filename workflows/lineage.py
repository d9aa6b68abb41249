"""Where a model came from, in MLflow: the shards a training run read and the runs behind a registered version.

A training run logs its shards as an MLflow dataset input (`mlflow.data`): name `shards`, the
shard folder as its source, and as digest the first 32 hex digits of the SHA-256 of the
shard `manifest.json` (MLflow keeps at most 36 characters), with the manifest's counts as its
profile. `lightbsr register` reads it back to tag the model version (`version_tags`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import PurePosixPath
from typing import Any

from workflows import storage
from workflows.config import Config, ConfigError, config_from_dict
from workflows.resume import fingerprint
from workflows.urls import join, redact

__all__ = [
    "DATASET_NAME",
    "config_digest",
    "log_shards_input",
    "manifest_digest",
    "shards_dataset",
    "training_runs",
    "version_tags",
]

DATASET_NAME = "shards"
TRAINING_CONTEXT = "training"
MANIFEST_NAME = "manifest.json"  # workflows.shards.MANIFEST_NAME (not imported: that module pulls pyarrow.parquet)


def manifest_digest(manifest: bytes) -> str:
    """The shard set's identity: SHA-256 of its manifest (which lists every shard's SHA-256), 32 hex digits."""
    return hashlib.sha256(manifest).hexdigest()[:32]


def config_digest(cfg: Config) -> str:
    """SHA-256 of the config fingerprint (`workflows.resume.fingerprint`: the keys results depend on)."""
    return hashlib.sha256(json.dumps(fingerprint(cfg), sort_keys=True).encode()).hexdigest()


def shards_dataset(cfg: Config) -> Any | None:
    """The MLflow dataset entity of `cfg.shards_url`, or None when it has no manifest."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset

    class ShardsDataset(MetaDataset):
        """Metadata only (the shards stay where they are), with the manifest's counts as the profile."""

        def __init__(self, url: str, manifest: bytes) -> None:
            super().__init__(resolve_dataset_source(url), name=DATASET_NAME, digest=manifest_digest(manifest))
            self.counts = json.loads(manifest).get("counts", {})

        @property
        def profile(self) -> dict[str, Any]:
            return self.counts

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(self.profile)}

    url = cfg.shards_url
    try:
        manifest = storage.read_bytes(join(url, MANIFEST_NAME), cfg.storage.s3)
    except FileNotFoundError:
        return None
    return Dataset(**ShardsDataset(redact(url), manifest).to_dict())


def log_shards_input(cfg: Config, run_id: str) -> bool:
    """Log the shards as the run's training dataset input; False (nothing logged) without a manifest."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    from workflows import tracking

    dataset = shards_dataset(cfg)
    if dataset is None:
        return False
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, TRAINING_CONTEXT)]
    tracking.client(cfg).log_inputs(run_id, datasets=[DatasetInput(dataset, tags)])
    return True


def _teacher_run_key(stored: Config) -> str:
    """The run key of the teacher a student learnt from: the `<name>-teacher` folder of its checkpoint URL."""
    source = stored.train.teacher_checkpoint or ""
    for part in reversed(PurePosixPath(source.split("://", 1)[-1]).parts):
        if part.endswith("-teacher"):
            return part
    return f"{stored.train.run_name}-teacher"


def training_runs(cfg: Config, stored: Config) -> dict[str, Any]:
    """{"teacher": run, "student": run} of the training that made a checkpoint with config `stored`
    (found by their run keys in its experiment on `cfg`'s tracking server); absent ones are left out."""
    from workflows import tracking

    where = cfg.model_copy(deep=True)
    where.tracking.experiment = stored.tracking.experiment
    keys = {"student": f"{stored.train.run_name}-student", "teacher": _teacher_run_key(stored)}
    mlflow_client = tracking.client(where)
    if mlflow_client.get_experiment_by_name(where.tracking.experiment) is None:
        return {}  # (find_run would create it)
    found = {role: tracking.find_run(where, key) for role, key in keys.items()}
    return {role: mlflow_client.get_run(run.info.run_id) for role, run in found.items() if run is not None}


def _shards_digest(runs: dict[str, Any]) -> str | None:
    for role in ("student", "teacher"):
        if role in runs:
            for item in runs[role].inputs.dataset_inputs:
                if item.dataset.name == DATASET_NAME:
                    return item.dataset.digest
    return None


def version_tags(cfg: Config, stored_config: dict[str, Any] | None) -> dict[str, str]:
    """`lineage.*` tags of a model version from the config saved in its checkpoint: the teacher and
    student training run ids, the config fingerprint's digest and the shard manifest digest."""
    if not stored_config:
        return {}
    try:
        stored = config_from_dict(stored_config)
    except ConfigError:  # a checkpoint from an older layout: no lineage to read
        return {}
    tags = {"lineage.config_fingerprint": config_digest(stored)}
    runs = training_runs(cfg, stored)
    tags |= {f"lineage.{role}_run_id": run.info.run_id for role, run in runs.items()}
    digest = _shards_digest(runs)
    if digest:
        tags["lineage.shards_digest"] = digest
    return tags
