"""One typed configuration for every workflow: loaded from YAML, validated before any Ray work.

The same `Config` drives local runs, `ray job submit`, sweeps and the pipeline. Unknown keys are
errors; `--set section.key=value` overrides are parsed as YAML scalars and validated the same way.
Credentials are never part of the config: S3 keys come from the environment or the AWS chain.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, cast

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lightbsr.models import ModelSpec
from workflows.errors import UsageError
from workflows.urls import is_remote

__all__ = [
    "Config",
    "ConfigError",
    "apply_overrides",
    "flatten_config",
    "load_config",
]


class ConfigError(UsageError, ValueError):
    """A configuration problem, with a message that names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_MODEL = ModelSpec()  # the one source of the model defaults (lightbsr.models)


class ModelConfig(_Strict):
    scale: Literal[2, 3, 4] = cast(Literal[2, 3, 4], _MODEL.scale)
    setting: Literal[1, 2] = cast(Literal[1, 2], _MODEL.setting)
    n_groups: int = Field(_MODEL.n_groups, ge=1, description="groups in the generator body (paper: 8)")
    n_blocks: int = Field(_MODEL.n_blocks, ge=1, description="adaptation blocks per group (paper: 8)")
    queue_size: int = Field(_MODEL.queue_size, ge=1, description="MoCo queue length of the teacher")
    momentum: float = Field(_MODEL.momentum, gt=0.0, lt=1.0, description="MoCo key-encoder momentum")
    pca_seed: int = Field(_MODEL.pca_seed, description="seed of the kernel PCA basis (saved with checkpoints)")


class S3Config(_Strict):
    """Where `s3://` URLs point. Credentials come from the environment / AWS chain, never from here."""

    endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:8333; None = AWS_ENDPOINT_URL or AWS")
    region: str | None = Field(None, description="None = AWS_REGION / AWS_DEFAULT_REGION or us-east-1")
    retries: int = Field(3, ge=0, description="attempts per object-store call before failing")
    connect_timeout_s: float = Field(5.0, gt=0)


class StorageConfig(_Strict):
    root: str = Field("runs", description="local folder or s3://bucket/prefix for shards, checkpoints, tables")
    s3: S3Config = S3Config()
    shared_filesystem: bool = Field(
        False,
        description="true: a local storage.root is a shared mount (NFS, EFS, Lustre) at the same path on every "
        "node, so a multi-node cluster may use it; preflight cannot tell a shared mount from a local disk",
    )


class DataConfig(_Strict):
    train_images: str = Field("data/samples/train", description="HR training images (folder or fsspec URL)")
    eval_images: str = Field("data/samples/eval", description="held-out HR images for validation and evaluation")
    benchmarks: str | None = Field(None, description="<root>/<Set5|Set14|B100|Urban100|Manga109>/HR/*.png")
    shards: str | None = Field(None, description="training shards URL; default <storage.root>/shards/train")
    tile_size: int = Field(384, ge=16, description="HR tile side stored in the shards (> HR patch, so views differ)")
    tiles_per_shard: int = Field(64, ge=1)
    patch_size: int = Field(64, ge=8, description="LR training patch (HR patch = patch_size * scale)")
    views: int = Field(4, ge=2, description="LR views per HR tile for the teacher (they share one degradation)")
    data_cpus: float = Field(
        1.0, gt=0, description="CPUs Ray Data reserves for decode + degrade (two chunk-maker actors per CPU)"
    )


class ScheduleConfig(_Strict):
    epochs: int = Field(700, ge=1)
    iters_per_epoch: int = Field(970, ge=1)
    phase1_epochs: int = Field(100, ge=0, description="epochs of the representation-only phase")
    warmup_epochs: int = Field(5, ge=0, description="linear warm-up at the start of phase 2")
    lr: float = Field(2e-4, gt=0)
    min_lr: float = Field(1e-6, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)


class LossConfig(_Strict):
    l1_weight: float = Field(1.0, ge=0, description="L1 on the 0..255 scale (phase 2)")
    contrastive_temperature: float = Field(0.07, gt=0)
    contrastive_weight: float = Field(1.0, ge=0)
    kd_temperature: float = Field(0.15, gt=0)
    channel_kl_weight: float = Field(1.0, ge=0)
    channel_l1_weight: float = Field(0.1, ge=0)
    spatial_weight: float = Field(1.0, ge=0)
    distillation: bool = Field(
        True, description="student: align ca/xk on the teacher's (False = the no-alignment ablation)"
    )


class TrainConfig(_Strict):
    stage: Literal["teacher", "student", "both"] = "both"
    run_name: str = Field("lightbsr", pattern=r"^[A-Za-z0-9._-]+$")
    batch_size: int = Field(64, ge=1, description="global batch (split across workers)")
    num_workers: int | tuple[int, int] = Field(
        1, description="workers, or [min, max] for elastic training (Ray Train runs on what is free in the range)"
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each train worker also asks for, e.g. {slot: 1} to put the workers on "
        "distinct nodes that each advertise one `slot` (ray start --resources='{\"slot\": 1}')",
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    seed: int = 0
    checkpoint_every_epochs: int = Field(1, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0)
    capacity_wait_s: float = Field(
        300.0,
        gt=0,
        description="how long the driver waits, e.g. after a node loss, for the nodes and CPUs the smallest worker "
        "group and the data stream need before it fails the run naming what is missing",
    )
    log_every_steps: int = Field(10, ge=1)
    image_every_steps: int = Field(500, ge=1)
    teacher_checkpoint: str | None = Field(
        None, description="teacher for the student stage: path, s3:// URL, runs:/<id>/... or models:/<name>@<alias>"
    )

    @property
    def worker_counts(self) -> range:
        """Every world size the run may have (one, unless num_workers is a [min, max] range)."""
        low, high = (self.num_workers, self.num_workers) if isinstance(self.num_workers, int) else self.num_workers
        return range(low, high + 1)


class TrackingConfig(_Strict):
    uri: str | None = Field(
        None, description="MLflow tracking URI; None = MLFLOW_TRACKING_URI, else sqlite under storage.root"
    )
    experiment: str = "lightbsr"
    registered_model: str | None = Field(None, description="default lightbsr-x<scale>")
    alias: str = "champion"


class RayConfig(_Strict):
    address: str | None = Field(None, description="None = RAY_ADDRESS if set, else a new local Ray")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray (None = detected)")
    object_store_mb: int | None = Field(512, ge=64)


class SearchParam(_Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> SearchParam:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-uniform range needs low > 0, got {self.low}")
        return self


class TuneConfig(_Strict):
    stage: Literal["teacher", "student"] = "student"
    num_samples: int = Field(8, ge=1)
    max_concurrent: int = Field(2, ge=1)
    grace_period: int = Field(1, ge=1, description="ASHA: epochs before a trial may be stopped")
    reduction_factor: int = Field(2, ge=2)
    seed: int = 0
    protocol: str = Field("iso_x4", description="validation protocol of lightbsr.protocols")
    space: dict[str, SearchParam] = Field(default_factory=dict, description="loss.<name> -> range")


class EvalConfig(_Strict):
    protocols: list[str] = Field(default_factory=lambda: ["iso_x4"])
    tile: int = Field(192, ge=16, description="LR tile side for tiled inference (lightbsr.tiling.DEFAULT_TILE)")
    overlap: int = Field(32, ge=0, description="LR pixels of overlap between tiles (lightbsr.tiling.DEFAULT_OVERLAP)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="inference precision (lightbsr.precision.prepare); tensors stay float32 at the edges"
    )
    batch_size: int = Field(1, ge=1)
    actors: int = Field(2, ge=1, description="Ray Data actor pool size for scoring and batch upscale (<= GPUs)")
    actor_cpus: float = Field(1.0, gt=0, description="CPUs per batch upscale actor")
    use_gpu: bool | None = Field(None, description="batch upscale actors on GPUs, one each; None = when Ray has GPUs")
    samples: bool = Field(True, description="also score data.eval_images, as the set 'samples'")
    crop: int | None = Field(
        None, ge=16, description="score only the top-left crop of this many HR pixels (quick checks)"
    )
    idr_patches: int = Field(24, ge=4, description="HR patches per degradation for the IDR discriminability probe")
    idr_patch: int = Field(192, ge=32, description="HR side of those patches (LR = idr_patch / scale)")


class ServeConfig(_Strict):
    """`lightbsr serve`: the Ray Serve deployment, its limits and its alias watch."""

    replicas: int = Field(1, ge=1, description="replicas of the deployment")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs Ray reserves for each replica")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per replica (0 = CPU inference)")
    host: str = Field("127.0.0.1", description="address the HTTP proxy binds (0.0.0.0 to accept other machines)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy")
    route_prefix: str = Field("/", pattern=r"^/", description="where the app's routes start")
    max_request_bytes: int = Field(32 * 2**20, ge=1, description="larger request bodies get 413")
    max_pixels: int = Field(4 * 2**20, ge=1, description="input images with more pixels get 413")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch: requests handled together")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="@serve.batch: wait this long to fill a batch")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica holds at once; more are queued")
    reload_interval_s: float = Field(
        30.0, gt=0, description="how often each replica checks where the alias points (reloads when it moved)"
    )


class Config(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    tune: TuneConfig = TuneConfig()
    evaluate: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.schedule.phase1_epochs + self.schedule.warmup_epochs > self.schedule.epochs:
            raise ValueError("schedule.phase1_epochs + schedule.warmup_epochs exceed schedule.epochs")
        counts = self.train.worker_counts
        if any(amount <= 0 for amount in self.train.worker_resources.values()):
            raise ValueError(f"train.worker_resources: amounts must be positive, got {self.train.worker_resources}")
        reserved = {"CPU", "GPU", "memory", "object_store_memory"} & set(self.train.worker_resources)
        if reserved:
            raise ValueError(
                f"train.worker_resources: {sorted(reserved)} are set by train.cpus_per_worker / train.use_gpu, "
                "not here (custom resources only)"
            )
        if not counts or counts.start < 1:
            raise ValueError(f"train.num_workers: expected a count >= 1 or [min, max], got {self.train.num_workers}")
        uneven = [n for n in counts if self.train.batch_size % n]
        if uneven:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must divide evenly over every worker count of "
                f"train.num_workers ({self.train.num_workers}); it does not over {uneven}"
            )
        hr_patch = self.data.patch_size * self.model.scale
        if self.data.tile_size < hr_patch:
            raise ValueError(
                f"data.tile_size ({self.data.tile_size}) must be at least data.patch_size x model.scale ({hr_patch})"
            )
        for key in self.tune.space:
            section, _, name = key.partition(".")
            if section != "loss" or name not in LossConfig.model_fields:
                raise ValueError(f"tune.space key {key!r} is not a hyper-parameter (expected loss.<name>)")
        return self

    # Derived values, so no one recomputes them differently.
    @property
    def prior_channels(self) -> int:
        from lightbsr.teacher import PRIOR_CHANNELS  # imports torch, which loading a config does not need

        return PRIOR_CHANNELS[self.model.setting]

    @property
    def registered_model(self) -> str:
        return self.tracking.registered_model or f"lightbsr-x{self.model.scale}"

    def url(self, *parts: str) -> str:
        """A location under the storage root, e.g. cfg.url("shards", "train")."""
        return "/".join([self.storage.root.rstrip("/"), *parts])

    @property
    def shards_url(self) -> str:
        return self.data.shards or self.url("shards", "train")

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.default_tracking_store}"

    @property
    def tracking_uri_is_set(self) -> bool:
        """True when tracking.uri or MLFLOW_TRACKING_URI names the store (not the sqlite default)."""
        return bool(self.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI"))

    @property
    def default_tracking_store(self) -> Path:
        """The sqlite file MLflow uses when no tracking URI is set: `<storage.root>/mlflow.db`."""
        if is_remote(self.storage.root):
            raise ConfigError("tracking.uri must be set when storage.root is remote (no local sqlite store)")
        return Path(self.storage.root, "mlflow.db")


def _absolute(url: str, base: Path) -> str:
    """A plain relative path becomes absolute (Ray workers run in other folders); URLs (`s3://`, `runs:/`,
    `models:/`, `file://` ...) stay exactly as given."""
    if is_remote(url) or url.startswith("file://"):
        return url
    return str((base / os.path.expanduser(url)).resolve())


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a raw config dict; values are parsed as YAML scalars."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return raw


def _describe(error: ValidationError) -> str:
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return "invalid config: " + "; ".join(lines)


def config_from_dict(raw: dict[str, Any], base: Path | None = None) -> Config:
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
    base = base or Path.cwd()
    cfg.storage.root = _absolute(cfg.storage.root, base)
    for name in ("train_images", "eval_images", "benchmarks", "shards"):
        if getattr(cfg.data, name) is not None:
            setattr(cfg.data, name, _absolute(getattr(cfg.data, name), base))
    if cfg.train.teacher_checkpoint is not None:
        cfg.train.teacher_checkpoint = _absolute(cfg.train.teacher_checkpoint, base)
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or start from defaults), apply overrides, validate. Raises ConfigError naming the key."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw)


def flatten_config(cfg: Config) -> dict[str, str]:
    """`section.key -> value` strings, e.g. for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(value)

    walk("", cfg.model_dump())
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)


def add_config_arguments(parser) -> None:
    """`--config FILE` and repeatable `--set section.key=value`, the same on every command."""
    parser.add_argument("--config", help="YAML config (see workflows/configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.num_workers=2 (repeatable)",
    )
