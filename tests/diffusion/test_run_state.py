"""Run state from the timestep alone: steps, new generations, CFG branches, doubled batches."""

from __future__ import annotations

import torch

from tokenreduce.diffusion.state import DiffusionRun, StepClock, cfg_pairs


def ticks(clock: StepClock, timesteps, shape=(2, 4, 8, 8)):
    return [(clock.tick(t, shape), clock.step, clock.branch) for t in timesteps]


def test_steps_follow_decreasing_timesteps_and_a_jump_back_starts_a_new_generation():
    clock = StepClock()
    out = ticks(clock, [999, 666, 333, 0, 999, 499])
    assert out == [(True, 0, 0), (False, 1, 0), (False, 2, 0), (False, 3, 0), (True, 0, 0), (False, 1, 0)]
    assert clock.generations == 2


def test_increasing_timesteps_work_too_and_a_reversal_is_a_new_generation():
    clock = StepClock()
    assert ticks(clock, [0.0, 0.5, 1.0, 0.0]) == [(True, 0, 0), (False, 1, 0), (False, 2, 0), (True, 0, 0)]


def test_the_same_timestep_twice_is_the_next_cfg_branch():
    clock = StepClock()
    assert ticks(clock, [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]) == [
        (True, 0, 0), (False, 0, 1), (False, 1, 0), (False, 1, 1), (False, 2, 0), (False, 2, 1),
    ]


def test_a_new_latent_shape_is_a_new_generation():
    clock = StepClock()
    clock.tick(999, (2, 4, 8, 8))
    clock.tick(500, (2, 4, 8, 8))
    assert clock.tick(400, (1, 4, 8, 8)) and clock.step == 0


def test_cfg_pairs_detects_identical_halves_only():
    x = torch.randn(2, 4, 3, 3)
    assert cfg_pairs(torch.cat([x, x]))
    assert not cfg_pairs(x)
    assert not cfg_pairs(torch.randn(3, 4, 3, 3))
    assert not cfg_pairs(torch.randn(1, 4, 3, 3))


def test_run_keeps_one_store_per_branch_and_drops_them_at_a_new_generation():
    checked = []
    run = DiffusionRun(num_steps=lambda: 3, check_steps=checked.append)
    x = torch.randn(1, 4, 2, 2)
    for t in (999, 999):
        run.begin(t, x, (1, 1), want_pairs=False)
        run.store["seen"] = run.call.branch
    assert run.branches == {0: {"seen": 0}, 1: {"seen": 1}}
    run.begin(500, x, (1, 1), want_pairs=False)
    assert run.call.step == 1 and run.store == {"seen": 0}  # same generation: branch 0 keeps its caches
    run.begin(999, x, (1, 1), want_pairs=False)
    assert run.call.new_generation and run.branches == {} and checked == [3, 3]
    run.store["x"] = 1
    run.reset()
    assert run.branches == {} and run.stats()["forwards"] == 0
