"""`lightbsr register`: put a trained student into the MLflow model registry as a pyfunc model.

The pyfunc model takes uint8 (N, H, W, 3) images and returns uint8 (N, sH, sW, 3) images; it
carries our checkpoint (weights, model config, PCA basis) as an artifact and runs the same
tiled inference as `lightbsr upscale` (params `tile`, `overlap`).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from lightbsr.checkpoint import CheckpointError, save_checkpoint
from lightbsr.macs import count_parameters
from workflows import preflight
from workflows.cli import run
from workflows.config import Config, add_config_arguments, load_config
from workflows.errors import UsageError
from workflows.references import check_registry, load_student, resolve
from workflows.serving import CHECKPOINT_ARTIFACT, LightBSRModel, signature
from workflows.urls import redact, redact_text

__all__ = ["main", "register_checkpoint", "serving_code_paths"]

EVAL_TABLE_ARTIFACT = "evaluation"
PINNED_PACKAGES = ("torch", "numpy", "Pillow", "mlflow", "PyYAML", "pydantic")
OURS = "LightBSR (ours)"  # the method name of our lines in `lightbsr evaluate` tables
#: config keys `register` does not read: preflight leaves them alone
NOT_USED_KEYS = (
    "data.train_images",
    "data.eval_images",
    "data.benchmarks",
    "train.teacher_checkpoint",
    "ray",  # no Ray work: no cluster or GPU checks
)


def serving_code_paths() -> list[str]:
    """Ship the model code with the model (`lightbsr/` and `workflows/`, whose empty `__init__` means
    importing `workflows.serving` pulls nothing else), so loading needs torch + mlflow, not this project."""
    import lightbsr
    import workflows.serving

    return [os.path.dirname(lightbsr.__file__), os.path.dirname(workflows.serving.__file__)]


def _without_userinfo(value: Any) -> Any:
    """The stored config with every URL's user:password part removed (checkpoints of older runs may hold them)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: _without_userinfo(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_userinfo(item) for item in value]
    return value


def _pinned_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}".replace("+cpu", "") for name in PINNED_PACKAGES]


def _psnr_tags(table_csv: Path) -> dict[str, str]:
    """`psnr.<protocol>.<set>` = our Y-PSNR averaged over the protocol's cases (the 'mean' lines of the CSV)."""
    tags = {}
    with open(table_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("method") != OURS or row.get("case") != "mean":
                continue
            for column, value in row.items():
                if column.endswith(" PSNR") and value:
                    tags[f"psnr.{row['protocol']}.{column[: -len(' PSNR')]}"] = f"{float(value):.2f}"
    return tags


def register_checkpoint(
    checkpoint: str, cfg: Config, alias: str | None = None, eval_table: str | None = None
) -> tuple[str, str]:
    """Log the student as a pyfunc model, register it and point `alias` at it; returns (name, version)."""
    from mlflow import MlflowClient

    from workflows import tracking

    uri = cfg.tracking_uri
    check_registry(uri)
    alias = alias or cfg.tracking.alias
    with tempfile.TemporaryDirectory(prefix="lightbsr-register-") as workdir:
        resolved = resolve(checkpoint, cfg, workdir)
        loaded = load_student(str(resolved.file), cfg)
        name = cfg.tracking.registered_model or f"lightbsr-x{loaded.scale}"
        # Always ship our format: an authors' checkpoint is converted (it has no PCA basis).
        ours = save_checkpoint(
            Path(workdir, f"{name}.pt"),
            loaded.model,
            role="student",
            model_config=loaded.model_config,
            pca_basis=loaded.pca_basis,
            epoch=loaded.raw.get("epoch", 0),
            iteration=loaded.raw.get("iteration", 0),
            config=_without_userinfo(loaded.raw.get("config")),
        )
        artifacts = {CHECKPOINT_ARTIFACT: str(ours)}
        tags = {
            "scale": str(loaded.scale),
            "setting": str(loaded.setting),
            "parameters": str(count_parameters(loaded.model)),
            "source": redact(checkpoint),
        }
        if resolved.registry is not None:  # re-registered from the registry: which version it was
            tags["source_version"] = resolved.registry.uri
        if eval_table:
            artifacts[EVAL_TABLE_ARTIFACT] = eval_table
            if eval_table.endswith(".csv"):
                tags.update(_psnr_tags(Path(eval_table)))
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        example = np.zeros((1, 16, 16, 3), np.uint8)
        with mlflow.start_run(experiment_id=tracking.experiment_id(cfg), run_name=f"register-{name}") as run:
            mlflow.set_tags(tags)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=LightBSRModel(),
                artifacts=artifacts,
                signature=signature(),
                input_example=example,
                pip_requirements=_pinned_requirements(),
                registered_model_name=name,
                code_paths=serving_code_paths(),
            )
        version = str(info.registered_model_version)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_model_version_tag(name, version, "run_id", run.info.run_id)
        client.set_registered_model_alias(name, alias, version)
    return name, version


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightbsr register", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="our checkpoint (file or folder), an authors' one, s3:// or models:/"
    )
    add_config_arguments(parser)
    parser.add_argument("--alias", help="alias to point at the new version (default: tracking.alias)")
    parser.add_argument(
        "--eval-table", help="evaluation table (CSV from `lightbsr evaluate`) to ship and tag PSNR from"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    preflight.check(cfg, skip=NOT_USED_KEYS)
    try:
        name, version = register_checkpoint(args.checkpoint, cfg, args.alias, args.eval_table)
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    print(f"registered models:/{name}/{version} as models:/{name}@{args.alias or cfg.tracking.alias}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="lightbsr register"))
