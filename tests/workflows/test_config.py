"""The typed config: YAML + overrides, unknown keys and wrong types named, derived values."""

import pytest

from workflows.config import ConfigError, flatten_config, load_config

pytestmark = pytest.mark.unit


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    assert (cfg.model.n_groups, cfg.model.n_blocks, cfg.model.scale) == (8, 8, 4)
    assert (cfg.model.setting, cfg.model.queue_size, cfg.model.momentum, cfg.model.pca_seed) == (1, 8192, 0.999, 0)
    assert (cfg.schedule.epochs, cfg.schedule.iters_per_epoch, cfg.schedule.phase1_epochs) == (700, 970, 100)
    assert (cfg.train.batch_size, cfg.data.patch_size) == (64, 64)
    assert (cfg.loss.contrastive_temperature, cfg.loss.kd_temperature, cfg.loss.channel_l1_weight) == (0.07, 0.15, 0.1)


def test_setting_and_scale_are_config_values(tmp_path):
    cfg = load_config(write(tmp_path, "model: {scale: 2, setting: 2}\ndata: {tile_size: 128}\n"))
    assert cfg.model.scale == 2 and cfg.prior_channels == 18 and cfg.registered_model == "lightbsr-x2"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.bach_size: unknown key"):
        load_config(write(tmp_path, "train: {bach_size: 8}\n"))


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"train\.use_gpu"):
        load_config(overrides=["train.use_gpu=maybe"])


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    cfg = load_config(write(tmp_path, "train: {batch_size: 8}\n"), ["train.batch_size=16", "loss.kd_temperature=0.2"])
    assert cfg.train.batch_size == 16 and cfg.loss.kd_temperature == 0.2
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(overrides=["train.batch_size"])


def test_cross_field_rules_name_the_keys():
    with pytest.raises(ConfigError, match=r"data\.tile_size"):
        load_config(overrides=["data.tile_size=64", "data.patch_size=32"])
    with pytest.raises(ConfigError, match=r"train\.num_workers"):
        load_config(overrides=["train.batch_size=5", "train.num_workers=2"])


def test_local_paths_become_absolute_and_urls_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["storage.root=runs", "data.train_images=s3://bucket/hr"])
    assert cfg.storage.root == str(tmp_path / "runs")
    assert cfg.data.train_images == "s3://bucket/hr"
    assert cfg.shards_url == str(tmp_path / "runs" / "shards" / "train")


@pytest.mark.parametrize(
    "reference",
    ["models:/lightbsr-x4@champion", "models:/lightbsr-x4/3", "runs:/0123abcd/checkpoint", "s3://bucket/t/model.pt"],
)
def test_a_remote_teacher_checkpoint_stays_as_given(reference):
    assert load_config(overrides=[f"train.teacher_checkpoint={reference}"]).train.teacher_checkpoint == reference


def test_a_relative_teacher_checkpoint_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(overrides=["train.teacher_checkpoint=runs/teacher/model.pt"])
    assert cfg.train.teacher_checkpoint == str(tmp_path / "runs" / "teacher" / "model.pt")
    url = "file:///data/teacher.pt"
    assert load_config(overrides=[f"train.teacher_checkpoint={url}"]).train.teacher_checkpoint == url


def test_tracking_uri_default_env_and_remote_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(overrides=[f"storage.root={tmp_path}"])
    assert cfg.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking_uri == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    remote = load_config(overrides=["storage.root=s3://bucket/runs"])
    with pytest.raises(ConfigError, match=r"tracking\.uri"):
        _ = remote.tracking_uri


def test_flatten_config_names_every_leaf():
    flat = flatten_config(load_config())
    assert flat["loss.kd_temperature"] == "0.15" and flat["model.scale"] == "4"
    assert not any(isinstance(v, dict) for v in flat.values())
