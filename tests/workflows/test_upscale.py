"""`lightbsr upscale` with a checkpoint file: formats kept, outputs complete or absent, bad input named."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightbsr.images import read_rgb
from lightbsr.tiling import upscale
from tests.fixtures.models import busy_student
from workflows.cli import run
from workflows.errors import EXIT_OK, EXIT_USAGE
from workflows.upscale import main

pytestmark = pytest.mark.e2e


def lightbsr_upscale(argv: list[str]) -> int:
    """The command as a user runs it: its exit code, its one-line error on stderr."""
    return run(main, argv, prog="lightbsr upscale")


@pytest.fixture(scope="module")
def photo(sample_images) -> np.ndarray:
    return read_rgb(sample_images / "eval" / "tulips.png")[50:98, 60:124]  # (48, 64, 3)


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")])
def test_each_format_comes_back_in_the_same_format_at_twice_the_size(tmp_path, busy_student_file, photo, suffix, fmt):
    Image.fromarray(photo).save(tmp_path / f"in{suffix}", format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    assert (
        lightbsr_upscale(
            ["--model", busy_student_file, str(tmp_path / f"in{suffix}"), str(tmp_path / "out") + "/", "--quiet"]
        )
        == EXIT_OK
    )
    out = tmp_path / "out" / f"in{'.jpg' if fmt == 'JPEG' else suffix}"
    with Image.open(out) as image:
        assert image.format == fmt and image.size == (128, 96)
    if fmt != "JPEG":  # lossless: exactly the model's output on the decoded input
        direct = upscale(busy_student(), torch.from_numpy(read_rgb(tmp_path / f"in{suffix}"))).numpy()
        assert np.array_equal(read_rgb(out), direct)


def test_format_option_converts_and_a_folder_keeps_its_layout(tmp_path, busy_student_file, photo):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    Image.fromarray(photo).save(tmp_path / "in" / "a.png")
    Image.fromarray(photo[:, ::-1]).save(tmp_path / "in" / "sub" / "b.jpg", quality=95)
    (tmp_path / "in" / "notes.txt").write_text("not an image, and not listed")
    assert (
        lightbsr_upscale(
            ["--model", busy_student_file, str(tmp_path / "in"), str(tmp_path / "out"), "--format", "webp", "--quiet"]
        )
        == EXIT_OK
    )
    assert files_under(tmp_path / "out") == ["a.webp", "sub/b.webp", "upscale-report.json"]
    with Image.open(tmp_path / "out" / "a.webp") as image:
        assert image.format == "WEBP"


def test_output_extension_that_contradicts_the_format_is_refused(tmp_path, busy_student_file, photo, capsys):
    Image.fromarray(photo).save(tmp_path / "in.png")
    assert (
        lightbsr_upscale(["--model", busy_student_file, str(tmp_path / "in.png"), str(tmp_path / "out.jpg"), "--quiet"])
        == EXIT_USAGE
    )
    assert "out.jpg: extension .jpg does not match the format PNG" in capsys.readouterr().err
    assert not (tmp_path / "out.jpg").exists()


def bad_inputs(folder: Path, photo: np.ndarray) -> dict[str, str]:
    """file name -> the words the error must contain."""
    (folder / "text.png").write_text("this is not an image")
    Image.fromarray(photo[:1, :1]).save(folder / "tiny.png")
    Image.fromarray(photo[..., 0].astype(np.float32) / 255).save(folder / "float.tif")  # mode F
    (folder / "empty.png").write_bytes(b"")
    return {
        "text.png": "not an image",
        "tiny.png": "1x1 pixels",
        "float.tif": "unsupported mode: mode F",
        "empty.png": "empty",
    }


def test_bad_images_are_named_and_leave_no_output(tmp_path, busy_student_file, photo, capsys):
    (tmp_path / "in").mkdir()
    for name, words in bad_inputs(tmp_path / "in", photo).items():
        out = tmp_path / "out" / name
        assert (
            lightbsr_upscale(["--model", busy_student_file, str(tmp_path / "in" / name), str(out), "--quiet"])
            == EXIT_USAGE
        )
        err = capsys.readouterr().err
        assert name in err and words in err, err
        assert not (tmp_path / "out").exists() or files_under(tmp_path / "out") == []


def test_a_bad_image_in_a_folder_is_named_and_the_others_are_written_whole(tmp_path, busy_student_file, photo, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(photo).save(tmp_path / "in" / "a_good.png")
    (tmp_path / "in" / "b_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    assert (
        lightbsr_upscale(["--model", busy_student_file, str(tmp_path / "in"), str(tmp_path / "out"), "--quiet"])
        == EXIT_USAGE
    )
    assert "b_broken.png" in capsys.readouterr().err
    assert files_under(tmp_path / "out") == ["a_good.png", "upscale-report.json"]  # complete, no temporary leftovers


def test_missing_or_wrong_model_is_named(tmp_path, photo, capsys):
    Image.fromarray(photo).save(tmp_path / "in.png")
    (tmp_path / "junk.pt").write_text("junk")
    for model, words in (
        (str(tmp_path / "nope.pt"), "nope.pt does not exist"),
        (str(tmp_path / "junk.pt"), "junk.pt is not a readable torch checkpoint"),
    ):
        assert (
            lightbsr_upscale(["--model", model, str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--quiet"])
            == EXIT_USAGE
        )
        assert words in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_a_registered_model_without_a_tracking_uri_says_what_to_set_and_creates_no_store(
    tmp_path, photo, capsys, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # storage.root defaults to ./runs, where MLflow would create mlflow.db
    Image.fromarray(photo).save(tmp_path / "in.png")
    code = lightbsr_upscale(["--model", "models:/lightbsr-x4@champion", "in.png", "out.png", "--quiet"])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert "tracking.uri" in err and "MLFLOW_TRACKING_URI" in err and "models:/lightbsr-x4@champion" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # no runs/mlflow.db, no output


@pytest.mark.parametrize(
    "model,words",
    [
        ("https://user:{secret}@models.example.invalid/student.pt", "scheme 'https' is not supported"),
        ("s3://AKIAEXAMPLE:{secret}@bucket/student.pt", "s3://bucket/student.pt: s3:// URLs carry no credentials"),
    ],
)
def test_userinfo_in_a_model_url_is_refused_and_never_printed(tmp_path, photo, capsys, model, words):
    Image.fromarray(photo).save(tmp_path / "in.png")
    secret = "s3cr3t-Pa55"
    argv = ["--model", model.format(secret=secret), str(tmp_path / "in.png"), str(tmp_path / "o.png"), "--quiet"]
    assert lightbsr_upscale(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert words in err and secret not in err


def test_folder_url_in_and_out_of_s3_with_the_model_on_s3(s3_server, busy_student_file, photo, tmp_path):
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key="up/models/student.pt", Body=Path(busy_student_file).read_bytes())
    client.put_object(Bucket=s3_server.bucket, Key="up/in/a.png", Body=encode(photo, "PNG"))
    client.put_object(Bucket=s3_server.bucket, Key="up/in/b.webp", Body=encode(photo[::-1], "WEBP"))
    base = f"s3://{s3_server.bucket}/up"
    client.put_object(Bucket=s3_server.bucket, Key="up/ckpt_folder/model.pt", Body=Path(busy_student_file).read_bytes())
    # A folder runs on Ray Data, whose workers take the AWS settings of the process that starts Ray: a fresh one.
    command = [str(Path(sys.executable).with_name("lightbsr")), "upscale", "--model", f"{base}/models/student.pt"]
    env = {**os.environ, **s3_server.env()}
    done = subprocess.run([*command, f"{base}/in", f"{base}/out", "--quiet"], env=env, capture_output=True, text=True)
    assert done.returncode == EXIT_OK, done.stderr[-3000:]
    with s3_server.environment():
        assert (
            lightbsr_upscale(["--model", f"{base}/ckpt_folder", f"{base}/in/a.png", str(tmp_path / "f.png"), "--quiet"])
            == EXIT_OK
        )
        assert (
            lightbsr_upscale(["--model", busy_student_file, f"{base}/in/a.png", str(tmp_path / "a.png"), "--quiet"])
            == EXIT_OK
        )
    listed = client.list_objects_v2(Bucket=s3_server.bucket, Prefix="up/out/")
    assert sorted(o["Key"] for o in listed["Contents"]) == [
        "up/out/a.png",
        "up/out/b.webp",
        "up/out/upscale-report.json",
    ]
    body = client.get_object(Bucket=s3_server.bucket, Key="up/out/b.webp")["Body"].read()
    expected = upscale(busy_student(), torch.from_numpy(np.ascontiguousarray(photo[::-1]))).numpy()
    assert np.array_equal(read_rgb(body, "b.webp"), expected)
    assert np.array_equal(read_rgb(tmp_path / "a.png"), upscale(busy_student(), torch.from_numpy(photo)).numpy())
    assert np.array_equal(read_rgb(tmp_path / "f.png"), read_rgb(tmp_path / "a.png"))  # model from a folder URL


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(
        buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {})
    )
    return buffer.getvalue()
