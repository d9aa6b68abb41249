"""The MAC counter: hand-counted layers, then the paper's 206.16 G for the x4 student at 256x256."""

import pytest
import torch
from torch import nn

from lightbsr import Student
from lightbsr.macs import count_macs

pytestmark = pytest.mark.unit


def test_counter_matches_hand_counted_conv_and_linear_macs():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8*10*12 outputs * 3*9
        nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=8),  # depthwise: 8*5*6 outputs * 1*25
        nn.Flatten(),
        nn.Linear(240, 7, bias=False),  # 7 outputs * 240
        nn.ReLU(),
    )
    expected = 8 * 10 * 12 * 27 + 8 * 5 * 6 * 25 + 7 * 240
    assert count_macs(model, torch.rand(1, 3, 10, 12)) == expected
    assert count_macs(model, torch.rand(2, 3, 10, 12)) == 2 * expected
    assert not model[0]._forward_hooks  # hooks are removed afterwards


def test_linear_on_channels_last_maps_counts_every_position():
    assert count_macs(nn.Linear(64, 128), torch.rand(1, 5, 6, 64)) == 5 * 6 * 128 * 64


@pytest.mark.parametrize(("scale", "paper_gmacs"), [(4, 206.16), (2, 166.15), (3, 178.79)])
def test_student_macs_at_256_match_the_paper(scale, paper_gmacs):
    with torch.device("meta"):
        student = Student(scale=scale).eval()
        macs = count_macs(student, torch.empty(1, 3, 256, 256))
    assert abs(macs / 1e9 - paper_gmacs) / paper_gmacs < 0.01
