"""Sweeps: Ray Tune + OptunaSearch (TPE, seeded, the paper's values first) + ASHA early stopping.

Each trial runs the ordinary training stage (`workflows.train.train_stage`, a Ray Train
TorchTrainer) with the trial's loss values, and reports the validation Y-PSNR of every epoch
to Tune (`TuneReportCallback`), where ASHA stops the weak trials. MLflow gets one parent run per
sweep and one child run per trial; the best config is written as YAML (URL credentials removed)
beside a table and a plot of the trials. Tune keeps its state under `<storage.root>/tune` on
the same storage filesystem as training (`workflows.storage.ray_storage`: endpoint, region,
retries). Rerunning the same command resumes an interrupted sweep (`Tuner.restore`): finished
trials are not rerun.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from workflows import storage
from workflows.cli import run
from workflows.config import (
    Config,
    ConfigError,
    SearchParam,
    add_config_arguments,
    config_from_dict,
    dump_config,
    load_config,
)
from workflows.urls import redact, redact_text

METRIC, MODE = "val_psnr", "max"

# What each stage may search, with defaults centred on the paper's values.
STAGE_PARAMS: dict[str, dict[str, SearchParam]] = {
    "teacher": {
        "loss.contrastive_temperature": SearchParam(low=0.02, high=0.25, log=True),
        "loss.contrastive_weight": SearchParam(low=0.25, high=4.0, log=True),
    },
    "student": {
        "loss.kd_temperature": SearchParam(low=0.05, high=0.5, log=True),
        "loss.channel_kl_weight": SearchParam(low=0.1, high=10.0, log=True),
        "loss.channel_l1_weight": SearchParam(low=0.01, high=1.0, log=True),
        "loss.spatial_weight": SearchParam(low=0.1, high=10.0, log=True),
    },
}


class SweepInterrupted(KeyboardInterrupt):
    """Tune stopped before every trial ended (Ctrl-C); its state is saved for a rerun to resume.

    A KeyboardInterrupt, so that `cli.run` exits with 130 as for any Ctrl-C."""


@dataclass
class SweepResult:
    best_params: dict[str, float]
    best_value: float
    best_config_url: str
    parent_run_id: str
    trials: list[dict[str, Any]]


def search_space(cfg: Config) -> dict[str, SearchParam]:
    """The configured space (or the stage's default), checked before any trial starts."""
    stage = cfg.tune.stage
    allowed = STAGE_PARAMS[stage]
    space = dict(cfg.tune.space) or dict(allowed)
    for key, param in space.items():
        if key not in allowed:
            raise ConfigError(
                f"tune.space.{key}: not a hyper-parameter of the {stage} stage; "
                f"searchable: {', '.join(sorted(allowed))}"
            )
        if "temperature" in key and param.low <= 0:
            raise ConfigError(f"tune.space.{key}: a temperature must be positive, got low={param.low}")
        if param.low < 0:
            raise ConfigError(f"tune.space.{key}: a loss weight cannot be negative, got low={param.low}")
    if stage == "student" and not cfg.train.teacher_checkpoint:
        raise ConfigError("train.teacher_checkpoint: the student sweep needs a fixed teacher checkpoint")
    return space


def paper_point(cfg: Config, space: dict[str, SearchParam]) -> dict[str, float]:
    """The config's own values (the paper's by default), evaluated first; clipped into the range."""
    point = {}
    for key, param in space.items():
        value = float(getattr(cfg.loss, key.split(".", 1)[1]))
        point[key] = min(max(value, param.low), param.high)
    return point


def trial_config(base: dict[str, Any], params: dict[str, float], trial_name: str) -> Config:
    raw = copy.deepcopy(base)
    for key, value in params.items():
        section, name = key.split(".", 1)
        raw[section][name] = float(value)
    raw["train"]["run_name"] = trial_name
    raw["train"]["stage"] = raw["tune"]["stage"]
    return config_from_dict(raw)


def _run_trial(params: dict[str, Any], base: dict[str, Any], parent_run_id: str) -> None:
    """Tune function: one ordinary training stage with this trial's loss values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from workflows.train import train_stage

    trial = tune.get_context().get_trial_id()
    cfg = trial_config(base, params, f"{base['train']['run_name']}-{trial}")
    train_stage(
        cfg,
        cfg.tune.stage,
        callbacks=[TuneReportCallback()],
        mlflow_tags={"mlflow.parentRunId": parent_run_id, "sweep.trial": trial},
    )


def _param_space(space: dict[str, SearchParam]):
    from ray import tune

    return {key: (tune.loguniform if p.log else tune.uniform)(p.low, p.high) for key, p in space.items()}


def _tuner(cfg: Config, space: dict[str, SearchParam], parent_run_id: str):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    name = f"{cfg.train.run_name}-sweep"
    where = storage.ray_storage(cfg, "tune")
    path, fs = f"{where['storage_path']}/{name}", where["storage_filesystem"]
    trainable = tune.with_resources(
        tune.with_parameters(_run_trial, base=cfg.model_dump(), parent_run_id=parent_run_id), {"cpu": 0.1}
    )
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[tune] resuming sweep {name} from {redact(cfg.url('tune', name))}")
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, restart_errored=True, storage_filesystem=fs)
    search = OptunaSearch(metric=METRIC, mode=MODE, seed=cfg.tune.seed, points_to_evaluate=[paper_point(cfg, space)])
    # max_t one past the last epoch: a trial that runs to the end returns by itself (and closes its
    # MLflow run) instead of being stopped by the scheduler at its last report.
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=cfg.schedule.epochs + 1,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        param_space=_param_space(space),
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode=MODE,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=max_concurrent_trials(cfg),
            search_alg=search,
            scheduler=scheduler,
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(name=name, verbose=1, **where),
    )


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _parent_run(cfg: Config) -> str:
    """The sweep's MLflow parent run: found again on resume, created otherwise.

    Called in the driver before any trial starts, so the tracking store (a fresh sqlite file is
    created and migrated on first open) and the experiment exist before concurrent trial
    processes open them: two processes migrating one fresh sqlite file race and fail."""
    from workflows import tracking

    name = f"{cfg.train.run_name}-sweep"
    run_id, resumed = tracking.open_run(cfg, name, {"sweep.name": name, "sweep.stage": cfg.tune.stage})
    if not resumed:
        tracking.log_config(cfg, run_id)
    return run_id


def _close_stopped_trial_runs(cfg: Config, parent_run_id: str, rows: list[dict[str, Any]]) -> None:
    """ASHA stops a trial by interrupting its training, so its MLflow run is left RUNNING or FAILED;
    mark KILLED every run of a trial that Tune ended without an error but whose run did not finish
    (ASHA may stop a trial even at its last epoch's report), and any run still open."""
    from workflows import tracking

    client = tracking.client(cfg)
    clean = {row["trial"] for row in rows if not row["error"]}
    children = client.search_runs(
        [tracking.experiment_id(cfg)], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    for child in children:
        stopped = child.data.tags.get("sweep.trial") in clean and child.info.status != "FINISHED"
        if child.info.status == "RUNNING" or stopped:
            client.set_terminated(child.info.run_id, status="KILLED")


def _unfinished_trials(results, num_samples: int) -> int:
    """Trials not yet created, waiting, or still running when Tune returned (after a Ctrl-C)."""
    waiting = sum(1 for result in results if result.config is None)
    not_ended = len(results) - results.num_terminated - results.num_errors
    return max(num_samples - len(results), 0) + max(waiting, not_ended)


def trials_table(results, space: dict[str, SearchParam], max_epochs: int) -> list[dict[str, Any]]:
    """One row per trial: its searched values, last validation PSNR, epochs run, early stop."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        epochs = int(metrics.get("training_iteration", 0))
        rows.append(
            {
                "trial": metrics.get("trial_id", result.path.rstrip("/").rsplit("/", 1)[-1]),
                **{key: float(result.config[key]) for key in space},
                METRIC: float(metrics.get(METRIC, float("nan"))),
                "epochs": epochs,
                "stopped_early": result.error is None and 0 < epochs < max_epochs,
                "error": type(result.error).__name__ if result.error else "",
            }
        )
    return rows


def max_concurrent_trials(cfg: Config) -> int:
    """At most cfg.tune.max_concurrent, and no more than the cluster's GPUs can hold."""
    if not cfg.train.use_gpu:
        return cfg.tune.max_concurrent
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    fit = gpus // cfg.train.worker_counts.start
    if fit < 1:
        raise ConfigError(
            f"train.use_gpu: a trial needs {cfg.train.worker_counts.start} GPU(s), the cluster has {gpus}"
        )
    return min(cfg.tune.max_concurrent, fit)


def _markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)\n"
    keys = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(fmt(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], space: dict[str, SearchParam]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(space), figsize=(4 * len(space), 3.2), squeeze=False)
    for ax, (key, param) in zip(axes[0], space.items()):
        done = [r for r in rows if not math.isnan(r[METRIC])]
        colours = ["tab:red" if r["stopped_early"] else "tab:blue" for r in done]
        ax.scatter([r[key] for r in done], [r[METRIC] for r in done], c=colours)
        ax.set_xscale("log" if param.log else "linear")
        ax.set_xlabel(key)
        ax.set_ylabel("validation Y-PSNR (dB)")
    fig.suptitle("trials (red: stopped early by ASHA)")
    fig.tight_layout()
    return fig


def best_config_text(cfg: Config) -> str:
    """The config as YAML with the credentials of every URL in it removed (they come from the environment)."""
    return redact_text(dump_config(cfg))


def run_sweep(cfg: Config) -> SweepResult:
    from workflows import tracking
    from workflows.preflight import check
    from workflows.runtime import init_ray
    from workflows.shards import write_shards
    from workflows.train_loop import validation_protocol

    space = search_space(cfg)
    if validation_protocol(cfg) is None:
        raise ConfigError(
            f"tune.protocol: no evaluation protocol exists for x{cfg.model.scale} setting {cfg.model.setting}, "
            f"so trials cannot report {METRIC}, the sweep's objective"
        )
    check(cfg)
    name = f"{cfg.train.run_name}-sweep"
    init_ray(cfg.ray)
    write_shards(cfg.data.train_images, cfg.shards_url, cfg)  # no-op when the shards are complete
    parent_run_id = _parent_run(cfg)
    print(f"[tune] sweep {name}: MLflow parent run {parent_run_id} at {redact(cfg.tracking_uri)}", flush=True)
    results = _tuner(cfg, space, parent_run_id).fit()
    unfinished = _unfinished_trials(results, cfg.tune.num_samples)
    if unfinished:
        print(
            f"[tune] sweep {name} interrupted with {unfinished} trial(s) unfinished; "
            f"its state is kept under {redact(cfg.url('tune', name))}",
            file=sys.stderr,
            flush=True,
        )
        raise SweepInterrupted(f"sweep {name}: {unfinished} trial(s) unfinished")
    rows = trials_table(results, space, cfg.schedule.epochs)
    _close_stopped_trial_runs(cfg, parent_run_id, rows)
    best = results.get_best_result(metric=METRIC, mode=MODE, scope="last")
    best_params = {k: float(best.config[k]) for k in space}
    best_yaml = best_config_text(trial_config(cfg.model_dump(), best_params, cfg.train.run_name))
    best_url = cfg.url("tune", name, "best_config.yaml")
    storage.atomic_write_bytes(best_url, best_yaml.encode(), cfg.storage.s3)
    client = tracking.client(cfg)
    best_value = float(best.metrics[METRIC])
    client.log_metric(parent_run_id, f"best_{METRIC}", best_value)
    client.log_text(parent_run_id, best_yaml, "best_config.yaml")
    client.log_text(parent_run_id, redact_text(_markdown(rows)), "trials.md")
    client.log_text(parent_run_id, redact_text(json.dumps(rows, indent=2, default=str)), "trials.json")
    import matplotlib.pyplot as plt

    figure = _plot(rows, space)
    client.log_figure(parent_run_id, figure, "trials.png")
    plt.close(figure)
    client.set_terminated(parent_run_id)
    print(_markdown(rows))
    print(f"[tune] best {METRIC} {best_value:.3f} dB with {best_params}; config: {redact(best_url)}")
    return SweepResult(best_params, best_value, best_url, parent_run_id, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightbsr tune", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    run_sweep(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="lightbsr tune"))
