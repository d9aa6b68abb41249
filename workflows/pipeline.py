"""End to end: samples/shards -> teacher -> student -> evaluate -> register.

Each step records what it produced in `<storage.root>/pipeline/<run_name>/<step>.json` (written
whole, then renamed) with the config fingerprint (`workflows.resume.fingerprint`); a rerun skips
every step whose record exists, so an interrupted pipeline continues where it stopped, and refuses
(naming the keys) when the config its results depend on changed since. It ends with a summary:
the records, the evaluation tables and the `lightbsr upscale` command for the registered model. `ray job submit -- python -m workflows.pipeline --config ...` runs it
on a cluster; locally it starts a private Ray.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from workflows.config import Config, ConfigError, add_config_arguments, load_config
from workflows.resume import check_fingerprint, fingerprint
from workflows.urls import is_remote, join, redact

STEPS = ("samples", "shards", "teacher", "student", "evaluate", "register")


def _record_url(cfg: Config, step: str) -> str:
    return cfg.url("pipeline", cfg.train.run_name, f"{step}.json")


def read_record(cfg: Config, step: str) -> dict[str, Any] | None:
    from workflows import storage

    url = _record_url(cfg, step)
    if not storage.exists(url, cfg.storage.s3):
        return None
    return json.loads(storage.read_bytes(url, cfg.storage.s3))


def write_record(cfg: Config, step: str, record: dict[str, Any]) -> dict[str, Any]:
    """Store a step's record with the config fingerprint; returns what was stored."""
    from workflows import storage

    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    full = {"step": step, "finished": finished, **record, "fingerprint": fingerprint(cfg)}
    storage.atomic_write_bytes(_record_url(cfg, step), json.dumps(full, indent=2, default=str).encode(), cfg.storage.s3)
    return full


def step_samples(cfg: Config, done: dict) -> dict:
    """Real sample photographs, only when the configured image folders are missing."""
    from pathlib import Path

    from lightbsr.samples import extract_samples

    folders = [cfg.data.train_images, cfg.data.eval_images]
    missing = [f for f in folders if "://" not in f and not Path(f).is_dir()]
    if not missing:
        return {"skipped": "image folders exist", "folders": folders}
    roots = {Path(f).parent for f in missing}
    if len(roots) != 1 or {Path(f).name for f in missing} - {"train", "eval"}:
        raise ConfigError(
            f"data.train_images / data.eval_images: {missing} do not exist "
            "(the sample images are extracted only into <dir>/train and <dir>/eval)"
        )
    root = roots.pop()
    extract_samples(root)
    return {"folder": str(root)}


def step_shards(cfg: Config, done: dict) -> dict:
    from workflows.shards import write_shards

    manifest = write_shards(cfg.data.train_images, cfg.shards_url, cfg)
    return {"shards": cfg.shards_url, "manifest": _as_dict(manifest)}


def step_teacher(cfg: Config, done: dict) -> dict:
    from workflows.train import train_stage

    return _as_dict(train_stage(cfg, "teacher"))


def step_student(cfg: Config, done: dict) -> dict:
    from workflows.train import train_stage

    if not cfg.train.teacher_checkpoint:
        cfg = cfg.model_copy(deep=True)
        cfg.train.teacher_checkpoint = done["teacher"]["checkpoint"]
    return _as_dict(train_stage(cfg, "student"))


def step_evaluate(cfg: Config, done: dict) -> dict:
    from workflows.evaluate import evaluate_model

    out = cfg.url("evaluation", cfg.train.run_name)
    result = evaluate_model(
        done["student"]["checkpoint"],
        cfg,
        benchmarks=cfg.data.benchmarks,
        teacher_ref=done["teacher"]["checkpoint"],
        out=out,
    )
    print(result.tables.markdown)
    return {
        "folder": out,
        "table_csv": f"{out}/table.csv",
        "table_md": f"{out}/table.md",
        "mlflow_run_id": result.run_id,
        "idr": result.idr,
    }


def step_register(cfg: Config, done: dict) -> dict:
    import tempfile

    from workflows import storage
    from workflows.register import register_version

    with tempfile.TemporaryDirectory(prefix="lightbsr-pipeline-") as tmp:
        table = None
        if "evaluate" in done:
            table = f"{tmp}/table.csv"
            with open(table, "wb") as fh:
                fh.write(storage.read_bytes(done["evaluate"]["table_csv"], cfg.storage.s3))
        registration = register_version(done["student"]["checkpoint"], cfg, eval_table=table)
    name, version = registration.name, registration.version
    # the alias names the champion; a challenger the gate held back is reachable by its version only
    model_uri = f"models:/{name}@{cfg.tracking.alias}" if registration.gate.promote else f"models:/{name}/{version}"
    held = (
        "" if registration.gate.promote else f" without the alias {cfg.tracking.alias!r} ({registration.gate.reason})"
    )
    print(f"[pipeline] registered {name} version {version}{held}")
    return {"model_uri": model_uri, "name": name, "version": version}


STEP_FUNCTIONS: dict[str, Callable[[Config, dict], dict]] = {
    "samples": step_samples,
    "shards": step_shards,
    "teacher": step_teacher,
    "student": step_student,
    "evaluate": step_evaluate,
    "register": step_register,
}


def _as_dict(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    return {"result": str(value)}


def run_pipeline(cfg: Config, steps: tuple[str, ...] = STEPS, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Run the steps in order, skipping those already recorded; returns every step's record."""
    from workflows.preflight import check

    # The samples step creates the image folders, so they are checked after it.
    check(cfg, skip=("data.train_images", "data.eval_images") if "samples" in steps else ())
    done: dict[str, dict] = {}
    for step in steps:
        record = read_record(cfg, step)
        if record is not None:
            check_fingerprint(cfg, record.get("fingerprint"), f"pipeline {cfg.train.run_name} step {step}")
            log(f"[pipeline] {step}: already done, skipping")
            done[step] = record
            continue
        log(f"[pipeline] {step}: running")
        started = time.monotonic()
        record = STEP_FUNCTIONS[step](cfg, done)
        record["seconds"] = round(time.monotonic() - started, 1)
        done[step] = write_record(cfg, step, record)
        log(f"[pipeline] {step}: done in {record['seconds']} s")
    return done


def example_input(cfg: Config) -> str | None:
    """The run's first held-out image (`data.eval_images`) when that folder is local, else None."""
    from workflows import storage

    if is_remote(cfg.data.eval_images):
        return None  # reading it would also need the S3 settings on the command line
    names = storage.list_images(cfg.data.eval_images) if storage.exists(cfg.data.eval_images) else []
    return join(cfg.data.eval_images, names[0]) if names else None


def upscale_command(cfg: Config, model_uri: str, example: str | None = None) -> str:
    """The `lightbsr upscale` line for a registered model, runnable from any directory (URLs redacted):
    on the local image `example` (absolute; written as STEM_xS.png in the current directory), else
    on placeholders INPUT OUTPUT."""
    from workflows.tracking import artifact_env

    env = {"MLFLOW_TRACKING_URI": cfg.tracking_uri, **artifact_env(cfg)}
    assignments = " ".join(f"{key}={shlex.quote(redact(value))}" for key, value in env.items())
    files = "INPUT OUTPUT"
    if example is not None:
        files = f"{shlex.quote(example)} {shlex.quote(f'{PurePath(example).stem}_x{cfg.model.scale}.png')}"
    return f"{assignments} lightbsr upscale --model {shlex.quote(model_uri)} {files}"


def summary(cfg: Config, done: dict[str, dict]) -> str:
    """Where the pipeline's records and tables are, and how to use the registered model."""
    lines = [f"[pipeline] {cfg.train.run_name}: records in {redact(cfg.url('pipeline', cfg.train.run_name))}"]
    for step, record in done.items():
        lines.append(
            f"  {step}: {record.get('seconds', '?')} s"
            + (f", {redact(record['checkpoint'])}" if "checkpoint" in record else "")
        )
    if "evaluate" in done:
        for key in ("table_md", "table_csv"):
            if key in done["evaluate"]:
                lines.append(f"  evaluation table: {redact(done['evaluate'][key])}")
    if "register" in done:
        command = upscale_command(cfg, done["register"]["model_uri"], example_input(cfg))
        lines.append(f"  upscale with the registered model:\n    {command}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightbsr pipeline", description=__doc__.split("\n\n")[0])
    add_config_arguments(parser)
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    steps = tuple(s.strip() for s in args.steps.split(",") if s.strip())
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise ConfigError(f"--steps: unknown step(s) {unknown}; known: {', '.join(STEPS)}")
    done = run_pipeline(cfg, steps)
    print(summary(cfg, done))
    return 0


if __name__ == "__main__":
    from workflows.cli import run

    sys.exit(run(main, prog="lightbsr pipeline"))
