"""Evaluation tables (local == Ray Data), the bicubic baseline, published rows, IDR discriminability."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image

from lightbsr.checkpoint import save_checkpoint
from lightbsr.degrade import bicubic_upsample
from lightbsr.images import read_rgb
from lightbsr.protocols import get_protocol
from lightbsr.student import Student
from workflows.config import load_config
from workflows.evaluate import BICUBIC, OURS, evaluate_model, probe_scores

pytestmark = pytest.mark.unit


def y_psnr(sr: np.ndarray, hr: np.ndarray, border: int) -> float:
    """Independent benchmark PSNR: 8-bit SR, Y = RGB . (65.738, 129.057, 25.064) / 256, border cut."""
    sr8 = np.round(np.clip(sr, 0, 1) * 255)
    hr8 = np.round(hr * 255)
    diff = np.tensordot(np.array([65.738, 129.057, 25.064]) / 256, sr8 - hr8, axes=(0, 0))
    diff = diff[border:-border, border:-border]
    return float(10 * np.log10(255**2 / np.mean(diff**2)))


@pytest.fixture(scope="module")
def parity_checkpoint(parity_vectors, tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "student_x4.pt"
    torch.save(parity_vectors["student_x4"]["state_dict"], path)  # the authors' key format
    return path


def eval_config(sample_images, *extra):
    return load_config(None, [f"data.eval_images={sample_images / 'eval'}", "evaluate.crop=64", *extra])


def test_bicubic_upsample_matches_pillow_away_from_the_borders():
    rng = np.random.default_rng(0)
    lr = rng.random((11, 14)).astype(np.float32)
    ours = bicubic_upsample(torch.from_numpy(lr)[None, None].double(), 4)[0, 0].numpy()
    pillow = np.asarray(Image.fromarray(lr, "F").resize((56, 44), Image.Resampling.BICUBIC))  # a = -0.5 too
    assert ours.shape == (44, 56)
    assert np.abs(ours[8:-8, 8:-8] - pillow[8:-8, 8:-8]).max() < 1e-5
    flat = bicubic_upsample(torch.full((1, 1, 5, 7), 0.3, dtype=torch.float64), 3)
    assert torch.allclose(flat, torch.full_like(flat, 0.3))


def test_probe_scores_tell_separable_degradations_from_noise():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 40)
    train = np.tile(np.arange(40) < 20, 4)
    separable = rng.normal(size=(160, 16)) * 0.1 + np.eye(16)[labels] * 3
    noise = rng.normal(size=(160, 16))
    good, bad = probe_scores(separable, labels, train), probe_scores(noise, labels, train)
    assert good["probe_accuracy"] == 1.0 and good["silhouette"] > 0.8
    assert bad["probe_accuracy"] < 0.5 and abs(bad["silhouette"]) < 0.1
    assert good["chance"] == 0.25


def test_tables_hold_bicubic_published_and_our_rows_with_independent_numbers(sample_images, tmp_path):
    bench = tmp_path / "bench" / "Set5" / "HR"
    bench.mkdir(parents=True)
    for name in ("kodim23.png", "monarch.png"):
        Image.fromarray(read_rgb(sample_images / "eval" / name)[:64, :80]).save(bench / name)
    torch.manual_seed(0)
    student = Student(scale=4, n_groups=1, n_blocks=1).eval()
    save_checkpoint(
        tmp_path / "s.pt",
        student,
        role="student",
        model_config={"scale": 4, "n_groups": 1, "n_blocks": 1},
        pca_basis=None,
    )
    cfg = load_config(None, ["evaluate.samples=false", "evaluate.protocols=[iso_x4, gaussian8]"])
    result = evaluate_model(
        str(tmp_path / "s.pt"), cfg, benchmarks=str(tmp_path / "bench"), local=True, idr=False, log=False
    )
    md = result.tables.markdown
    assert "| Bicubic [published] | - | 27.30 / 25.12 / 23.40 |" in md
    assert "| DASR (CVPR 21) [published] | 5.8M | 31.92 / 31.75 / 30.59 |" in md
    assert "| KDSRs-M (ICLR 23) [published] | 5.80M | 32.02 |" in md
    assert "B100" not in md  # only the sets present
    # one per-image score, recomputed independently
    row = next(r for r in result.rows if r["image"] == "monarch.png" and r["case"] == "sigma2.4")
    protocol = get_protocol("iso_x4")
    hr = torch.from_numpy(read_rgb(bench / "monarch.png")).permute(2, 0, 1)[None].float() / 255
    hr, lr = protocol.make_pair(hr, protocol.case("sigma2.4"), "Set5/monarch.png")
    with torch.no_grad():
        sr = student(lr)
    assert row["psnr"] == pytest.approx(y_psnr(sr[0].numpy(), hr[0].numpy(), 4), abs=1e-6)
    # the table's per-set figure is the mean over the set's images
    lines = list(csv.DictReader(io.StringIO(result.tables.csv)))
    ours = next(r for r in lines if r["method"] == OURS and r["protocol"] == "iso_x4" and r["case"] == "sigma2.4")
    expected = np.mean([r["psnr"] for r in result.rows if r["protocol"] == "iso_x4" and r["case"] == "sigma2.4"])
    assert float(ours["Set5 PSNR"]) == pytest.approx(expected, abs=1e-4)
    base = next(r for r in lines if r["method"] == BICUBIC and r["protocol"] == "gaussian8" and r["case"] == "mean")
    # the bicubic baseline loses PSNR as the blur widens (Gaussian8: sigma 1.8 .. 3.2), and "mean" is their mean
    cases = {r["case"]: float(r["Set5 PSNR"]) for r in lines if r["method"] == BICUBIC and r["protocol"] == "gaussian8"}
    by_sigma = [cases[c.name] for c in get_protocol("gaussian8").cases]
    assert np.all(np.diff(by_sigma) < 0), by_sigma
    assert float(base["Set5 PSNR"]) == pytest.approx(np.mean(by_sigma), abs=0.01)


@pytest.fixture(scope="module")
def logged_local_run(parity_checkpoint, parity_vectors, sample_images, mlflow_server, tmp_path_factory):
    """The parity student scored locally on the evaluation photographs, with the IDR probe, logged to MLflow."""
    folder = tmp_path_factory.mktemp("evaluate")
    torch.save(parity_vectors["teacher_x4_setting1"]["state_dict"], folder / "teacher.pt")
    cfg = eval_config(
        sample_images,
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=evaluate-test",
        "evaluate.idr_patches=8",
        "evaluate.idr_patch=64",
    )
    result = evaluate_model(
        str(parity_checkpoint), cfg, local=True, teacher_ref=str(folder / "teacher.pt"), out=str(folder / "out")
    )
    return cfg, result, folder


@pytest.mark.integration
def test_parity_model_tables_are_identical_locally_and_through_ray_data(logged_local_run, parity_checkpoint, ray_local):
    cfg, local, _ = logged_local_run
    remote = evaluate_model(str(parity_checkpoint), cfg, local=False, idr=False, log=False)
    assert len(local.rows) == 5 * 3  # five evaluation photographs x three sigmas
    assert remote.rows == local.rows  # every float, exactly
    assert remote.tables.csv == local.tables.csv and remote.tables.markdown == local.tables.markdown
    assert "| Bicubic | - |" in local.tables.markdown and f"| {OURS} | 3.26M |" in local.tables.markdown


@pytest.mark.integration
def test_idr_discriminability_and_tables_are_logged_to_mlflow(logged_local_run, mlflow_server, tmp_path):
    import mlflow

    _, result, folder = logged_local_run
    teacher, student = result.idr["teacher"], result.idr["student"]
    assert teacher["probe_accuracy"] > teacher["chance"]  # its input carries the degradation prior
    assert student["chance"] == teacher["chance"]  # both probes score the same degradation labels
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.data.metrics["idr/teacher/probe_accuracy"] == teacher["probe_accuracy"]
    assert run.data.metrics["idr/student/silhouette"] == student["silhouette"]
    assert run.data.metrics["ours/psnr/iso_x4/samples/mean"] == pytest.approx(
        np.mean([r["psnr"] for r in result.rows]), abs=1e-4
    )
    names = {f.path for f in client.list_artifacts(result.run_id, "evaluation")}
    assert {
        "evaluation/table.md",
        "evaluation/table.csv",
        "evaluation/per_image.csv",
        "evaluation/idr_projection.png",
    } <= names
    local_png = client.download_artifacts(result.run_id, "evaluation/idr_projection.png", str(tmp_path))
    with Image.open(local_png) as plot:
        assert plot.format == "PNG" and plot.size[0] > 1.8 * plot.size[1]  # teacher and student panels
    assert (folder / "out" / "table.md").read_text() == result.tables.markdown


def test_evaluate_command_names_a_missing_model_and_writes_nothing(tmp_path, capsys):
    from workflows.evaluate import main

    code = main(
        [
            "--model",
            str(tmp_path / "missing.pt"),
            "--local",
            "--no-mlflow",
            "--out",
            str(tmp_path / "out"),
            "--set",
            f"storage.root={tmp_path}",
        ]
    )
    assert code == 1
    assert f"checkpoint {tmp_path / 'missing.pt'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
