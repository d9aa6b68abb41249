"""Starting or joining Ray the same way everywhere (local runs, tests, `ray job submit`)."""

from __future__ import annotations

import logging
import os
import warnings

# Quiet, repeatable defaults; a user's own environment wins.
_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # MLflow prints "View run ... at: <tracking URI>" when a run ends, userinfo (a password) included.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    # Ray Train copies every print of a worker into its own log as well: each line came out twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
#: loggers whose INFO chatter drowns our one line per epoch: Ray Train's per-report
#: `TrainingReport(...)` and checkpoint lines, its "run snapshot was found" notice; MLflow's
#: advice on type hints and on the pickle format we chose (errors still show).
_QUIET_LOGGERS = {"ray.train": logging.WARNING, "mlflow": logging.ERROR}


def worker_env() -> dict[str, str]:
    """The quiet defaults, for a runtime_env (cluster workers do not inherit the driver's environment)."""
    return {key: os.environ.get(key, value) for key, value in _ENV_DEFAULTS.items()}


def set_quiet_env() -> None:
    """Quiet defaults in the environment (for Ray processes started from here) and quiet loggers."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    quiet_logs()


class _RayTrainInfo(logging.Filter):
    """Drops INFO records emitted from Ray Train's code, whatever their logger's name (some are
    named after the file, outside the `ray.train` hierarchy: "Reporting training result ...")."""

    _DIR = f"{os.sep}ray{os.sep}train{os.sep}"

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or self._DIR not in record.pathname


def quiet_logs() -> None:
    """Our own lines only: Ray Train's report chatter and MLflow's warnings filtered (in this process)."""
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _RayTrainInfo) for f in handler.filters):
            handler.addFilter(_RayTrainInfo())
    warnings.filterwarnings("ignore", module=r"mlflow(\..*)?$")


def init_ray(ray_cfg=None):
    """Join the cluster named by `ray.address` or RAY_ADDRESS, else start a private local Ray.

    A local Ray never auto-joins some other `ray start` cluster on the machine (address="local"),
    and it gets logical CPUs beyond the physical ones so Ray Data is not starved by train workers.
    """
    import ray

    set_quiet_env()
    if ray.is_initialized():
        return ray
    address = getattr(ray_cfg, "address", None) or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return ray
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    num_cpus = getattr(ray_cfg, "num_cpus", None) or max(4, 2 * (os.cpu_count() or 2))
    store_mb = getattr(ray_cfg, "object_store_mb", None) or 512
    ray.init(
        address="local",
        num_cpus=num_cpus,
        object_store_memory=store_mb * 2**20,
        log_to_driver=True,
    )
    return ray
