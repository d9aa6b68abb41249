"""`lightbsr samples`: real photographs from package wheels, with their attribution."""

import re
import shutil

import numpy as np
import pytest
from PIL import Image

import lightbsr.samples as samples
from lightbsr.images import read_rgb
from lightbsr.samples import SAMPLES, extract_samples

pytestmark = pytest.mark.unit


def test_every_sample_is_an_rgb_photograph_large_enough_to_train_on(sample_images):
    for sample in SAMPLES:
        pixels = read_rgb(sample_images / sample.split / f"{sample.name}.png", min_size=256)
        assert pixels.std() > 20, sample.name  # real scenes, not flat or synthetic fills
    assert sorted(p.stem for p in (sample_images / "eval").glob("*.png")) == [
        "barbara",
        "kodim23",
        "monarch",
        "sail",
        "tulips",
    ]
    assert read_rgb(sample_images / "eval" / "monarch.png").shape == (512, 768, 3)


def test_samples_hold_the_same_pixels_as_the_installed_packages_load(sample_images):
    """An independent read of the same photographs through each package's own loader."""
    from matplotlib import cbook
    from skimage import data
    from sklearn.datasets import load_sample_image

    train = sample_images / "train"
    expected = {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
        "motorcycle": data.stereo_motorcycle()[0],
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
        "grace_hopper": np.asarray(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")),
    }
    assert set(expected) == {s.name for s in SAMPLES if s.split == "train"}
    for name, pixels in expected.items():
        np.testing.assert_array_equal(read_rgb(train / f"{name}.png"), pixels, err_msg=name)


def parse_attribution(text: str) -> dict[str, dict[str, str]]:
    entries, current = {}, None
    for line in text.splitlines():
        if re.fullmatch(r"(train|eval)/\S+\.png", line):
            current = entries.setdefault(line, {})
        elif current is not None and (match := re.fullmatch(r"  (\w+):\s+(.+)", line)):
            current[match.group(1)] = match.group(2)
    return entries


def test_attribution_lists_every_file_with_source_and_licence(sample_images):
    entries = parse_attribution((sample_images / "ATTRIBUTION").read_text())
    on_disk = {p.relative_to(sample_images).as_posix() for p in sample_images.glob("*/*.png")}
    assert set(entries) == on_disk and len(on_disk) == len(SAMPLES)
    for name, fields in entries.items():
        assert re.fullmatch(r"[a-z-]+==[0-9][\w.]* wheel, \S+\.(png|jpg)", fields["source"]), name
        assert fields["licence"] and fields["credit"], name


def test_rerun_keeps_every_file_and_downloads_nothing(sample_images, tmp_path, monkeypatch):
    dest = tmp_path / "samples"
    shutil.copytree(sample_images, dest)
    mtimes = {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()}

    def no_download(package, version, folder):
        raise AssertionError(f"{package} downloaded again")

    monkeypatch.setattr(samples, "_download_wheel", no_download)
    report = extract_samples(dest)
    assert report.written == [] and len(report.kept) == len(SAMPLES)
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*") if p.is_file()} == mtimes


def test_a_missing_file_is_extracted_again_from_its_wheel(sample_images, tmp_path):
    dest = tmp_path / "samples"
    shutil.copytree(sample_images, dest)
    (dest / "eval" / "monarch.png").unlink()
    (dest / "ATTRIBUTION").unlink()
    report = extract_samples(dest)
    assert report.written == [dest / "eval" / "monarch.png"]
    np.testing.assert_array_equal(read_rgb(report.written[0]), read_rgb(sample_images / "eval" / "monarch.png"))
    assert (dest / "ATTRIBUTION").read_text() == (sample_images / "ATTRIBUTION").read_text()


@pytest.mark.e2e
def test_samples_command_reports_what_it_did(sample_images, tmp_path, capsys):
    from workflows.samples import main

    dest = tmp_path / "samples"
    shutil.copytree(sample_images, dest)
    assert main([str(dest)]) == 0
    out = capsys.readouterr().out
    assert f"0 written, {len(SAMPLES)} already present" in out and "ATTRIBUTION" in out


def test_an_unknown_wheel_member_is_a_clear_error(tmp_path):
    bogus = samples.Sample("train", "nothing", "sporco", "0.2.2.post1", "sporco/data/nothing.png", "-", "-")
    with pytest.raises(samples.SampleError, match=r"holds no sporco/data/nothing\.png"):
        extract_samples(tmp_path, samples=(bogus,))
