"""The learning-rate rule at its boundaries (paper numbers: 100 + 5 warm-up + cosine to 700)."""

import itertools
import math
from types import SimpleNamespace

import pytest

from lightbsr.schedule import learning_rate, phase_of

pytestmark = pytest.mark.unit

PAPER = SimpleNamespace(epochs=700, phase1_epochs=100, warmup_epochs=5, lr=2e-4, min_lr=1e-6)


@pytest.mark.parametrize("epoch", [1, 50, 100])
def test_phase_one_is_constant(epoch):
    assert learning_rate(epoch, PAPER) == 2e-4
    assert phase_of(epoch, PAPER) == 1


@pytest.mark.parametrize("epoch, fraction", [(101, 1 / 5), (102, 2 / 5), (105, 1.0)])
def test_warm_up_is_linear_over_epochs_101_to_105(epoch, fraction):
    assert learning_rate(epoch, PAPER) == pytest.approx(2e-4 * fraction)
    assert phase_of(epoch, PAPER) == 2


def test_cosine_hits_its_closed_form_values():
    """8 cosine epochs (6..13) from lr 1 to 0: (1 + cos(pi k / 8)) / 2 = cos^2(pi k / 16), written with square roots."""
    short = SimpleNamespace(epochs=13, phase1_epochs=2, warmup_epochs=3, lr=1.0, min_lr=0.0)
    expected = {
        5: 1.0,  # end of the warm-up: the peak
        6: (2 + math.sqrt(2 + math.sqrt(2))) / 4,  # cos^2(pi/16)
        7: (2 + math.sqrt(2)) / 4,  # cos^2(pi/8)
        9: 0.5,  # half way
        11: (2 - math.sqrt(2)) / 4,
        12: (2 - math.sqrt(2 + math.sqrt(2))) / 4,
        13: 0.0,
    }
    for epoch, rate in expected.items():
        assert learning_rate(epoch, short) == pytest.approx(rate, abs=1e-12), epoch


def test_paper_cosine_is_symmetric_about_its_midpoint_and_ends_at_min_lr():
    """cos(pi - x) = -cos(x): epochs 105 + k and 700 - k average to (lr + min_lr) / 2."""
    for k in (1, 100, 297):
        pair = learning_rate(105 + k, PAPER) + learning_rate(700 - k, PAPER)
        assert pair == pytest.approx(2e-4 + 1e-6, rel=1e-12), k
    # first cosine epoch: 1 - cos(x) ~ x^2 / 2 for x = pi / 595 (next term x^4 / 24, ~1e-11 relative here)
    assert learning_rate(106, PAPER) == pytest.approx(2e-4 - (2e-4 - 1e-6) * (math.pi / 595) ** 2 / 4, rel=1e-9)
    assert learning_rate(700, PAPER) == pytest.approx(1e-6, rel=1e-12)


def test_learning_rate_never_increases_after_warm_up():
    rates = [learning_rate(e, PAPER) for e in range(105, 701)]
    assert all(a >= b for a, b in itertools.pairwise(rates))


@pytest.mark.parametrize("epoch", [0, 701])
def test_epochs_outside_the_run_are_rejected(epoch):
    with pytest.raises(ValueError, match="1-based"):
        learning_rate(epoch, PAPER)


def test_no_warm_up_goes_straight_to_the_cosine():
    short = SimpleNamespace(epochs=4, phase1_epochs=1, warmup_epochs=0, lr=1.0, min_lr=0.0)
    assert [learning_rate(e, short) for e in (1, 2, 4)] == pytest.approx([1.0, 0.75, 0.0])
