"""fastkd.schedules: values at given steps, composition, and errors."""

import math
import pickle

import pytest

from fastkd import schedules


def test_constant_is_the_same_at_every_step():
    assert [schedules.Constant(0.3)(s) for s in (0, 1, 10**6)] == [0.3, 0.3, 0.3]


def test_linear_goes_from_start_to_end_then_stays():
    decay = schedules.Linear(0.9, 0.1, steps=4)
    assert [decay(s) for s in range(6)] == pytest.approx([0.9, 0.7, 0.5, 0.3, 0.1, 0.1])


def test_cosine_is_flat_at_both_ends_and_half_way_at_the_middle():
    ramp = schedules.Cosine(1.0, 3.0, steps=10)
    assert ramp(0) == 1.0 and ramp(10) == 3.0 and ramp(25) == 3.0
    assert ramp(5) == pytest.approx(2.0)
    assert ramp(1) == pytest.approx(1.0 + (1 - math.cos(math.pi / 10)))
    assert ramp(1) - ramp(0) < ramp(5) - ramp(4)


def test_step_multiplies_by_gamma_at_each_milestone_reached():
    decay = schedules.Step(1.0, milestones=[3, 6], gamma=0.5)
    assert [decay(s) for s in (0, 2, 3, 5, 6, 100)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_step_scales_its_value_and_decays_by_one_tenth_by_default():
    decay = schedules.Step(3.0, milestones=[2, 4])
    assert [decay(s) for s in (0, 1, 2, 4, 9)] == pytest.approx([3.0, 3.0, 0.3, 0.03, 0.03], rel=1e-12)


def test_warmup_is_dkd_factor_min_epoch_over_warmup():
    warm = schedules.Warmup(20)
    assert [warm(e) for e in (0, 1, 10, 20, 40)] == pytest.approx([0.0, 0.05, 0.5, 1.0, 1.0])


def test_warmup_follows_a_schedule_after_the_ramp():
    warm = schedules.Warmup(2, after=schedules.Linear(2.0, 0.0, steps=4))
    assert [warm(s) for s in range(6)] == pytest.approx([0.0, 0.5 * 1.5, 1.0, 0.5, 0.0, 0.0])


def test_as_schedule_wraps_numbers_and_keeps_schedules():
    linear = schedules.Linear(1.0, 0.0, steps=2)
    assert schedules.as_schedule(linear) is linear
    assert schedules.as_schedule(2)(7) == 2.0
    with pytest.raises(TypeError, match="weight"):
        schedules.as_schedule("0.5", "weight")


def test_schedules_pickle_with_their_values():
    warm = schedules.Warmup(3, after=schedules.Step(2.0, [1], gamma=0.1))
    copy = pickle.loads(pickle.dumps(warm))
    assert [copy(s) for s in range(5)] == [warm(s) for s in range(5)]
    assert "Warmup" in repr(copy) and "Step" in repr(copy)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: schedules.Linear(1.0, 0.0, steps=0), "steps"),
        (lambda: schedules.Cosine(1.0, float("nan"), steps=3), "end"),
        (lambda: schedules.Step(1.0, [5, 5]), "strictly increasing"),
        (lambda: schedules.Step(1.0, [6, 3]), "strictly increasing"),
        (lambda: schedules.Step(1.0, [-1]), "milestones"),
        (lambda: schedules.Warmup(2.5), "steps"),
        (lambda: schedules.Constant(True), "value"),
    ],
)
def test_bad_arguments_name_what_is_wrong(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_step_must_be_a_non_negative_integer(step):
    with pytest.raises(ValueError, match="step"):
        schedules.Constant(1.0)(step)
