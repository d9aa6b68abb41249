"""`lightbsr serve --model models:/NAME@ALIAS`: an HTTP endpoint on Ray Serve that upscales images.

Routes (under `serve.route_prefix`):

* `POST /upscale?tile=&overlap=&precision=` with the image file as the body (PNG, JPEG, WebP) ->
  the upscaled image as PNG. 400 with the reason for a body that is not a usable image, 413 naming
  the limit for a body over `serve.max_request_bytes` or an image over `serve.max_pixels`.
* `GET /healthz` -> 200 while the replica has a model.
* `GET /version` -> the registered model's name, version, alias and training run ids.

Small requests are batched (`@serve.batch`, `serve.max_batch_size` / `serve.batch_wait_timeout_s`)
and run off the event loop. Each replica checks where the alias points every
`serve.reload_interval_s` seconds and swaps in the new version when it moved; a registry that does
not answer keeps the current model. The model comes through `workflows.references`, so a replica
needs only the tracking server (HTTP) and the artifact store (e.g. S3 credentials in its environment).

Also runnable as `serve run workflows.serve:build_app model=models:/NAME@ALIAS [config=FILE]`, as
the `import_path` of a `serve deploy` config, or as `python -m workflows.serve` under `ray job submit`.
"""

import argparse
import asyncio
import io
import logging
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from mlflow.exceptions import MlflowException
from PIL import Image, UnidentifiedImageError
from ray import serve
from ray.serve import Application

from lightbsr.checkpoint import CheckpointError, load_checkpoint
from lightbsr.images import ImageError
from lightbsr.inference import upscale_bytes
from lightbsr.precision import PRECISIONS, PreparedStudent, prepare
from lightbsr.tiling import MIN_SIDE, TileModel
from workflows import preflight, references
from workflows.cli import run
from workflows.config import Config, add_config_arguments, load_config
from workflows.errors import RuntimeFailure, UsageError
from workflows.references import RegistryVersion
from workflows.urls import redact, redact_text

__all__ = ["PRECISIONS", "Upscaler", "build_app", "main", "make_app", "upscale_image_bytes"]

log = logging.getLogger("lightbsr.serve")

#: precisions the endpoint accepts; bf16/fp16 join when `prepare_for_precision` calls lightbsr.precision
APP_NAME = "lightbsr"


# ---- the model --------------------------------------------------------------------------------


@dataclass
class ServedModel:
    """One loaded student and where it came from; `prepared` caches it per precision."""

    reference: str
    student: torch.nn.Module
    registry: RegistryVersion | None
    tags: dict[str, str]
    device: str
    prepared: dict[str, PreparedStudent] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        parsed = references.parse(self.reference)
        runs = {key: value for key, value in sorted(self.tags.items()) if key.endswith("run_id")}
        return {
            "reference": redact(self.reference),
            "model": self.registry.name if self.registry else None,
            "version": self.registry.version if self.registry else None,
            "alias": parsed.alias,
            "training_run_ids": runs,
            "device": self.device,
        }


def _version_tags(cfg: Config, reference: str, version: RegistryVersion | None) -> dict[str, str]:
    if version is None:
        return {}
    from mlflow import MlflowClient

    uri = references.tracking_uri(cfg, reference)
    return dict(MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(version.name, version.version).tags)


def load_served_model(reference: str, cfg: Config, device: str) -> ServedModel:
    """The student behind `reference` (through `workflows.references`), with its registry version and tags."""
    with tempfile.TemporaryDirectory(prefix="lightbsr-serve-") as workdir:
        resolved = references.resolve(reference, cfg, workdir)
        loaded = load_checkpoint(resolved.file, map_location=device)
    if loaded.role != "student":
        raise CheckpointError(f"{redact(reference)} holds a {loaded.role}; serving needs a student")
    student = loaded.model.to(device).eval()
    return ServedModel(reference, student, resolved.registry, _version_tags(cfg, reference, resolved.registry), device)


def alias_version(reference: str, cfg: Config) -> str | None:
    """The version `models:/NAME@ALIAS` points at now; None for references without an alias."""
    parsed = references.parse(reference)
    if parsed.alias is None or parsed.name is None:
        return None
    from mlflow import MlflowClient

    uri = references.tracking_uri(cfg, reference)
    return str(
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(parsed.name, parsed.alias).version
    )


def prepare_for_precision(served: ServedModel, precision: str) -> PreparedStudent:
    """The model to run at `precision` (`lightbsr.precision.prepare`), prepared once per precision."""
    if precision not in served.prepared:
        served.prepared[precision] = prepare(served.student, precision, served.device)
    return served.prepared[precision]


def upscale_image_bytes(model: TileModel, data: bytes, name: str, tile: int, overlap: int) -> bytes:
    """Image file bytes (any mode `lightbsr upscale` reads) -> upscaled PNG bytes, the same bytes as `lightbsr upscale`
    writes for that image as PNG."""
    return upscale_bytes(model, data, name, fmt="PNG", tile=tile, overlap=overlap)[0]


def header_pixels(data: bytes) -> int | None:
    """Width x height from the image header (no decoding); None when Pillow cannot tell."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            return None
    return width * height


# ---- the HTTP app -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    data: bytes
    tile: int
    overlap: int
    precision: str


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it exceeds `limit` bytes (Content-Length checked first)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


api = FastAPI(title="lightbsr", description="Blind super-resolution with a registered LightBSR student")


@serve.deployment
@serve.ingress(api)
class Upscaler:
    """One replica: the model, a batch queue and a thread that follows the alias."""

    def __init__(self, reference: str, cfg: Config):
        self._stop = threading.Event()
        self.reference, self.cfg = reference, cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.served = load_served_model(reference, cfg, self.device)
        batcher = cast(Any, self._upscale_batch)  # @serve.batch adds the setters
        batcher.set_max_batch_size(cfg.serve.max_batch_size)
        batcher.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        if references.parse(reference).alias is not None:
            threading.Thread(target=self._follow_alias, name="lightbsr-alias-watch", daemon=True).start()

    def __del__(self) -> None:
        self._stop.set()

    def _follow_alias(self) -> None:
        """Every reload_interval_s: reload when the alias points at another version than the one served."""
        while not self._stop.wait(self.cfg.serve.reload_interval_s):
            try:
                current = alias_version(self.reference, self.cfg)
                if self.served.registry is None or current == self.served.registry.version:
                    continue
                self.served = load_served_model(self.reference, self.cfg, self.device)  # one atomic swap
                log.info("reloaded %s: now version %s", redact(self.reference), current)
            except (MlflowException, OSError, UsageError, RuntimeFailure, CheckpointError) as error:
                # the replica keeps serving what it has; the next check retries
                log.warning("alias check of %s failed: %s", redact(self.reference), redact_text(str(error)))

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "version": self.served.describe()["version"]}

    @api.get("/version")
    def version(self) -> dict[str, Any]:
        return self.served.describe()

    @api.post("/upscale", response_class=Response)
    async def upscale(
        self,
        request: Request,
        tile: int | None = Query(None, ge=MIN_SIDE, description="LR tile side (default: evaluate.tile)"),
        overlap: int | None = Query(None, ge=0, description="LR overlap between tiles (default: evaluate.overlap)"),
        precision: str = Query("fp32", description="fp32, bf16 or fp16 (fp16 on GPU)"),
    ) -> Response:
        limits = self.cfg.serve
        data = await _read_body(request, limits.max_request_bytes)
        if data is None:
            return _error(413, f"request body larger than serve.max_request_bytes ({limits.max_request_bytes} bytes)")
        if not data:
            return _error(400, "empty request body: POST the image file's bytes")
        pixels = header_pixels(data)
        if pixels is not None and pixels > limits.max_pixels:
            return _error(413, f"image has {pixels} pixels, more than serve.max_pixels ({limits.max_pixels})")
        job = Job(
            data, tile or self.cfg.evaluate.tile, self.cfg.evaluate.overlap if overlap is None else overlap, precision
        )
        if job.overlap >= job.tile:
            return _error(400, f"overlap ({job.overlap}) must be smaller than tile ({job.tile})")
        if precision not in PRECISIONS:
            return _error(400, f"precision {precision!r} is not available (choose from {', '.join(PRECISIONS)})")
        result, version = await self._upscale_batch(job)
        if isinstance(result, ImageError):
            return _error(400, f"not a usable image: {result.reason}: {result.detail}")
        return Response(content=result, media_type="image/png", headers={"X-Model-Version": str(version)})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _upscale_batch(self, jobs: list[Job]) -> list[tuple[bytes | ImageError, str | None]]:
        """Requests that arrive together run as one call in a worker thread (the event loop stays free),
        all on the model served when the batch starts; each result says which version made it."""
        return await asyncio.to_thread(self._run_jobs, jobs, self.served)

    def _run_jobs(self, jobs: list[Job], served: ServedModel) -> list[tuple[bytes | ImageError, str | None]]:
        version = served.registry.version if served.registry else None
        results: list[tuple[bytes | ImageError, str | None]] = []
        for job in jobs:
            try:
                model = prepare_for_precision(served, job.precision)
                results.append((upscale_image_bytes(model, job.data, "request body", job.tile, job.overlap), version))
            except ImageError as error:
                results.append((error, version))
        return results


# ---- building and running the app ---------------------------------------------------------------


def make_app(reference: str, cfg: Config) -> Application:
    """The Serve application for `reference`, with replicas, resources and limits from `cfg.serve`."""
    from workflows.runtime import worker_env

    references.parse(reference)  # a malformed reference fails here, not in every replica
    return (
        cast(serve.Deployment, Upscaler)
        .options(
            num_replicas=cfg.serve.replicas,
            max_ongoing_requests=cfg.serve.max_ongoing_requests,
            ray_actor_options={
                "num_cpus": cfg.serve.cpus_per_replica,
                "num_gpus": cfg.serve.gpus_per_replica,
                "runtime_env": {"env_vars": worker_env()},
            },
        )
        .bind(reference, cfg)
    )


def build_app(args: dict[str, str]) -> Application:
    """Builder for `serve run workflows.serve:build_app model=REF [config=FILE] [set="k=v;k=v"]` and `serve deploy`."""
    if "model" not in args:
        raise UsageError("serve app arguments: `model` (models:/NAME@ALIAS or any model reference) is required")
    overrides = [item for item in args.get("set", "").split(";") if item.strip()]
    return make_app(args["model"], load_config(args.get("config"), overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightbsr serve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS (reloads when the alias moves) or any reference"
    )
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from workflows.runtime import init_ray
    from workflows.upscale import preflight_skips

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    preflight.check(cfg, skip=preflight_skips(args.model))
    app = make_app(args.model, cfg)
    init_ray(cfg.ray)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(app, name=APP_NAME, route_prefix=cfg.serve.route_prefix)
    url = f"http://{cfg.serve.host}:{cfg.serve.port}{cfg.serve.route_prefix.rstrip('/')}"
    print(f"serving {redact(args.model)} at {url}/upscale (POST an image); Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(APP_NAME)
        print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="lightbsr serve"))
