"""`lightbsr register`: put a trained student into the MLflow model registry as a pyfunc model.

The pyfunc model takes uint8 (N, H, W, 3) images and returns uint8 (N, sH, sW, 3) images; it
carries our checkpoint (weights, model config, PCA basis) as an artifact and runs the same
tiled inference as `lightbsr upscale` (params `tile`, `overlap`).

The gate: every registration makes a new version, but the alias (`tracking.alias`, e.g.
champion) moves to it only when its evaluation table is at least as good as the alias
holder's: our mean Y-PSNR on every (protocol, set) of the champion's table, no lower. A
challenger without a table, or one that lacks a protocol or set of the champion's, or is worse
on one, does not take the alias, and the command says why; `--force` moves it anyway. Each
version is tagged with its lineage (`workflows.lineage`: training run ids, config fingerprint,
shard manifest digest) and the gate's decision (`gate`, `gate.reason`).
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

from lightbsr.checkpoint import CheckpointError, save_checkpoint
from lightbsr.macs import count_parameters
from workflows import preflight
from workflows.cli import run
from workflows.config import Config, add_config_arguments, load_config
from workflows.errors import UsageError
from workflows.references import RegistryError, check_registry, load_student, resolve
from workflows.serving import CHECKPOINT_ARTIFACT, LightBSRModel, signature
from workflows.urls import redact, redact_text

__all__ = [
    "Gate",
    "Registration",
    "gate",
    "main",
    "register_checkpoint",
    "register_version",
    "serving_code_paths",
    "table_scores",
]

EVAL_TABLE_ARTIFACT = "evaluation"
PINNED_PACKAGES = ("torch", "numpy", "Pillow", "mlflow", "PyYAML", "pydantic")
OURS = "LightBSR (ours)"  # the method name of our lines in `lightbsr evaluate` tables
#: config keys `register` does not read: preflight leaves them alone
NOT_USED_KEYS = (
    "data.train_images",
    "data.eval_images",
    "data.benchmarks",
    "train.teacher_checkpoint",
    "ray",  # no Ray work: no cluster or GPU checks
)


def serving_code_paths() -> list[str]:
    """Ship the model code with the model (`lightbsr/` and `workflows/`, whose empty `__init__` means
    importing `workflows.serving` pulls nothing else), so loading needs torch + mlflow, not this project."""
    import lightbsr
    import workflows.serving

    return [os.path.dirname(lightbsr.__file__), os.path.dirname(workflows.serving.__file__)]


def _without_userinfo(value: Any) -> Any:
    """The stored config with every URL's user:password part removed (checkpoints of older runs may hold them)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: _without_userinfo(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_userinfo(item) for item in value]
    return value


def _pinned_requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}".replace("+cpu", "") for name in PINNED_PACKAGES]


def table_scores(table_csv: Path) -> dict[tuple[str, str], float]:
    """(protocol, set) -> our Y-PSNR averaged over the protocol's cases (the 'mean' lines of the CSV)."""
    scores = {}
    with open(table_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("method") != OURS or row.get("case") != "mean":
                continue
            for column, value in row.items():
                if column.endswith(" PSNR") and value:
                    scores[(row["protocol"], column[: -len(" PSNR")])] = float(value)
    return scores


def _psnr_tags(table_csv: Path) -> dict[str, str]:
    """`psnr.<protocol>.<set>` = our mean Y-PSNR (2 decimals)."""
    return {f"psnr.{protocol}.{name}": f"{value:.2f}" for (protocol, name), value in table_scores(table_csv).items()}


@dataclass(frozen=True)
class Gate:
    promote: bool  # move the alias to the challenger
    reason: str


def gate(challenger: dict[tuple[str, str], float] | None, champion: dict[tuple[str, str], float] | None) -> Gate:
    """Whether a challenger with these table scores may take the alias from a champion with those.

    `champion` None: nobody holds the alias. An empty dict: the holder has no evaluation table.
    """
    if champion is None:
        return Gate(True, "no version holds the alias yet")
    if not challenger:
        return Gate(False, "no evaluation table to compare with the champion's (pass --eval-table, or --force)")
    if not champion:
        return Gate(False, "the champion has no evaluation table to compare with (use --force to replace it)")
    missing = sorted(f"{p}/{s}" for p, s in set(champion) - set(challenger))
    if missing:
        return Gate(
            False,
            f"the challenger's table lacks {', '.join(missing)} of the champion's (same protocols and sets needed)",
        )
    worse = [
        f"{p}/{s} {challenger[(p, s)]:.4f} < {value:.4f} dB"
        for (p, s), value in sorted(champion.items())
        if challenger[(p, s)] < value
    ]
    if worse:
        return Gate(False, "worse than the champion on " + "; ".join(worse))
    compared = "; ".join(f"{p}/{s} {challenger[(p, s)]:.4f} >= {v:.4f} dB" for (p, s), v in sorted(champion.items()))
    return Gate(True, "at least as good as the champion: " + compared)


def _champion_scores(name: str, alias: str, cfg: Config, workdir: str) -> tuple[str | None, dict | None]:
    """(the alias holder's version, its table scores: {} without a table), or (None, None) when none holds it."""
    try:
        found = resolve(f"models:/{name}@{alias}", cfg, Path(workdir, "champion"))
    except RegistryError:  # no such model or alias yet
        return None, None
    assert found.registry is not None  # a models:/ reference always names its version
    tables = sorted(found.file.parent.glob("*.csv"))
    return found.registry.version, table_scores(tables[0]) if tables else {}


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str
    gate: Gate


def register_checkpoint(
    checkpoint: str, cfg: Config, alias: str | None = None, eval_table: str | None = None, force: bool = False
) -> tuple[str, str]:
    """`register_version`, returning (name, version)."""
    registration = register_version(checkpoint, cfg, alias, eval_table, force)
    return registration.name, registration.version


def register_version(
    checkpoint: str, cfg: Config, alias: str | None = None, eval_table: str | None = None, force: bool = False
) -> Registration:
    """Log the student as a pyfunc model and register it; point `alias` at it when the gate (or `force`) says so."""
    from mlflow import MlflowClient

    from workflows import lineage, tracking

    uri = cfg.tracking_uri
    check_registry(uri)
    alias = alias or cfg.tracking.alias
    with tempfile.TemporaryDirectory(prefix="lightbsr-register-") as workdir:
        resolved = resolve(checkpoint, cfg, workdir)
        loaded = load_student(str(resolved.file), cfg)
        name = cfg.tracking.registered_model or f"lightbsr-x{loaded.scale}"
        # Always ship our format: an authors' checkpoint is converted (it has no PCA basis).
        ours = save_checkpoint(
            Path(workdir, f"{name}.pt"),
            loaded.model,
            role="student",
            model_config=loaded.model_config,
            pca_basis=loaded.pca_basis,
            epoch=loaded.raw.get("epoch", 0),
            iteration=loaded.raw.get("iteration", 0),
            config=_without_userinfo(loaded.raw.get("config")),
        )
        artifacts = {CHECKPOINT_ARTIFACT: str(ours)}
        tags = {
            "scale": str(loaded.scale),
            "setting": str(loaded.setting),
            "parameters": str(count_parameters(loaded.model)),
            "source": redact(checkpoint),
        }
        if resolved.registry is not None:  # re-registered from the registry: which version it was
            tags["source_version"] = resolved.registry.uri
        if eval_table:
            artifacts[EVAL_TABLE_ARTIFACT] = eval_table
            if eval_table.endswith(".csv"):
                tags.update(_psnr_tags(Path(eval_table)))
        tags.update(lineage.version_tags(cfg, loaded.raw.get("config")))
        champion_version, champion = _champion_scores(name, alias, cfg, workdir)
        challenger = table_scores(Path(eval_table)) if eval_table and eval_table.endswith(".csv") else None
        decision = Gate(True, "forced (--force)") if force else gate(challenger, champion)
        if champion_version is not None:
            tags["gate.champion_version"] = champion_version
        tags |= {"gate": "promoted" if decision.promote else "held", "gate.reason": decision.reason[:4000]}
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        example = np.zeros((1, 16, 16, 3), np.uint8)
        with mlflow.start_run(experiment_id=tracking.experiment_id(cfg), run_name=f"register-{name}") as run:
            mlflow.set_tags(tags)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=LightBSRModel(),
                artifacts=artifacts,
                signature=signature(),
                input_example=example,
                pip_requirements=_pinned_requirements(),
                registered_model_name=name,
                code_paths=serving_code_paths(),
            )
        version = str(info.registered_model_version)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_model_version_tag(name, version, "run_id", run.info.run_id)
        if decision.promote:
            client.set_registered_model_alias(name, alias, version)
    return Registration(name, version, alias, decision)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightbsr register", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="our checkpoint (file or folder), an authors' one, s3:// or models:/"
    )
    add_config_arguments(parser)
    parser.add_argument("--alias", help="alias to point at the new version (default: tracking.alias)")
    parser.add_argument(
        "--eval-table",
        help="evaluation table (CSV from `lightbsr evaluate`) to ship, tag PSNR from and compare with the champion's",
    )
    parser.add_argument(
        "--force", action="store_true", help="move the alias even when the gate would hold it (not better, no table)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    preflight.check(cfg, skip=NOT_USED_KEYS)
    try:
        done = register_version(args.checkpoint, cfg, args.alias, args.eval_table, args.force)
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    if done.gate.promote:
        print(f"registered models:/{done.name}/{done.version} as models:/{done.name}@{done.alias}: {done.gate.reason}")
    else:
        print(f"registered models:/{done.name}/{done.version} WITHOUT the alias {done.alias!r}: {done.gate.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main, prog="lightbsr register"))
