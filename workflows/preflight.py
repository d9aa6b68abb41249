"""Fast checks of a validated config against the world, run before any training starts.

`load_config` already rejects unknown keys and wrong types. What it cannot see is whether the
places the config names exist: an object store that does not answer, an MLflow server that is
down, a data folder with a typo, GPUs asked for where there are none. Each of those would
otherwise surface minutes into a run (or hang a placement group forever); here each one is a
`ConfigError` within seconds that names the key to fix.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from collections.abc import Collection
from pathlib import Path
from urllib.parse import urlsplit

from workflows.config import Config, ConfigError
from workflows.urls import is_remote

__all__ = ["check", "check_endpoints", "check_folders", "check_gpu", "check_tracking"]

# Config keys whose values are read as inputs (they must exist before the run).
INPUT_FOLDER_KEYS = ("data.train_images", "data.eval_images", "data.benchmarks")
# Every key that may hold a URL the run reads or writes.
URL_KEYS = (
    "storage.root",
    "data.train_images",
    "data.eval_images",
    "data.benchmarks",
    "data.shards",
    "train.teacher_checkpoint",
)
MAX_PROBE_S = 10.0


def check(cfg: Config, *, skip: Collection[str] = ()) -> None:
    """Raise ConfigError naming the key if a store, folder, tracking server or GPU is not there.

    `skip` names keys not to check, e.g. the image folders a pipeline step is about to create
    ("tracking.uri" and "train.use_gpu" skip the tracking and GPU checks of commands that use neither).
    With train.use_gpu the GPU check asks the Ray cluster (joining `ray.address` / RAY_ADDRESS
    first, as the run would) or, with no cluster, torch about this machine.
    """
    check_folders(cfg, skip=skip)
    check_endpoints(cfg, skip=skip)
    if "tracking.uri" not in skip:
        check_tracking(cfg)
    if "train.use_gpu" not in skip:
        check_gpu(cfg)


def _value(cfg: Config, key: str) -> str | None:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _local_path(url: str) -> Path:
    return Path(url.removeprefix("file://"))


# ---- local folders -------------------------------------------------------------------------


def check_folders(cfg: Config, *, skip: Collection[str] = ()) -> None:
    """Input folders exist, the teacher checkpoint exists, the storage root can be written."""
    for key in INPUT_FOLDER_KEYS:
        url = _value(cfg, key)
        if key in skip or url is None or is_remote(url):
            continue
        if not _local_path(url).is_dir():
            raise ConfigError(f"{key}: folder {url} does not exist")
    checkpoint = cfg.train.teacher_checkpoint
    if "train.teacher_checkpoint" not in skip and checkpoint and not is_remote(checkpoint):
        if not _local_path(checkpoint).exists():
            raise ConfigError(f"train.teacher_checkpoint: {checkpoint} does not exist")
    if "storage.root" not in skip and not is_remote(cfg.storage.root):
        _check_writable("storage.root", _local_path(cfg.storage.root))


def _check_writable(key: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot create or write {path} ({existing} is not writable)")


# ---- object stores and remote data ---------------------------------------------------------


def s3_endpoint(cfg: Config) -> tuple[str, str]:
    """The endpoint `s3://` URLs go to (resolved as `workflows.storage` does) and its source."""
    from workflows import storage

    endpoint = storage.s3_endpoint(cfg.storage.s3)
    if cfg.storage.s3.endpoint_url:
        return endpoint, "storage.s3.endpoint_url"
    if endpoint:
        name = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
        return endpoint, f"the {name} environment variable (storage.s3.endpoint_url is unset)"
    region = storage.s3_region(cfg.storage.s3)
    return f"https://s3.{region}.amazonaws.com", f"AWS S3 in {region} (storage.s3.endpoint_url is unset)"


def _endpoint_of(url: str, cfg: Config) -> tuple[str, str] | None:
    scheme = urlsplit(url).scheme
    if scheme in ("s3", "s3a"):
        return s3_endpoint(cfg)
    if scheme in ("http", "https"):
        return url, "the URL itself"
    return None


def check_endpoints(cfg: Config, *, skip: Collection[str] = ()) -> None:
    """Every remote URL in the config has an endpoint that accepts a TCP connection."""
    users: dict[str, list[str]] = {}
    origin: dict[str, str] = {}
    for key in URL_KEYS:
        url = _value(cfg, key)
        if key in skip or url is None or not is_remote(url):
            continue
        found = _endpoint_of(url, cfg)
        if found is None:
            continue
        endpoint, source = found
        users.setdefault(endpoint, []).append(f"{key}={url}")
        origin[endpoint] = source
    timeout = min(cfg.storage.s3.connect_timeout_s, MAX_PROBE_S)
    for endpoint, keys in users.items():
        problem = probe_tcp(endpoint, timeout)
        if problem:
            where = f"endpoint {endpoint} (from {origin[endpoint]})"
            raise ConfigError(f"{', '.join(keys)}: {where} is not reachable: {problem}")


def probe_tcp(url: str, timeout: float) -> str | None:
    """None if host:port of `url` accepts a connection within `timeout` seconds, else why not."""
    parts = urlsplit(url)
    if not parts.hostname:
        return f"{url!r} has no host name"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as error:
        return str(error)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except socket.gaierror as error:
        return f"cannot resolve host {parts.hostname!r} ({error.strerror})"
    except TimeoutError:
        return f"no answer from {parts.hostname}:{port} within {timeout:g} s"
    except OSError as error:
        return f"{parts.hostname}:{port}: {error.strerror or error}"


# ---- MLflow --------------------------------------------------------------------------------


def check_tracking(cfg: Config) -> None:
    """An http(s) tracking URI answers HTTP (any status: auth proxies may say 401)."""
    uri = cfg.tracking_uri  # raises ConfigError itself when no URI can be derived
    key = "tracking.uri" if cfg.tracking.uri else "tracking.uri (unset; taken from MLFLOW_TRACKING_URI)"
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    timeout = min(cfg.storage.s3.connect_timeout_s, MAX_PROBE_S)
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ConfigError(f"{key}: MLflow tracking server {uri} is not reachable: {reason}") from None


# ---- GPUs ----------------------------------------------------------------------------------


def check_gpu(cfg: Config) -> None:
    """train.use_gpu needs one GPU per train worker where the workers will run."""
    if not cfg.train.use_gpu:
        return
    needed = cfg.train.worker_counts.start
    available, where = _gpus_available(cfg)
    if available < 1:
        raise ConfigError(f"train.use_gpu is true but {where} has no GPU")
    if available < needed:
        raise ConfigError(
            f"train.num_workers ({needed}) with train.use_gpu needs {needed} GPUs but {where} has at most {available:g}"
        )


def _gpus_available(cfg: Config) -> tuple[float, str]:
    """(the most GPUs the run can get, where): the Ray cluster's, else this machine's."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized() and address:
        _connect_ray(cfg, address)
    if ray.is_initialized():
        return _ray_gpus(ray), "the Ray cluster"
    import torch

    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), "this machine"


def _connect_ray(cfg: Config, address: str) -> None:
    """Join the configured cluster now (the run would next); a GPU-less head says nothing."""
    from workflows.runtime import init_ray

    key = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
    if address not in ("auto", "local"):
        url = address if "://" in address else f"tcp://{address}"
        problem = probe_tcp(url, MAX_PROBE_S)  # ray.init itself retries for minutes
        if problem:
            raise ConfigError(f"{key}: the Ray cluster at {address} is not reachable: {problem}")
    try:
        init_ray(cfg.ray)
    except Exception as error:  # ConnectionError, RuntimeError (auth), ValueError (bad address)
        raise ConfigError(f"{key}: cannot connect to the Ray cluster at {address}: {error}") from None


def _ray_gpus(ray) -> float:
    """The most GPUs the cluster can offer: its autoscaler's ceiling if it has one, else what it has.

    An autoscaling cluster may have no GPU node up yet; its configured node groups say how many
    it can launch (the figure Ray Train itself checks before placing workers).
    """
    try:
        from ray._private.state import state

        ceiling = state.get_max_resources_from_cluster_config()
    except Exception:  # internal API: fall back to what is there now
        ceiling = None
    if ceiling:
        return float(ceiling.get("GPU", 0))
    return float(ray.cluster_resources().get("GPU", 0))
