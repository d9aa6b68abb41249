"""`--precision` on `lightbsr upscale`: the command runs the prepared model the library builds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightbsr.checkpoint import save_checkpoint
from lightbsr.images import read_rgb, write_image
from lightbsr.precision import prepare
from lightbsr.tiling import upscale
from tests.fixtures.models import busy_student
from workflows.cli import run
from workflows.errors import EXIT_OK
from workflows.upscale import main

pytestmark = pytest.mark.e2e


def test_upscale_with_bf16_writes_what_the_bf16_model_computes(tmp_path, sample_images):
    photo = read_rgb(sample_images / "eval" / "tulips.png")[50:98, 60:124]  # (48, 64, 3)
    write_image(tmp_path / "in.png", photo)
    model_path = tmp_path / "student.pt"
    config = {"scale": 2, "n_groups": 1, "n_blocks": 1}
    save_checkpoint(model_path, busy_student(), role="student", model_config=config, pca_basis=None)
    argv = ["--model", str(model_path), "--device", "cpu", "--tile", "32", "--overlap", "8", "--quiet"]
    assert run(main, [*argv, "--precision", "bf16", str(tmp_path / "in.png"), str(tmp_path / "out.png")]) == EXIT_OK
    written = read_rgb(tmp_path / "out.png")
    want = upscale(prepare(busy_student(), "bf16"), torch.from_numpy(photo), tile=32, overlap=8).numpy()
    fp32 = upscale(busy_student(), torch.from_numpy(photo), tile=32, overlap=8).numpy()
    assert np.array_equal(written, want)
    assert not np.array_equal(want, fp32)  # the flag changed the arithmetic, so the test can tell
