"""Shapes, sizes, input checks and the teacher's MoCo machinery of the LightBSR networks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lightbsr import Student, Teacher
from lightbsr.encoder import DegradationEncoder
from lightbsr.generator import Generator
from lightbsr.macs import count_parameters, count_trainable_parameters

pytestmark = pytest.mark.unit

MEAN_SHIFT_PARAMETERS = 2 * (9 + 3)  # the authors' two frozen 1x1 MeanShift convs


def small_student(scale: int = 4) -> Student:
    torch.manual_seed(0)
    return Student(scale=scale, n_groups=1, n_blocks=2)


def randomise_layer_scales(model: torch.nn.Module) -> None:
    """Layer scales start at 1e-6, which hides every block; make them O(1) so the blocks show in the output."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):
                parameter.uniform_(0.5, 1.0)


@pytest.mark.parametrize(("scale", "expected"), [(4, 3_259_971), (3, 3_296_899), (2, 3_112_259)])
def test_student_parameter_count_matches_the_paper(scale, expected):
    with torch.device("meta"):
        student = Student(scale=scale)
    assert count_parameters(student) == expected
    assert count_trainable_parameters(student) == expected - MEAN_SHIFT_PARAMETERS


def test_teacher_parameter_count_excludes_momentum_encoder_and_queue():
    with torch.device("meta"):
        teacher = Teacher(scale=4, setting=1)
    assert count_parameters(teacher) == 3_297_315
    assert count_trainable_parameters(teacher) == 3_297_315 - MEAN_SHIFT_PARAMETERS
    with torch.device("meta"):
        setting2 = Teacher(scale=4, setting=2)
    assert count_parameters(setting2) == 3_297_315 + 3 * 9 * 32  # three more input channels in the first conv


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_odd_input_sizes_give_scaled_output_and_full_size_codes(scale):
    student = small_student(scale).eval()
    lr = torch.rand(2, 3, 63, 65)
    with torch.inference_mode():
        sr, ca, xk = student(lr, return_codes=True)
        idr = student.encode(lr)
    assert sr.shape == (2, 3, 63 * scale, 65 * scale)
    assert ca.shape == (2, 48) and xk.shape == (2, 8, 63, 65)
    assert idr.shape == (2, 128, 16, 17)  # ceil(63/4), ceil(65/4)
    assert torch.isfinite(sr).all()


def test_spatial_code_is_the_pixel_shuffled_idr_cropped_to_the_image():
    generator = Generator(scale=2, n_groups=1, n_blocks=1)
    idr = torch.randn(1, 128, 3, 4)
    ca, xk = generator.convert(idr, (9, 14))
    shuffled = torch.empty(1, 8, 12, 16)
    for channel in range(8):  # PixelShuffle(4) by hand: channel c*16 + 4*dy + dx -> (4y + dy, 4x + dx)
        for dy in range(4):
            for dx in range(4):
                shuffled[0, channel, dy::4, dx::4] = idr[0, channel * 16 + 4 * dy + dx]
    conv = generator.converter.spatial_code
    expected_xk = F.gelu(F.conv2d(shuffled[..., :9, :14], conv.weight, conv.bias, padding=1))
    expected_ca = F.gelu(idr.mean(dim=(2, 3)) @ generator.converter.channel_code.weight.T)
    torch.testing.assert_close(xk, expected_xk)
    torch.testing.assert_close(ca, expected_ca)


def test_each_sample_is_reconstructed_independently():
    student = small_student().eval()
    randomise_layer_scales(student)
    lr = torch.rand(3, 3, 20, 24)
    with torch.inference_mode():
        batch = student(lr)
        single = student(lr[1:2])
    torch.testing.assert_close(batch[1:2], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.rand(3, 16, 16), r"\(B, 3, H, W\).*3-D"),
        (torch.rand(1, 1, 3, 16, 16), r"\(B, 3, H, W\).*5-D"),
        (torch.rand(1, 4, 16, 16), r"\(B, 3, H, W\).*4 channels"),
        (torch.randint(0, 255, (1, 3, 16, 16), dtype=torch.uint8), r"\(B, 3, H, W\).*uint8"),
        (torch.rand(1, 3, 0, 16), r"\(B, 3, H, W\)"),
    ],
)
def test_student_rejects_bad_images(bad, message):
    with pytest.raises(ValueError, match=message):
        small_student()(bad)


@pytest.mark.parametrize(
    ("prior", "message"),
    [
        (torch.rand(2, 18), r"\(2, 15\).*\(2, 18\)"),
        (torch.rand(1, 15), r"\(2, 15\).*\(1, 15\)"),  # no broadcasting of one prior over the batch
        (torch.rand(15), r"\(2, 15\).*\(15,\)"),
        (torch.rand(2, 15, 1, 1), r"\(2, 15\)"),
        (torch.ones(2, 15, dtype=torch.int64), r"\(2, 15\).*int64"),
    ],
)
def test_teacher_rejects_bad_priors(prior, message):
    teacher = Teacher(scale=2, setting=1, n_groups=1, n_blocks=1, queue_size=16)
    with pytest.raises(ValueError, match=message):
        teacher(torch.rand(2, 3, 12, 12), prior)


def test_generator_rejects_codes_that_do_not_fit_the_tile():
    generator = Generator(scale=2, n_groups=1, n_blocks=1)
    lr = torch.rand(1, 3, 10, 12)
    with pytest.raises(ValueError, match=r"xk: .*\(1, 8, 10, 12\)"):
        generator.reconstruct(lr, torch.rand(1, 48), torch.rand(1, 8, 10, 11))
    with pytest.raises(ValueError, match=r"ca: .*\(1, 48\)"):
        generator.reconstruct(lr, torch.rand(48), torch.rand(1, 8, 10, 12))


def test_bf16_autocast_on_cpu_is_close_to_fp32():
    student = small_student().eval()
    randomise_layer_scales(student)
    lr = torch.rand(1, 3, 24, 28)
    with torch.inference_mode():
        reference = student(lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = student(lr)
    assert mixed.dtype == torch.bfloat16  # the convs really ran in bf16
    error = (mixed.float() - reference).abs().max() / reference.abs().max()
    assert error < 5e-2


def test_training_step_reaches_every_trainable_parameter():
    student = small_student().train()
    sr, ca, xk = student(torch.rand(2, 3, 16, 16), return_codes=True)
    (sr.mean() + ca.mean() + xk.mean()).backward()
    no_grad = [n for n, p in student.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []
    assert student.generator.sub_mean.weight.grad is None  # the mean shift stays fixed


def test_teacher_uses_the_prior_as_a_constant_map():
    teacher = Teacher(scale=2, setting=2, n_groups=1, n_blocks=1, queue_size=16).eval()
    lr, prior = torch.rand(2, 3, 9, 11), torch.randn(2, 18)
    expected_input = torch.cat([lr, prior[:, :, None, None].expand(2, 18, 9, 11)], dim=1)
    with torch.inference_mode():
        torch.testing.assert_close(teacher.encode(lr, prior), teacher.encoder(expected_input))
        other = teacher.encode(lr, prior.flip(0))
    assert not torch.allclose(other, teacher.encoder(expected_input))


def test_teacher_key_path_starts_as_a_frozen_copy_of_the_query_path():
    teacher = Teacher(scale=2, n_groups=1, n_blocks=1, queue_size=32).eval()
    lr, prior = torch.rand(3, 3, 12, 12), torch.randn(3, 15)
    q = teacher.embed(lr, prior)
    k = teacher.embed_keys(lr, prior)
    torch.testing.assert_close(q, k)
    assert q.requires_grad and not k.requires_grad
    torch.testing.assert_close(q.norm(dim=1), torch.ones(3))
    assert not any(p.requires_grad for p in teacher.key_encoder.parameters())
    assert not any(p.requires_grad for p in teacher.key_head.parameters())
    torch.testing.assert_close(teacher.queue.norm(dim=0), torch.ones(32))
    assert teacher.queue.shape == (128, 32) and teacher.queue_ptr.dtype == torch.long


def test_momentum_update_moves_keys_toward_queries():
    teacher = Teacher(scale=2, n_groups=1, n_blocks=1, queue_size=8, momentum=0.9)
    with torch.no_grad():
        for p in [*teacher.encoder.parameters(), *teacher.head.parameters()]:
            p.add_(1.0)
    before = [p.clone() for p in teacher.key_encoder.parameters()]
    queries = list(teacher.encoder.parameters())
    teacher.momentum_update()
    for old, new, query in zip(before, teacher.key_encoder.parameters(), queries, strict=True):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * query)
    torch.testing.assert_close(
        teacher.key_head.mlp[2].bias, 0.9 * (teacher.head.mlp[2].bias - 1.0) + 0.1 * teacher.head.mlp[2].bias
    )


def test_enqueue_wraps_around_the_queue():
    teacher = Teacher(scale=2, n_groups=1, n_blocks=1, queue_size=10)
    batches = [torch.full((4, 128), float(i)) for i in (1, 2, 3)]
    for keys in batches:
        teacher.enqueue(keys)
    # slots 0-3: batch 1, then 4-7: batch 2, then 8, 9, 0, 1: batch 3
    expected_columns = [3, 3, 1, 1, 2, 2, 2, 2, 3, 3]
    assert teacher.queue[0].tolist() == [float(v) for v in expected_columns]
    assert int(teacher.queue_ptr[0]) == 2
    with pytest.raises(ValueError, match=r"\(N, 128\)"):
        teacher.enqueue(torch.zeros(4, 64))
    with pytest.raises(ValueError, match="N <= 10"):
        teacher.enqueue(torch.zeros(11, 128))


def test_student_initialised_from_teacher_takes_all_but_the_first_conv():
    teacher = Teacher(scale=2, n_groups=1, n_blocks=2, queue_size=8)
    student = Student(scale=2, n_groups=1, n_blocks=2)
    first_conv_before = student.encoder.stages[0].conv.weight.clone()
    with torch.no_grad():
        teacher.encoder.stages[0].norm.running_mean.uniform_()
    student.load_from_teacher(teacher)
    for (name, ours), theirs in zip(
        student.generator.state_dict().items(), teacher.generator.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    teacher_encoder = teacher.encoder.state_dict()
    for name, tensor in student.encoder.state_dict().items():
        if name.startswith("stages.0.conv."):
            continue
        assert torch.equal(tensor, teacher_encoder[name]), name
    assert torch.equal(student.encoder.stages[0].conv.weight, first_conv_before)
    with pytest.raises(ValueError, match="x4"):
        Student(scale=4, n_groups=1, n_blocks=2).load_from_teacher(teacher)


def test_unsupported_scale_and_setting_are_rejected():
    with pytest.raises(ValueError, match=r"scale: expected one of \(2, 3, 4\)"):
        Student(scale=8)
    with pytest.raises(ValueError, match="setting: expected 1 or 2"):
        Teacher(setting=3)


def test_gradients_through_the_generator_are_exact():
    """The in-place inference shortcuts must not leak into the autograd path: numerical vs analytic gradients."""
    torch.manual_seed(0)
    student = Student(scale=2, n_groups=1, n_blocks=1).double().eval()
    randomise_layer_scales(student)
    lr = torch.rand(1, 3, 5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: student(x), (lr,), eps=1e-6, atol=1e-5, fast_mode=True)


def test_inference_mode_gives_the_same_output_as_autograd_mode():
    student = small_student().eval()
    randomise_layer_scales(student)
    lr = torch.rand(1, 3, 20, 22)
    tracked = student(lr)  # parameters require grad: the out-of-place path
    with torch.inference_mode():
        untracked = student(lr)  # the in-place path
    torch.testing.assert_close(untracked, tracked.detach(), rtol=0, atol=0)


def test_bf16_autocast_is_close_to_fp32():
    """On CPU here (CUDA fp16/bf16: benchmarks/gpu_checks.py): the model must run under autocast."""
    student = small_student().eval()
    randomise_layer_scales(student)
    lr = torch.rand(1, 3, 63, 65, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        reference = student(lr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = student(lr)
    assert mixed.shape == (1, 3, 252, 260) and mixed.dtype == torch.bfloat16
    error = ((mixed.float() - reference).abs().max() / reference.abs().max()).item()
    assert 0 < error < 5e-2  # bf16 really ran (not a silent fp32 pass-through), and stayed close


def test_encoder_with_views_equals_one_call_per_view_then_a_view_zero_repeat():
    torch.manual_seed(0)
    batched = DegradationEncoder(3).train()
    separate = copy.deepcopy(batched)
    views, batch = 3, 4
    x = torch.rand(views * batch, 3, 12, 12) * torch.arange(1, views + 1).repeat_interleave(batch)[:, None, None, None]
    out = batched(x, views=views, repeat_first_view=True)
    expected = torch.cat([separate(group) for group in x.chunk(views)])
    with torch.no_grad():
        separate(x[:batch])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for name, value in separate.state_dict().items():  # running statistics and num_batches_tracked
        torch.testing.assert_close(batched.state_dict()[name], value, rtol=1e-5, atol=1e-7, msg=name)
    pooled = DegradationEncoder(3).train()
    pooled.load_state_dict(batched.state_dict())
    assert not torch.allclose(pooled(x), batched(x, views=views), atol=1e-3)  # per-view statistics differ from pooled


def test_encoder_views_must_divide_the_batch():
    with pytest.raises(ValueError, match="views must divide the batch"):
        DegradationEncoder(3).train()(torch.rand(5, 3, 8, 8), views=2)
