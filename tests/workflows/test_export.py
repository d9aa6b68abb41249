"""`lightbsr export --format onnx` and `lightbsr upscale --model <export>`: onnxruntime agrees with torch, tiled."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightbsr.checkpoint import save_checkpoint
from lightbsr.images import read_rgb
from lightbsr.student import Student
from lightbsr.tiling import upscale, upscale_tiled
from workflows import export
from workflows import upscale as upscale_command
from workflows.cli import run
from workflows.errors import EXIT_OK, EXIT_USAGE, UsageError
from workflows.onnx_model import MANIFEST, OnnxModel

SCALE = 4


def student() -> Student:
    """A one-group one-block x4 student with non-trivial BatchNorm statistics and layer scales."""
    torch.manual_seed(0)
    model = Student(scale=SCALE, n_groups=1, n_blocks=1).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.3 + 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.1 + 0.05)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Student, str]:
    """The student, and the folder `lightbsr export` wrote from its checkpoint (one export per module)."""
    folder = tmp_path_factory.mktemp("export")
    model = student()
    config = {"scale": SCALE, "n_groups": 1, "n_blocks": 1}
    checkpoint = save_checkpoint(folder / "student.pt", model, role="student", model_config=config, pca_basis=None)
    out = folder / "onnx"
    argv = ["--model", str(checkpoint), "--format", "onnx", str(out)]
    assert run(export.main, argv, prog="lightbsr export") == EXIT_OK
    return model, str(out)


def photo_lr(sample_images, name: str, height: int, width: int) -> torch.Tensor:
    pixels = read_rgb(sample_images / "eval" / name)[:height, :width]
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)[None].float() / 255


@pytest.mark.integration
def test_the_export_folder_holds_two_graphs_and_a_manifest(exported):
    _, out = exported
    manifest = json.loads((Path(out) / MANIFEST).read_text())
    assert manifest["scale"] == SCALE and manifest["opset"] == export.OPSET
    assert manifest["source"].endswith("student.pt")
    assert OnnxModel(out).scale == SCALE


@pytest.mark.integration
@pytest.mark.parametrize(
    "name,height,width,tile,overlap",
    [("sail.png", 37, 45, 192, 32), ("barbara.png", 61, 90, 32, 8), ("tulips.png", 50, 67, 24, 8)],
)
def test_onnxruntime_matches_torch_tiled_on_photographs(exported, sample_images, name, height, width, tile, overlap):
    """Sizes not multiple of 4, one tile and several: the graphs keep dynamic height and width."""
    model, out = exported
    lr = photo_lr(sample_images, name, height, width)
    with torch.no_grad():
        expected = upscale_tiled(model, lr, tile, overlap)
    got = upscale_tiled(OnnxModel(out), lr, tile, overlap)
    assert got.shape == (1, 3, SCALE * height, SCALE * width)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert expected.std() > 0.05  # an output with content, where 1e-4 is a tight bound


@pytest.mark.e2e
def test_upscale_runs_an_export_folder(exported, sample_images, tmp_path):
    model, out = exported
    pixels = read_rgb(sample_images / "eval" / "tulips.png")[:40, :56]
    Image.fromarray(pixels).save(tmp_path / "in.png")
    argv = [
        "--model",
        out,
        str(tmp_path / "in.png"),
        str(tmp_path / "out.png"),
        "--tile",
        "24",
        "--overlap",
        "8",
        "--quiet",
    ]
    assert run(upscale_command.main, argv, prog="lightbsr upscale") == EXIT_OK
    got = read_rgb(tmp_path / "out.png").astype(int)
    expected = upscale(model, torch.from_numpy(pixels), 24, 8).numpy().astype(int)  # torch, same tiling
    assert got.shape == expected.shape == (160, 224, 3)
    assert np.abs(got - expected).max() <= 1  # 8-bit rounding of outputs within 1e-4


@pytest.mark.unit
def test_a_broken_manifest_is_named(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "lightbsr-onnx", "version": 1, "scale": 4}))
    with pytest.raises(UsageError, match=f"{MANIFEST}: the encoder graph"):
        OnnxModel(tmp_path)


@pytest.mark.unit
def test_missing_onnxruntime_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an install without the extra looks like
    (tmp_path / MANIFEST).write_text("{}")
    argv = ["--model", str(tmp_path), str(tmp_path / "in.png"), str(tmp_path / "out.png")]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
    assert run(upscale_command.main, argv, prog="lightbsr upscale") == EXIT_USAGE
    assert "pip install 'lightbsr[onnx]'" in capsys.readouterr().err
