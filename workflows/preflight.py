"""Fast checks of a validated config against the world, run before any training starts.

`load_config` already rejects unknown keys and wrong types. What it cannot see is whether the
places the config names exist: an object store that does not answer, a bucket that is missing or
credentials it refuses, an MLflow server that is down, a data folder with a typo, a local folder
or sqlite store on a cluster whose nodes do not share a disk, fewer CPUs or GPUs than the run
needs. Each of those would otherwise surface minutes into a run (or hang a placement group
forever); here each one is a `ConfigError` within seconds that names the key to fix. Every
network call is bounded (`MAX_PROBE_S`), and no message carries a URL's credentials.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os
import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from workflows.config import Config, ConfigError
from workflows.urls import is_remote, is_s3, local_path, redact, redact_text

__all__ = [
    "check",
    "check_cluster",
    "check_cpus",
    "check_endpoints",
    "check_folders",
    "check_gpu",
    "check_s3_access",
    "check_tracking",
]

T = TypeVar("T")
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
# Tracking-URI schemes that name a store on the local disk of whichever node opens it.
LOCAL_TRACKING_SCHEMES = ("", "file", "sqlite")
MISSING = "missing"


def check(cfg: Config, *, skip: Collection[str] = ()) -> None:
    """Raise ConfigError naming the key if a store, folder, tracking server, GPU or CPU is not there.

    `skip` names keys not to check, e.g. the image folders a pipeline step is about to create;
    "tracking.uri" skips the tracking check and "ray" the cluster and GPU checks, for commands
    that use neither. With `ray.address` / RAY_ADDRESS the cluster is joined first (the run would
    join it next) and asked how many nodes, CPUs and GPUs it has.
    """
    check_folders(cfg, skip=skip)
    check_endpoints(cfg, skip=skip)
    check_s3_access(cfg, skip=skip)
    if "tracking.uri" not in skip:
        check_tracking(cfg)
    if "ray" not in skip:
        check_cluster(cfg, skip=skip)
        check_gpu(cfg)


def _value(cfg: Config, key: str) -> str | None:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _bounded(call: Callable[[], T], seconds: float, what: str) -> T:
    """`call()` in a helper thread; a ConfigError saying `what` did not answer after `seconds`.

    Client libraries bound connecting but not always name resolution or a server that accepts
    the connection and never answers; the thread is left to finish on its own.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call).result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise ConfigError(f"{what}: no answer within {seconds:g} s") from None
    finally:
        pool.shutdown(wait=False)


# ---- local folders -------------------------------------------------------------------------


def check_folders(cfg: Config, *, skip: Collection[str] = ()) -> None:
    """Input folders exist, the teacher checkpoint exists, the storage root can be written."""
    for key in INPUT_FOLDER_KEYS:
        url = _value(cfg, key)
        if key in skip or url is None or is_remote(url):
            continue
        if not local_path(url).is_dir():
            raise ConfigError(f"{key}: folder {local_path(url)} does not exist")
    checkpoint = cfg.train.teacher_checkpoint or ""
    local_checkpoint = checkpoint and not is_remote(checkpoint)
    if "train.teacher_checkpoint" not in skip and local_checkpoint and not local_path(checkpoint).exists():
        raise ConfigError(f"train.teacher_checkpoint: {checkpoint} does not exist")
    if "storage.root" not in skip and not is_remote(cfg.storage.root):
        _check_writable("storage.root", local_path(cfg.storage.root))


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
        return cfg.storage.s3.endpoint_url, "storage.s3.endpoint_url"
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


def _probe_timeout(cfg: Config) -> float:
    return min(cfg.storage.s3.connect_timeout_s, MAX_PROBE_S)


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
        users.setdefault(endpoint, []).append(f"{key}={redact(url)}")
        origin[endpoint] = source
    timeout = _probe_timeout(cfg)
    for endpoint, keys in users.items():
        where = f"{', '.join(keys)}: endpoint {redact(endpoint)} (from {origin[endpoint]})"
        problem = _bounded(functools.partial(probe_tcp, endpoint, timeout), timeout + 1, f"{where} is not reachable")
        if problem:
            raise ConfigError(f"{where} is not reachable: {redact_text(problem)}")


def probe_tcp(url: str, timeout: float) -> str | None:
    """None if host:port of `url` accepts a connection within `timeout` seconds, else why not."""
    parts = urlsplit(url)
    if not parts.hostname:
        return f"{redact(url)!r} has no host name"
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


def check_s3_access(cfg: Config, *, skip: Collection[str] = ()) -> None:
    """One real request per bucket (its existence and our credentials), then the S3 inputs exist.

    A TCP answer says nothing about the bucket or the keys; without this a missing bucket or a
    wrong secret surfaces at the first checkpoint or shard read, minutes (or an epoch) in.
    """
    from workflows import storage

    urls = {key: url for key in URL_KEYS if key not in skip and (url := _value(cfg, key)) and is_s3(url)}
    endpoint, source = s3_endpoint(cfg)
    timeout = _probe_timeout(cfg) + 1
    checked: set[str] = set()
    for key, url in urls.items():
        fs, path = storage.fsspec_filesystem(url, cfg.storage.s3)
        bucket = path.split("/")[0]
        if bucket in checked:
            continue
        checked.add(bucket)
        where = f"{key}={redact(url)}: bucket {bucket!r} at {redact(endpoint)} (from {source})"
        problem = _bounded(functools.partial(_s3_problem, fs, bucket), timeout, where)
        if problem == MISSING:
            raise ConfigError(f"{where} does not exist; create it or fix the bucket name")
        if problem:
            raise ConfigError(f"{where}: {problem}")
    for key in (*INPUT_FOLDER_KEYS, "train.teacher_checkpoint"):
        url = urls.get(key)
        if url is None:
            continue
        fs, path = storage.fsspec_filesystem(url, cfg.storage.s3)
        where = f"{key}: {redact(url)}"
        problem = _bounded(functools.partial(_s3_problem, fs, path), timeout, where)
        if problem:
            raise ConfigError(f"{where} does not exist" if problem == MISSING else f"{where}: {problem}")


def _s3_problem(fs: Any, path: str) -> str | None:
    """None if `path` (a bucket, a prefix or an object) exists and may be read; MISSING; or what
    went wrong, in words that name no credential."""
    import botocore.exceptions

    check_credentials = (
        "check the credentials in the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
        "the AWS profile or the instance role)"
    )
    try:
        fs.ls(path, detail=False) if "/" not in path else fs.info(path)
    except FileNotFoundError:
        return MISSING
    except PermissionError as error:
        return f"access denied ({redact_text(str(error)) or 'Forbidden'}); {check_credentials}"
    except botocore.exceptions.NoCredentialsError:
        return f"no S3 credentials found; {check_credentials}"
    except (OSError, botocore.exceptions.BotoCoreError) as error:
        return f"the request failed: {type(error).__name__}: {redact_text(str(error))}"
    return None


# ---- MLflow --------------------------------------------------------------------------------


def _tracking_key(cfg: Config) -> str:
    return "tracking.uri" if cfg.tracking.uri else "tracking.uri (unset; taken from MLFLOW_TRACKING_URI)"


def check_tracking(cfg: Config) -> None:
    """An http(s) tracking URI answers HTTP (any status: auth proxies may say 401)."""
    uri = cfg.tracking_uri  # raises ConfigError itself when no URI can be derived
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    key = _tracking_key(cfg)
    timeout = _probe_timeout(cfg)
    where = f"{key}: MLflow tracking server {redact(uri)}"
    health = f"{redact(uri).rstrip('/')}/health"  # any answer will do, so no credentials are sent
    problem = _bounded(functools.partial(_http_problem, health, timeout), timeout + 1, where)
    if problem:
        raise ConfigError(f"{where} is not reachable: {redact_text(problem)}")


def _http_problem(url: str, timeout: float) -> str | None:
    """None if `url` answers HTTP at all within `timeout`, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as error:
        return str(getattr(error, "reason", error))


# ---- the Ray cluster: shared storage, CPUs and GPUs ----------------------------------------


def check_cluster(cfg: Config, *, skip: Collection[str] = ()) -> None:
    """On a cluster of several nodes, storage and tracking must be shared; the run must fit.

    Joins the cluster named by `ray.address` / RAY_ADDRESS (or uses the Ray this process already
    runs). Without one, a local Ray will be started with `ray.num_cpus` CPUs, which must fit.
    """
    ray = _cluster(cfg)
    if ray is None:
        if cfg.ray.num_cpus is not None:
            check_cpus(cfg, [{"CPU": float(cfg.ray.num_cpus)}], "the local Ray (ray.num_cpus)")
        return
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    if len(nodes) > 1:
        _check_shared_storage(cfg, len(nodes), skip)
        _check_shared_tracking(cfg, len(nodes))
    # An autoscaler's nodes that are not up yet are not counted (Ray offers no public way to ask
    # for its ceiling): the message says so.
    check_cpus(cfg, nodes, f"the Ray cluster ({len(nodes)} alive node(s); nodes still starting are not counted)")


def _cluster(cfg: Config) -> Any:
    """The `ray` module joined to the run's cluster, or None when the run will start a local Ray."""
    import ray

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized() and address:
        _connect_ray(cfg, address)
    return ray if ray.is_initialized() else None


def _check_shared_storage(cfg: Config, nodes: int, skip: Collection[str]) -> None:
    """A local storage.root on several nodes only when the user says it is a shared mount: preflight
    cannot tell one from a local disk, and a wrong guess loses checkpoints (or hides them on one node)."""
    if "storage.root" in skip or is_remote(cfg.storage.root) or cfg.storage.shared_filesystem:
        return
    raise ConfigError(
        f"storage.root: {cfg.storage.root} is a folder on this machine, but the Ray cluster has {nodes} nodes: "
        "checkpoints a worker writes on its node would be missing on the others (and lost with that node). "
        "Use an object store every node reaches, e.g. storage.root=s3://bucket/prefix "
        "(with storage.s3.endpoint_url for MinIO, SeaweedFS or Ceph); if the folder is a shared mount at the "
        "same path on every node (NFS, EFS), say so with storage.shared_filesystem=true"
    )


def _check_shared_tracking(cfg: Config, nodes: int) -> None:
    uri = cfg.tracking_uri
    if urlsplit(uri).scheme not in LOCAL_TRACKING_SCHEMES:
        return
    derived = not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))
    key = "tracking.uri (unset: a sqlite file under storage.root)" if derived else _tracking_key(cfg)
    raise ConfigError(
        f"{key}: {redact(uri)} is an MLflow store on one machine's disk, but the Ray cluster has {nodes} nodes: "
        "rank 0 may run on another node and open an empty store of its own. Start an MLflow tracking server "
        "(`mlflow server ...`) and set tracking.uri (or MLFLOW_TRACKING_URI) to its http(s):// address"
    )


STREAM_READ_CPUS = 1.0  # Ray Data's read task of the training stream, beside the chunk makers


def stream_cpus(cfg: Config) -> float:
    """CPUs the training stream declares: `data.data_cpus` for the chunk makers plus one for Ray Data's read."""
    return cfg.data.data_cpus + STREAM_READ_CPUS


def _stream_recipe(cfg: Config) -> str:
    return f"data.data_cpus ({cfg.data.data_cpus:g}) + {STREAM_READ_CPUS:g} for Ray Data's read"


def check_cpus(cfg: Config, nodes: list[dict[str, float]], where: str, *, with_stream: bool = True) -> None:
    """The smallest allowed worker group fits on the nodes (each worker on one node) and leaves the
    data stream its CPUs (`stream_cpus`).

    Without them Ray Train waits for its workers without end (it retries the group every minute),
    or the stream does: the workers and chunk makers start first, and a read task that finds no
    CPU left waits forever with zero rows.
    """
    workers, per_worker = cfg.train.worker_counts.start, cfg.train.cpus_per_worker
    data = stream_cpus(cfg) if with_stream else 0.0
    total = sum(node.get("CPU", 0.0) for node in nodes)
    needed = workers * per_worker + data
    recipe = f"train.num_workers ({workers}) x train.cpus_per_worker ({per_worker:g})"
    if with_stream:
        recipe += f" + {_stream_recipe(cfg)}"
    if total + 1e-9 < needed:
        raise ConfigError(
            f"{recipe} = {needed:g} CPUs, but {where} has {total:g}: {needed - total:g} CPU(s) missing. "
            "Lower those keys or add CPUs; without them the run would wait forever for a CPU"
        )
    fit = sum(workers_on_node(cfg, node) for node in nodes)
    if fit < workers:
        custom = f" and train.worker_resources ({cfg.train.worker_resources})" if cfg.train.worker_resources else ""
        raise ConfigError(
            f"train.num_workers ({workers}) x train.cpus_per_worker ({per_worker:g}){custom}: a worker's resources "
            f"must be on one node, and the nodes of {where} hold only {fit} such worker(s)"
        )


def elastic_maximum(cfg: Config, nodes: list[dict[str, float]]) -> int:
    """The most train workers a run may scale to on `nodes`: the maximum of `train.num_workers`, lowered
    so that the workers' CPUs leave the stream its `stream_cpus` (below the minimum when even that
    group does not leave them; `check_cpus` names that case).

    Ray Train starts, and after a failure restarts, an elastic group with as many workers as the
    nodes hold, up to the maximum, before the stream asks for its CPUs: uncapped, the workers can
    take every CPU and the stream waits forever with zero rows.
    """
    total = sum(node.get("CPU", 0.0) for node in nodes)
    by_cpus = math.floor((total - stream_cpus(cfg)) / cfg.train.cpus_per_worker + 1e-9)
    return min(cfg.train.worker_counts.stop - 1, by_cpus)


def check_stream_left(cfg: Config, nodes: list[dict[str, float]], maximum: int, where: str) -> None:
    """The group Ray Train would (re)start on `nodes` (as many workers as they hold, up to `maximum`)
    leaves the stream its CPUs. After a node loss a group below `maximum` fills the nodes that are
    left, so this can fail where `check_cpus` passes."""
    workers = min(maximum, sum(workers_on_node(cfg, node) for node in nodes))
    if workers < cfg.train.worker_counts.start:
        return  # no group starts at all: check_cpus names what is missing
    total = sum(node.get("CPU", 0.0) for node in nodes)
    used = workers * cfg.train.cpus_per_worker
    if total - used + 1e-9 < stream_cpus(cfg):
        raise ConfigError(
            f"Ray Train would (re)start {workers} worker(s) of train.num_workers ({cfg.train.num_workers}; at most "
            f"{maximum} in this run) on {where}: x train.cpus_per_worker ({cfg.train.cpus_per_worker:g}) = {used:g} of "
            f"its {total:g} CPUs, leaving {total - used:g} where the data stream needs {_stream_recipe(cfg)} = "
            f"{stream_cpus(cfg):g}; it would wait forever with zero rows"
        )


def workers_on_node(cfg: Config, node: dict[str, float]) -> int:
    """How many train workers (CPUs and `train.worker_resources` each) the resources of `node` hold."""
    wanted = {"CPU": cfg.train.cpus_per_worker, **cfg.train.worker_resources}
    return min(math.floor(node.get(name, 0.0) / amount + 1e-9) for name, amount in wanted.items() if amount > 0)


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
            f"train.num_workers ({needed}) with train.use_gpu needs {needed} GPUs but {where} has {available:g}"
        )


def _gpus_available(cfg: Config) -> tuple[float, str]:
    """(the GPUs the run can get, where): the Ray cluster's alive nodes', else this machine's.

    An autoscaling cluster counts the nodes that are up now: submit once its GPU nodes are up.
    """
    ray = _cluster(cfg)
    if ray is not None:
        return float(ray.cluster_resources().get("GPU", 0)), "the Ray cluster (nodes still starting are not counted)"
    import torch

    return (torch.cuda.device_count() if torch.cuda.is_available() else 0), "this machine"


def _connect_ray(cfg: Config, address: str) -> None:
    """Join the configured cluster now (the run would next), failing fast if nothing answers."""
    from workflows.runtime import init_ray

    key = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
    if address not in ("auto", "local"):
        url = address if "://" in address else f"tcp://{address}"
        problem = probe_tcp(url, MAX_PROBE_S)  # ray.init itself retries for minutes
        if problem:
            raise ConfigError(f"{key}: the Ray cluster at {redact(address)} is not reachable: {problem}")
    try:
        init_ray(cfg.ray)
    except (ConnectionError, RuntimeError, ValueError) as error:  # unreachable, refused (auth), bad address
        raise ConfigError(
            f"{key}: cannot connect to the Ray cluster at {redact(address)}: {redact_text(str(error))}"
        ) from None
