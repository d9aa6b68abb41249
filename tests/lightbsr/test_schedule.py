"""The learning-rate rule at its boundaries (paper numbers: 100 + 5 warm-up + cosine to 700)."""

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


def test_cosine_runs_from_the_peak_to_min_lr_at_the_last_epoch():
    assert learning_rate(106, PAPER) == pytest.approx(1e-6 + (2e-4 - 1e-6) * (1 + math.cos(math.pi / 595)) / 2)
    midpoint = 105 + 595 / 2
    assert learning_rate(int(midpoint), PAPER) == pytest.approx(
        1e-6 + (2e-4 - 1e-6) * (1 + math.cos(math.pi * (int(midpoint) - 105) / 595)) / 2
    )
    assert learning_rate(700, PAPER) == pytest.approx(1e-6)


def test_learning_rate_never_increases_after_warm_up():
    rates = [learning_rate(e, PAPER) for e in range(105, 701)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))


@pytest.mark.parametrize("epoch", [0, 701])
def test_epochs_outside_the_run_are_rejected(epoch):
    with pytest.raises(ValueError, match="1-based"):
        learning_rate(epoch, PAPER)


def test_no_warm_up_goes_straight_to_the_cosine():
    short = SimpleNamespace(epochs=4, phase1_epochs=1, warmup_epochs=0, lr=1.0, min_lr=0.0)
    assert [learning_rate(e, short) for e in (1, 2, 4)] == pytest.approx([1.0, 0.75, 0.0])
