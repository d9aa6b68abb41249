"""The pipeline's records: a rerun with a changed config is refused with the differing keys named;
the closing summary's `lightbsr upscale` line."""

import shlex

import pytest

from workflows import pipeline
from workflows.cli import run
from workflows.config import load_config
from workflows.resume import ConfigChanged

pytestmark = pytest.mark.unit


def _overrides(tmp_path, sample_images, *more):
    return [
        f"storage.root={tmp_path / 'store'}",
        f"data.train_images={sample_images / 'train'}",
        f"data.eval_images={sample_images / 'eval'}",
        "train.run_name=fingerprinted",
        *more,
    ]


def test_a_rerun_with_a_changed_config_is_refused_with_the_differing_keys_named(tmp_path, sample_images, capsys):
    cfg = load_config(None, _overrides(tmp_path, sample_images))
    first = pipeline.run_pipeline(cfg, ("samples",), log=lambda line: None)
    assert first["samples"]["fingerprint"]["data.patch_size"] == "64"

    # harmless keys (log interval, worker count, tracking experiment) may change: the step is skipped
    seen: list[str] = []
    harmless = load_config(
        None,
        _overrides(tmp_path, sample_images, "train.log_every_steps=3", "train.num_workers=2", "tracking.experiment=x"),
    )
    pipeline.run_pipeline(harmless, ("samples",), log=seen.append)
    assert seen == ["[pipeline] samples: already done, skipping"]

    changed = load_config(None, _overrides(tmp_path, sample_images, "data.patch_size=32", "loss.spatial_weight=0.5"))
    with pytest.raises(ConfigChanged) as refused:
        pipeline.run_pipeline(changed, ("samples",), log=lambda line: None)
    message = str(refused.value)
    assert "data.patch_size: 64 -> 32" in message and "loss.spatial_weight: 1.0 -> 0.5" in message
    assert "log_every_steps" not in message and "num_workers" not in message

    # the command line: exit 2 and one line naming the keys and how to start a new run
    argv = ["--steps", "samples"] + [
        a for o in _overrides(tmp_path, sample_images, "data.views=3") for a in ("--set", o)
    ]
    assert run(pipeline.main, argv, prog="lightbsr pipeline") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.views: 4 -> 3" in err[0] and "--set train.run_name=" in err[0]


def test_the_upscale_line_names_the_tracking_server_and_the_s3_endpoint_without_credentials(tmp_path):
    cfg = load_config(
        None,
        [
            "tracking.uri=http://alice:s3cr3t@mlflow.example:5000",
            "storage.root=s3://bucket/runs",
            "storage.s3.endpoint_url=http://bob:hunter2@127.0.0.1:8333",
        ],
    )
    words = shlex.split(pipeline.upscale_command(cfg, "models:/lightbsr-x4@champion"))
    assert words == [
        "MLFLOW_TRACKING_URI=http://mlflow.example:5000",
        "MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:8333",
        "lightbsr",
        "upscale",
        "--model",
        "models:/lightbsr-x4@champion",
        "INPUT",
        "OUTPUT",
    ]


def test_the_upscale_line_runs_on_a_held_out_image_when_the_folder_is_local(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "zebra.png").write_bytes(b"")  # listed by name only
    (tmp_path / "eval" / "bird.png").write_bytes(b"")
    cfg = load_config(None, [f"data.eval_images={tmp_path / 'eval'}", "model.scale=2"])
    words = shlex.split(pipeline.upscale_command(cfg, "models:/m@champion", pipeline.example_input(cfg)))
    assert words[-2:] == [str(tmp_path / "eval" / "bird.png"), "bird_x2.png"]
    remote = load_config(None, ["data.eval_images=s3://bucket/eval"])
    assert pipeline.example_input(remote) is None
