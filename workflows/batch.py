"""Batch upscale of a folder or an `s3://` prefix on Ray Data (`lightbsr upscale --model M SRC DST`).

Binary reads (`ray.data.read_binary_files` on the configured filesystem) feed an actor pool of
upscalers, one model per actor (`evaluate.actors` actors, `evaluate.actor_cpus` CPUs each, or
one GPU each: `evaluate.use_gpu`); each actor writes its outputs through
`workflows.storage.atomic_write_bytes`, so an output is complete or absent. Every image goes
through `lightbsr.inference.upscale_bytes`, the function of the one-image path, so both give the
same bytes.

Resumable: DST is listed once before Ray starts, and an input whose output is already there
(the name its extension or `--format` gives) is neither read nor upscaled; a rerun after an
interruption does only what is left. A file that cannot be decoded or written is counted and
listed with its reason in `DST/upscale-report.json`, never a crashed worker.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lightbsr.checkpoint import CheckpointError, load_checkpoint
from lightbsr.images import ImageError
from lightbsr.inference import upscale_bytes
from lightbsr.precision import prepare
from workflows import references, storage
from workflows.config import Config, S3Config
from workflows.errors import UsageError
from workflows.upscale import output_url, requested_format
from workflows.urls import redact, redact_text

__all__ = ["REPORT_NAME", "BatchReport", "Failure", "Upscaler", "pending_images", "upscale_batch"]

REPORT_NAME = "upscale-report.json"
#: the format an input's extension announces (what a rerun looks for in DST); others become PNG
_EXTENSION_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


@dataclass(frozen=True)
class Failure:
    source: str  # name below SRC
    reason: str


@dataclass
class BatchReport:
    inputs: int  # images under SRC
    skipped: int  # outputs already in DST: not read, not upscaled
    written: list[str] = field(default_factory=list)  # names below SRC upscaled by this run
    failed: list[Failure] = field(default_factory=list)
    report_url: str = ""

    def summary(self) -> str:
        lines = [
            f"{self.inputs} image(s): {len(self.written)} written, {self.skipped} already done (skipped), "
            f"{len(self.failed)} failed; report: {redact(self.report_url)}"
        ]
        lines += [f"  failed {item.source}: {item.reason}" for item in self.failed]
        return "\n".join(lines)

    def to_json(self) -> bytes:
        body = {
            "counts": {
                "inputs": self.inputs,
                "written": len(self.written),
                "skipped": self.skipped,
                "failed": len(self.failed),
            },
            "failed": [asdict(item) for item in self.failed],
            "written": self.written,
        }
        return (json.dumps(body, indent=1) + "\n").encode()


def expected_output(out: str, relative: str, fmt: str | None) -> str:
    """The output a finished input leaves in `out` (its format from `fmt` or from its extension)."""
    chosen = requested_format(fmt) or _EXTENSION_FORMATS.get(PurePosixPath(relative).suffix.lower(), "PNG")
    return output_url(out, relative, chosen)


def pending_images(src: str, out: str, cfg: Config, fmt: str | None) -> tuple[list[str], int]:
    """(names below `src` still to upscale, how many are done already), from one listing of each side."""
    try:
        images = storage.list_images(src, cfg.storage.s3)
    except FileNotFoundError:
        raise UsageError(f"input {redact(src)} does not exist") from None
    if not images:
        raise UsageError(f"input folder {redact(src)} holds no images")
    try:
        present = {storage.join(out, name) for name in storage.list_files(out, cfg.storage.s3)}
    except FileNotFoundError:
        present = set()
    todo = [name for name in images if expected_output(out, name, fmt) not in present]
    return todo, len(images) - len(todo)


def load_student_bytes(checkpoint: bytes, device: str) -> torch.nn.Module:
    """A student from checkpoint file bytes (ours or the authors'), in eval mode on `device`."""
    with tempfile.TemporaryDirectory(prefix="lightbsr-upscaler-") as folder:
        path = Path(folder, "model.pt")
        path.write_bytes(checkpoint)
        loaded = load_checkpoint(path, map_location=device, role="student")
    return loaded.model.to(device)


class Upscaler:
    """Ray Data callable class: a batch of (path, bytes) rows -> one result row per image, written to DST."""

    def __init__(
        self,
        checkpoint: bytes,
        root: str,
        out: str,
        fmt: str | None,
        tile: int,
        overlap: int,
        precision: str,
        s3: dict[str, Any],
        device: str,
    ) -> None:
        self.model = prepare(load_student_bytes(checkpoint, device), precision, device)
        self.root = root.rstrip("/") + "/"  # SRC as the read filesystem spells its paths
        self.out, self.fmt, self.tile, self.overlap = out, fmt, tile, overlap
        self.s3 = S3Config.model_validate(s3)

    def upscale_one(self, path: str, data: bytes) -> dict[str, str]:
        name = path[len(self.root) :] if path.startswith(self.root) else PurePosixPath(path).name
        try:
            encoded, chosen = upscale_bytes(self.model, data, name, requested_format(self.fmt), self.tile, self.overlap)
            target = output_url(self.out, name, chosen)
            storage.atomic_write_bytes(target, encoded, self.s3)
        except ImageError as error:
            return {"source": name, "error": f"{error.reason}: {error.detail}"}
        except OSError as error:  # StorageError after its retries, or a local write that failed
            return {"source": name, "error": f"write failed: {redact_text(str(error))}"}
        return {"source": name, "error": ""}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.upscale_one(str(path), bytes(data)) for path, data in zip(batch["path"], batch["bytes"])]
        return {"source": np.array([r["source"] for r in rows]), "error": np.array([r["error"] for r in rows])}


def _checkpoint_bytes(model: str, cfg: Config) -> bytes:
    """The student checkpoint behind any model reference, checked here before any actor starts."""
    with tempfile.TemporaryDirectory(prefix="lightbsr-batch-") as workdir:
        file = references.fetch_checkpoint(model, cfg, workdir)
        load_checkpoint(file, role="student")  # a teacher or a broken file fails here, once
        return file.read_bytes()


def _pool(cfg: Config, ray: Any, use_gpu: bool | None, todo: int) -> tuple[int, bool]:
    """(actors, on GPUs): GPU actors when asked or, by default, when the cluster has GPUs.

    The actors leave one CPU to the read tasks: a pool holding every CPU would wait forever for reads.
    """
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    wanted = cfg.evaluate.use_gpu if use_gpu is None else use_gpu
    on_gpu = gpus > 0 if wanted is None else wanted
    if on_gpu and gpus == 0:
        raise UsageError("evaluate.use_gpu: GPU actors asked for, but the Ray cluster has no GPU")
    fit = int((cpus - 1) // cfg.evaluate.actor_cpus)
    if fit < 1:
        raise UsageError(
            f"evaluate.actor_cpus ({cfg.evaluate.actor_cpus}) leaves no CPU for reading on a Ray cluster of "
            f"{cpus:g} CPUs; lower it"
        )
    return min(cfg.evaluate.actors, todo, fit, gpus if on_gpu else todo), on_gpu


def upscale_batch(
    model: str,
    src: str,
    out: str,
    cfg: Config,
    fmt: str | None = None,
    use_gpu: bool | None = None,
    progress: bool = True,
    runtime_env: dict[str, Any] | None = None,
) -> BatchReport:
    """Upscale the images under `src` that have no output in `out` yet; the report is also written to `out`.

    `runtime_env` goes to the read tasks and the actors (e.g. S3 settings for a cluster whose
    workers lack them; Ray shows a runtime_env in its dashboard, so prefer the workers' own AWS chain).
    """
    todo, skipped = pending_images(src, out, cfg, fmt)
    report = BatchReport(inputs=len(todo) + skipped, skipped=skipped, report_url=storage.join(out, REPORT_NAME))
    if todo:
        try:
            checkpoint = _checkpoint_bytes(model, cfg)
        except CheckpointError as error:
            raise UsageError(str(error)) from None
        for row in _run(checkpoint, src, out, cfg, todo, fmt, use_gpu, progress, runtime_env):
            if row["error"]:
                report.failed.append(Failure(row["source"], row["error"]))
            else:
                report.written.append(row["source"])
    report.written.sort()
    report.failed.sort(key=lambda item: item.source)
    storage.atomic_write_bytes(report.report_url, report.to_json(), cfg.storage.s3)
    return report


def _run(
    checkpoint: bytes,
    src: str,
    out: str,
    cfg: Config,
    todo: list[str],
    fmt: str | None,
    use_gpu: bool | None,
    progress: bool,
    runtime_env: dict[str, Any] | None,
) -> list[dict[str, str]]:
    from workflows.runtime import init_ray

    ray = init_ray(cfg.ray)
    actors, on_gpu = _pool(cfg, ray, use_gpu, len(todo))
    filesystem, root = storage.filesystem(src, cfg.storage.s3)
    env: dict[str, Any] = {"runtime_env": runtime_env} if runtime_env else {}
    dataset = ray.data.read_binary_files(
        [f"{root.rstrip('/')}/{name}" for name in todo],
        include_paths=True,
        filesystem=filesystem,
        override_num_blocks=min(len(todo), 4 * actors),  # small blocks: the actors share the work
        **env,
    ).map_batches(
        Upscaler,
        fn_constructor_kwargs={
            "checkpoint": checkpoint,
            "root": root,
            "out": out,
            "fmt": fmt,
            "tile": cfg.evaluate.tile,
            "overlap": cfg.evaluate.overlap,
            "precision": cfg.evaluate.precision,
            "s3": cfg.storage.s3.model_dump(),
            "device": "cuda" if on_gpu else "cpu",
        },
        batch_size=cfg.evaluate.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cfg.evaluate.actor_cpus,
        num_gpus=1 if on_gpu else 0,
        **env,
    )
    rows = []
    with tqdm(total=len(todo), desc="upscale", unit="image", disable=not progress) as bar:
        for row in dataset.iter_rows():
            rows.append({"source": str(row["source"]), "error": str(row["error"])})
            bar.update(1)
            bar.set_postfix(failed=sum(1 for r in rows if r["error"]))
    return rows
