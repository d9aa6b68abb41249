"""`lightbsr shards`: HR tiles of real photographs in parquet shards, locally and on real S3."""

import hashlib
import io
import json
import logging
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from lightbsr.images import ImageError, read_rgb
from tests.fixtures.images import bad_images, exif_rotated_jpeg
from workflows import storage
from workflows.cli import run
from workflows.config import load_config
from workflows.errors import EXIT_OK, EXIT_USAGE
from workflows.shards import MANIFEST_NAME, SHARD_SCHEMA, ShardsError, main, write_shards
from workflows.storage import StorageError

pytestmark = pytest.mark.unit

TILE = 128
PER_SHARD = 16
PHOTOS = ("chelsea", "coffee", "rocket")  # 3x2 + 4x3 + 5x3 = 33 tiles -> shards of 16, 16, 1


def make_cfg(*extra: str):
    return load_config(
        overrides=["data.patch_size=32", f"data.tile_size={TILE}", f"data.tiles_per_shard={PER_SHARD}", *extra]
    )


@pytest.fixture(scope="module")
def photo_dir(sample_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hr")
    for name in PHOTOS:
        shutil.copy(sample_images / "train" / f"{name}.png", folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def local_reference(photo_dir, tmp_path_factory):
    dst = tmp_path_factory.mktemp("reference") / "shards"
    manifest = write_shards(str(photo_dir), str(dst), make_cfg(), progress=False)
    return dst, manifest


def shard_files(folder):
    return sorted(p for p in folder.iterdir() if p.suffix == ".parquet")


def test_shards_hold_every_tile_of_every_photo_in_the_agreed_schema(photo_dir, local_reference):
    dst, manifest = local_reference
    table = pq.read_table([str(p) for p in shard_files(dst)])
    assert pq.read_schema(shard_files(dst)[0]) == SHARD_SCHEMA
    expected = 0
    for name in PHOTOS:
        height, width, _ = read_rgb(photo_dir / f"{name}.png").shape
        expected += (height // TILE) * (width // TILE)
    assert table.num_rows == expected == manifest.tiles == 33
    assert table["tile_id"].to_pylist() == list(range(expected))
    assert [p.name for p in shard_files(dst)] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [pq.read_metadata(p).num_rows for p in shard_files(dst)] == [16, 16, 1]
    sources = {name: read_rgb(photo_dir / f"{name}.png") for name in PHOTOS}
    for row in table.to_pylist():
        tile = np.asarray(Image.open(io.BytesIO(row["image"])))
        x, y = row["x"], row["y"]
        np.testing.assert_array_equal(tile, sources[row["source"].removesuffix(".png")][y : y + TILE, x : x + TILE])
        assert (row["height"], row["width"]) == (TILE, TILE)
        assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()


def test_manifest_counts_bytes_and_shards(local_reference):
    dst, _ = local_reference
    body = json.loads((dst / MANIFEST_NAME).read_text())
    assert body["complete"] and body["tile_size"] == TILE and body["tiles_per_shard"] == PER_SHARD
    assert body["counts"] == {"sources": 3, "images": 3, "skipped": 0, "tiles": 33, "shards": 3}
    files = shard_files(dst)
    assert body["bytes"]["shards"] == sum(p.stat().st_size for p in files)
    for entry, path in zip(body["shards"], files):
        assert entry["name"] == path.name and entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_input_gives_byte_identical_shards(photo_dir, local_reference, tmp_path):
    dst, _ = local_reference
    write_shards(str(photo_dir), f"file://{tmp_path}/again", make_cfg(), progress=False)
    again = tmp_path / "again"
    assert [p.read_bytes() for p in shard_files(again)] == [p.read_bytes() for p in shard_files(dst)]
    assert (again / MANIFEST_NAME).read_bytes() == (dst / MANIFEST_NAME).read_bytes()


def test_rerun_rewrites_nothing_and_a_lost_shard_only(photo_dir, tmp_path):
    dst = tmp_path / "shards"
    write_shards(str(photo_dir), str(dst), make_cfg(), progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    time.sleep(0.01)
    write_shards(str(photo_dir), str(dst), make_cfg(), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in dst.iterdir()} == mtimes
    lost = dst / "shard-00001.parquet"
    original = lost.read_bytes()
    lost.unlink()
    manifest = write_shards(str(photo_dir), str(dst), make_cfg(), progress=False)
    assert lost.read_bytes() == original and manifest.tiles == 33
    after = {p.name: p.stat().st_mtime_ns for p in dst.iterdir()}
    assert sorted(n for n in after if after[n] != mtimes.get(n)) == ["manifest.json", "shard-00001.parquet"]


def test_other_settings_on_an_existing_destination_are_refused(photo_dir, local_reference, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(local_reference[0], dst)
    with pytest.raises(ShardsError, match="other tiles_per_shard"):
        write_shards(str(photo_dir), str(dst), make_cfg("data.tiles_per_shard=8"), progress=False)


@pytest.fixture(scope="module")
def mixed_dir(sample_images, tmp_path_factory):
    """Two good photos, one EXIF-rotated photo and one bad file of every kind."""
    folder = tmp_path_factory.mktemp("mixed")
    china = read_rgb(sample_images / "train" / "china.png")
    for name in ("flower", "coffee"):
        shutil.copy(sample_images / "train" / f"{name}.png", folder / f"{name}.png")
    (folder / "turned").mkdir()
    (folder / "turned" / "rotated.jpg").write_bytes(exif_rotated_jpeg(np.ascontiguousarray(china[:256, :384])))
    (folder / "README.txt").write_text("not an image extension: ignored")
    expected = {}
    for name, (data, reason) in bad_images(china, (sample_images / "ATTRIBUTION").read_bytes()).items():
        (folder / "bad" / name).parent.mkdir(exist_ok=True)
        (folder / "bad" / name).write_bytes(data)
        expected[f"bad/{name}"] = reason
    return folder, expected, china


def test_every_bad_file_is_a_counted_skip_with_its_reason(mixed_dir, tmp_path, caplog):
    folder, expected, china = mixed_dir
    with caplog.at_level(logging.WARNING, logger="workflows.shards"):
        manifest = write_shards(str(folder), str(tmp_path / "shards"), make_cfg(), progress=False)
    assert {s.source: s.reason for s in manifest.skipped} == expected
    assert manifest.images == 3 and len(manifest.sources) == 3 + len(expected)
    body = json.loads((tmp_path / "shards" / MANIFEST_NAME).read_text())
    assert body["counts"]["skipped"] == len(expected)
    assert {s["source"]: s["reason"] for s in body["skipped"]} == expected
    for source in expected:
        assert any(source in r.getMessage() for r in caplog.records), source
    table = pq.read_table([str(p) for p in shard_files(tmp_path / "shards")])
    rotated = [r for r in table.to_pylist() if r["source"] == "turned/rotated.jpg"]
    assert [(r["x"], r["y"]) for r in rotated] == [(0, 0), (128, 0), (256, 0), (0, 128), (128, 128), (256, 128)]
    for row in rotated:  # upright: close to the photo it was made from (JPEG loss only)
        tile = np.asarray(Image.open(io.BytesIO(row["image"]))).astype(int)
        x, y = row["x"], row["y"]
        assert np.abs(tile - china[y : y + TILE, x : x + TILE]).mean() < 4


def test_a_single_bad_file_is_a_clear_error(mixed_dir, tmp_path, capsys):
    folder, _, _ = mixed_dir
    with pytest.raises(ImageError, match=r"cmyk\.jpg: cmyk"):
        write_shards(str(folder / "bad" / "cmyk.jpg"), str(tmp_path / "one"), make_cfg(), progress=False)
    code = run(
        main,
        [
            "--src",
            str(folder / "bad" / "truncated.png"),
            "--dst",
            str(tmp_path / "two"),
            "--set",
            "data.patch_size=32",
            "--tile-size",
            str(TILE),
            "-q",
        ],
        prog="lightbsr shards",
    )
    assert code == EXIT_USAGE
    assert "truncated.png: truncated" in capsys.readouterr().err
    assert not (tmp_path / "two" / "shard-00000.parquet").exists()


@pytest.mark.e2e
def test_shards_command_shows_progress_and_a_summary(photo_dir, tmp_path, capsys):
    code = run(
        main,
        [
            "--src",
            str(photo_dir),
            "--dst",
            str(tmp_path / "cli"),
            "--set",
            "data.patch_size=32",
            "--tile-size",
            str(TILE),
            "--tiles-per-shard",
            str(PER_SHARD),
        ],
        prog="lightbsr shards",
    )
    captured = capsys.readouterr()
    assert code == EXIT_OK
    assert "33 tiles in 3 shards" in captured.out and "from 3 images, 0 skipped" in captured.out
    assert "shards: 100%" in captured.err and "3/3" in captured.err
    assert run(main, ["--src", str(photo_dir), "--dst", str(tmp_path / "x"), "--tile-size", "8"]) == EXIT_USAGE
    assert "data.tile_size" in capsys.readouterr().err


def s3_objects(server, prefix):
    client = server.client()
    listed = client.list_objects_v2(Bucket=server.bucket, Prefix=prefix + "/").get("Contents", [])
    return {o["Key"].removeprefix(prefix + "/"): (o["ETag"], o["LastModified"]) for o in listed}


def s3_body(server, prefix, name):
    return server.client().get_object(Bucket=server.bucket, Key=f"{prefix}/{name}")["Body"].read()


@pytest.mark.integration
def test_s3_shards_match_the_local_run_byte_for_byte_and_hold_no_credentials(
    s3_server, photo_dir, local_reference, capfd, caplog
):
    local, _ = local_reference
    prefix = "shards-test/s3-run"
    dst = f"s3://{s3_server.bucket}/{prefix}"
    cfg = make_cfg(f"storage.s3.endpoint_url={s3_server.endpoint}")
    with s3_server.environment(), caplog.at_level(logging.DEBUG):
        src = f"s3://{s3_server.bucket}/shards-test/hr"
        for path in sorted(photo_dir.iterdir()):
            storage.atomic_write_bytes(storage.join(src, path.name), path.read_bytes())
        write_shards(src, dst, cfg, progress=True)
        first = s3_objects(s3_server, prefix)
        write_shards(src, dst, cfg, progress=True)  # rerun: nothing rewritten
        assert s3_objects(s3_server, prefix) == first
    names = [p.name for p in shard_files(local)] + [MANIFEST_NAME]
    assert sorted(first) == sorted(names)
    stored = {name: s3_body(s3_server, prefix, name) for name in names}
    assert stored == {name: (local / name).read_bytes() for name in names}
    captured = capfd.readouterr()
    ours = [r.getMessage() for r in caplog.records if r.name.startswith(("workflows", "lightbsr"))]
    texts = [captured.out, captured.err, *ours, *(b.decode("latin-1") for b in stored.values())]
    assert not any(s3_server.access_key in text or s3_server.secret_key in text for text in texts)
    assert s3_server.secret_key not in caplog.text  # botocore's own DEBUG log names the key id, never the secret


@pytest.mark.integration
def test_server_killed_mid_write_fails_clearly_and_keeps_finished_shards(s3_server_factory, photo_dir, local_reference):
    local, _ = local_reference
    server = s3_server_factory("lightbsr-crash")
    prefix = "crash/shards"
    dst = f"s3://{server.bucket}/{prefix}"
    cfg = make_cfg(
        f"storage.s3.endpoint_url={server.endpoint}", "storage.s3.retries=2", "storage.s3.connect_timeout_s=1"
    )
    finished = []

    def kill_after_first_shard(entry):
        finished.append(entry.name)
        server.kill()

    with server.environment():
        with pytest.raises(StorageError, match=r"could not write .*shard-00001\.parquet after 2 attempt\(s\)"):
            write_shards(str(photo_dir), dst, cfg, progress=False, on_shard=kill_after_first_shard)
        assert finished == ["shard-00000.parquet"]
        server.start()
        before = s3_objects(server, prefix)
        assert sorted(before) == ["manifest.json", "shard-00000.parquet"]
        fs, path = storage.filesystem(storage.join(dst, "shard-00000.parquet"), cfg.storage.s3)
        assert pq.read_table(path, filesystem=fs).num_rows == PER_SHARD
        assert not json.loads(s3_body(server, prefix, MANIFEST_NAME))["complete"]
        write_shards(str(photo_dir), dst, cfg, progress=False)
    after = s3_objects(server, prefix)
    assert after["shard-00000.parquet"] == before["shard-00000.parquet"]  # same ETag and time: not rewritten
    for path in shard_files(local):
        assert s3_body(server, prefix, path.name) == path.read_bytes()
    assert s3_body(server, prefix, MANIFEST_NAME) == (local / MANIFEST_NAME).read_bytes()
