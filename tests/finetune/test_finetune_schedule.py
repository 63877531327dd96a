"""Fine-tuning's learning-rate schedules step by step against transformers' (the oracle), and the shapes
recipe's own schedule, which stays as it was trained."""

from __future__ import annotations

import math

import pytest
import torch

from idefics2.finetune.loop import LR_SCHEDULES, lr_factor, lr_multiplier


def _transformers_rates(make: object, steps: int, **kwargs: object) -> list[float]:
    """The multiplier of each optimizer step as a transformers Trainer applies it: the scheduler's rate is
    read for step s after s calls of `scheduler.step()`."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make(optimizer, **kwargs)  # type: ignore[operator]
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.oracle
@pytest.mark.parametrize(("steps", "warmup"), [(30, 7), (30, 0), (12, 1), (5, 5), (3, 8), (1, 0)])
@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_each_schedule_is_transformers_step_by_step(steps: int, warmup: int, min_ratio: float) -> None:
    transformers = pytest.importorskip("transformers")
    common = {"num_warmup_steps": warmup}
    expected = {
        "cosine": _transformers_rates(
            transformers.get_cosine_with_min_lr_schedule_with_warmup,
            steps,
            **common,
            num_training_steps=steps,
            min_lr_rate=min_ratio,
        ),
        # transformers' linear decay ends at 0; ours at the floor, the same line rescaled onto [min_ratio, 1]
        "linear": [
            rate if step < warmup else min_ratio + (1 - min_ratio) * rate
            for step, rate in enumerate(
                _transformers_rates(
                    transformers.get_linear_schedule_with_warmup, steps, **common, num_training_steps=steps
                )
            )
        ],
        "constant_with_warmup": _transformers_rates(
            transformers.get_constant_schedule_with_warmup, steps, **common
        ),
    }
    if min_ratio == 0:  # without a floor, the plain cosine schedule is the same one
        assert expected["cosine"] == pytest.approx(
            _transformers_rates(
                transformers.get_cosine_schedule_with_warmup, steps, **common, num_training_steps=steps
            ),
            abs=1e-15,
        )
    assert set(expected) == set(LR_SCHEDULES)
    for name, rates in expected.items():
        ours = [lr_multiplier(name, step, steps, warmup, min_ratio) for step in range(steps)]
        assert ours == pytest.approx(rates, abs=1e-12), name


def test_the_rate_right_after_the_warm_up_is_the_peak() -> None:
    """The decay counts from the end of the warm-up: step 10 of 100 after 10 warm-up steps is at 1, not at
    the 0.868x a cosine over the whole run would give; the first step of a warm-up is at 0."""
    assert lr_multiplier("cosine", 10, 100, 10, 0.0) == 1.0
    assert lr_multiplier("cosine", 11, 100, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 90)))
    assert lr_multiplier("linear", 55, 100, 10, 0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert [lr_multiplier("constant_with_warmup", s, 100, 4, 0.5) for s in (0, 2, 4, 99)] == [
        0.0,
        0.5,
        1.0,
        1.0,
    ]
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        lr_multiplier("step", 0, 10, 0, 0.0)


def test_the_shapes_recipe_keeps_its_schedule() -> None:
    """The recipe's shipped model was trained with this schedule: warm-up reaching 1 at its last step, and
    the cosine over the run's overall progress (steps or wall-clock time), warm-up included."""
    assert lr_factor(0.0, 0, 10, 0.1) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_factor(0.05, 5, 10, 0.0) == pytest.approx(0.6)
    assert lr_factor(0.25, 20, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(0.5, 50, 10, 0.1) == pytest.approx(0.55)
    assert lr_factor(1.5, 200, 10, 0.2) == pytest.approx(0.2)  # past the end (the time budget): the floor
