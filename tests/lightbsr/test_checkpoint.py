"""Checkpoint files -> models: our format round-trips, the authors' state dicts load, junk is refused."""

from __future__ import annotations

import pickle

import pytest
import torch

from lightbsr.checkpoint import CheckpointError, describe_reference_state_dict, load_checkpoint, save_checkpoint
from lightbsr.student import Student
from lightbsr.teacher import Teacher

pytestmark = pytest.mark.unit

SMALL = {"scale": 2, "setting": 1, "n_groups": 1, "n_blocks": 2, "queue_size": 16, "momentum": 0.99, "pca_seed": 3}


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.mark.parametrize("target", ["ckpt_dir", "ckpt.pt"])
def test_student_round_trips_through_our_format(tmp_path, target):
    student = randomised(Student(2, 1, 2), seed=0)
    basis = torch.randn(441, 15, generator=torch.Generator().manual_seed(1))
    written = save_checkpoint(
        tmp_path / target,
        student,
        role="student",
        model_config=SMALL,
        pca_basis=basis,
        epoch=3,
        iteration=42,
        config={"model": SMALL},
    )
    assert written.name in {"model.pt", "ckpt.pt"} and written.is_file()
    loaded = load_checkpoint(tmp_path / target)
    assert (loaded.role, loaded.scale, loaded.setting) == ("student", 2, 1)
    assert loaded.model_config == SMALL and not loaded.model.training
    assert torch.equal(loaded.pca_basis, basis) and loaded.raw["iteration"] == 42
    lr = torch.rand(1, 3, 13, 17, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded.model(lr), student(lr))


def test_a_save_that_fails_keeps_the_previous_checkpoint_and_no_temporary(tmp_path):
    student = randomised(Student(2, 1, 2), seed=0)
    save_checkpoint(tmp_path / "ckpt", student, role="student", model_config=SMALL, pca_basis=None, epoch=1)
    before = (tmp_path / "ckpt" / "model.pt").read_bytes()
    unpicklable = {"callback": lambda: None}  # torch.save fails while serialising it
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        save_checkpoint(
            tmp_path / "ckpt", student, role="student", model_config=SMALL, pca_basis=None, train_state=unpicklable
        )
    assert (tmp_path / "ckpt" / "model.pt").read_bytes() == before
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["model.pt"]
    assert load_checkpoint(tmp_path / "ckpt").raw["epoch"] == 1


def test_missing_model_config_keys_take_the_paper_defaults(tmp_path):
    student = randomised(Student(2, 1, 2), seed=0)
    save_checkpoint(
        tmp_path / "s.pt",
        student,
        role="student",
        model_config={"scale": 2, "n_groups": 1, "n_blocks": 2},
        pca_basis=None,
    )
    expected = {
        "scale": 2,
        "setting": 1,
        "n_groups": 1,
        "n_blocks": 2,
        "queue_size": 8192,
        "momentum": 0.999,
        "pca_seed": 0,
    }
    assert load_checkpoint(tmp_path / "s.pt").model_config == expected
    with pytest.raises(CheckpointError, match=r"unknown model_config keys \['depth'\]"):
        save_checkpoint(
            tmp_path / "x.pt", student, role="student", model_config={"scale": 2, "depth": 3}, pca_basis=None
        )


def test_teacher_round_trips_with_its_queue(tmp_path):
    teacher = Teacher(scale=2, setting=2, n_groups=1, n_blocks=2, queue_size=16, momentum=0.99)
    teacher.enqueue(torch.nn.functional.normalize(torch.randn(4, 128), dim=1))
    save_checkpoint(tmp_path / "t", teacher, role="teacher", model_config={**SMALL, "setting": 2}, pca_basis=None)
    loaded = load_checkpoint(tmp_path / "t", role="teacher")
    assert loaded.setting == 2 and loaded.pca_basis is None
    for key, value in teacher.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_authors_student_state_dict_loads_and_matches_their_output(tmp_path, parity_vectors):
    case = parity_vectors["student_x4"]
    torch.save(case["state_dict"], tmp_path / "model_best.pt")
    loaded = load_checkpoint(tmp_path / "model_best.pt")
    assert (loaded.role, loaded.scale, loaded.is_reference) == ("student", 4, True)
    assert loaded.model_config["n_groups"] == 8 and loaded.model_config["n_blocks"] == 8
    with torch.no_grad():
        sr = loaded.model(case["lr"])
    assert (sr - case["sr"]).abs().max() <= 1e-4


@pytest.mark.parametrize("name,scale", [("student_x4", 4), ("student_x3", 3), ("student_x2", 2)])
def test_scale_and_depth_are_read_from_the_authors_keys(parity_vectors, name, scale):
    found = describe_reference_state_dict(parity_vectors[name]["state_dict"])
    assert found == {"role": "student", "scale": scale, "setting": 1, "n_groups": 8, "n_blocks": 8}


def test_authors_teacher_state_dict_is_recognised(tmp_path, parity_vectors):
    case = parity_vectors["teacher_x4_setting1"]
    torch.save({"state_dict": case["state_dict"]}, tmp_path / "teacher.pt")
    loaded = load_checkpoint(tmp_path / "teacher.pt")
    assert (loaded.role, loaded.scale, loaded.setting) == ("teacher", 4, 1)
    with torch.no_grad():
        sr = loaded.model(case["lr"], case["prior"])
    assert (sr - case["sr"]).abs().max() <= 1e-4


def test_asking_for_the_wrong_role_names_the_file(tmp_path, parity_vectors):
    torch.save(parity_vectors["student_x2"]["state_dict"], tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match=r"s\.pt.*role 'teacher'.*'student'"):
        load_checkpoint(tmp_path / "s.pt", role="teacher")


def test_unusable_files_are_refused_naming_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    torch.save(
        {"format": "lightbsr/1", "role": "student", "model_config": {"scale": 5}, "model": {}}, tmp_path / "bad.pt"
    )
    (tmp_path / "empty_dir").mkdir()
    cases = {
        "notes.txt": "not a readable torch checkpoint",
        "other.pt": "neither a lightbsr/1 checkpoint nor an authors'",
        "bad.pt": "scale 5 is not 2, 3 or 4",
        "empty_dir": "has no model.pt",
        "missing.pt": "does not exist",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=name) as error:
            load_checkpoint(tmp_path / name)
        assert message in str(error.value)


def test_weights_of_another_shape_are_refused(tmp_path):
    save_checkpoint(tmp_path / "c.pt", Student(2, 1, 2), role="student", model_config=SMALL, pca_basis=None)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    raw["model_config"]["n_blocks"] = 3
    torch.save(raw, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=r"c\.pt: weights do not fit a student"):
        load_checkpoint(tmp_path / "c.pt")
