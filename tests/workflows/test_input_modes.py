"""Every input mode through `lightbsr upscale` and `lightbsr evaluate`, checked against an independent path.

Inputs are made from a real photograph; the expected values come from the model run directly on
the RGB that Pillow (or numpy) gives for the same file, then converted the way the output should
be: gray by Pillow's ITU-R 601-2 luma, alpha by Pillow's bicubic, 16-bit in float (not on 8-bit
levels), EXIF rotation by `PIL.ImageOps.exif_transpose`.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from lightbsr.checkpoint import save_checkpoint
from lightbsr.images import read_rgb
from lightbsr.protocols import get_protocol
from lightbsr.student import Student
from tests.fixtures.images import exif_rotated_jpeg, png_bytes
from tests.workflows.test_evaluate import y_psnr
from workflows.cli import run
from workflows.config import load_config
from workflows.errors import EXIT_OK, EXIT_USAGE
from workflows.evaluate import evaluate_model
from workflows.upscale import main

LUMA = np.array([0.299, 0.587, 0.114])


def student(scale: int) -> Student:
    torch.manual_seed(0)
    model = Student(scale=scale, n_groups=1, n_blocks=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.2)
    return model.eval()


def checkpoint(path: Path, scale: int) -> str:
    config = {"scale": scale, "n_groups": 1, "n_blocks": 1}
    save_checkpoint(path, student(scale), role="student", model_config=config, pca_basis=None)
    return str(path)


def model_float(rgb: np.ndarray, scale: int = 2) -> np.ndarray:
    """float (H, W, 3) in [0, 1] -> the model's SR, float (sH, sW, 3) clamped (one untiled forward)."""
    with torch.no_grad():
        sr = student(scale)(torch.from_numpy(rgb.astype(np.float32)).permute(2, 0, 1)[None])
    return sr.clamp(0, 1)[0].permute(1, 2, 0).numpy()


def model_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB -> the model's SR on 8-bit levels."""
    return np.round(model_float(pixels.astype(np.float32) / np.float32(255)) * np.float32(255)).astype(np.uint8)


def pillow_bicubic(channel: np.ndarray) -> np.ndarray:
    height, width = channel.shape
    return np.asarray(Image.fromarray(channel).resize((2 * width, 2 * height), Image.Resampling.BICUBIC))


def saved(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def read_png16_rgb(data: bytes) -> np.ndarray:
    """uint16 (H, W, 3) of a 16-bit RGB PNG whose rows are all unfiltered (what `lightbsr` writes)."""
    width, height, depth, color_type = struct.unpack(">IIBB", data[16:26])
    assert (depth, color_type) == (16, 2)
    idat, offset = b"", 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        if data[offset + 4 : offset + 8] == b"IDAT":
            idat += data[offset + 8 : offset + 8 + length]
        offset += 12 + length
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * 6)
    assert not rows[:, 0].any()  # filter type None on every row
    return rows[:, 1:].copy().view(">u2").reshape(height, width, 3).astype(np.uint16)


@pytest.fixture(scope="module")
def photo(sample_images) -> np.ndarray:
    return read_rgb(sample_images / "eval" / "tulips.png")[50:98, 60:124]  # (48, 64, 3)


@pytest.fixture(scope="module")
def other(sample_images) -> np.ndarray:
    """A second real crop: the alpha channels and the low bytes of the 16-bit inputs."""
    return read_rgb(sample_images / "eval" / "monarch.png")[100:148, 200:264]


def inputs(photo: np.ndarray, other: np.ndarray) -> dict[str, tuple[str, bytes]]:
    """`{mode: (file name, bytes)}`, one file per input mode."""
    rgb = Image.fromarray(photo)
    alpha = other[..., 1]
    gray16 = photo[..., 1].astype(np.uint16) * 256 + other[..., 0]
    rgb16 = (photo.astype(np.uint16) * 256 + other).astype(">u2").reshape(48, -1)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "gray": ("gray.png", saved(rgb.convert("L"))),
        "rgba": ("rgba.png", saved(Image.fromarray(np.dstack([photo, alpha])))),
        "la": ("la.png", saved(Image.fromarray(np.dstack([np.asarray(rgb.convert("L")), alpha]), "LA"))),
        "palette": ("palette.png", saved(palette)),
        "palette_transparent": ("clear.png", saved(palette, transparency=int(np.asarray(palette)[0, 0]))),
        "gray16": ("gray16.png", saved(Image.fromarray(gray16))),
        "rgb16": ("rgb16.png", png_bytes((row.tobytes() for row in rgb16), 64, 48, bit_depth=16)),
        "cmyk": ("cmyk.tif", saved(rgb.convert("CMYK"), "TIFF")),
        "exif_jpeg": ("rotated.jpg", exif_rotated_jpeg(photo)),
        "exif_png": ("rotated.png", saved(Image.fromarray(np.ascontiguousarray(np.rot90(photo))), exif=exif)),
    }


@pytest.fixture(scope="module")
def files(photo, other) -> dict[str, tuple[str, bytes]]:
    return inputs(photo, other)


@pytest.fixture(scope="module")
def model_x2(tmp_path_factory) -> str:
    return checkpoint(tmp_path_factory.mktemp("model") / "x2.pt", 2)


def lightbsr_upscale(model: str, folder: Path, name: str, data: bytes, *extra: str) -> Path:
    (folder / name).write_bytes(data)
    argv = ["--model", model, str(folder / name), str(folder / "out") + "/", "--quiet", *extra]
    assert run(main, argv, prog="lightbsr upscale") == EXIT_OK
    (written,) = (folder / "out").iterdir()
    return written


def pillow_pixels(data: bytes, mode: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert(mode))


@pytest.mark.e2e
@pytest.mark.parametrize(
    "mode",
    ["gray", "rgba", "la", "palette", "palette_transparent", "gray16", "rgb16", "cmyk", "exif_jpeg", "exif_png"],
)
def test_each_input_mode_comes_back_upscaled_in_its_own_mode(mode, files, model_x2, tmp_path):
    name, data = files[mode]
    out = lightbsr_upscale(model_x2, tmp_path, name, data, *(["--format", "png"] if mode == "exif_jpeg" else []))
    result = Image.open(out)
    pixels = np.asarray(result)
    if mode in ("gray", "la"):  # gray in -> gray out: the luma of the model's RGB output
        gray = pillow_pixels(data, "L")
        expected = np.asarray(Image.fromarray(model_uint8(np.dstack([gray] * 3))).convert("L"))
        assert result.mode == ("L" if mode == "gray" else "LA") and out.suffix == ".png"
        luma = pixels[..., 0] if mode == "la" else pixels
        assert np.abs(luma.astype(int) - expected).max() <= 1
    if mode in ("rgba", "la", "palette_transparent"):  # alpha apart, Pillow's bicubic
        alpha = pillow_pixels(data, "RGBA")[..., 3]
        assert alpha.min() < 255 and result.mode in ("RGBA", "LA")
        assert np.abs(pixels[..., -1].astype(int) - pillow_bicubic(alpha)).max() <= 1
    if mode in ("rgba", "palette", "palette_transparent", "cmyk"):  # RGB exactly the model's output
        assert result.mode == ("RGBA" if mode in ("rgba", "palette_transparent") else "RGB") and out.suffix == ".png"
        np.testing.assert_array_equal(pixels[..., :3], model_uint8(pillow_pixels(data, "RGB")))
    if mode == "gray16":  # 16 bits in, 16 bits out, the float model output's luma
        source = np.asarray(Image.open(io.BytesIO(data))).astype(np.float32) / 65535
        expected = np.round(model_float(np.dstack([source] * 3)) @ LUMA * 65535)
        assert result.mode == "I;16"
        assert np.abs(pixels.astype(np.float64) - expected).max() <= 1
        assert np.abs(pixels / 257 - np.round(pixels / 257)).max() > 0.1  # not on 8-bit levels
    if mode == "rgb16":
        source = read_png16_rgb(data).astype(np.float32) / 65535
        written = read_png16_rgb(out.read_bytes())
        expected = np.round(model_float(source) * 65535)
        assert np.abs(written.astype(np.float64) - expected).max() <= 1
        assert np.abs(written / 257 - np.round(written / 257)).max() > 0.1
    if mode.startswith("exif"):  # upright, then upscaled
        upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        assert upright.shape == (48, 64, 3) and pixels.shape == (96, 128, 3)
        np.testing.assert_array_equal(pixels, model_uint8(upright))


@pytest.mark.e2e
@pytest.mark.parametrize("mode, fmt, words", [("rgba", "jpeg", "JPEG cannot hold its alpha"), ("rgb16", "webp", "16")])
def test_a_format_that_cannot_hold_the_image_is_refused(mode, fmt, words, files, model_x2, tmp_path, capsys):
    name, data = files[mode]
    (tmp_path / name).write_bytes(data)
    argv = ["--model", model_x2, str(tmp_path / name), str(tmp_path / "out") + "/", "--quiet", "--format", fmt]
    assert run(main, argv, prog="lightbsr upscale") == EXIT_USAGE
    err = capsys.readouterr().err
    assert name in err and words in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def benchmark_hr(mode: str, data: bytes) -> np.ndarray:
    """float (H, W, 3) HR as the authors' loader sees the file: gray copied to RGB, alpha dropped, upright."""
    if mode == "rgb16":
        return read_png16_rgb(data).astype(np.float32) / 65535
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if mode == "gray16":
        return np.dstack([np.asarray(image).astype(np.float32) / 65535] * 3)
    return np.asarray(image.convert("RGB")).astype(np.float32) / np.float32(255)


@pytest.mark.integration
def test_evaluate_scores_a_benchmark_set_holding_every_mode(files, tmp_path):
    hr_folder = tmp_path / "bench" / "Modes" / "HR"
    hr_folder.mkdir(parents=True)
    for name, data in files.values():
        (hr_folder / name).write_bytes(data)
    cfg = load_config(None, ["evaluate.samples=false", "evaluate.protocols=[iso_x4]"])
    model = checkpoint(tmp_path / "x4.pt", 4)
    result = evaluate_model(model, cfg, benchmarks=str(tmp_path / "bench"), local=True, idr=False, log=False)
    protocol, model_x4 = get_protocol("iso_x4"), student(4)
    assert len(result.rows) == len(files) * len(protocol.cases)
    case = protocol.case("sigma2.4")  # one case per image recomputed: the others run the same code
    for mode, (name, data) in files.items():
        hr = torch.from_numpy(benchmark_hr(mode, data)).permute(2, 0, 1)[None]
        row = next(r for r in result.rows if r["image"] == name and r["case"] == case.name)
        hr_cropped, lr = protocol.make_pair(hr, case, f"Modes/{name}")
        with torch.no_grad():
            sr = model_x4(lr)
        expected = y_psnr(sr[0].double().numpy(), hr_cropped[0].double().numpy(), 4)
        assert row["psnr"] == pytest.approx(expected, abs=1e-6), name
