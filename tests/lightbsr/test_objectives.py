"""Teacher and student objectives: what each phase computes, the queue, the frozen teacher, and
what training on the real sample photographs achieves (plain PyTorch, small networks)."""

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lightbsr.degrade import kernel_pca_basis
from lightbsr.objectives import StudentObjective, TeacherObjective
from lightbsr.small_runs import (
    LossWeights,
    Recipe,
    as_float_batch,
    bicubic_psnr,
    blind_blur_eval_set,
    degraded_examples,
    student_psnr,
    train_student,
    train_teacher,
)
from lightbsr.student import Student
from lightbsr.teacher import Teacher

pytestmark = pytest.mark.unit

SCALE = 4


def paper_losses(**changes):
    return replace(LossWeights(), **changes)


def small_teacher(queue_size=64, momentum=0.999, seed=0):
    torch.manual_seed(seed)
    return Teacher(SCALE, 1, n_groups=1, n_blocks=1, queue_size=queue_size, momentum=momentum)


def small_student(teacher):
    student = Student(SCALE, n_groups=1, n_blocks=1)
    student.load_from_teacher(teacher)
    return student


@pytest.fixture(scope="module")
def basis():
    return kernel_pca_basis(0)


@pytest.fixture(scope="module")
def teacher_batch(sample_images, basis):
    examples = degraded_examples(sample_images / "train", 4, 4, 8, SCALE, basis, seed=3)
    return as_float_batch(examples, slice(0, 4))


def test_teacher_phase_one_trains_the_representation_only(teacher_batch):
    objective = TeacherObjective(small_teacher(), paper_losses()).train()
    terms = objective(*teacher_batch, phase=1)
    assert set(terms) == {"contrastive", "total"}
    terms["total"].backward()
    assert all(p.grad is None for p in objective.model.generator.parameters())
    assert objective.model.encoder.stages[0].conv.weight.grad.abs().sum() > 0


def test_teacher_phase_two_adds_l1_of_view_zero_on_the_255_scale(teacher_batch, teacher_path):
    teacher = small_teacher()
    reference = copy.deepcopy(teacher).eval()
    terms = TeacherObjective(teacher, paper_losses(l1_weight=2.0)).eval()(*teacher_batch, phase=2)
    lr, hr, prior = teacher_batch
    with torch.no_grad():
        expected = (reference(lr[:, 0], prior) * 255 - hr[:, 0] * 255).abs().mean()
    assert terms["l1"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert terms["total"].item() == pytest.approx(terms["contrastive"].item() + 2 * expected.item(), rel=1e-4)


def test_teacher_enqueues_the_momentum_keys_of_view_zero_only(teacher_batch, teacher_path):
    teacher = small_teacher(momentum=0.9)
    with torch.no_grad():  # make the key encoder differ from the query encoder
        for p in teacher.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expected_keys = copy.deepcopy(teacher).eval()  # eval: per-item BatchNorm, so one view can be embedded alone
    expected_keys.momentum_update()  # MoCo: the key encoder moves before it embeds
    lr, hr, prior = teacher_batch
    with torch.no_grad():
        view0 = expected_keys.embed_keys(lr[:, 0], prior)  # (B, 128)
    TeacherObjective(teacher, paper_losses()).eval()(lr, hr, prior, phase=1)
    assert int(teacher.queue_ptr) == lr.shape[0]
    torch.testing.assert_close(teacher.queue[:, : lr.shape[0]].T, view0, rtol=1e-4, atol=1e-5)


def test_teacher_step_with_sync_batch_norm_equals_the_plain_one(teacher_batch, teacher_path):
    """DDP on GPU converts the encoders to SyncBatchNorm, which runs one module call per view; without a process
    group it reduces locally, so on CPU it must give the plain BatchNorm's single per-view pass's step."""
    plain = TeacherObjective(small_teacher(), paper_losses()).train()
    sync = copy.deepcopy(plain)
    for name in ("encoder", "key_encoder"):
        setattr(sync.model, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(getattr(sync.model, name)))
    for objective in (plain, sync):
        objective(*teacher_batch, phase=2)["total"].backward()
    grads = dict(sync.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is not None and not name.endswith("conv.bias"):  # true gradient 0 before a training BatchNorm
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-6, msg=name)
    buffers = dict(sync.named_buffers())
    for name, value in plain.named_buffers():  # running statistics, batch counts, queue
        torch.testing.assert_close(value, buffers[name], rtol=1e-5, atol=1e-6, msg=name)


def test_channels_last_key_pass_equals_the_encoder_with_per_view_statistics():
    """The key encoder's gradient-free pass (channels_last, one BatchNorm call per view) gives the rows and
    running statistics of the differentiable per-view pass; 3 items x 2 views, each row scaled apart, so rows
    swapped between items and views cannot go unseen."""
    reference = small_teacher().key_encoder.train()
    fast = copy.deepcopy(reference)
    views = 2
    x = torch.rand(3 * views, 18, 12, 12) * torch.arange(1, 3 * views + 1)[:, None, None, None]
    with torch.no_grad():
        expected = reference(x, views=views, by_item=True)
    torch.testing.assert_close(fast.forward_views_no_grad(x, views), expected, rtol=1e-4, atol=1e-5)
    for name, value in reference.state_dict().items():  # running statistics and batch counts
        torch.testing.assert_close(fast.state_dict()[name], value, rtol=1e-5, atol=1e-7, msg=name)


def test_teacher_needs_several_views(teacher_batch):
    lr, hr, prior = teacher_batch
    with pytest.raises(ValueError, match="2 views"):
        TeacherObjective(small_teacher(), paper_losses())(lr[:, :1], hr[:, :1], prior, phase=1)


def test_teacher_contrastive_loss_falls_on_real_images(sample_images, basis):
    torch.manual_seed(0)
    examples = degraded_examples(sample_images / "train", 128, 4, 8, SCALE, basis, seed=0)
    objective = TeacherObjective(small_teacher(queue_size=64, momentum=0.99), paper_losses()).train()
    optimizer = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.99))
    losses = []
    for step in range(90):
        start = (step * 8) % 128
        terms = objective(*as_float_batch(examples, slice(start, start + 8)), phase=1)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["contrastive"].item())
    # the queue (64 keys) is full of real keys after 8 steps; the loss rises first, as the spec warns
    early, late = sum(losses[10:30]) / 20, sum(losses[-20:]) / 20
    print(f"\ncontrastive loss: steps 10-29 {early:.3f} -> last 20 {late:.3f}")
    assert late < 0.8 * early


def test_student_objective_keeps_the_teacher_frozen(teacher_batch):
    teacher = small_teacher()
    before = copy.deepcopy(teacher.state_dict())
    objective = StudentObjective(small_student(teacher), teacher, paper_losses()).train()
    assert not objective.teacher.training
    lr, hr, prior = teacher_batch
    optimizer = torch.optim.Adam([p for p in objective.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        terms = objective(lr[:, :1], hr[:, :1], prior, phase=2)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_student_phases_and_the_no_alignment_switch(teacher_batch):
    lr, hr, prior = (x[:, :1] if x.dim() == 5 else x for x in teacher_batch)
    teacher = small_teacher()
    student = small_student(teacher)
    assert set(StudentObjective(student, teacher, paper_losses())(lr, hr, prior, phase=1)) == {
        "channel",
        "spatial",
        "total",
    }
    assert set(StudentObjective(student, teacher, paper_losses())(lr, hr, prior, phase=2)) == {
        "channel",
        "spatial",
        "l1",
        "total",
    }
    plain = StudentObjective(student, None, paper_losses(distillation=False))
    assert set(plain(lr, hr, prior, phase=2)) == {"l1", "total"}
    with pytest.raises(ValueError, match="phase 1 without distillation"):
        plain(lr, hr, prior, phase=1)


def test_student_alignment_terms_match_the_teacher_codes(teacher_batch):
    lr, hr, prior = (x[:, :1] if x.dim() == 5 else x for x in teacher_batch)
    teacher = small_teacher()
    student = small_student(teacher)
    terms = StudentObjective(student, teacher, paper_losses()).eval()(lr, hr, prior, phase=1)
    with torch.no_grad():
        _, ca_s, xk_s = student.eval()(lr[:, 0], return_codes=True)
        _, ca_t, xk_t = teacher.eval()(lr[:, 0], prior, return_codes=True)
    kl = F.kl_div(F.log_softmax(ca_s / 0.15, 1), F.softmax(ca_t / 0.15, 1), reduction="batchmean")
    assert terms["channel"].item() == pytest.approx((kl + 0.1 * (ca_s - ca_t).abs().mean()).item(), rel=1e-4)
    assert terms["spatial"].item() == pytest.approx(((xk_s - xk_t) ** 2).mean().item(), rel=1e-4)


def test_student_objective_holds_the_teacher_outside_its_module_tree(teacher_batch):
    teacher = small_teacher()
    objective = StudentObjective(small_student(teacher), teacher, paper_losses())
    teacher_tensors = {id(t) for t in [*teacher.parameters(), *teacher.buffers()]}
    assert not teacher_tensors & {id(t) for t in [*objective.parameters(), *objective.buffers()]}
    assert not any(key.startswith("teacher.") for key in objective.state_dict())
    assert objective.teacher is teacher
    objective.to(torch.float64)  # `to` still moves it with the student
    assert all(p.dtype == torch.float64 for p in [*objective.model.parameters(), *teacher.parameters()])
    lr, hr, prior = (x.double() for x in teacher_batch)
    assert torch.isfinite(objective(lr[:, :1], hr[:, :1], prior, phase=1)["total"])  # float32 weights would raise


# Training demonstrably works: the held-out Y-PSNR the small recipe gains over its untrained start, not a
# margin over bicubic. At this budget the students stay ~1 dB under bicubic; the claims study's longer recipe
# (benchmarks/results/claims_study.md, 3 seeds, 38 min wall on the loaded 2-core machine) puts the aligned student
# 0.26 +- 0.15 dB over it (lowest seed 0.09 dB), not the many-standard-deviation margin a test needs. Seed 0,
# made deterministic: fixed threads, deterministic algorithms, fixed seeds.
GAIN_DB = 5.0


def test_trained_teacher_then_aligned_student_gain_on_held_out_photos(sample_images, basis):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        recipe = Recipe()
        lr, hr = blind_blur_eval_set(sample_images / "eval", recipe.scale, hr_side=128)  # sigma ~ U[0.2, 4] each
        examples = degraded_examples(sample_images / "train", 512, 4, 12, recipe.scale, basis, seed=0)
        untrained = replace(recipe, teacher_phase1=0, teacher_phase2=0, student_phase1=0, student_phase2=0)
        start = train_student(examples, train_teacher(examples, untrained, seed=0), untrained, seed=0, aligned=True)
        teacher = train_teacher(examples, recipe, seed=0)
        student = train_student(examples, teacher, recipe, seed=0, aligned=True)
        before, after = (student_psnr(s, lr, hr, recipe.scale).mean().item() for s in (start, student))
        bicubic = bicubic_psnr(lr, hr, recipe.scale).mean().item()
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(threads)
    print(
        f"\nY-PSNR on {len(hr)} held-out photos: untrained {before:.2f} dB, trained teacher + aligned student "
        f"{after:.2f} dB (bicubic {bicubic:.2f} dB)"
    )
    assert after >= before + GAIN_DB
