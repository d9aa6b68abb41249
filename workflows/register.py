"""`lightbsr register`: put a trained student into the MLflow model registry as a pyfunc model,
and fetch models back (`models:/name@alias`, `s3://`, local paths) for evaluate and upscale.

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
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import yaml

from lightbsr.checkpoint import CheckpointError, Loaded, load_checkpoint, save_checkpoint
from lightbsr.tiling import DEFAULT_OVERLAP, DEFAULT_TILE
from workflows.config import Config, add_config_arguments, load_config
from workflows.serving import CHECKPOINT_ARTIFACT, LightBSRModel

__all__ = [
    "RegistryError",
    "check_registry",
    "fetch_checkpoint",
    "load_student",
    "main",
    "register_checkpoint",
]

EVAL_TABLE_ARTIFACT = "evaluation"
PINNED_PACKAGES = ("torch", "numpy", "Pillow", "mlflow", "PyYAML", "pydantic")
OURS = "LightBSR (ours)"  # the method name of our lines in `lightbsr evaluate` tables


class RegistryError(ValueError):
    """A model reference that cannot be resolved: names the registry, the model and the alias."""


def serving_code_paths() -> list[str]:
    """Ship the model code with the model (`lightbsr/` and `workflows/`, whose empty `__init__` means
    importing `workflows.serving` pulls nothing else), so loading needs torch + mlflow, not this project."""
    import lightbsr
    import workflows.serving

    return [os.path.dirname(lightbsr.__file__), os.path.dirname(workflows.serving.__file__)]


def check_registry(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer (MLflow would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise RegistryError(f"MLflow tracking server {uri} is not reachable: {reason}") from None


def _parse_model_uri(ref: str) -> tuple[str, str | None, str | None]:
    """`models:/name@alias` or `models:/name/version` -> (name, alias, version)."""
    body = ref[len("models:/") :]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias, None
    name, _, version = body.partition("/")
    return name, None, version or None


def _model_version(ref: str, uri: str):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, version = _parse_model_uri(ref)
    if not name or not (alias or version):
        raise RegistryError(f"model reference {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    check_registry(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"registry {uri} has no registered model {name!r} (from {ref})") from None
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias else f"version {version!r}"
        raise RegistryError(f"registered model {name!r} in {uri} has no {what} (from {ref})") from None


def fetch_checkpoint(ref: str, cfg: Config, workdir: str | os.PathLike) -> Path:
    """A local checkpoint file or folder for a path, an `s3://` file or folder URL, `runs:/` or `models:/`."""
    if ref.startswith("models:/"):
        import mlflow.artifacts

        uri = cfg.tracking_uri
        version = _model_version(ref, uri)
        name = version.name
        model_dir = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version.version}", dst_path=str(workdir), tracking_uri=uri
            )
        )
        mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
        try:
            relative = mlmodel["flavors"]["python_function"]["artifacts"][CHECKPOINT_ARTIFACT]["path"]
        except (KeyError, TypeError):
            raise RegistryError(f"{ref} (version {version.version}) is not a lightbsr model: no checkpoint artifact")
        return model_dir / relative
    if ref.startswith("runs:/"):
        import mlflow.artifacts

        check_registry(cfg.tracking_uri)
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(workdir), tracking_uri=cfg.tracking_uri)
        )
    if "://" in ref and not ref.startswith("file://"):
        from workflows import storage

        url = ref.rstrip("/")
        if storage.list_files(url, cfg.storage.s3) != [""]:  # a checkpoint folder
            url = storage.join(url, "model.pt")
        target = Path(workdir) / Path(url).name
        target.write_bytes(storage.read_bytes(url, cfg.storage.s3))
        return target
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


def load_student(ref: str, cfg: Config, map_location: str = "cpu") -> Loaded:
    """The student behind any model reference, in eval mode (a teacher is refused)."""
    with tempfile.TemporaryDirectory(prefix="lightbsr-model-") as workdir:
        loaded = load_checkpoint(fetch_checkpoint(ref, cfg, workdir), map_location=map_location)
    if loaded.role != "student":
        raise CheckpointError(f"{ref} holds a {loaded.role}; upscaling and evaluation need a student")
    return loaded


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


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    images = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    params = ParamSchema([ParamSpec("tile", "long", DEFAULT_TILE), ParamSpec("overlap", "long", DEFAULT_OVERLAP)])
    return ModelSignature(inputs=images, outputs=images, params=params)


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
        loaded = load_student(checkpoint, cfg)
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
            config=loaded.raw.get("config"),
        )
        artifacts = {CHECKPOINT_ARTIFACT: str(ours)}
        tags = {
            "scale": str(loaded.scale),
            "setting": str(loaded.setting),
            "parameters": str(sum(p.numel() for p in loaded.model.parameters())),
            "source": checkpoint,
        }
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
                signature=_signature(),
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
    try:
        cfg = load_config(args.config, args.overrides)
        name, version = register_checkpoint(args.checkpoint, cfg, args.alias, args.eval_table)
    except (RegistryError, CheckpointError, ValueError) as error:
        print(f"lightbsr register: {error}", file=sys.stderr)
        return 1
    print(f"registered models:/{name}/{version} as models:/{name}@{args.alias or cfg.tracking.alias}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
