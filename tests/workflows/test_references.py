"""`workflows.references`: what each kind of model reference is, and the errors that name what is wrong.

Registered models and run artifacts against a real MLflow server are in test_register.py; `s3://`
files and folders against SeaweedFS in test_upscale.py.
"""

from __future__ import annotations

import pytest

from lightbsr.checkpoint import CheckpointError, save_checkpoint
from lightbsr.student import Student
from workflows.config import load_config
from workflows.references import ModelReferenceError, RegistryError, fetch_checkpoint, parse, resolve

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "ref,kind,name,alias,version",
    [
        ("models:/lightbsr-x4@champion", "model", "lightbsr-x4", "champion", None),
        ("models:/lightbsr-x4/7", "model", "lightbsr-x4", None, "7"),
        ("runs:/0123abcd/checkpoint", "run", None, None, None),
        ("s3://bucket/runs/student/model.pt", "url", None, None, None),
        ("file:///data/student.pt", "path", None, None, None),
        ("runs-folder/student.pt", "path", None, None, None),
    ],
)
def test_each_kind_of_reference_is_recognised(ref, kind, name, alias, version):
    parsed = parse(ref)
    assert (parsed.kind, parsed.name, parsed.alias, parsed.version) == (kind, name, alias, version)


@pytest.mark.parametrize(
    "ref,error,words",
    [
        ("models:/lightbsr-x4", RegistryError, "expected models:/<name>@<alias> or models:/<name>/<version>"),
        ("models:/@champion", RegistryError, "expected models:/<name>@<alias>"),
        ("runs:/0123abcd", RegistryError, "expected runs:/<run_id>/<artifact path>"),
        ("gs://bucket/model.pt", ModelReferenceError, "scheme 'gs' is not supported"),
    ],
)
def test_malformed_references_are_named(ref, error, words):
    with pytest.raises(error, match=words):
        parse(ref)


def test_a_local_folder_resolves_to_its_model_file_and_has_no_registry_version(tmp_path):
    student = Student(scale=2, n_groups=1, n_blocks=1)
    model_config = {"scale": 2, "n_groups": 1, "n_blocks": 1}
    written = save_checkpoint(tmp_path / "ckpt", student, role="student", model_config=model_config, pca_basis=None)
    cfg = load_config()
    found = resolve(str(tmp_path / "ckpt"), cfg, tmp_path / "work")
    assert found.file == written == tmp_path / "ckpt" / "model.pt" and found.registry is None
    assert fetch_checkpoint(f"file://{tmp_path / 'ckpt'}", cfg, tmp_path / "work") == written
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty has no model\.pt"):
        fetch_checkpoint(str(tmp_path / "empty"), cfg, tmp_path / "work")
