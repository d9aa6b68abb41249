"""The registered model: a pyfunc wrapper around the student, in a module of its own so that loading
it imports only this file and `lightbsr/` (the registry ships the `lightbsr/` and `workflows/`
folders, see `register.serving_code_paths`; `workflows/__init__.py` is empty and this module imports
nothing else of `workflows`), and needs torch + mlflow, not this project.

uint8 (N, H, W, 3) or (H, W, 3) images in, uint8 upscaled images out, tiled with codes shared
over the whole image (params `tile`, `overlap`).
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
        # np.ndarray is a type hint MLflow accepts without inferring a schema: the logged signature is the schema.
        params = params or {}
        images = np.asarray(model_input)
        single = images.ndim == 3
        if single:
            images = images[None]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"model input: expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        tile, overlap = int(params.get("tile", DEFAULT_TILE)), int(params.get("overlap", DEFAULT_OVERLAP))
        out = np.stack(
            [upscale(self.student, torch.from_numpy(np.ascontiguousarray(im)), tile, overlap).numpy() for im in images]
        )  # (N, sH, sW, 3)
        return out[0] if single else out
