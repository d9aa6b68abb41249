"""One resolver for model references: whatever names a checkpoint becomes a local checkpoint file.

A model reference is one of

* a local path or `file://` URL: a checkpoint file (ours or the authors') or a folder holding `model.pt`;
* an object-store URL (`s3://bucket/key`): a file or a folder with `model.pt`, read through `workflows.storage`
  (the configured endpoint, region and retries);
* `runs:/<run_id>/<artifact path>`: an MLflow run artifact (file or folder);
* `models:/<name>@<alias>` or `models:/<name>/<version>`: a model registered by `lightbsr register`;
* for inference only (`load_tile_model`): a local folder written by `lightbsr export --format onnx`.

`resolve` fetches the checkpoint into a work folder and says, for registered models, which version
the alias pointed at. The MLflow references need the tracking store that holds them: `tracking.uri`,
MLFLOW_TRACKING_URI, or the default sqlite store under `storage.root` when it already exists (it is
never created here, so a missing setting is an error that says so, not an empty new store).
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from lightbsr.checkpoint import MODEL_FILE, CheckpointError, Loaded, checkpoint_file, load_checkpoint
from lightbsr.precision import prepare
from lightbsr.tiling import TileModel
from workflows import storage
from workflows.config import Config
from workflows.errors import RuntimeFailure, UsageError
from workflows.urls import is_remote, redact

__all__ = [
    "ModelReference",
    "ModelReferenceError",
    "RegistryError",
    "RegistryUnreachable",
    "RegistryVersion",
    "Resolved",
    "check_registry",
    "fetch_checkpoint",
    "load_student",
    "load_tile_model",
    "parse",
    "resolve",
    "tracking_uri",
]

REGISTRY_TIMEOUT_S = 5.0


class ModelReferenceError(UsageError, ValueError):
    """A model reference that cannot be parsed (an unsupported scheme, a malformed `models:/` or `runs:/`)."""


class RegistryError(ModelReferenceError):
    """A model reference that cannot be resolved: names the registry, the model and the alias."""


class RegistryUnreachable(RuntimeFailure):
    """The MLflow tracking server does not answer (exit 1: nothing the reference itself can fix)."""


@dataclass(frozen=True)
class ModelReference:
    """A parsed reference; `kind` is "path", "url", "run" or "model" (a registered model)."""

    text: str
    kind: str
    name: str | None = None  # registered model name
    alias: str | None = None
    version: str | None = None


@dataclass(frozen=True)
class RegistryVersion:
    """The registered model version a `models:/` reference pointed at when it was resolved."""

    name: str
    version: str
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass(frozen=True)
class Resolved:
    file: Path  # the local checkpoint file
    registry: RegistryVersion | None = None


def parse(ref: str) -> ModelReference:
    """What kind of reference `ref` is; a `models:/` reference without an alias or version is an error."""
    if ref.startswith("models:/"):
        body = ref.removeprefix("models:/")
        if "@" in body:
            name, alias = body.split("@", 1)
            version = None
        else:
            name, _, version = body.partition("/")
            alias = None
        if not name or not (alias or version) or "/" in (alias or ""):
            raise RegistryError(f"model reference {ref!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
        return ModelReference(ref, "model", name=name, alias=alias, version=version)
    if ref.startswith("runs:/"):
        if len(ref.removeprefix("runs:/").strip("/").split("/")) < 2:
            raise RegistryError(f"model reference {ref!r}: expected runs:/<run_id>/<artifact path>")
        return ModelReference(ref, "run")
    if is_remote(ref):
        if not storage.is_s3(ref):
            raise ModelReferenceError(
                f"model reference {redact(ref)}: scheme {urlsplit(ref).scheme!r} is not supported "
                "(a path, file://, s3://, runs:/ or models:/)"
            )
        if "@" in urlsplit(ref).netloc:
            raise ModelReferenceError(
                f"model reference {redact(ref)}: s3:// URLs carry no credentials "
                "(they come from the environment or the AWS chain)"
            )
        return ModelReference(ref, "url")
    return ModelReference(ref, "path")


def resolve(ref: str, cfg: Config, workdir: str | os.PathLike) -> Resolved:
    """Fetch the checkpoint `ref` names into `workdir` (local files are used in place)."""
    parsed = parse(ref)
    if parsed.kind == "model":
        return _resolve_registered(parsed, cfg, Path(workdir))
    if parsed.kind == "run":
        return Resolved(checkpoint_file(_download(ref, tracking_uri(cfg, ref), Path(workdir))))
    if parsed.kind == "url":
        return Resolved(_fetch_url(ref, cfg, Path(workdir)))
    return Resolved(checkpoint_file(Path(ref.removeprefix("file://")).expanduser()))


def fetch_checkpoint(ref: str, cfg: Config, workdir: str | os.PathLike) -> Path:
    """The local checkpoint file behind any model reference (see `resolve`)."""
    return resolve(ref, cfg, workdir).file


def load_student(ref: str, cfg: Config, map_location: str = "cpu") -> Loaded:
    """The student behind any model reference, in eval mode (a teacher is refused)."""
    with tempfile.TemporaryDirectory(prefix="lightbsr-model-") as workdir:
        loaded = load_checkpoint(fetch_checkpoint(ref, cfg, workdir), map_location=map_location)
    if loaded.role != "student":
        raise CheckpointError(f"{redact(ref)} holds a {loaded.role}; upscaling and evaluation need a student")
    return loaded


def load_tile_model(ref: str, cfg: Config, map_location: str = "cpu", precision: str = "fp32") -> TileModel:
    """What `upscale` runs: an ONNX export folder (onnxruntime, on the CPU, fp32) or the student behind any
    reference, prepared for `precision` (`lightbsr.precision.prepare`)."""
    from workflows import onnx_model

    if parse(ref).kind == "path" and onnx_model.is_export(ref.removeprefix("file://")):
        if precision != "fp32":
            raise ModelReferenceError(f"{redact(ref)} is an ONNX export, which runs in fp32; got precision {precision}")
        return onnx_model.OnnxModel(ref.removeprefix("file://"))
    return prepare(load_student(ref, cfg, map_location).model, precision, map_location)


# ---- object stores --------------------------------------------------------------------------


def _fetch_url(ref: str, cfg: Config, workdir: Path) -> Path:
    url = ref.rstrip("/")
    try:
        listed = storage.list_files(url, cfg.storage.s3)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {redact(url)} does not exist") from None
    if listed != [""]:  # a checkpoint folder
        if MODEL_FILE not in listed:
            raise CheckpointError(f"checkpoint folder {redact(url)} has no {MODEL_FILE}")
        url = storage.join(url, MODEL_FILE)
    target = workdir / PurePosixPath(url).name
    target.write_bytes(storage.read_bytes(url, cfg.storage.s3))
    return target


# ---- MLflow ---------------------------------------------------------------------------------


def tracking_uri(cfg: Config, ref: str) -> str:
    """The tracking URI that holds `ref`; the default sqlite store only when it exists already."""
    if cfg.tracking_uri_is_set:
        return cfg.tracking_uri
    store = cfg.default_tracking_store
    if not store.is_file():
        raise RegistryError(
            f"{ref} lives in an MLflow tracking store, and none is configured: set tracking.uri "
            f"(--set tracking.uri=http://HOST:5000) or the MLFLOW_TRACKING_URI environment variable "
            f"(the default store {store} does not exist)"
        )
    return cfg.tracking_uri


def check_registry(uri: str, timeout_s: float = REGISTRY_TIMEOUT_S) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer (MLflow would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{redact(uri).rstrip('/')}/health", timeout=timeout_s):  # urllib takes no userinfo
            return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise RegistryUnreachable(f"MLflow tracking server {redact(uri)} is not reachable: {reason}") from None


def _download(artifact_uri: str, uri: str, workdir: Path) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    check_registry(uri)
    try:
        return Path(
            mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(workdir), tracking_uri=uri)
        )
    except MlflowException as error:
        raise RegistryError(f"{artifact_uri} cannot be fetched from {redact(uri)}: {error.message}") from None


def _model_version(parsed: ModelReference, uri: str) -> Any:
    """The registered `ModelVersion` that `parsed` names, or a RegistryError saying what is missing."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    assert parsed.name is not None
    check_registry(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_registered_model(parsed.name)
    except MlflowException:
        raise RegistryError(
            f"registry {redact(uri)} has no registered model {parsed.name!r} (from {parsed.text})"
        ) from None
    try:
        if parsed.alias:
            return client.get_model_version_by_alias(parsed.name, parsed.alias)
        return client.get_model_version(parsed.name, str(parsed.version))
    except MlflowException:
        what = f"alias {parsed.alias!r}" if parsed.alias else f"version {parsed.version!r}"
        raise RegistryError(
            f"registered model {parsed.name!r} in {redact(uri)} has no {what} (from {parsed.text})"
        ) from None


def _version_source(name: str, version: str, uri: str) -> str:
    """Where a model version's files are stored. Downloading `models:/...` itself would look the model up in the
    process-wide registry URI, not in `uri` (a Serve replica or a fresh process has none set)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_download_uri(name, version)


def _resolve_registered(parsed: ModelReference, cfg: Config, workdir: Path) -> Resolved:
    import yaml

    from workflows.serving import CHECKPOINT_ARTIFACT

    uri = tracking_uri(cfg, parsed.text)
    found = _model_version(parsed, uri)
    version = RegistryVersion(name=found.name, version=str(found.version), run_id=found.run_id)
    model_dir = _download(_version_source(found.name, str(found.version), uri), uri, workdir)
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    try:
        relative = mlmodel["flavors"]["python_function"]["artifacts"][CHECKPOINT_ARTIFACT]["path"]
    except (KeyError, TypeError):
        raise RegistryError(f"{parsed.text} ({version.uri}) is not a lightbsr model: no checkpoint artifact") from None
    return Resolved(checkpoint_file(model_dir / relative), version)
