"""`workflows.storage` against local folders and a real SeaweedFS S3 server."""

import pyarrow.fs as pafs
import pytest

from tests.fixtures.s3_server import free_ports
from workflows import storage
from workflows.config import S3Config, load_config
from workflows.storage import StorageError

pytestmark = pytest.mark.unit


def test_join_keeps_urls_and_local_paths_apart(tmp_path):
    assert storage.join("s3://bucket/prefix/", "shards", "/x.parquet") == "s3://bucket/prefix/shards/x.parquet"
    assert storage.join(str(tmp_path), "a", "b.png") == str(tmp_path / "a" / "b.png")
    assert storage.redact("s3://key:secret@bucket/p") == "s3://bucket/p"


def test_local_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    url = f"file://{tmp_path}/deep/er/blob.bin"
    storage.atomic_write_bytes(url, b"first")
    storage.atomic_write_bytes(url, b"second, longer")
    assert storage.read_bytes(url) == b"second, longer"
    assert storage.exists(url) and storage.size(url) == len(b"second, longer")
    assert [p.name for p in (tmp_path / "deep" / "er").iterdir()] == ["blob.bin"]
    assert storage.list_files(str(tmp_path)) == ["deep/er/blob.bin"]
    assert storage.list_files(url) == [""]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing.bin"))


def test_list_images_keeps_image_files_only(tmp_path):
    for name in ("b.png", "a/c.JPG", "a/notes.txt", "d.webp", "ATTRIBUTION"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert storage.list_images(str(tmp_path)) == ["a/c.JPG", "b.png", "d.webp"]


def test_ray_storage_is_an_absolute_local_path_or_a_configured_s3_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = storage.ray_storage(load_config(None, ["storage.root=runs"]), "tune")
    assert local == {"storage_path": str(tmp_path / "runs" / "tune"), "storage_filesystem": None}
    cfg = load_config(None, ["storage.root=s3://bucket/pre/", "storage.s3.region=eu-west-3"])
    remote = storage.ray_storage(cfg, "tune")
    assert remote["storage_path"] == "bucket/pre/tune"  # no scheme: Ray resolves it on the filesystem
    assert isinstance(remote["storage_filesystem"], pafs.S3FileSystem)
    assert remote["storage_filesystem"].region == "eu-west-3"


@pytest.mark.integration
def test_s3_round_trip_with_credentials_from_the_environment(s3_server):
    base = f"s3://{s3_server.bucket}/storage-test"
    with s3_server.environment():
        storage.atomic_write_bytes(storage.join(base, "a", "one.bin"), b"1" * 1000)
        storage.atomic_write_bytes(storage.join(base, "two.bin"), b"22")
        assert storage.list_files(base) == ["a/one.bin", "two.bin"]
        assert storage.read_bytes(storage.join(base, "two.bin")) == b"22"
        assert storage.exists(storage.join(base, "a", "one.bin"))
        assert not storage.exists(storage.join(base, "three.bin"))
        fs, path = storage.filesystem(storage.join(base, "a", "one.bin"))
        assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_server.bucket}/storage-test/a/one.bin"
        with fs.open_input_stream(path) as stream:
            assert stream.read() == b"1" * 1000
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key="storage-test/two.bin")["Body"].read()
    assert body == b"22"


@pytest.mark.integration
def test_endpoint_from_the_config_overrides_the_environment(s3_server, monkeypatch):
    with s3_server.environment():
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
        cfg = S3Config(endpoint_url=s3_server.endpoint, retries=1)
        url = f"s3://{s3_server.bucket}/storage-test/cfg.bin"
        storage.atomic_write_bytes(url, b"cfg", cfg)
        assert storage.read_bytes(url, cfg) == b"cfg"
        fs, path = storage.filesystem(url, cfg)
        assert fs.get_file_info(path).size == 3


@pytest.mark.integration
def test_a_wrong_secret_is_a_clear_error_that_does_not_echo_it(s3_server, monkeypatch):
    wrong = "not-the-secret-" + "x" * 20
    with s3_server.environment():
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        with pytest.raises(StorageError) as caught:
            storage.atomic_write_bytes(f"s3://{s3_server.bucket}/storage-test/denied.bin", b"x", S3Config(retries=1))
    message = str(caught.value)
    assert "storage-test/denied.bin" in message
    assert wrong not in message and s3_server.secret_key not in message


def test_an_unreachable_endpoint_fails_after_the_configured_attempts(caplog, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "someone")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "something")
    (port,) = free_ports(1)
    cfg = S3Config(endpoint_url=f"http://127.0.0.1:{port}", retries=3, connect_timeout_s=1)
    with pytest.raises(StorageError, match=r"could not write s3://b/k\.bin after 3 attempt\(s\)") as caught:
        storage.atomic_write_bytes("s3://b/k.bin", b"x", cfg)
    assert "EndpointConnectionError" in str(caught.value)
    assert len([r for r in caplog.records if "attempt" in r.getMessage()]) == 2
