"""The registered model: a pyfunc wrapper around the student, in a module of its own so that loading
it imports only this file and `lightbsr/` (the registry ships the `lightbsr/` and `workflows/`
folders, see `register.serving_code_paths`; `workflows/__init__.py` is empty and this module imports
nothing else of `workflows`), and needs torch + mlflow, not this project.

uint8 (N, H, W, 3) or (H, W, 3) images in, uint8 upscaled images out, tiled with codes shared
over the whole image (params `tile`, `overlap`). Integer pixel values 0..255 of any integer type are
accepted (JSON numbers arrive as int64); float input is refused, so an image in [0, 1] is not
silently truncated to black. The signature has no input schema for this reason: MLflow casts
JSON input to the schema's dtype before `predict` sees it (0.5 -> 0 for uint8).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from mlflow.pyfunc import PythonModel, PythonModelContext

from lightbsr.checkpoint import load_checkpoint
from lightbsr.tiling import DEFAULT_OVERLAP, DEFAULT_TILE, upscale

CHECKPOINT_ARTIFACT = "checkpoint"


class LightBSRModel(PythonModel):
    """uint8 (N, H, W, 3) or (H, W, 3) images -> uint8 upscaled images, tiled with shared codes."""

    def load_context(self, context: PythonModelContext) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        loaded = load_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT], map_location=device)
        self.student = loaded.model.to(device)

    def predict(
        self, context: PythonModelContext | None, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        # np.ndarray is a type hint MLflow accepts without inferring a schema (no warning; the logged
        # signature is the schema).
        params = params or {}
        images = checked_images(model_input)
        single = images.ndim == 3
        if single:
            images = images[None]
        tile, overlap = int(params.get("tile", DEFAULT_TILE)), int(params.get("overlap", DEFAULT_OVERLAP))
        out = np.stack(
            [upscale(self.student, torch.from_numpy(np.ascontiguousarray(im)), tile, overlap).numpy() for im in images]
        )  # (N, sH, sW, 3)
        return out[0] if single else out


def checked_images(model_input: Any) -> np.ndarray:
    """uint8 (H, W, 3) or (N, H, W, 3) from integer pixel values 0..255; a short ValueError otherwise
    (dtype, shape and range only: never the values themselves)."""
    images = np.asarray(model_input)
    if images.ndim not in (3, 4) or images.shape[-1] != 3 or 0 in images.shape:
        raise ValueError(f"model input: expected (H, W, 3) or (N, H, W, 3) RGB images, got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    if images.dtype == np.bool_ or not np.issubdtype(images.dtype, np.integer):
        raise ValueError(
            f"model input: expected uint8 pixel values 0..255, got {images.dtype}; "
            "scale float images in [0, 1] first: np.round(x * 255).astype(np.uint8)"
        )
    low, high = int(images.min()), int(images.max())
    if low < 0 or high > 255:
        raise ValueError(f"model input: pixel values must lie in 0..255, got values from {low} to {high}")
    return images.astype(np.uint8)


def signature() -> Any:
    """The registered signature: uint8 images out, params `tile` and `overlap`, and no input schema
    (see the module docstring: `checked_images` is the input check)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    images = Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))])
    params = ParamSchema([ParamSpec("tile", "long", DEFAULT_TILE), ParamSpec("overlap", "long", DEFAULT_OVERLAP)])
    return ModelSignature(inputs=None, outputs=images, params=params)
