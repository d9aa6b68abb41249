"""Inference in fp32, bf16 or fp16: `prepare(student, precision, device)` -> a model tiling can run.

The prepared model is a `lightbsr.tiling.TileModel` (`scale`, `encode_tile`, `reconstruct_tile`)
and a module (`model(lr)` runs it untiled), with float32 tensors in and out at every boundary;
only the inside runs in the chosen precision.

* CPU: a copy of the student with its weights pre-cast to the low dtype, in channels_last, so the
  convs and linears reach oneDNN's bf16 kernels (AMX on Sapphire Rapids) without a cast per call.
* CUDA: the fp32 student under `torch.autocast` (fp16 or bf16), channels_last.

Precision choices, on purpose:
* The first layers (mean shift, head conv) and the last (to_rgb conv, mean shift) stay float32
  ("islands"): bf16 keeps 8 bits of mantissa, so rounding the input picture or the output pixels
  to bf16 alone would cost up to half an 8-bit level; these layers hold ~1% of the MACs.
* The codes at the tiling boundary are float32: the encoder's convs run in the low precision but
  its IDR leaves as float32, tiling sums it into the image's mean IDR (in float64), and the IDR
  converter (one small linear for `ca`, one 8-channel conv for `xk`) runs in float32; so every
  tile gets the same float32 `ca` and the exact crop of `xk`, and the global mean is not rounded
  to 8 bits. The generator casts the codes to the low dtype at its entry.

NaN/inf never leave a prepared model: a low-precision call (encoder or generator) whose result
is not finite is run again in float32 for that call, with a `NonFiniteFallbackWarning`, and
counted in `model.fallbacks`; a float32 result that is not finite raises `FloatingPointError`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import nn

from lightbsr.student import Student

__all__ = ["PRECISIONS", "NonFiniteFallbackWarning", "Precision", "PreparedStudent", "parse_precision", "prepare"]

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteFallbackWarning(RuntimeWarning):
    """A low-precision call produced NaN or inf; that call was run again in float32."""


def parse_precision(value: str) -> Precision:
    """'fp32' | 'bf16' | 'fp16' (as given on a command line or in a request) -> Precision, else ValueError."""
    if value not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {value!r}")
    return value  # type: ignore[return-value]  # checked against the Literal's values just above


class Float32Island(nn.Module):
    """Runs `module` in float32 (autocast off, input cast up) and casts its output to `out_dtype`."""

    def __init__(self, module: nn.Module, out_dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.module(x.float()).to(self.out_dtype)


def low_precision_copy(student: Student, dtype: torch.dtype, cast_weights: bool) -> Student:
    """A copy of the student for `dtype`: weights cast (or left float32 for autocast), channels_last,
    with the input and output layers of the generator kept as float32 islands."""
    low = copy.deepcopy(student).eval()
    if cast_weights:
        low = low.to(dtype)
    low = low.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # documented; not in the stubs
    kept = student.generator  # islands from the float32 originals: no round trip through the low dtype
    low.generator.sub_mean = Float32Island(copy.deepcopy(kept.sub_mean), torch.float32)
    low.generator.head = Float32Island(copy.deepcopy(kept.head), dtype)  # the groups start in the low dtype
    low.generator.to_rgb = Float32Island(copy.deepcopy(kept.to_rgb), torch.float32)
    low.generator.add_mean = Float32Island(copy.deepcopy(kept.add_mean), torch.float32)
    return low


class PreparedStudent(nn.Module):
    """A student ready for inference in one precision on one device, as a `lightbsr.tiling.TileModel`;
    float32 tensors at every boundary.

    Build it with `prepare`. `fallbacks` counts the calls that had to be rerun in float32.
    """

    def __init__(self, student: Student, precision: Precision, device: torch.device) -> None:
        super().__init__()
        self.precision = precision
        self.device = device
        self.dtype = DTYPES[precision]
        self.scale = student.scale
        self.fp32 = student.to(device).eval()
        self.autocast = device.type == "cuda"  # GPU: autocast; CPU: weights pre-cast (oneDNN bf16/fp16 kernels)
        self.low = (
            self.fp32
            if precision == "fp32"
            else low_precision_copy(self.fp32, self.dtype, cast_weights=not self.autocast).to(device)
        )
        self.fallbacks = 0

    def encode_tile(self, lr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LR crop -> (IDR, xk), both float32: the encoder in the model's precision, xk's conv in float32."""
        idr = self._checked("encoder", lambda model, dtype: model.encode(lr.to(dtype)))
        with torch.no_grad():
            return idr, self.fp32.generator.converter.spatial_code_of(idr, (lr.shape[-2], lr.shape[-1]))

    def reconstruct_tile(self, lr: torch.Tensor, idr_mean: torch.Tensor, xk: torch.Tensor) -> torch.Tensor:
        """LR tile, the image's mean IDR and the tile's xk (float32) -> SR tile (float32).

        The channel code comes from the mean IDR in float32; the generator runs in the model's precision.
        """
        with torch.no_grad():
            ca = self.fp32.generator.converter.channel_code_of(idr_mean.float())
        return self._checked(
            "generator", lambda model, dtype: model.generator.reconstruct(lr.float(), ca.to(dtype), xk.to(dtype))
        )

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        """LR (B, 3, H, W) float32 -> SR float32, untiled."""
        idr, xk = self.encode_tile(lr)
        return self.reconstruct_tile(lr, idr.mean(dim=(2, 3)), xk)

    @torch.no_grad()
    def _checked(self, what: str, call: Callable[[Student, torch.dtype], torch.Tensor]) -> torch.Tensor:
        """Run `call` in the model's precision; rerun it in float32 if the result is not finite."""
        if self.precision != "fp32":
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                out = call(self.low, torch.float32 if self.autocast else self.dtype).float()
            if bool(torch.isfinite(out).all()):
                return out
            self.fallbacks += 1
            warnings.warn(
                f"{what}: {self.precision} produced NaN or inf; this call was run again in fp32",
                NonFiniteFallbackWarning,
                stacklevel=3,
            )
        out = call(self.fp32, torch.float32)
        if not bool(torch.isfinite(out).all()):
            raise FloatingPointError(f"{what}: NaN or inf in fp32; the weights or the input are not finite")
        return out


def prepare(
    student: nn.Module, precision: Precision | str = "fp32", device: torch.device | str = "cpu"
) -> PreparedStudent:
    """The student (moved to `device`, eval mode) ready for tiled inference in `precision`.

    `precision` is 'fp32', 'bf16' or 'fp16'; tensors in and out stay float32. This is the one call
    the CLI, the registered model and the Serve deployment make before handing the model to tiling.
    """
    if not isinstance(student, Student):
        raise TypeError(f"student: expected a lightbsr Student, got {type(student).__name__}")
    return PreparedStudent(student, parse_precision(precision), torch.device(device))
