"""`lightbsr upscale --model MODEL IN OUT`: upscale an image, a folder or an fsspec URL.

MODEL is any model reference (`workflows.references`): `models:/name@alias` or `models:/name/version`
(with the tracking URI in `tracking.uri` or MLFLOW_TRACKING_URI), `runs:/<run_id>/<path>`, an `s3://`
URL or a checkpoint path (ours or the authors').
Inference is tiled with the whole-image codes shared by every tile, on the GPU when there is
one. Any common image works (`lightbsr.inference`): gray comes back gray, alpha is kept
(upscaled bicubic), 16-bit comes back 16-bit. Each output keeps its input's format (PNG, JPEG
or WebP; others become PNG) unless `--format` says otherwise (refused when it cannot hold the
image: alpha in JPEG, 16 bits in anything but PNG), and appears only when complete.

One image runs here, in this process. A folder or an `s3://` prefix runs as a Ray Data batch
(`workflows.batch`): resumable, with bad files counted and listed in `<OUT>/upscale-report.json`.
Both paths upscale each image with the same function, `lightbsr.inference.upscale_bytes`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import PurePosixPath

import torch
from tqdm import tqdm

from lightbsr.checkpoint import CheckpointError
from lightbsr.images import IMAGE_EXTENSIONS, ImageError
from lightbsr.inference import upscale_bytes
from lightbsr.precision import PRECISIONS
from workflows import preflight, references, storage
from workflows.cli import run
from workflows.config import Config, add_config_arguments, load_config
from workflows.errors import UsageError
from workflows.urls import redact

__all__ = ["Job", "main", "output_url", "plan_jobs", "requested_format", "upscale_all"]

FORMATS = {"png": "PNG", "jpeg": "JPEG", "jpg": "JPEG", "webp": "WEBP"}
EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


@dataclass(frozen=True)
class Job:
    source: str  # URL or path of one input image
    target: str | None  # output URL or path; None = <out>/<stem>.<format extension>, decided once read
    relative: str  # name below the input folder (the file name for a single file)


def _is_folder_target(out: str, many: bool) -> bool:
    return (
        many or out.endswith("/") or (not storage.is_s3(out) and storage.exists(out) and not PurePosixPath(out).suffix)
    )


def plan_jobs(src: str, out: str, cfg: Config) -> list[Job]:
    """One job per input image: IN is a file or a folder (local or URL)."""
    try:
        files = storage.list_files(src, cfg.storage.s3)
    except FileNotFoundError:
        raise UsageError(f"input {redact(src)} does not exist") from None
    if files == [""]:
        name = PurePosixPath(src.rstrip("/")).name
        target = None if _is_folder_target(out, False) else out
        return [Job(src, target, name)]
    images = [f for f in files if PurePosixPath(f).suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise UsageError(f"input folder {redact(src)} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [Job(storage.join(src, f), None, f) for f in images]


def output_url(out: str, relative: str, fmt: str) -> str:
    """Where the input `relative` (a name below the input folder) goes in the folder `out`."""
    stem = str(PurePosixPath(relative).with_suffix(""))
    return storage.join(out, stem + EXTENSIONS[fmt])


def requested_format(fmt: str | None) -> str | None:
    """`--format` (any case of FORMATS' keys) as a Pillow format name; None = the input's."""
    return FORMATS[fmt.lower()] if fmt else None


def _target(job: Job, out: str, fmt: str) -> str:
    if job.target is not None:
        suffix = PurePosixPath(job.target).suffix.lower().lstrip(".")
        if suffix in FORMATS and FORMATS[suffix] != fmt:
            raise UsageError(f"output {redact(job.target)}: extension .{suffix} does not match the format {fmt}")
        return job.target
    return output_url(out, job.relative, fmt)


def upscale_all(
    model: str,
    src: str,
    out: str,
    cfg: Config,
    fmt: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Upscale every image of `src` into `out`, one at a time in this process; returns the written outputs.

    Stops at the first bad input. `main` sends folders to the Ray Data batch instead.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    jobs = plan_jobs(src, out, cfg)
    student = references.load_tile_model(model, cfg, device, cfg.evaluate.precision)  # a student or an ONNX export
    written = []
    for job in tqdm(jobs, desc="upscale", unit="image", disable=not progress):
        data = storage.read_bytes(job.source, cfg.storage.s3)
        sr, chosen = upscale_bytes(
            student, data, job.source, requested_format(fmt), cfg.evaluate.tile, cfg.evaluate.overlap
        )
        target = _target(job, out, chosen)
        storage.atomic_write_bytes(target, sr, cfg.storage.s3)
        written.append(target)
    return written


def is_single_image(src: str, cfg: Config) -> bool:
    """True when `src` is one file (the in-process path), False for a folder or prefix (the batch)."""
    try:
        return storage.list_files(src, cfg.storage.s3) == [""]
    except FileNotFoundError:
        raise UsageError(f"input {redact(src)} does not exist") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightbsr upscale", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        help="models:/name@alias, models:/name/version, runs:/..., s3:// URL or checkpoint path",
    )
    parser.add_argument("input", help="image, folder or fsspec URL")
    parser.add_argument("output", help="output file (one input) or folder")
    parser.add_argument("--format", choices=sorted(FORMATS), help="output format (default: the input's)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--tile", type=int, help="LR tile side (default: evaluate.tile)")
    parser.add_argument("--overlap", type=int, help="LR overlap between tiles (default: evaluate.overlap)")
    parser.add_argument("--precision", choices=PRECISIONS, help="fp32, bf16 or fp16 (default: evaluate.precision)")
    add_config_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def preflight_skips(model: str) -> tuple[str, ...]:
    """Config keys `upscale` does not use (only the model's tracking store, for MLflow references)."""
    skip = ["data.train_images", "data.eval_images", "data.benchmarks", "data.shards", "train.teacher_checkpoint"]
    skip += ["storage.root", "ray"]
    if references.parse(model).kind not in ("model", "run"):
        skip.append("tracking.uri")
    return tuple(skip)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"evaluate.tile={args.tile}"] if args.tile else []
    overrides += [f"evaluate.overlap={args.overlap}"] if args.overlap is not None else []
    overrides += [f"evaluate.precision={args.precision}"] if args.precision else []
    cfg = load_config(args.config, overrides)
    preflight.check(cfg, skip=preflight_skips(args.model))
    try:
        if not is_single_image(args.input, cfg):
            return _batch(args, cfg)
        written = upscale_all(args.model, args.input, args.output, cfg, args.format, args.device, not args.quiet)
    except (ImageError, CheckpointError) as error:
        raise UsageError(str(error)) from None
    print(f"wrote {len(written)} image(s) to {redact(args.output)}")
    return 0


def _batch(args: argparse.Namespace, cfg: Config) -> int:
    """A folder or prefix on Ray Data; bad files make the exit status 2 after everything else is written."""
    from workflows.batch import upscale_batch

    use_gpu = None if args.device is None else args.device.startswith("cuda")
    report = upscale_batch(args.model, args.input, args.output, cfg, args.format, use_gpu, not args.quiet)
    print(report.summary())
    if report.failed:
        first = report.failed[0]
        raise UsageError(
            f"{len(report.failed)} of {report.inputs} image(s) could not be upscaled, listed in "
            f"{redact(report.report_url)}; the first: {first.source}: {first.reason}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="lightbsr upscale"))
