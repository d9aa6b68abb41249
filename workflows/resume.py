"""Where a stage resumes from, read through public APIs only.

Ray Train restores a run (`<storage.root>/<run_name>-<stage>`) from the latest checkpoint it
recorded as complete; `ray.train.Result.from_path` reads that same record, so the driver, the
data stream and the workers agree on the epoch to continue after. Each checkpoint folder also
holds our own `lightbsr.json` (epoch, iteration, config fingerprint); the data stream writes
`lightbsr-stream.json` with the epoch it starts after, which the workers check against the
checkpoint they restore (`check_stream_start`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from workflows import storage
from workflows.config import Config, flatten_config
from workflows.errors import RuntimeFailure, UsageError
from workflows.urls import is_s3, join, redact, redact_text

__all__ = [
    "CHECKPOINT_RECORD",
    "ConfigChanged",
    "Found",
    "ResumeError",
    "check_fingerprint",
    "checkpoint_record",
    "checkpoint_url",
    "fingerprint",
    "latest_checkpoint",
    "read_stream_start",
    "run_url",
    "stream_start_url",
    "write_stream_start",
]

CHECKPOINT_RECORD = "lightbsr.json"  # our own record inside every checkpoint folder
STREAM_RECORD = "lightbsr-stream.json"  # the epoch the current data stream starts after


class ResumeError(RuntimeFailure):
    """The record of a run cannot be read, so it is unknown where to continue."""


@dataclass(frozen=True)
class Found:
    checkpoint: str  # folder URI (local path or s3://) holding model.pt and lightbsr.json
    metrics: dict[str, Any]  # what the workers reported with it (epoch, iteration, losses ...)

    @property
    def epoch(self) -> int:
        return int(self.metrics["epoch"])

    @property
    def iteration(self) -> int:
        return int(self.metrics["iteration"])


def run_url(cfg: Config, run_name: str) -> str:
    return join(cfg.storage.root, run_name)


def checkpoint_url(cfg: Config, checkpoint) -> str:
    """URI of a `ray.train.Checkpoint` (its path has no scheme on S3)."""
    return f"s3://{checkpoint.path}" if is_s3(cfg.storage.root) else checkpoint.path


def latest_checkpoint(cfg: Config, run_name: str) -> Found | None:
    """The checkpoint Ray Train restores `run_name` from, with the metrics reported with it; None if none.

    Raises ResumeError when the run's record exists but cannot be read: continuing from epoch 0
    while the workers restore epoch k would be silently wrong.
    """
    from ray.train import Result

    url = run_url(cfg, run_name)
    if not storage.exists(url, cfg.storage.s3):
        return None
    if is_s3(url):
        fs, path = storage.filesystem(url, cfg.storage.s3)
        args: dict[str, Any] = {"path": path, "storage_filesystem": fs}
    else:
        args = {"path": url}
    try:
        result = Result.from_path(**args)
    except RuntimeError:  # the folder has no completed checkpoint yet
        return None
    except ValueError as error:  # an unreadable record (JSON or schema)
        raise ResumeError(
            f"{redact(url)}: Ray Train's record of this run cannot be read ({error}); "
            "start a new run with --set train.run_name=<new name>"
        ) from None
    if result.checkpoint is None or not result.metrics:
        return None
    return Found(checkpoint_url(cfg, result.checkpoint), dict(result.metrics))


def checkpoint_record(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """Our `lightbsr.json` of a checkpoint folder ({} for checkpoints written before it existed)."""
    url = join(checkpoint, CHECKPOINT_RECORD)
    if not storage.exists(url, cfg.storage.s3):
        return {}
    return json.loads(storage.read_bytes(url, cfg.storage.s3))


def stream_start_url(cfg: Config, run_name: str) -> str:
    return join(run_url(cfg, run_name), STREAM_RECORD)


def write_stream_start(cfg: Config, run_name: str, epoch: int) -> None:
    storage.atomic_write_bytes(
        stream_start_url(cfg, run_name), json.dumps({"start_epoch": epoch}).encode(), cfg.storage.s3
    )


def read_stream_start(cfg: Config, run_name: str) -> int:
    return int(json.loads(storage.read_bytes(stream_start_url(cfg, run_name), cfg.storage.s3))["start_epoch"])


# ---- config fingerprint ----------------------------------------------------------------------

#: what a run's results depend on; other keys (log intervals, worker counts, tracking, ray, eval) may change.
FINGERPRINT_SECTIONS = ("model", "loss", "data", "schedule")
FINGERPRINT_EXTRA_KEYS = ("train.batch_size", "train.seed")
FINGERPRINT_HARMLESS_KEYS = ("data.data_cpus",)


class ConfigChanged(UsageError):
    """A rerun of an existing run with a config its results do not match."""


def fingerprint(cfg: Config) -> dict[str, str]:
    """`section.key -> value` (URLs redacted) of every key the run's results depend on."""
    return {
        key: redact_text(value)
        for key, value in flatten_config(cfg).items()
        if (key.split(".")[0] in FINGERPRINT_SECTIONS or key in FINGERPRINT_EXTRA_KEYS)
        and key not in FINGERPRINT_HARMLESS_KEYS
    }


def check_fingerprint(cfg: Config, stored: dict[str, str] | None, what: str) -> None:
    """Raise ConfigChanged naming the differing keys when `stored` (from `what`) is not this config's."""
    if not stored:
        return
    mine = fingerprint(cfg)
    differing = sorted(key for key in {*mine, *stored} if mine.get(key) != stored.get(key))
    if differing:
        changes = "; ".join(f"{key}: {stored.get(key, '(unset)')} -> {mine.get(key, '(unset)')}" for key in differing)
        raise ConfigChanged(
            f"{what} was made with a different config ({changes}). Rerun with the config it was made with to "
            f"continue it, or start a new run with --set train.run_name=<new name> (now {cfg.train.run_name!r})"
        )
