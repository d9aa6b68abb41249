"""The model registry against a real `mlflow server`: register, then pull by alias in a fresh process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lightbsr.checkpoint import save_checkpoint
from lightbsr.images import read_rgb
from lightbsr.student import Student
from lightbsr.tiling import upscale
from tests.fixtures.mlflow_server import free_port, stop_process, wait_http
from tests.fixtures.paths import REPO
from workflows.cli import run
from workflows.config import load_config
from workflows.errors import EXIT_USAGE
from workflows.evaluate import build_tables
from workflows.references import RegistryError, fetch_checkpoint, resolve
from workflows.register import gate, register_checkpoint, register_version
from workflows.register import main as register_main
from workflows.upscale import main as upscale_main

pytestmark = pytest.mark.unit

MODEL_CONFIG = {"scale": 2, "setting": 1, "n_groups": 1, "n_blocks": 2}
SECRET = "Pa55w0rd-in-userinfo"


def small_student(seed: int = 0) -> Student:
    """Random but fixed weights, with layer scales that let the body change the output."""
    torch.manual_seed(seed)
    student = Student(scale=2, n_groups=1, n_blocks=2)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.2)
    return student.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "student"
    config = {"tracking": {"uri": f"http://trainer:{SECRET}@mlflow.example:5000"}}  # as an older run stored it
    save_checkpoint(
        path, small_student(), role="student", model_config=MODEL_CONFIG, pca_basis=torch.zeros(441, 15), config=config
    )
    assert SECRET.encode() in (path / "model.pt").read_bytes()
    return path


PER_IMAGE_PSNR = {
    ("a.png", "sigma1.2"): 27.0,
    ("b.png", "sigma1.2"): 28.0,
    ("a.png", "sigma2.4"): 25.5,
    ("b.png", "sigma2.4"): 26.5,
    ("a.png", "sigma3.6"): 24.0,
    ("b.png", "sigma3.6"): 23.0,
}


@pytest.fixture(scope="module")
def eval_table(tmp_path_factory) -> Path:
    """A table as `lightbsr evaluate` writes it, from known per-image scores."""
    rows = [
        {
            "set": "samples",
            "image": image,
            "protocol": "iso_x4",
            "case": case,
            "psnr": value,
            "ssim": 0.5,
            "bicubic_psnr": value - 3,
            "bicubic_ssim": 0.4,
        }
        for (image, case), value in PER_IMAGE_PSNR.items()
    ]
    path = tmp_path_factory.mktemp("table") / "table.csv"
    path.write_text(build_tables(rows, ["iso_x4"], params=123).csv)
    return path


@pytest.fixture(scope="module")
def registered(mlflow_server, checkpoint, eval_table):
    cfg = load_config(
        None,
        [
            f"tracking.uri={mlflow_server}",
            "tracking.experiment=register-test",
            "tracking.registered_model=lightbsr-test",
        ],
    )
    name, version = register_checkpoint(str(checkpoint), cfg, alias="champion", eval_table=str(eval_table))
    return cfg, name, version


@pytest.fixture(scope="module")
def photo(sample_images) -> np.ndarray:
    return read_rgb(sample_images / "eval" / "kodim23.png")[100:172, 200:296]  # (72, 96, 3) real photograph


def fresh_python(code: str, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_pyfunc_pulled_by_alias_in_a_fresh_process_equals_the_direct_output(registered, photo, checkpoint, tmp_path):
    cfg, name, _ = registered
    np.save(tmp_path / "in.npy", photo[None])
    code = (
        "import mlflow.pyfunc, numpy as np, sys\n"
        # Hide this project (its editable-install finder and the repo on sys.path): the model must
        # bring its own code (code_paths), as it would for a user who only has torch + mlflow.
        "sys.meta_path = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
        f"sys.path = [p for p in sys.path if p and p.rstrip('/') != {str(REPO)!r}]\n"
        "try:\n    import lightbsr\n    sys.exit('lightbsr importable before loading the model')\n"
        "except ImportError:\n    pass\n"
        f"model = mlflow.pyfunc.load_model('models:/{name}@champion')\n"
        f"out = model.predict(np.load({str(tmp_path / 'in.npy')!r}))\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
        f"import lightbsr; assert not lightbsr.__file__.startswith({str(REPO / 'lightbsr')!r}), lightbsr.__file__\n"
    )
    done = fresh_python(code, cfg.tracking_uri)
    assert done.returncode == 0, done.stderr[-3000:]
    pulled = np.load(tmp_path / "out.npy")
    direct = upscale(small_student(), torch.from_numpy(photo)).numpy()
    assert pulled.shape == (1, 144, 192, 3) and pulled.dtype == np.uint8
    assert np.array_equal(pulled[0], direct)


@pytest.mark.e2e
def test_upscale_command_in_a_fresh_process_pulls_the_champion(registered, photo, sample_images, tmp_path):
    cfg, name, _ = registered
    from PIL import Image

    Image.fromarray(photo).save(tmp_path / "photo.png")
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("lightbsr")),
            "upscale",
            "--model",
            f"models:/{name}@champion",
            str(tmp_path / "photo.png"),
            str(tmp_path / "big.png"),
            "--set",
            f"tracking.uri={cfg.tracking_uri}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    direct = upscale(small_student(), torch.from_numpy(photo)).numpy()
    assert np.array_equal(read_rgb(tmp_path / "big.png"), direct)


@pytest.mark.integration
def test_registered_version_carries_tags_alias_signature_and_artifacts(registered, tmp_path):
    from mlflow import MlflowClient

    cfg, name, version = registered
    client = MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
    mv = client.get_model_version_by_alias(name, "champion")
    assert mv.version == version
    expected_params = sum(p.numel() for p in small_student().parameters())
    assert mv.tags["scale"] == "2" and mv.tags["setting"] == "1"
    assert mv.tags["parameters"] == str(expected_params)
    assert mv.tags["psnr.iso_x4.samples"] == f"{np.mean(list(PER_IMAGE_PSNR.values())):.2f}"  # 25.67
    model_file = fetch_checkpoint(f"models:/{name}@champion", cfg, tmp_path)
    raw = torch.load(model_file, weights_only=True)
    assert raw["format"] == "lightbsr/1" and raw["model_config"]["scale"] == 2
    assert torch.equal(raw["pca_basis"], torch.zeros(441, 15))
    assert raw["config"] == {"tracking": {"uri": "http://mlflow.example:5000"}}  # the userinfo is not registered
    assert SECRET.encode() not in model_file.read_bytes()
    from mlflow.models import get_model_info

    info = get_model_info(f"models:/{name}/{version}")
    outputs = json.loads(info.signature.to_dict()["outputs"])
    assert outputs[0]["tensor-spec"] == {"dtype": "uint8", "shape": [-1, -1, -1, 3]}
    assert info.signature.inputs is None  # no schema: MLflow would cast float JSON to uint8 before predict
    assert (model_file.parent / "table.csv").is_file()  # the evaluation table travels with the model


@pytest.mark.integration
@pytest.mark.parametrize(
    "ref,named",
    [
        ("models:/no-such-model@champion", "no registered model 'no-such-model'"),
        ("models:/lightbsr-test@no-such-alias", "no alias 'no-such-alias'"),
    ],
)
def test_missing_model_or_alias_is_named_and_nothing_is_written(registered, ref, named, photo, tmp_path, capsys):
    cfg = registered[0]
    with pytest.raises(RegistryError, match=named):
        fetch_checkpoint(ref, cfg, tmp_path)
    from PIL import Image

    Image.fromarray(photo).save(tmp_path / "in.png")
    code = run(
        upscale_main,
        [
            "--model",
            ref,
            str(tmp_path / "in.png"),
            str(tmp_path / "out" / "big.png"),
            "--set",
            f"tracking.uri={cfg.tracking_uri}",
            "--quiet",
        ],
        prog="lightbsr upscale",
    )
    assert code == EXIT_USAGE and named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_registry_that_is_down_is_named_quickly_and_leaves_no_output(tmp_path, sample_images):
    uri = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "out.png"
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("lightbsr")),
            "upscale",
            "--model",
            "models:/lightbsr-x4@champion",
            str(sample_images / "eval" / "monarch.png"),
            str(out),
            "--set",
            f"tracking.uri={uri}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_USAGE  # preflight: a tracking server that is down is a config error
    assert f"MLflow tracking server {uri} is not reachable" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_register_with_the_registry_down_names_it(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    argv = ["--checkpoint", str(tmp_path / "any.pt"), "--set", f"tracking.uri={uri}"]
    assert run(register_main, argv, prog="lightbsr register") == EXIT_USAGE
    assert f"MLflow tracking server {uri} is not reachable" in capsys.readouterr().err


@pytest.mark.integration
def test_an_alias_resolves_to_its_version_and_a_run_artifact_to_its_file(registered, checkpoint, tmp_path):
    """`models:/name@alias` says which version it pointed at; `runs:/<id>/checkpoint` is the file logged there."""
    from mlflow import MlflowClient

    cfg, name, version = registered
    found = resolve(f"models:/{name}@champion", cfg, tmp_path / "alias")
    assert found.registry is not None and (found.registry.name, found.registry.version) == (name, version)
    by_number = resolve(f"models:/{name}/{version}", cfg, tmp_path / "number")
    assert by_number.file.read_bytes() == found.file.read_bytes()
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    experiment = client.get_experiment_by_name("register-test")  # made by the fixture's registration
    run_id = client.create_run(experiment.experiment_id).info.run_id
    client.log_artifact(run_id, str(checkpoint / "model.pt"), artifact_path="checkpoint")
    fetched = resolve(f"runs:/{run_id}/checkpoint", cfg, tmp_path / "run")
    assert fetched.registry is None
    assert fetched.file.name == "model.pt" and fetched.file.read_bytes() == (checkpoint / "model.pt").read_bytes()
    with pytest.raises(RegistryError, match="cannot be fetched"):
        resolve(f"runs:/{run_id}/no-such-artifact", cfg, tmp_path / "missing")


@pytest.fixture(scope="module")
def pyfunc_server(registered, tmp_path_factory):
    """`mlflow models serve` of the champion (the registered pyfunc as its users serve it), in this venv."""
    cfg, name, _ = registered
    port = free_port()
    log = tmp_path_factory.mktemp("pyfunc-serve") / "server.log"
    command = [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{name}@champion"]
    command += ["--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking_uri}, stdout=handle, stderr=handle
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", timeout=180, proc=proc)
    except (RuntimeError, TimeoutError) as error:
        stop_process(proc)
        raise RuntimeError(f"mlflow models serve failed; log:\n{log.read_text()[-3000:]}") from error
    yield f"http://127.0.0.1:{port}"
    stop_process(proc)


@pytest.mark.e2e
def test_served_pyfunc_takes_an_hw3_image_and_refuses_float_json_with_a_short_error(pyfunc_server, photo):
    import requests

    crop = photo[:20, :24]  # (20, 24, 3): one image, no batch axis, as JSON integers
    answer = requests.post(f"{pyfunc_server}/invocations", json={"inputs": crop.tolist()}, timeout=120)
    assert answer.status_code == 200, answer.text[-2000:]
    direct = upscale(small_student(), torch.from_numpy(crop)).numpy()
    assert np.array_equal(np.asarray(answer.json()["predictions"], np.uint8), direct)
    floats = (crop[None] / 255.0).tolist()  # an image in [0, 1]: used to come back black with 200 OK
    refused = requests.post(f"{pyfunc_server}/invocations", json={"inputs": floats}, timeout=120)
    assert refused.status_code == 400
    assert "expected uint8 pixel values 0..255, got float64" in refused.text
    assert f"{floats[0][0][0][0]!r}" not in refused.text and len(refused.text) < 5000  # no array dump


@pytest.mark.parametrize(
    "images,named",
    [
        (np.full((1, 8, 8, 3), 0.5), "got float64"),
        (np.full((8, 8, 3), 300, np.int64), "values from 300 to 300"),
        (np.zeros((8, 8), np.uint8), "got shape (8, 8)"),
    ],
)
def test_pyfunc_input_check_names_dtype_range_or_shape(images, named):
    from workflows.serving import checked_images

    with pytest.raises(ValueError, match=re.escape(named)):
        checked_images(images)


def test_pyfunc_input_check_takes_integer_pixels_as_uint8():
    from workflows.serving import checked_images

    pixels = np.arange(4 * 4 * 3, dtype=np.int64).reshape(4, 4, 3) * 5  # 0..235, as JSON numbers arrive
    checked = checked_images(pixels)
    assert checked.dtype == np.uint8 and np.array_equal(checked, pixels)


# ---- the gate and lineage (real `mlflow server`) ----------------------------------------------


def table_with(tmp_path: Path, name: str, shift: float) -> str:
    """An evaluation table whose every per-image PSNR is PER_IMAGE_PSNR's + `shift` dB."""
    rows = [
        {
            "set": "samples",
            "image": image,
            "protocol": "iso_x4",
            "case": case,
            "psnr": value + shift,
            "ssim": 0.5,
            "bicubic_psnr": value - 3,
            "bicubic_ssim": 0.4,
        }
        for (image, case), value in PER_IMAGE_PSNR.items()
    ]
    path = tmp_path / f"{name}.csv"
    path.write_text(build_tables(rows, ["iso_x4"], params=123).csv)
    return str(path)


def gate_config(uri: str, model_name: str):
    overrides = [f"tracking.uri={uri}", "tracking.experiment=gate-test", f"tracking.registered_model={model_name}"]
    return load_config(None, overrides)


def alias_holder(cfg, name: str) -> str:
    from mlflow import MlflowClient

    return (
        MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)
        .get_model_version_by_alias(name, "champion")
        .version
    )


@pytest.mark.integration
def test_a_worse_challenger_does_not_take_the_alias_and_a_better_one_does(mlflow_server, checkpoint, tmp_path):
    from mlflow import MlflowClient

    cfg = gate_config(mlflow_server, "lightbsr-gate")
    first = register_version(str(checkpoint), cfg, eval_table=table_with(tmp_path, "base", 0.0))
    assert first.gate.promote and alias_holder(cfg, first.name) == first.version
    worse = register_version(str(checkpoint), cfg, eval_table=table_with(tmp_path, "worse", -0.5))
    assert not worse.gate.promote and alias_holder(cfg, first.name) == first.version
    assert "worse than the champion on iso_x4/samples 25.1667 < 25.6667 dB" in worse.gate.reason
    tags = MlflowClient(tracking_uri=cfg.tracking_uri).get_model_version(worse.name, worse.version).tags
    assert tags["gate"] == "held" and tags["gate.champion_version"] == first.version
    better = register_version(str(checkpoint), cfg, eval_table=table_with(tmp_path, "better", 0.25))
    assert better.gate.promote and alias_holder(cfg, first.name) == better.version
    assert "25.9167 >= 25.6667 dB" in better.gate.reason


@pytest.mark.integration
def test_register_prints_why_it_holds_the_alias_and_force_moves_it(mlflow_server, checkpoint, tmp_path, capsys):
    cfg = gate_config(mlflow_server, "lightbsr-gate-force")
    base = ["--checkpoint", str(checkpoint), *(f"--set={item}" for item in gate_overrides(cfg))]
    assert run(register_main, [*base, "--eval-table", table_with(tmp_path, "base", 0.0)]) == 0
    champion = alias_holder(cfg, "lightbsr-gate-force")
    capsys.readouterr()
    assert run(register_main, base) == 0  # no table: nothing to compare with
    out = capsys.readouterr().out
    assert "WITHOUT the alias 'champion': no evaluation table to compare with the champion's" in out
    assert alias_holder(cfg, "lightbsr-gate-force") == champion
    assert run(register_main, [*base, "--eval-table", table_with(tmp_path, "worse", -1.0), "--force"]) == 0
    forced = alias_holder(cfg, "lightbsr-gate-force")
    assert int(forced) == int(champion) + 2 and "forced (--force)" in capsys.readouterr().out


def gate_overrides(cfg) -> list[str]:
    return [
        f"tracking.uri={cfg.tracking_uri}",
        f"tracking.experiment={cfg.tracking.experiment}",
        f"tracking.registered_model={cfg.tracking.registered_model}",
    ]


@pytest.mark.integration
def test_a_version_leads_back_to_its_training_runs_config_and_shards(mlflow_server, sample_images, tmp_path):
    """The training runs log the shards as a dataset input (as `train_stage` does); register tags the version."""
    import hashlib

    from mlflow import MlflowClient

    from workflows import lineage, tracking
    from workflows.resume import fingerprint
    from workflows.shards import write_shards

    (tmp_path / "hr").mkdir()
    (tmp_path / "hr" / "rocket.png").write_bytes((sample_images / "train" / "rocket.png").read_bytes())
    cfg = load_config(
        None,
        [
            f"storage.root={tmp_path / 'runs'}",
            f"tracking.uri={mlflow_server}",
            "tracking.experiment=lineage-test",
            "tracking.registered_model=lightbsr-lineage",
            "train.run_name=lin",
            "data.tile_size=128",
            "data.patch_size=16",
        ],
    )
    write_shards(str(tmp_path / "hr"), cfg.shards_url, cfg, progress=False)
    manifest = (Path(cfg.shards_url) / "manifest.json").read_bytes()
    run_ids = {}
    for stage in ("teacher", "student"):
        with tracking.stage_run(cfg, f"lin-{stage}", {"lightbsr.stage": stage}) as run_id:
            assert run_id is not None and lineage.log_shards_input(cfg, run_id)
            run_ids[stage] = run_id
    trained = cfg.model_copy(deep=True)
    trained.train.teacher_checkpoint = f"{cfg.storage.root}/lin-teacher/checkpoint_000002"
    student_file = tmp_path / "student.pt"
    save_checkpoint(
        student_file,
        small_student(),
        role="student",
        model_config=MODEL_CONFIG,
        pca_basis=torch.zeros(441, 15),
        config=tracking.redacted_config(trained),
    )
    done = register_version(str(student_file), cfg)
    client = MlflowClient(tracking_uri=cfg.tracking_uri)
    tags = client.get_model_version(done.name, done.version).tags
    digest = hashlib.sha256(manifest).hexdigest()[:32]
    assert tags["lineage.teacher_run_id"] == run_ids["teacher"]
    assert tags["lineage.student_run_id"] == run_ids["student"]
    assert tags["lineage.shards_digest"] == digest
    config_digest = hashlib.sha256(json.dumps(fingerprint(trained), sort_keys=True).encode()).hexdigest()
    assert tags["lineage.config_fingerprint"] == config_digest
    (logged,) = client.get_run(run_ids["student"]).inputs.dataset_inputs
    assert logged.dataset.name == "shards" and logged.dataset.digest == digest
    assert json.loads(logged.dataset.source)["uri"] == cfg.shards_url
    assert json.loads(logged.dataset.profile)["tiles"] == json.loads(manifest)["counts"]["tiles"] > 0
    assert {(t.key, t.value) for t in logged.tags} == {("mlflow.data.context", "training")}


@pytest.mark.parametrize(
    "challenger,champion,promote,words",
    [
        ({("iso_x4", "Set5"): 30.0}, None, True, "no version holds the alias"),
        (None, {("iso_x4", "Set5"): 30.0}, False, "no evaluation table"),
        ({("iso_x4", "Set5"): 30.0}, {}, False, "the champion has no evaluation table"),
        ({("iso_x4", "Set5"): 31.0}, {("iso_x4", "Set5"): 30.0, ("iso_x4", "B100"): 28.0}, False, "lacks iso_x4/B100"),
        ({("iso_x4", "Set5"): 30.0, ("x", "y"): 1.0}, {("iso_x4", "Set5"): 30.0}, True, "30.0000 >= 30.0000"),
    ],
)
def test_the_gate_holds_the_alias_without_a_like_for_like_comparison(challenger, champion, promote, words):
    decision = gate(challenger, champion)
    assert decision.promote is promote and words in decision.reason
