"""`lightbsr.inference`: the output format rules and one call of `upscale_bytes` end to end."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lightbsr.images import ImageError, Picture, read_rgb
from lightbsr.inference import output_format, upscale_bytes
from lightbsr.student import Student
from lightbsr.tiling import upscale_tiled

pytestmark = pytest.mark.unit


def picture(fmt: str, alpha: bool = False, bits: int = 8) -> Picture:
    return Picture(
        np.zeros((4, 4, 3), np.float32), np.ones((4, 4), np.float32) if alpha else None, bits=bits, format=fmt
    )


def test_the_source_format_is_kept_when_it_can_be_written_and_a_lossy_request_is_refused():
    assert output_format(picture("WEBP", alpha=True), "a.webp") == "WEBP"  # WebP holds 8-bit alpha
    assert output_format(picture("JPEG"), "a.jpg") == "JPEG"
    assert output_format(picture("TIFF", bits=16), "a.tif") == "PNG"
    assert output_format(picture("BMP"), "a.bmp") == "PNG"
    assert output_format(picture("PNG"), "a.png", "jpg") == "JPEG"
    with pytest.raises(ImageError, match=r"a\.png: format: JPEG cannot hold its alpha channel"):
        output_format(picture("PNG", alpha=True), "a.png", "jpeg")
    with pytest.raises(ImageError, match=r"b\.png: format: 16 bits per channel cannot be written as WEBP"):
        output_format(picture("PNG", bits=16), "b.png", "webp")


def test_a_webp_with_alpha_comes_back_as_webp_with_alpha(sample_images):
    photo = read_rgb(sample_images / "eval" / "tulips.png")[50:98, 60:124]
    alpha = read_rgb(sample_images / "eval" / "monarch.png")[100:148, 200:264, 1]
    buffer = io.BytesIO()
    Image.fromarray(np.dstack([photo, alpha])).save(buffer, format="WEBP", lossless=True, exact=True)
    torch.manual_seed(0)
    model = Student(scale=2, n_groups=1, n_blocks=1).eval()
    data, fmt = upscale_bytes(model, buffer.getvalue(), "leaf.webp")
    out = Image.open(io.BytesIO(data))
    assert fmt == "WEBP" and out.format == "WEBP" and out.mode == "RGBA" and out.size == (128, 96)
    with torch.no_grad():
        sr = model(torch.from_numpy(photo).permute(2, 0, 1)[None].float() / 255).clamp(0, 1)
    expected = (sr[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    pixels = np.asarray(out)
    np.testing.assert_array_equal(pixels[..., :3], expected)
    bicubic = np.asarray(Image.fromarray(alpha).resize((128, 96), Image.Resampling.BICUBIC))
    assert np.abs(pixels[..., 3].astype(int) - bicubic).max() <= 1


@pytest.mark.parametrize("mode", ["RGB", "I;16"])
def test_a_picture_quantised_band_by_band_equals_the_whole_float_output_quantised(mode, sample_images):
    """upscale_bytes writes each finished band of tiles into the integer output; with tiles of 16 on a
    48x64 photograph (four bands) the file must hold exactly the whole tiled float SR, clipped and rounded."""
    photo = read_rgb(sample_images / "eval" / "tulips.png")[50:98, 60:124]
    if mode == "RGB":
        source, top = photo, 255
    else:  # 16-bit gray: the model sees it in three equal channels; the output is its luma at 16 bits
        source, top = np.asarray(Image.fromarray(photo).convert("L")).astype(np.uint16) * 257 + 100, 65535
    buffer = io.BytesIO()
    Image.fromarray(source).save(buffer, format="PNG")
    torch.manual_seed(0)
    model = Student(scale=2, n_groups=1, n_blocks=1).eval()
    data, fmt = upscale_bytes(model, buffer.getvalue(), "tulips.png", tile=16, overlap=4)
    rgb = source.astype(np.float32)[..., None].repeat(3, axis=2) if mode == "I;16" else source.astype(np.float32)
    lr = torch.from_numpy(rgb / np.float32(top)).permute(2, 0, 1)[None]
    sr = upscale_tiled(model, lr, tile=16, overlap=4)[0].permute(1, 2, 0).numpy()
    sr = np.clip(sr, 0, 1)
    if mode == "I;16":
        sr = sr @ np.array([0.299, 0.587, 0.114], np.float32)
    expected = np.round(np.clip(sr, 0, 1) * np.float32(top)).astype(np.uint16 if top == 65535 else np.uint8)
    out = Image.open(io.BytesIO(data))
    assert fmt == "PNG" and out.mode == mode and out.size == (128, 96)
    np.testing.assert_array_equal(np.asarray(out), expected)
