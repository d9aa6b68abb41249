"""`lightbsr.images`: strict 8-bit RGB reading, any mode for inference, 16-bit PNG, atomic writing."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from lightbsr.images import (
    ImageError,
    Picture,
    decode_picture,
    encode_picture,
    encode_png,
    read_rgb,
    write_image,
)
from tests.fixtures.images import bad_images, exif_rotated_jpeg, png_chunk

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def photo(sample_images) -> np.ndarray:
    return read_rgb(sample_images / "train" / "china.png")


@pytest.fixture(scope="module")
def bad_files(photo, sample_images):
    return bad_images(photo, (sample_images / "ATTRIBUTION").read_bytes())


def test_read_rgb_returns_the_decoded_pixels_of_an_rgb_file(photo, tmp_path):
    path = tmp_path / "crop.png"
    Image.fromarray(photo[:64, :96]).save(path)
    pixels = read_rgb(path)
    assert pixels.dtype == np.uint8 and pixels.shape == (64, 96, 3)
    np.testing.assert_array_equal(pixels, photo[:64, :96])
    np.testing.assert_array_equal(read_rgb(path.read_bytes(), "crop"), pixels)


@pytest.mark.parametrize(
    "name",
    [
        "truncated.jpg",
        "truncated.png",
        "empty.png",
        "notes.png",
        "gray.png",
        "rgba.png",
        "palette.png",
        "rgb16.png",
        "cmyk.jpg",
        "small.png",
        "bomb.png",
    ],
)
def test_each_kind_of_bad_file_is_rejected_with_its_reason_and_name(bad_files, tmp_path, name):
    data, reason = bad_files[name]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageError) as caught:
        read_rgb(path, min_size=128)
    assert caught.value.reason == reason
    assert str(path) in str(caught.value) and reason in str(caught.value)
    if reason in ("grayscale", "alpha", "palette", "16-bit", "cmyk"):  # accepted for inference, not for training
        assert "training shards need 8-bit RGB images" in str(caught.value)
    if reason in ("grayscale", "alpha", "palette"):
        assert f"mode {Image.open(io.BytesIO(data)).mode}" in str(caught.value)


def test_pillow_alone_would_accept_the_16_bit_png_as_8_bit_rgb(bad_files):
    """Why the header check exists: Pillow opens 48-bit PNGs as plain "RGB"."""
    data, _ = bad_files["rgb16.png"]
    assert Image.open(io.BytesIO(data)).mode == "RGB"


def test_exif_orientation_is_applied(photo):
    upright = np.ascontiguousarray(photo[:200, :300])
    data = exif_rotated_jpeg(upright)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # as stored, no transpose
    assert stored.shape == (300, 200, 3)
    pixels = read_rgb(data, "rotated.jpg")
    assert pixels.shape == (200, 300, 3)
    np.testing.assert_array_equal(pixels, np.rot90(stored, k=-1))
    error = np.abs(pixels.astype(int) - upright).mean()
    assert error < 4.0, error  # JPEG loss only; a wrong turn would be tens of levels off
    assert np.abs(np.rot90(pixels, k=2).astype(int) - upright).mean() > 5 * error


def test_decompression_bomb_limit_can_be_lowered(photo):
    data = encode_png(np.ascontiguousarray(photo[:100, :100]))
    assert read_rgb(data, max_pixels=10_000).shape == (100, 100, 3)
    with pytest.raises(ImageError, match="decompression bomb"):
        read_rgb(data, "big.png", max_pixels=9_999)


def test_encode_png_is_lossless_and_repeatable(photo):
    crop = np.ascontiguousarray(photo[50:114, 70:134])
    data = encode_png(crop)
    assert data == encode_png(crop.copy())
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), crop)


@pytest.mark.parametrize("suffix, lossless", [(".png", True), (".webp", True), (".jpg", False)])
def test_write_image_round_trips_by_extension(photo, tmp_path, suffix, lossless):
    crop = np.ascontiguousarray(photo[:80, :120])
    path = write_image(tmp_path / f"out{suffix}", crop)
    assert Image.open(path).format == {".png": "PNG", ".webp": "WEBP", ".jpg": "JPEG"}[suffix]
    back = read_rgb(path)
    if lossless:
        np.testing.assert_array_equal(back, crop)
    else:
        mse = np.mean((back.astype(float) - crop) ** 2)
        assert 10 * np.log10(255**2 / mse) > 35
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(photo, tmp_path):
    path = tmp_path / "keep.jpg"
    write_image(path, np.ascontiguousarray(photo[:32, :32]))
    before = path.read_bytes()
    too_wide = np.ascontiguousarray(np.tile(photo[:1], (1, 110, 1)))  # (1, 70400, 3): over JPEG's 65500 limit
    with pytest.raises(OSError):
        write_image(path, too_wide)  # the JPEG encoder fails part-way through the save
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.jpg"]


def test_write_image_rejects_non_rgb_arrays_and_unknown_formats(tmp_path):
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\).*float32"):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"'\.gif'"):
        write_image(tmp_path / "x.gif", np.zeros((4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def filtered_png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG whose rows use the five PNG filters in turn (None, Sub, Up, Average, Paeth),
    filtered here by the specification's forward formulas."""
    height, width, _ = pixels.shape
    raw = pixels.astype(">u2").reshape(height, -1).view(np.uint8).astype(np.int64)  # (H, 6W)
    left = np.pad(raw, ((0, 0), (6, 0)))[:, :-6]
    up = np.pad(raw, ((1, 0), (0, 0)))[:-1]
    upleft = np.pad(raw, ((1, 0), (6, 0)))[:-1, :-6]
    estimate = left + up - upleft
    pa, pb, pc = np.abs(estimate - left), np.abs(estimate - up), np.abs(estimate - upleft)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, upleft))
    predictors = [np.zeros_like(raw), left, up, (left + up) // 2, paeth]
    rows = b"".join(
        bytes([y % 5]) + ((raw[y] - predictors[y % 5][y]) % 256).astype(np.uint8).tobytes() for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.fixture(scope="module")
def deep(photo) -> np.ndarray:
    """uint16 (40, 56, 3) from a real photo, low bytes from another part of it (not on 8-bit levels)."""
    return photo[:40, :56].astype(np.uint16) * 256 + photo[100:140, 200:256]


def test_16_bit_rgb_png_is_read_through_every_filter_at_full_precision(deep):
    picture = decode_picture(filtered_png16(deep), "deep.png")
    assert picture.bits == 16 and not picture.gray and picture.alpha is None and picture.format == "PNG"
    np.testing.assert_array_equal(np.round(picture.rgb * 65535).astype(np.uint16), deep)


def test_16_bit_pictures_are_written_as_16_bit_png(deep):
    rgb = encode_picture(Picture(deep.astype(np.float32) / 65535, bits=16), "PNG")
    assert rgb[24:26] == bytes([16, 2])  # IHDR: 16 bits, truecolour
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(rgb))), (deep >> 8).astype(np.uint8))  # Pillow: high bytes
    np.testing.assert_array_equal(np.round(decode_picture(rgb, "back").rgb * 65535), deep)
    gray = deep[..., 0].astype(np.float32) / 65535
    gray_png = encode_picture(Picture(np.dstack([gray] * 3), gray=True, bits=16), "PNG")
    with Image.open(io.BytesIO(gray_png)) as image:
        assert image.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(image), deep[..., 0])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_as_pillow_does(photo, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(photo[:30, :50]).save(buffer, format="PNG", exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
    picture = decode_picture(buffer.getvalue(), "turned.png")
    np.testing.assert_array_equal(np.round(picture.rgb * 255).astype(np.uint8), upright)


def test_an_unsupported_mode_is_named(photo):
    buffer = io.BytesIO()
    Image.fromarray(photo[..., 0].astype(np.float32)).save(buffer, format="TIFF")  # 32-bit float
    with pytest.raises(ImageError, match=r"depth\.tif: unsupported mode: mode F"):
        decode_picture(buffer.getvalue(), "depth.tif")
