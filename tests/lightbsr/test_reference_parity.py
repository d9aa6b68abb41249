"""Our networks against the authors' code: the parity vectors in ../shared/vectors (made with their classes)."""

import pytest
import torch

from lightbsr import Student, Teacher
from lightbsr.reference import ReferenceCheckpointError, export_reference_state_dict, load_reference_checkpoint

pytestmark = pytest.mark.unit

STUDENTS = [("student_x4", 4), ("student_x2", 2), ("student_x3", 3)]
TOLERANCE = 1e-4


def relative_max_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


@pytest.mark.parametrize(("name", "scale"), STUDENTS)
def test_student_matches_reference_outputs(parity_vectors, name, scale):
    case = parity_vectors[name]
    student = load_reference_checkpoint(case["state_dict"], role="student", scale=scale).eval()
    with torch.inference_mode():
        sr, ca, xk = student(case["lr"], return_codes=True)
        idr = student.encode(case["lr"])
    for label, ours, theirs in (
        ("sr", sr, case["sr"]),
        ("ca", ca, case["ca"]),
        ("xk", xk, case["xk"]),
        ("idr", idr, case["idr"]),
    ):
        assert ours.shape == theirs.shape, label
        assert relative_max_error(ours, theirs) <= TOLERANCE, label


def test_teacher_matches_reference_outputs(parity_vectors):
    case = parity_vectors["teacher_x4_setting1"]
    teacher = load_reference_checkpoint(case["state_dict"], role="teacher", scale=4, setting=1).eval()
    with torch.inference_mode():
        sr, ca, xk = teacher(case["lr"], case["prior"], return_codes=True)
    for label, ours, theirs in (("sr", sr, case["sr"]), ("ca", ca, case["ca"]), ("xk", xk, case["xk"])):
        assert ours.shape == theirs.shape, label
        assert relative_max_error(ours, theirs) <= TOLERANCE, label


@pytest.mark.parametrize(
    ("name", "role", "scale"), [("student_x3", "student", 3), ("teacher_x4_setting1", "teacher", 4)]
)
def test_export_gives_back_the_reference_checkpoint(parity_vectors, name, role, scale):
    reference = parity_vectors[name]["state_dict"]
    exported = export_reference_state_dict(load_reference_checkpoint(reference, role=role, scale=scale))
    assert sorted(exported) == sorted(reference)
    for key, tensor in reference.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key


def test_reference_checkpoint_round_trips_through_a_file(parity_vectors, tmp_path):
    reference = parity_vectors["student_x2"]["state_dict"]
    path = tmp_path / "model_700.pt"
    torch.save(reference, path)
    student = load_reference_checkpoint(path, role="student", scale=2)
    assert isinstance(student, Student)
    assert torch.equal(student.generator.to_rgb.weight, reference["G.tail.1.weight"])
    assert torch.equal(student.encoder.stages[5].norm.running_var, reference["E.E.16.running_var"])


def test_missing_reference_key_is_named(parity_vectors):
    reference = dict(parity_vectors["student_x4"]["state_dict"])
    del reference["G.body.3.body.5.spatial_mixing.partial_conv3.weight"]
    with pytest.raises(
        ReferenceCheckpointError, match=r"missing keys \['G\.body\.3\.body\.5\.spatial_mixing\.partial_conv3\.weight'\]"
    ):
        load_reference_checkpoint(reference, role="student", scale=4)


def test_unexpected_reference_key_is_named(parity_vectors):
    reference = dict(parity_vectors["teacher_x4_setting1"]["state_dict"])
    reference["E.encoder_q.mlp.4.weight"] = torch.zeros(128, 128)
    with pytest.raises(ReferenceCheckpointError, match=r"unexpected keys \['E\.encoder_q\.mlp\.4\.weight'\]"):
        load_reference_checkpoint(reference, role="teacher", scale=4)


def test_wrong_role_or_scale_is_rejected(parity_vectors):
    student_x4 = parity_vectors["student_x4"]["state_dict"]
    with pytest.raises(
        ReferenceCheckpointError, match=r"missing keys \['E\.encoder_k\.E\.0\.bias'.*unexpected keys \['E\.E\.0\.bias'"
    ):
        load_reference_checkpoint(student_x4, role="teacher", scale=4)
    with pytest.raises(ReferenceCheckpointError, match=r"G\.tail\.0\.2\.weight"):  # a x4 tail has a second stage
        load_reference_checkpoint(student_x4, role="student", scale=2)
    with pytest.raises(ReferenceCheckpointError, match=r"E\.encoder_q\.E\.0\.weight"):  # 18 input channels, not 21
        load_reference_checkpoint(
            parity_vectors["teacher_x4_setting1"]["state_dict"], role="teacher", scale=4, setting=2
        )


def test_export_of_a_fresh_model_loads_back_identically():
    teacher = Teacher(scale=3, setting=2, n_groups=2, n_blocks=3)
    exported = export_reference_state_dict(teacher)
    assert "G.body.1.body.4.weight" in exported  # fuse conv after 3 blocks + ConvNeXt block
    assert "G.body.2.weight" in exported  # body conv after 2 groups
    loaded = load_reference_checkpoint(exported, role="teacher", scale=3, setting=2, n_groups=2, n_blocks=3)
    for (name, ours), (_, back) in zip(teacher.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(ours, back), name
