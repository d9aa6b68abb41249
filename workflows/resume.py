"""Where a stage resumes from: the checkpoint Ray Train restores a run from, read through public APIs."""

from __future__ import annotations

import json
from typing import Any

from workflows.config import Config

__all__ = ["latest_checkpoint"]

RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2 (2.60) run record


def latest_checkpoint(cfg: Config, run_name: str) -> tuple[str, dict[str, Any]] | None:
    """(folder URI, metrics reported with it) of the checkpoint Ray Train restores a run from, or None.

    Read from Ray Train's own record of the run (`checkpoint_manager_snapshot.json`, written after
    a checkpoint is fully stored), so a half-copied checkpoint folder is never taken.
    """
    from workflows import storage

    run_url = storage.join(cfg.storage.root, run_name)
    try:
        snapshot = json.loads(storage.read_bytes(storage.join(run_url, RAY_SNAPSHOT), cfg.storage.s3))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    latest = snapshot.get("latest_checkpoint_result")
    if not latest:
        return None
    return storage.join(run_url, latest["checkpoint_dir_name"]), latest["metrics"]
