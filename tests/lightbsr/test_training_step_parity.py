"""One Adam step of our objectives against one step of the authors' trainers (../shared/vectors/training-step.pt).

The vectors were made by the authors' `teacher_trainer.py` / `student_trainer.py`, run unmodified
from a fixed, perturbed state, at epoch 1 (phase 1) and epoch 301 (phase 2). We load the same state
with our loader, run our objective, Adam with the authors' betas/eps and our LR schedule for one
step, and compare with the tolerances of the vectors' README.
"""

from types import SimpleNamespace

import pytest
import torch

from lightbsr.objectives import StudentObjective, TeacherObjective
from lightbsr.reference import key_map, load_reference_checkpoint
from lightbsr.schedule import learning_rate
from lightbsr.student import Student
from lightbsr.teacher import Teacher
from tests.fixtures.paths import SHARED

pytestmark = pytest.mark.unit

TRAINING_STEP = SHARED / "vectors" / "training-step.pt"
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
QUEUE_ATOL = 1e-5
RUNNING_STATS_RTOL = 1e-5
POST_MAX_FRACTION = 1e-3  # of elements further than lr/2 from the authors' post-step value


@pytest.fixture(scope="module")
def vectors():
    if not TRAINING_STEP.is_file():
        pytest.skip(f"training-step vectors not found at {TRAINING_STEP} (they live in ../shared/vectors)")
    return torch.load(TRAINING_STEP, weights_only=True)


def settings(constants):
    return SimpleNamespace(**constants, distillation=True)


def authors_teacher(vectors) -> Teacher:
    teacher = load_reference_checkpoint(vectors["teacher"]["state_dict"], role="teacher", scale=4, setting=1)
    assert isinstance(teacher, Teacher)
    teacher.momentum = vectors["constants"]["moco_momentum"]
    return teacher


def authors_student(vectors, teacher: Teacher) -> Student:
    """The authors' --initparams: everything from the teacher but the student's own first encoder conv."""
    student = Student(scale=4)
    student.load_from_teacher(teacher)
    first_conv = vectors["student"]["first_conv"]
    student.encoder.stages[0].get_submodule("conv").load_state_dict(
        {"weight": first_conv["E.E.0.weight"], "bias": first_conv["E.E.0.bias"]}
    )
    return student


def is_encoder_conv_bias(our_name: str) -> bool:
    """Conv biases in front of a training-mode BatchNorm: true gradient 0, float noise in both codes."""
    return "encoder.stages." in our_name and our_name.endswith(".conv.bias")


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()


def one_step(objective, model, vectors, role, phase):
    """Our step from the authors' state: (terms, gradients by the authors' names, lr, post state by their names)."""
    constants, case = vectors["constants"], vectors[role][phase]
    lr_step = learning_rate(case["epoch"], SimpleNamespace(**constants))
    trainable = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(
        trainable, lr=lr_step, betas=(constants["adam_beta1"], constants["adam_beta2"]), eps=constants["adam_eps"]
    )
    data = vectors[role]
    terms = objective(data["lr"], data["hr_uint8"].float() / 255, data["prior"], phase=case["phase"])
    optimizer.zero_grad()
    terms["total"].backward()
    names = key_map(model)
    grads = {names[n]: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    post = {names[n]: v for n, v in model.state_dict().items()}
    excluded = {names[n] for n, _ in model.named_parameters() if is_encoder_conv_bias(n)}
    return terms, grads, lr_step, post, excluded, sum(p.numel() for p in trainable)


def check_step(case, terms, grads, lr_step, post, excluded, n_trainable, loss_names):
    assert lr_step == pytest.approx(case["lr_step"], rel=1e-12)
    assert n_trainable == case["optimizer_param_count"]
    for name in loss_names:
        assert terms[name].item() == pytest.approx(case[name], rel=LOSS_RTOL), name
    assert set(grads) == set(case["grad_stats"]), "the step must reach exactly the tensors the authors' step reaches"
    for name, stats in case["grad_stats"].items():
        if name not in excluded:  # L2 norm of every gradient
            norm = grads[name].double().norm().item()
            assert norm == pytest.approx(stats[2].item(), rel=GRAD_RTOL), name
    for name, theirs in case["grad"].items():  # whole tensors of representative gradients
        if name not in excluded:
            assert relative(grads[name], theirs) <= GRAD_RTOL, name
    for name, theirs in case["post"].items():
        if name not in excluded:
            off = ((post[name] - theirs).abs() > lr_step / 2).float().mean().item()
            assert off < POST_MAX_FRACTION, f"{name}: {off:.2%} of elements off by more than lr/2"
    for name, theirs in case["bn_running_post"].items():
        error = ((post[name] - theirs).abs().max() / theirs.abs().max()).item()
        assert error <= RUNNING_STATS_RTOL, name


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_teacher_step_matches_the_authors_trainer(vectors, phase, teacher_path):
    teacher = authors_teacher(vectors)
    objective = TeacherObjective(teacher, settings(vectors["constants"])).train()
    terms, grads, lr_step, post, excluded, n_trainable = one_step(objective, teacher, vectors, "teacher", phase)
    case = vectors["teacher"][phase]
    losses = ["total", "contrastive"] + (["l1"] if phase == "phase2" else [])
    check_step(case, terms, grads, lr_step, post, excluded, n_trainable, losses)
    ptr = vectors["teacher"]["queue_ptr_before"]
    new = case["queue_after"].shape[1]
    slots = [(ptr + i) % teacher.queue.shape[1] for i in range(new)]
    torch.testing.assert_close(teacher.queue[:, slots], case["queue_after"], rtol=0, atol=QUEUE_ATOL)
    assert int(teacher.queue_ptr) == case["queue_ptr_after"]


@pytest.mark.parametrize("phase", ["phase1", "phase2"])
def test_student_step_matches_the_authors_trainer(vectors, phase):
    teacher = authors_teacher(vectors)
    student = authors_student(vectors, teacher)
    objective = StudentObjective(student, teacher, settings(vectors["constants"])).train()
    terms, grads, lr_step, post, excluded, n_trainable = one_step(objective, student, vectors, "student", phase)
    losses = ["total", "channel", "spatial"] + (["l1"] if phase == "phase2" else [])
    check_step(vectors["student"][phase], terms, grads, lr_step, post, excluded, n_trainable, losses)
