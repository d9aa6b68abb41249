"""`lightbsr upscale` over an `s3://` prefix: Ray Data batch on a real SeaweedFS, against the one-image path."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lightbsr.images import read_rgb
from workflows.batch import REPORT_NAME, Failure, upscale_batch
from workflows.config import load_config
from workflows.upscale import upscale_all

pytestmark = pytest.mark.integration

PREFIX = "batch-test"
#: name below SRC -> (Pillow format, options)
GOOD = {
    "a.png": ("PNG", {}),
    "sub/b.jpg": ("JPEG", {"quality": 90}),
    "c.webp": ("WEBP", {"lossless": True}),
}
BROKEN = "d_broken.png"


@pytest.fixture(scope="module")
def inputs(sample_images, tmp_path_factory) -> Path:
    """SRC as a local folder: three real photo crops in three formats and one truncated PNG."""
    folder = tmp_path_factory.mktemp("batch-in")
    photo = read_rgb(sample_images / "eval" / "kodim23.png")
    for i, (name, (fmt, options)) in enumerate(GOOD.items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        crop = photo[40 * i : 40 * i + 40, 60 * i : 60 * i + 56]  # (40, 56, 3), a different crop each
        Image.fromarray(np.ascontiguousarray(crop)).save(folder / name, format=fmt, **options)
    buffer = io.BytesIO()
    Image.fromarray(photo[:40, :40]).save(buffer, format="PNG")
    (folder / BROKEN).write_bytes(buffer.getvalue()[:60])  # a header, then nothing
    return folder


@pytest.fixture(scope="module")
def first_run(ray_local, s3_server, inputs, busy_student_file):
    """The batch over s3://<bucket>/batch-test/in -> .../out: (config, report, the report file's JSON)."""
    client = s3_server.client()
    for path in sorted(p for p in inputs.rglob("*") if p.is_file()):
        client.put_object(
            Bucket=s3_server.bucket, Key=f"{PREFIX}/in/{path.relative_to(inputs).as_posix()}", Body=path.read_bytes()
        )
    cfg = load_config(None, [f"storage.s3.endpoint_url={s3_server.endpoint}", "evaluate.actors=2"])
    base = f"s3://{s3_server.bucket}/{PREFIX}"
    with s3_server.environment():
        report = upscale_batch(
            busy_student_file,
            f"{base}/in",
            f"{base}/out",
            cfg,
            progress=False,
            runtime_env={"env_vars": s3_server.env()},
        )
    written = json.loads(client.get_object(Bucket=s3_server.bucket, Key=f"{PREFIX}/out/{REPORT_NAME}")["Body"].read())
    return cfg, report, written


def s3_object(s3_server, key: str) -> bytes:
    return s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()


def test_batch_outputs_equal_the_one_image_path_byte_for_byte(
    first_run, s3_server, inputs, busy_student_file, tmp_path
):
    cfg, report, _ = first_run
    assert report.written == sorted(GOOD)
    for name in GOOD:
        out = tmp_path / "one" / Path(name).parent
        (single,) = upscale_all(busy_student_file, str(inputs / name), str(out) + "/", cfg, progress=False)
        expected = Path(single).read_bytes()
        key = f"{PREFIX}/out/{(Path(name).parent / Path(single).name).as_posix()}"
        assert s3_object(s3_server, key) == expected, name
    with Image.open(io.BytesIO(s3_object(s3_server, f"{PREFIX}/out/sub/b.jpg"))) as image:
        assert image.format == "JPEG" and image.size == (112, 80)  # format kept, twice the size


def test_a_bad_file_is_counted_and_listed_in_the_report_and_the_others_are_written(first_run, s3_server):
    _, report, written = first_run
    assert [item.source for item in report.failed] == [BROKEN]
    assert "truncated" in report.failed[0].reason or "not an image" in report.failed[0].reason
    assert written["counts"] == {"inputs": 4, "written": 3, "skipped": 0, "failed": 1}
    assert written["failed"] == [{"source": BROKEN, "reason": report.failed[0].reason}]
    keys = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix=f"{PREFIX}/out/")["Contents"]
    assert sorted(o["Key"] for o in keys) == sorted(
        [f"{PREFIX}/out/{n}" for n in ("a.png", "c.webp", "sub/b.jpg", REPORT_NAME)]
    )  # nothing for the broken file, no temporary leftovers
    assert f"failed {BROKEN}: " in report.summary() and "3 written" in report.summary()


def test_a_rerun_skips_every_finished_image_without_reading_or_rewriting_it(first_run, s3_server, busy_student_file):
    cfg, _, _ = first_run
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key=f"{PREFIX}/out/a.png", Body=b"left alone")  # a rewrite would show
    base = f"s3://{s3_server.bucket}/{PREFIX}"
    with s3_server.environment():
        again = upscale_batch(
            busy_student_file,
            f"{base}/in",
            f"{base}/out",
            cfg,
            progress=False,
            runtime_env={"env_vars": s3_server.env()},
        )
    assert (again.inputs, again.skipped, again.written) == (4, 3, [])
    assert again.failed == [Failure(BROKEN, again.failed[0].reason)]  # still bad, tried again, still listed
    assert s3_object(s3_server, f"{PREFIX}/out/a.png") == b"left alone"
    assert json.loads(s3_object(s3_server, f"{PREFIX}/out/{REPORT_NAME}"))["counts"]["skipped"] == 3
