"""LatencyPolicy: a pure function of queue depth, measured costs and the frame's arrival time."""

import pytest

from fm2s_stream.policy import COLD_BACKLOG, COLD_SHARE, LatencyPolicy


def test_a_ready_channel_fine_tunes_only_while_step_and_answer_fit_the_budget():
    policy = LatencyPolicy(budget_ms=50, max_finetune_steps=8)
    policy.answered(0.010)
    policy.stepped(0.020)
    assert policy.plan(100.0, backlog=0, ready=True, answer_seconds=0.01).max_steps == 8
    policy.stepped(0.5)  # one slow step: the smoothed cost goes over budget
    plan = policy.plan(100.0, backlog=0, ready=True, answer_seconds=0.01)
    assert plan.max_steps == 0 and plan.skipped
    before = policy.step_s
    policy.plan(100.0, backlog=0, ready=True, answer_seconds=0.01)
    assert policy.step_s < before  # the estimate decays, so fine-tuning comes back
    for _ in range(60):
        policy.plan(100.0, backlog=0, ready=True, answer_seconds=0.01)
    assert policy.plan(100.0, backlog=0, ready=True, answer_seconds=0.01).max_steps == 8


def test_backlog_stops_fine_tuning_but_never_the_cold_start():
    policy = LatencyPolicy(budget_ms=50, max_finetune_steps=8)
    plan = policy.plan(100.0, backlog=5, ready=True, answer_seconds=0.01)
    assert plan.max_steps == 0 and plan.skipped
    cold = policy.plan(100.0, backlog=2, ready=False, answer_seconds=0.3)
    assert cold.max_steps > 0 and cold.at_least_s == pytest.approx(0.3 * COLD_SHARE / (1 - COLD_SHARE))
    assert cold.deadline == pytest.approx(100.05)
    # a long backlog: the same share, taken on every COLD_BACKLOG-th frame only
    plans = [policy.plan(100.0, backlog=50, ready=False, answer_seconds=0.3, frame_index=i) for i in range(8)]
    assert sum(p.at_least_s for p in plans) == pytest.approx(8 * cold.at_least_s)
    assert sum(p.max_steps > 0 for p in plans) == 8 // COLD_BACKLOG


def test_a_cold_start_whose_network_answers_yields_to_a_queue():
    policy = LatencyPolicy(budget_ms=50, max_finetune_steps=8)
    waiting = policy.plan(100.0, backlog=1, ready=False, answer_seconds=0.02, answers=True)
    assert waiting.max_steps == 0 and waiting.skipped
    quiet = policy.plan(100.0, backlog=0, ready=False, answer_seconds=0.02, answers=True)
    assert quiet.max_steps > 0 and quiet.at_least_s == pytest.approx(0.02 * COLD_SHARE / (1 - COLD_SHARE))
    # a network that does not answer yet keeps its share under the same queue
    assert policy.plan(100.0, backlog=1, ready=False, answer_seconds=0.02).max_steps > 0


def test_sustainable_fps_is_known_once_both_costs_are_measured():
    policy = LatencyPolicy(budget_ms=50, max_finetune_steps=4)
    assert policy.sustainable_fps() is None
    policy.answered(0.010)
    policy.stepped(0.010)
    assert policy.sustainable_fps() == pytest.approx(1 / 0.05)


def test_no_fine_tuning_configured_is_not_counted_as_skipped():
    plan = LatencyPolicy(budget_ms=50, max_finetune_steps=0).plan(0.0, backlog=0, ready=True, answer_seconds=0.0)
    assert plan.max_steps == 0 and not plan.skipped
