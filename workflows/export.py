"""`lightbsr export --model MODEL --format onnx OUT`: the student as two ONNX graphs for tiled inference.

MODEL is any model reference (`workflows.references`). OUT is a local folder that receives
`encoder.onnx` (LR crop -> encoder features `idr` and spatial code `xk`), `generator.onnx`
(LR tile, the image's mean `idr`, the tile's `xk` -> SR tile), both with dynamic batch, height and
width, and the manifest `lightbsr-onnx.json` (written last: a folder with a manifest is complete).
`lightbsr upscale --model OUT` runs the export with onnxruntime, tile by tile with shared codes
(`workflows.onnx_model`).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightbsr.checkpoint import CheckpointError
from lightbsr.files import atomic_write
from lightbsr.student import Student
from workflows import preflight, references
from workflows.cli import run
from workflows.config import add_config_arguments, load_config
from workflows.errors import UsageError
from workflows.onnx_model import ENCODER_FILE, FORMAT, FORMAT_VERSION, GENERATOR_FILE, INSTALL_HINT, MANIFEST
from workflows.upscale import preflight_skips
from workflows.urls import is_remote, redact

__all__ = ["OPSET", "export_onnx", "main"]

OPSET = 18
SAMPLE_SIDE = 40  # LR side of the example input the graphs are traced with (any size runs afterwards)


class _EncodeTile(nn.Module):
    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.encode_tile(lr)


class _ReconstructTile(nn.Module):
    def __init__(self, student: Student) -> None:
        super().__init__()
        self.student = student

    def forward(self, lr: torch.Tensor, idr_mean: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        return self.student.reconstruct_tile(lr, idr_mean, xk)


def _write_graph(module: nn.Module, args: tuple[torch.Tensor, ...], names: dict[str, Any], path: Path) -> None:
    batch, height, width = torch.export.Dim("batch"), torch.export.Dim("height"), torch.export.Dim("width")
    image = {0: batch, 2: height, 3: width}
    shapes = {name: image if arg.dim() == 4 else {0: batch} for name, arg in zip(names["inputs"], args)}
    with warnings.catch_warnings():  # the exporter warns about its own internals (axis renames, tree specs)
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(),
            args,
            input_names=list(names["inputs"]),
            output_names=list(names["outputs"]),
            dynamic_shapes=shapes,
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
        )
    assert program is not None
    atomic_write(path, lambda handle: handle.write(program.model_proto.SerializeToString()))


def export_onnx(student: Student, out: Path, source: str) -> Path:
    """Write the two graphs and the manifest of `student` into the folder `out`; returns the manifest."""
    student = student.eval().cpu()
    # a batch of 2: a batch of 1 would make the exporter fix the batch size at 1
    lr = torch.rand(2, 3, SAMPLE_SIDE, SAMPLE_SIDE + 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        idr, xk = student.encode_tile(lr)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest is in place
    _write_graph(_EncodeTile(student), (lr,), {"inputs": ["lr"], "outputs": ["idr", "xk"]}, out / ENCODER_FILE)
    generator_names = {"inputs": ["lr", "idr_mean", "xk"], "outputs": ["sr"]}
    _write_graph(_ReconstructTile(student), (lr, idr.mean(dim=(2, 3)), xk), generator_names, out / GENERATOR_FILE)
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "scale": student.scale,
        "opset": OPSET,
        "encoder": ENCODER_FILE,
        "generator": GENERATOR_FILE,
        "source": redact(source),
        "torch": torch.__version__,
    }
    return atomic_write(out / MANIFEST, lambda handle: handle.write(json.dumps(manifest, indent=2).encode() + b"\n"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightbsr export", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="models:/..., runs:/..., s3:// URL or checkpoint path")
    parser.add_argument("--format", required=True, choices=["onnx"], help="export format")
    parser.add_argument("output", help="local folder for the graphs and the manifest")
    add_config_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if is_remote(args.output):
        raise UsageError(f"output {redact(args.output)}: export writes a local folder")
    try:  # the exporter's own dependencies, checked before the model is loaded
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise UsageError(f"export --format onnx needs {error.name}: {INSTALL_HINT}") from None
    cfg = load_config(args.config, list(args.overrides))
    preflight.check(cfg, skip=preflight_skips(args.model))
    try:
        student = references.load_student(args.model, cfg).model
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    if not isinstance(student, Student):
        raise UsageError(f"{redact(args.model)}: expected a lightbsr student, got {type(student).__name__}")
    manifest = export_onnx(student, Path(args.output).expanduser(), args.model)
    print(f"wrote {ENCODER_FILE}, {GENERATOR_FILE} and {manifest.name} to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="lightbsr export"))
