"""Filesystems for local folders, `file://` and `s3://` URLs, built the same way everywhere.

The endpoint and region come from `cfg.storage.s3` (or AWS_ENDPOINT_URL / AWS_REGION); the
credentials only from the environment or the standard AWS chain, and they are never passed
through here, logged or written anywhere. Every call below makes at most `s3.retries`
attempts (a short back-off between them) and then fails with a `StorageError` that names the
URL and the operation. Writes are atomic: a local file is written under a temporary name and
renamed; an S3 object is sent in one PUT from a complete in-memory buffer, so a reader never
sees a partial object.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import botocore.exceptions
import fsspec
import pyarrow.fs as pafs

from lightbsr import files
from lightbsr.images import IMAGE_EXTENSIONS
from workflows.config import Config, S3Config
from workflows.urls import is_s3, join, local_path, redact, redact_text

__all__ = [
    "StorageError",
    "atomic_write_bytes",
    "exists",
    "filesystem",
    "fsspec_filesystem",
    "is_s3",
    "join",
    "list_files",
    "list_images",
    "ray_storage",
    "read_bytes",
    "redact",
    "retrying",
    "s3_endpoint",
    "s3_region",
    "size",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_NOT_RETRYABLE = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError, ValueError)
# What the client libraries raise for network, server and protocol failures: OSError (pyarrow, s3fs's
# translated errors, timeouts), botocore's own errors, aiohttp's (under s3fs).
_TRANSIENT: tuple[type[Exception], ...] = (
    OSError,
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    aiohttp.ClientError,
)
_BACKOFF_S = 0.25


class StorageError(OSError):
    """An object-store or filesystem operation that failed after its bounded retries."""


def _local_path(url: str) -> str:
    return str(local_path(url))


def _s3_path(url: str) -> str:
    """`s3://bucket/key` -> `bucket/key` (the form both pyarrow and s3fs take)."""
    return url.split("://", 1)[1].strip("/")


def s3_endpoint(cfg: S3Config | None) -> str | None:
    if cfg is not None and cfg.endpoint_url:
        return cfg.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region(cfg: S3Config | None) -> str:
    if cfg is not None and cfg.region:
        return cfg.region
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def _attempts(cfg: S3Config | None) -> int:
    return max(1, (cfg or S3Config()).retries)


def filesystem(url: str, s3_cfg: S3Config | None = None) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for `url` and the path to use with it (no scheme for S3)."""
    if not is_s3(url):
        return pafs.LocalFileSystem(), _local_path(url)
    cfg = s3_cfg or S3Config()
    endpoint = s3_endpoint(cfg)
    options: dict = {
        "region": s3_region(cfg),
        "connect_timeout": cfg.connect_timeout_s,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=_attempts(cfg)),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    return pafs.S3FileSystem(**options), _s3_path(url)


def fsspec_filesystem(url: str, s3_cfg: S3Config | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for `url` and the path to use with it (no scheme for S3).

    Retries are ours (see `retrying`), so s3fs and botocore each make a single attempt.
    """
    if not is_s3(url):
        return fsspec.filesystem("file"), _local_path(url)
    cfg = s3_cfg or S3Config()
    key = (s3_endpoint(cfg), s3_region(cfg), cfg.connect_timeout_s, _credentials_fingerprint())
    if key not in _S3FS_CACHE:
        _S3FS_CACHE[key] = _new_s3fs(cfg)
    return _S3FS_CACHE[key], _s3_path(url)


_S3FS_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}


def _credentials_fingerprint() -> str:
    """A digest of the credential variables, so a client is rebuilt when they change (never stored)."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
    return hashlib.sha256("\0".join(os.environ.get(n, "") for n in names).encode()).hexdigest()


def _new_s3fs(cfg: S3Config) -> fsspec.AbstractFileSystem:
    import s3fs

    fs = s3fs.S3FileSystem(
        endpoint_url=s3_endpoint(cfg),
        client_kwargs={"region_name": s3_region(cfg)},
        config_kwargs={
            "connect_timeout": cfg.connect_timeout_s,
            "retries": {"total_max_attempts": 1},
            "s3": {"addressing_style": "path"},
        },
        skip_instance_cache=True,
        use_listings_cache=False,  # other processes write here too
    )
    fs.retries = 1
    return fs


def retrying(what: str, url: str, call: Callable[[], T], s3_cfg: S3Config | None = None) -> T:
    """Run `call` up to `s3.retries` times; a missing file fails at once (FileNotFoundError)."""
    attempts = _attempts(s3_cfg)
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except _NOT_RETRYABLE:
            raise
        except PermissionError as error:
            raise StorageError(
                f"{what} {redact(url)}: access denied ({redact_text(str(error))}); check the credentials in the "
                "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS profile)"
            ) from None
        except _TRANSIENT as error:
            if attempt == attempts:
                raise StorageError(
                    f"could not {what} {redact(url)} after {attempts} attempt(s): "
                    f"{type(error).__name__}: {redact_text(str(error))}"
                ) from error
            log.warning(
                "%s %s failed (attempt %d of %d): %s", what, redact(url), attempt, attempts, redact_text(str(error))
            )
            time.sleep(_BACKOFF_S * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def exists(url: str, s3_cfg: S3Config | None = None) -> bool:
    fs, path = fsspec_filesystem(url, s3_cfg)
    return retrying("check", url, lambda: fs.exists(path), s3_cfg)


def size(url: str, s3_cfg: S3Config | None = None) -> int:
    fs, path = fsspec_filesystem(url, s3_cfg)
    return int(retrying("stat", url, lambda: fs.size(path), s3_cfg))


def read_bytes(url: str, s3_cfg: S3Config | None = None) -> bytes:
    fs, path = fsspec_filesystem(url, s3_cfg)
    return retrying("read", url, lambda: fs.cat_file(path), s3_cfg)


def list_files(url: str, s3_cfg: S3Config | None = None) -> list[str]:
    """Every file under `url` as paths relative to it (posix, sorted); `[""]` when `url` is a file."""
    fs, root = fsspec_filesystem(url, s3_cfg)

    def walk() -> list[str]:
        if fs.isfile(root):
            return [""]
        if not fs.isdir(root):
            raise FileNotFoundError(f"{redact(url)} does not exist")
        prefix = root.rstrip("/") + "/"
        return sorted(path[len(prefix) :] for path in fs.find(root) if path.startswith(prefix))

    return retrying("list", url, walk, s3_cfg)


def list_images(url: str, s3_cfg: S3Config | None = None) -> list[str]:
    """The image files (by extension) under the folder `url`, as paths relative to it (posix, sorted)."""
    return [name for name in list_files(url, s3_cfg) if name.lower().endswith(IMAGE_EXTENSIONS)]


def ray_storage(cfg: Config, *parts: str) -> dict[str, Any]:
    """`storage_path` and `storage_filesystem` of `cfg.url(*parts)` for a Ray `RunConfig` (Train and Tune).

    For `s3://` the filesystem carries the configured endpoint, region, retries and connect
    timeout, and the path has no scheme (Ray resolves it on that filesystem); a local folder is
    an absolute path with no filesystem (Ray's own local one).
    """
    url = cfg.url(*parts)
    if is_s3(url):
        fs, path = filesystem(url, cfg.storage.s3)
        return {"storage_path": path, "storage_filesystem": fs}
    return {"storage_path": _local_path(url), "storage_filesystem": None}


def atomic_write_bytes(url: str, data: bytes, s3_cfg: S3Config | None = None) -> None:
    """Write `data` so that `url` either holds all of it or is untouched."""
    if is_s3(url):
        fs, path = fsspec_filesystem(url, s3_cfg)
        try:
            retrying("write", url, lambda: fs.pipe_file(path, data), s3_cfg)
        except FileNotFoundError:
            raise StorageError(f"could not write {redact(url)}: bucket {path.split('/')[0]!r} does not exist") from None
        return
    retrying("write", url, lambda: _atomic_local_write(Path(_local_path(url)), data), s3_cfg)


def _atomic_local_write(path: Path, data: bytes) -> None:
    files.atomic_write_bytes(path, data)
