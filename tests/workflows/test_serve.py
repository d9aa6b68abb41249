"""`lightbsr serve`: a real Serve app on the local Ray, pulling a tiny model from a real `mlflow server`."""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from lightbsr.checkpoint import save_checkpoint
from lightbsr.images import encode_png, read_rgb
from lightbsr.student import Student
from tests.fixtures.mlflow_server import free_port
from workflows.cli import run
from workflows.config import load_config
from workflows.errors import EXIT_OK
from workflows.register import register_checkpoint
from workflows.upscale import main as upscale_main

pytestmark = pytest.mark.e2e

MODEL = "lightbsr-serve-test"
RELOAD_INTERVAL_S = 1.0
MAX_REQUEST_BYTES = 100_000
MAX_PIXELS = 96 * 96


def tiny_checkpoint(folder: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    student = Student(scale=2, n_groups=1, n_blocks=1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.2)
    path = folder / f"student-{seed}"
    model_config = {"scale": 2, "setting": 1, "n_groups": 1, "n_blocks": 1}
    save_checkpoint(path, student.eval(), role="student", model_config=model_config, pca_basis=torch.zeros(441, 15))
    return path


@pytest.fixture(scope="module")
def overrides(mlflow_server) -> list[str]:
    return [
        f"tracking.uri={mlflow_server}",
        "tracking.experiment=serve-test",
        f"tracking.registered_model={MODEL}",
        "evaluate.tile=32",  # a 40x48 image takes the tiled path
        "evaluate.overlap=8",
        f"serve.reload_interval_s={RELOAD_INTERVAL_S}",
        f"serve.max_request_bytes={MAX_REQUEST_BYTES}",
        f"serve.max_pixels={MAX_PIXELS}",
    ]


@pytest.fixture(scope="module")
def endpoint(overrides, ray_local, tmp_path_factory):
    """(base URL, config, checkpoint folder): one Serve app for the module, deleted at the end."""
    from ray import serve

    from workflows.serve import make_app

    cfg = load_config(None, overrides)
    folder = tmp_path_factory.mktemp("serve-ckpt")
    register_checkpoint(str(tiny_checkpoint(folder, seed=0)), cfg, alias="champion")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(make_app(f"models:/{MODEL}@champion", cfg), name="lightbsr-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}", cfg, folder
    serve.shutdown()


@pytest.fixture(scope="module")
def photo_png(sample_images) -> bytes:
    return encode_png(read_rgb(sample_images / "eval" / "kodim23.png")[100:140, 200:248])  # (40, 48, 3) real photo


def test_png_round_trip_equals_lightbsr_upscale_byte_for_byte(endpoint, overrides, photo_png, tmp_path):
    url, _, _ = endpoint
    answer = requests.post(f"{url}/upscale", data=photo_png, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    (tmp_path / "in.png").write_bytes(photo_png)
    argv = ["--model", f"models:/{MODEL}@champion", str(tmp_path / "in.png"), str(tmp_path / "out.png"), "--quiet"]
    assert run(upscale_main, argv + [arg for o in overrides for arg in ("--set", o)]) == EXIT_OK
    assert answer.content == (tmp_path / "out.png").read_bytes()
    assert Image.open(io.BytesIO(answer.content)).size == (96, 80)


def _bad_requests(photo_png: bytes) -> dict[str, tuple[str, bytes, int, str]]:
    big = np.zeros((100, 100, 3), np.uint8)  # 10,000 pixels > MAX_PIXELS, well under the byte limit
    return {
        "not an image": ("/upscale", b"GIF? no: plain text", 400, "not an image"),
        "truncated": ("/upscale", photo_png[: len(photo_png) // 2], 400, "truncated"),
        "zero bytes": ("/upscale", b"", 400, "empty request body"),
        "too many bytes": ("/upscale", b"\0" * (MAX_REQUEST_BYTES + 1), 413, "serve.max_request_bytes (100000"),
        "too many pixels": ("/upscale", encode_png(big), 413, f"serve.max_pixels ({MAX_PIXELS})"),
        "wrong route": ("/upscale-please", photo_png, 404, "Not Found"),
    }


@pytest.mark.parametrize("case", list(_bad_requests(b"x")))
def test_bad_request_gets_its_4xx_and_the_server_keeps_serving(endpoint, photo_png, case):
    url, _, _ = endpoint
    route, body, status, named = _bad_requests(photo_png)[case]
    answer = requests.post(f"{url}{route}", data=body, timeout=120)
    assert answer.status_code == status and named in answer.text, (answer.status_code, answer.text)
    assert requests.post(f"{url}/upscale", data=photo_png, timeout=120).status_code == 200


def test_moving_the_alias_changes_version_within_the_reload_interval(endpoint):
    url, cfg, folder = endpoint
    before = requests.get(f"{url}/version", timeout=30).json()
    assert before["model"] == MODEL and before["alias"] == "champion"
    _, moved_to = register_checkpoint(
        str(tiny_checkpoint(folder, seed=1)), cfg, alias="champion", force=True
    )  # past the gate: no table
    assert moved_to != before["version"]
    # The replica checks every RELOAD_INTERVAL_S and then downloads the model: poll over a few
    # intervals, a bounded number of times, and stop at the first answer with the new version.
    period = RELOAD_INTERVAL_S / 4
    seen = []
    for _ in range(math.ceil(8 * RELOAD_INTERVAL_S / period)):
        seen.append(requests.get(f"{url}/version", timeout=30).json()["version"])
        if seen[-1] == moved_to:
            break
        time.sleep(period)
    assert seen[-1] == moved_to, f"/version answered {seen} after the alias moved to {moved_to}"
