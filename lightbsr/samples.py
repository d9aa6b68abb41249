"""Real photographs to try the system on, taken from package wheels on PyPI.

The only network this needs is the package registry: each wheel is fetched with
`pip download --no-deps --only-binary=:all: <package>==<version>` into a temporary folder,
the photographs are read out of it with `zipfile`, and nothing is installed. The training
sample holds natural RGB photographs (no synthetic, text or microscopy images); the
evaluation sample is the five lossless test images of the `sporco` wheel (its monarch is
Set14's monarch). Each file's source and licence go into `ATTRIBUTION` beside them.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lightbsr.images import read_rgb, write_image

__all__ = ["SAMPLES", "Sample", "SampleError", "SampleReport", "attribution_text", "extract_samples"]


@dataclass(frozen=True)
class Sample:
    split: str  # "train" or "eval"
    name: str  # output file stem
    package: str
    version: str
    member: str  # path inside the wheel
    licence: str
    credit: str


_SKIMAGE = ("scikit-image", "0.26.0")
_SKLEARN = ("scikit-learn", "1.9.1")
_MPL = ("matplotlib", "3.11.2")
_SPORCO = ("sporco", "0.2.2.post1")
_SKIMAGE_DOC = "scikit-image's skimage.data docstrings"
_SPORCO_DOC = "sporco/data/README.rst"

SAMPLES: tuple[Sample, ...] = (
    Sample(
        "train",
        "astronaut",
        *_SKIMAGE,
        "skimage/data/astronaut.png",
        "public domain",
        f"Eileen Collins, NASA Great Images database ({_SKIMAGE_DOC})",
    ),
    Sample(
        "train",
        "chelsea",
        *_SKIMAGE,
        "skimage/data/chelsea.png",
        "CC0",
        f"Chelsea the cat, photograph by Stefan van der Walt ({_SKIMAGE_DOC})",
    ),
    Sample(
        "train",
        "coffee",
        *_SKIMAGE,
        "skimage/data/coffee.png",
        "CC0",
        f"coffee cup, photograph by Rachel Michetti, courtesy of Pikolo Espresso Bar ({_SKIMAGE_DOC})",
    ),
    Sample(
        "train",
        "rocket",
        *_SKIMAGE,
        "skimage/data/rocket.jpg",
        "public domain",
        f"DSCOVR launch on Falcon 9, SpaceX Photos ({_SKIMAGE_DOC})",
    ),
    Sample(
        "train",
        "motorcycle",
        *_SKIMAGE,
        "skimage/data/motorcycle_left.png",
        "no licence stated; redistributed by scikit-image (BSD-3-Clause package)",
        f"Middlebury 2014 stereo benchmark, Scharstein et al., left view ({_SKIMAGE_DOC})",
    ),
    Sample(
        "train",
        "china",
        *_SKLEARN,
        "sklearn/datasets/images/china.jpg",
        "CC BY 2.0",
        "danielbuechele on Flickr, retrieved by Robert Layton (sklearn/datasets/images/README.txt)",
    ),
    Sample(
        "train",
        "flower",
        *_SKLEARN,
        "sklearn/datasets/images/flower.jpg",
        "CC BY 2.0",
        "vultilion on Flickr, retrieved by Robert Layton (sklearn/datasets/images/README.txt)",
    ),
    Sample(
        "train",
        "grace_hopper",
        *_MPL,
        "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
        "public domain",
        "Commodore Grace M. Hopper, official U.S. Navy photograph, 1984 (matplotlib sample data)",
    ),
    Sample(
        "eval",
        "barbara",
        *_SPORCO,
        "sporco/data/barbara.png",
        "redistributable test image",
        f"attributed to Allen Gersho, via hlevkin.com, borders cropped ({_SPORCO_DOC})",
    ),
    Sample(
        "eval",
        "kodim23",
        *_SPORCO,
        "sporco/data/kodim23.png",
        "released for unrestricted use",
        f"Kodak Lossless True Color Image Suite, image 23 ({_SPORCO_DOC})",
    ),
    Sample(
        "eval",
        "monarch",
        *_SPORCO,
        "sporco/data/monarch.png",
        "free of copyright restrictions",
        f"Waterloo BragZone (the Set14 monarch) ({_SPORCO_DOC})",
    ),
    Sample(
        "eval",
        "sail",
        *_SPORCO,
        "sporco/data/sail.png",
        "free of copyright restrictions",
        f"Waterloo BragZone ({_SPORCO_DOC})",
    ),
    Sample(
        "eval",
        "tulips",
        *_SPORCO,
        "sporco/data/tulips.png",
        "free of copyright restrictions",
        f"Waterloo BragZone ({_SPORCO_DOC})",
    ),
)


class SampleError(RuntimeError):
    """A wheel could not be downloaded or did not hold the expected photograph."""


@dataclass
class SampleReport:
    dest: Path
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # already present from an earlier run
    attribution: Path | None = None

    @property
    def files(self) -> list[Path]:
        return sorted(self.written + self.kept)


def output_path(dest: Path, sample: Sample) -> Path:
    return dest / sample.split / f"{sample.name}.png"


def attribution_text(samples: tuple[Sample, ...] = SAMPLES) -> str:
    lines = [
        "Sample photographs extracted from Python package wheels on PyPI by `lightbsr samples`.",
        "Each file was decoded, turned upright by its EXIF orientation and re-saved as lossless PNG.",
        "",
    ]
    for sample in samples:
        lines += [
            f"{sample.split}/{sample.name}.png",
            f"  source:  {sample.package}=={sample.version} wheel, {sample.member}",
            f"  licence: {sample.licence}",
            f"  credit:  {sample.credit}",
            "",
        ]
    return "\n".join(lines)


def extract_samples(
    dest: str | Path,
    samples: tuple[Sample, ...] = SAMPLES,
    log: Callable[[str], None] = lambda message: None,
) -> SampleReport:
    """Put the sample photographs under `dest/train` and `dest/eval` with `dest/ATTRIBUTION`.

    Files already present are kept, so a rerun downloads nothing once the folder is complete.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    report = SampleReport(dest=dest)
    missing = [s for s in samples if not output_path(dest, s).is_file()]
    report.kept = [output_path(dest, s) for s in samples if s not in missing]
    for (package, version), group in _by_wheel(missing).items():
        log(f"downloading {package}=={version} (wheel only, not installed)")
        with tempfile.TemporaryDirectory(prefix="lightbsr-wheel-") as folder:
            wheel = _download_wheel(package, version, Path(folder))
            with zipfile.ZipFile(wheel) as archive:
                for sample in group:
                    report.written.append(_extract_one(archive, wheel.name, sample, dest))
                    log(f"wrote {sample.split}/{sample.name}.png")
    report.attribution = _write_attribution(dest, samples)
    return report


def _by_wheel(samples: list[Sample]) -> dict[tuple[str, str], list[Sample]]:
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.package, sample.version), []).append(sample)
    return groups


def _download_wheel(package: str, version: str, folder: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        f"{package}=={version}",
        "-d",
        str(folder),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise SampleError(
            f"pip download of {package}=={version} failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def _extract_one(archive: zipfile.ZipFile, wheel_name: str, sample: Sample, dest: Path) -> Path:
    try:
        data = archive.read(sample.member)
    except KeyError:
        raise SampleError(f"{wheel_name} holds no {sample.member}") from None
    pixels = read_rgb(data, name=f"{wheel_name}:{sample.member}")
    return write_image(output_path(dest, sample), pixels)


def _write_attribution(dest: Path, samples: tuple[Sample, ...]) -> Path:
    path = dest / "ATTRIBUTION"
    text = attribution_text(samples)
    if not path.is_file() or path.read_text() != text:
        with tempfile.NamedTemporaryFile("w", dir=dest, prefix=".ATTRIBUTION.", delete=False) as handle:
            handle.write(text)
        Path(handle.name).chmod(0o644)
        Path(handle.name).replace(path)
    return path
