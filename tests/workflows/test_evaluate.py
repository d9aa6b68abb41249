"""Evaluation tables (local == Ray Data), the bicubic baseline, published rows, IDR discriminability."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lightbsr.checkpoint import save_checkpoint
from lightbsr.degrade import bicubic_upsample
from lightbsr.images import read_rgb
from lightbsr.protocols import get_protocol
from lightbsr.student import Student
from tests.fixtures.paths import REPO
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


# Local scoring runs in the test process (all threads), Ray's actors in workers with one CPU each:
# float32 convolutions then sum in another order and SR pixels differ by ~1e-6, so after the
# 8-bit rounding of the metrics one pixel level may flip now and then. One flipped level in one
# pixel of the 56x56 scored crop moves an image's Y-PSNR by under 5e-4 dB and its SSIM by under
# 1e-5; a wrong image, case or model moves them by tenths of a dB.
PSNR_TOL_DB, SSIM_TOL = 2e-3, 5e-5


def _numbers_close(a: str, b: str, tol: float) -> bool:
    """`a` and `b` equal once every number in them is compared within `tol`."""
    pattern = r"-?\d+\.\d+"
    if re.sub(pattern, "#", a) != re.sub(pattern, "#", b):
        return False
    return all(abs(float(x) - float(y)) <= tol for x, y in zip(re.findall(pattern, a), re.findall(pattern, b)))


@pytest.mark.integration
def test_parity_model_tables_agree_locally_and_through_ray_data(logged_local_run, parity_checkpoint, ray_local):
    cfg, local, _ = logged_local_run
    remote = evaluate_model(str(parity_checkpoint), cfg, local=False, idr=False, log=False)
    assert len(local.rows) == 5 * 3  # five evaluation photographs x three sigmas
    assert [(r["set"], r["image"], r["case"]) for r in remote.rows] == [
        (r["set"], r["image"], r["case"]) for r in local.rows
    ]
    for ours, theirs in zip(remote.rows, local.rows):
        for key in ("psnr", "bicubic_psnr"):
            assert ours[key] == pytest.approx(theirs[key], abs=PSNR_TOL_DB), (ours, theirs)
        for key in ("ssim", "bicubic_ssim"):
            assert ours[key] == pytest.approx(theirs[key], abs=SSIM_TOL), (ours, theirs)
    assert _numbers_close(remote.tables.csv, local.tables.csv, PSNR_TOL_DB)
    # markdown shows two decimals: a last digit may round the other way
    assert _numbers_close(remote.tables.markdown, local.tables.markdown, 0.01 + PSNR_TOL_DB)
    assert "| Bicubic | - |" in local.tables.markdown and f"| {OURS} | 3.26M |" in local.tables.markdown


@pytest.mark.integration
def test_idr_discriminability_and_tables_are_logged_to_mlflow(logged_local_run, mlflow_server, tmp_path):
    import mlflow

    _, result, folder = logged_local_run
    teacher, student = result.idr["teacher"], result.idr["student"]
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


def test_evaluate_command_names_a_missing_model_and_writes_nothing(sample_images, tmp_path, capsys):
    from workflows.cli import run
    from workflows.evaluate import main

    argv = ["--model", str(tmp_path / "missing.pt"), "--local", "--no-mlflow", "--out", str(tmp_path / "out")]
    argv += ["--set", f"storage.root={tmp_path}", "--set", f"data.eval_images={sample_images / 'eval'}"]
    code = run(main, argv, prog="lightbsr evaluate")
    assert code == 2
    assert f"lightbsr evaluate: error: checkpoint {tmp_path / 'missing.pt'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def tiny_student_checkpoint(path):
    torch.manual_seed(0)
    student = Student(scale=4, n_groups=1, n_blocks=1).eval()
    config = {"scale": 4, "n_groups": 1, "n_blocks": 1}
    save_checkpoint(path, student, role="student", model_config=config, pca_basis=None)
    return path


def crops_benchmark(root, sample_images, sets):
    """`<root>/<set>/HR/<photo>.png`: 96x96 crops of real evaluation photographs, two per set."""
    photos = sorted((sample_images / "eval").glob("*.png"))
    for i, name in enumerate(sets):
        (root / name / "HR").mkdir(parents=True)
        for photo in photos[2 * i : 2 * i + 2]:
            Image.fromarray(read_rgb(photo)[:96, :96]).save(root / name / "HR" / photo.name)
    return root


@pytest.mark.integration
def test_inputs_on_s3_give_the_tables_of_the_same_local_folders(s3_server, sample_images, tmp_path, monkeypatch):
    """Eval images, benchmarks, the checkpoint and the IDR patches from s3:// (SeaweedFS, endpoint
    from the config only) give exactly the rows, tables and probe scores of the same local files."""
    bench = crops_benchmark(tmp_path / "bench", sample_images, ["Set5", "Holiday_2024"])
    checkpoint = tiny_student_checkpoint(tmp_path / "student.pt")
    prefix = "evaluate-test"
    client = s3_server.client()  # uploaded with boto3, not with the code under test
    uploads = {f"{prefix}/student.pt": checkpoint}
    uploads |= {f"{prefix}/bench/{p.relative_to(bench).as_posix()}": p for p in bench.rglob("*.png")}
    uploads |= {f"{prefix}/eval/{p.name}": p for p in (sample_images / "eval").glob("*.png")}
    for key, path in uploads.items():
        client.put_object(Bucket=s3_server.bucket, Key=key, Body=path.read_bytes())
    for name, value in s3_server.env().items():
        if name != "AWS_ENDPOINT_URL":
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    s3 = f"s3://{s3_server.bucket}/{prefix}"
    common = ["evaluate.crop=64", "evaluate.idr_patches=4", "evaluate.idr_patch=48", "evaluate.protocols=[iso_x4]"]
    local_cfg = load_config(None, [f"data.eval_images={sample_images / 'eval'}", *common])
    remote_cfg = load_config(
        None, [f"data.eval_images={s3}/eval", f"storage.s3.endpoint_url={s3_server.endpoint}", *common]
    )

    local = evaluate_model(str(checkpoint), local_cfg, benchmarks=str(bench), local=True, log=False)
    remote = evaluate_model(f"{s3}/student.pt", remote_cfg, benchmarks=f"{s3}/bench", local=True, log=False)

    assert {r["set"] for r in local.rows} == {"Set5", "Holiday_2024", "samples"}
    assert len(local.rows) == (2 + 2 + 5) * 3  # images x the three iso_x4 sigmas
    assert remote.rows == local.rows  # the same process and bytes: the same floats
    assert remote.tables.csv == local.tables.csv and remote.tables.markdown == local.tables.markdown
    assert remote.idr == local.idr and set(local.idr) == {"student"}


@pytest.mark.integration
def test_any_benchmark_set_names_from_a_directory_outside_the_repository(sample_images, tmp_path):
    """`python -m workflows.evaluate --benchmarks bench` run in a temporary folder (no data/ there):
    every set folder is scored, published rows only for the paper's sets, the IDR probe on the
    benchmark images, the missing default evaluation folder a logged skip."""
    crops_benchmark(tmp_path / "bench", sample_images, ["Set5", "Kodak"])
    tiny_student_checkpoint(tmp_path / "student.pt")
    command = [sys.executable, "-m", "workflows.evaluate", "--model", "student.pt", "--benchmarks", "bench"]
    command += ["--local", "--no-mlflow", "--out", "out", "--set", "storage.root=store"]
    command += ["--set", "evaluate.idr_patches=4", "--set", "evaluate.idr_patch=48", "--set", "evaluate.crop=64"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data.eval_images" in done.stderr and "scoring the benchmarks only" in done.stderr
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| method | params | Set5 | Kodak |" in table
    assert "| Bicubic [published] | - | 27.30 / 25.12 / 23.40 | - |" in table
    assert json.loads((tmp_path / "out" / "idr.json").read_text())["student"]["chance"] == 0.2
    lines = list(csv.DictReader(io.StringIO((tmp_path / "out" / "table.csv").read_text())))
    assert all(line["Kodak PSNR"] for line in lines if line["method"] in (OURS, BICUBIC))
