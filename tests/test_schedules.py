"""Learning-rate schedules at their defining points."""
import math

import pytest

from megalatent.config import TrainingConfig
from megalatent.training.schedules import LRSchedule


def sched(**kw):
    base = dict(lr=1.0, min_lr=0.1, train_iters=110, lr_warmup_iters=10)
    base.update(kw)
    return LRSchedule(TrainingConfig(**base))


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "WSD", "inverse-square-root"])
def test_warmup_is_linear_to_peak(style):
    s = sched(lr_decay_style=style)
    assert [s(i) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert s(9) == pytest.approx(1.0)


def test_linear_and_cosine_reach_min_lr():
    lin, cos = sched(lr_decay_style="linear"), sched(lr_decay_style="cosine")
    assert lin(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lin(110) == cos(110) == 0.1 and lin(500) == 0.1


def test_constant_and_inverse_sqrt():
    assert sched(lr_decay_style="constant")(100) == 1.0
    inv = sched(lr_decay_style="inverse-square-root")
    assert inv(39) == pytest.approx(math.sqrt(10) / math.sqrt(40))
    assert inv(10**6) == 0.1  # floored at min-lr


def test_wsd_stable_then_decays_in_the_last_phase():
    s = sched(lr_decay_style="WSD", lr_wsd_decay_iters=20)
    assert s(89) == 1.0  # stable until decay_iters - wsd_decay_iters = 90
    assert s(100) == pytest.approx(0.1 + 0.9 * 0.5)  # linear halfway
    assert s(110) == 0.1
    e = sched(lr_decay_style="WSD", lr_wsd_decay_iters=20, lr_wsd_decay_style="exponential")
    assert e(90) == pytest.approx(1.0) and e(109) > 0.1


def test_warmup_fraction():
    s = sched(lr_warmup_iters=0, lr_warmup_fraction=0.5, lr_decay_iters=20)
    assert s(4) == pytest.approx(0.5)
