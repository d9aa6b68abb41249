"""A student exported by `lightbsr export --format onnx`, run with onnxruntime as a `lightbsr.tiling.TileModel`.

The export is a folder with two graphs of dynamic height and width and a manifest:

* `encoder.onnx`: `lr` (B, 3, h, w) -> `idr` (B, 128, ceil(h/4), ceil(w/4)), the encoder features whose
  mean over the image is the channel code's input, and `xk` (B, 8, h, w), the crop's spatial code;
* `generator.onnx`: `lr` (B, 3, h, w), `idr_mean` (B, 128), `xk` (B, 8, h, w) -> `sr` (B, 3, s*h, s*w);
* `lightbsr-onnx.json`: format, scale, opset, the graphs' file names and the source model.

`lightbsr.tiling` runs them tile by tile exactly as it runs the student, so the codes stay shared.
onnxruntime is the optional extra `onnx` (`pip install 'lightbsr[onnx]'`); it runs here on the CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workflows.errors import UsageError

__all__ = [
    "ENCODER_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "GENERATOR_FILE",
    "INSTALL_HINT",
    "MANIFEST",
    "OnnxExportError",
    "OnnxModel",
    "is_export",
    "onnxruntime_module",
    "read_manifest",
]

FORMAT = "lightbsr-onnx"
FORMAT_VERSION = 1
MANIFEST = "lightbsr-onnx.json"
ENCODER_FILE = "encoder.onnx"
GENERATOR_FILE = "generator.onnx"
INSTALL_HINT = "pip install 'lightbsr[onnx]'"


class OnnxExportError(UsageError, ValueError):
    """An ONNX export folder that cannot be used; names the file and the problem."""


def onnxruntime_module() -> Any:
    """onnxruntime, or a UsageError saying how to install it."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(f"running an ONNX export needs onnxruntime: {INSTALL_HINT}") from None
    return onnxruntime


def is_export(path: str | os.PathLike) -> bool:
    """True for a local folder holding an export manifest."""
    return (Path(path).expanduser() / MANIFEST).is_file()


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export folder, checked: its format, version, scale and both graph files."""
    file = Path(folder).expanduser() / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise OnnxExportError(f"{file}: not a readable ONNX export manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise OnnxExportError(f"{file}: format is not {FORMAT!r}")
    if manifest.get("version") != FORMAT_VERSION:
        raise OnnxExportError(f"{file}: version {manifest.get('version')!r}, this lightbsr reads {FORMAT_VERSION}")
    if not isinstance(manifest.get("scale"), int) or manifest["scale"] < 1:
        raise OnnxExportError(f"{file}: scale must be a positive integer, got {manifest.get('scale')!r}")
    for key in ("encoder", "generator"):
        graph = file.parent / str(manifest.get(key))
        if not graph.is_file():
            raise OnnxExportError(f"{file}: the {key} graph {graph.name} is missing")
    return manifest


class OnnxModel:
    """The two exported graphs in onnxruntime sessions, with the `TileModel` methods (torch in, torch out)."""

    device = torch.device("cpu")

    def __init__(self, folder: str | os.PathLike, threads: int | None = None) -> None:
        ort = onnxruntime_module()
        self.folder = Path(folder).expanduser()
        self.manifest = read_manifest(self.folder)
        self.scale: int = self.manifest["scale"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._encoder = self._session(ort, options, self.manifest["encoder"])
        self._generator = self._session(ort, options, self.manifest["generator"])

    def _session(self, ort: Any, options: Any, name: str) -> Any:
        path = self.folder / name
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile

        try:
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except (Fail, InvalidGraph, InvalidProtobuf, NoSuchFile) as error:
            raise OnnxExportError(f"{path}: onnxruntime cannot load it ({error})") from None

    def encode_tile(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idr, xk = self._encoder.run(["idr", "xk"], {"lr": _array(lr)})
        return torch.from_numpy(idr), torch.from_numpy(xk)

    def reconstruct_tile(self, lr: torch.Tensor, idr_mean: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        feeds = {"lr": _array(lr), "idr_mean": _array(idr_mean), "xk": _array(xk)}
        (sr,) = self._generator.run(["sr"], feeds)
        return torch.from_numpy(sr)


def _array(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
