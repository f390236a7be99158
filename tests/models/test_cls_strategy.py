"""The strategic-decoding state machine, its windows (rules 1–3) and the schedules."""

from __future__ import annotations

import pytest

from deepalign.models.cls_strategy import Insertion, Strategy, StrategyConfig

N_INPUT = 6  # the user's words: content indices 0 … 5


def test_initial_malicious_inserts_at_once_and_uses_rule_1():
    strategy = Strategy(StrategyConfig(r1=10), N_INPUT)
    assert strategy.start(True, content_length=N_INPUT + 3) == Insertion(N_INPUT + 3, "first")  # after a prefill
    assert strategy.state == "refusing"
    assert strategy.window(N_INPUT + 4) == range(0, N_INPUT + 4)
    assert strategy.window(N_INPUT + 40) == range(0, N_INPUT + 10)  # input + first r1 response tokens
    assert strategy.observe(True, 1, N_INPUT + 41) is None  # nothing is inserted twice


def test_benign_uses_rule_2_latest_tokens():
    strategy = Strategy(StrategyConfig(r2=4), N_INPUT)
    assert strategy.start(False, N_INPUT) is None and strategy.state == "benign"
    assert strategy.window(N_INPUT + 1) == range(N_INPUT - 3, N_INPUT + 1)
    assert strategy.window(2) == range(0, 2)


@pytest.mark.parametrize("tau", [1, 2, 3])
def test_late_transition_confirmed_after_tau_verdicts(tau):
    strategy = Strategy(StrategyConfig(schedule="periodic", period=5, tau=tau, r2=3, r3=2), N_INPUT)
    strategy.start(False, N_INPUT)
    assert not strategy.due(4) and strategy.due(5)
    switch = N_INPUT + 5 - 1  # the token appended at step 5
    result = strategy.observe(True, 5, N_INPUT + 5)
    for k in range(1, tau):
        assert result is None and strategy.state == "suspect"
        assert strategy.due(5 + k)  # a pending switch is checked at every step, whatever the schedule
        assert strategy.window(N_INPUT + 5 + k) == range(switch - 3, min(N_INPUT + 5 + k, switch + 3))
        result = strategy.observe(True, 5 + k, N_INPUT + 5 + k)
    assert result == Insertion(switch, "switch") and strategy.state == "refusing"
    assert strategy.window(N_INPUT + 30) == range(switch - 3, switch + 3)  # rule 3's window, frozen


def test_false_trigger_falls_back_to_rule_2():
    strategy = Strategy(StrategyConfig(tau=3, r2=4), N_INPUT)
    strategy.start(False, N_INPUT)
    assert strategy.observe(True, 1, N_INPUT + 1) is None and strategy.state == "suspect"
    assert strategy.observe(False, 2, N_INPUT + 2) is None
    assert strategy.state == "benign" and strategy.switch is None
    assert strategy.window(N_INPUT + 2) == range(N_INPUT - 2, N_INPUT + 2)
    # the count restarts: two more malicious verdicts do not reach tau = 3
    assert strategy.observe(True, 3, N_INPUT + 3) is None and strategy.observe(True, 4, N_INPUT + 4) is None
    assert strategy.observe(True, 5, N_INPUT + 5) == Insertion(N_INPUT + 2, "switch")


def test_without_strategic_decoding_nothing_is_inserted():
    strategy = Strategy(StrategyConfig(strategic_decoding=False, tau=1), N_INPUT)
    assert strategy.start(True, N_INPUT) is None
    strategy = Strategy(StrategyConfig(strategic_decoding=False, tau=1), N_INPUT)
    strategy.start(False, N_INPUT)
    assert strategy.observe(True, 1, N_INPUT + 1) is None


def _checks(schedule: str, steps: int = 64, **kwargs) -> list[int]:
    strategy = Strategy(StrategyConfig(schedule=schedule, **kwargs), N_INPUT)
    strategy.start(False, N_INPUT)
    done = []
    for step in range(1, steps + 1):
        if strategy.due(step):
            done.append(step)
            strategy.observe(False, step, N_INPUT + step)
    return done


def test_schedules():
    assert _checks("each", 12) == list(range(1, 13))
    assert _checks("first") == []
    assert _checks("periodic", 35) == [10, 20, 30]
    assert _checks("annealing") == [1, 2, 4, 8, 16, 32, 48, 64]


def test_annealing_restarts_after_a_malicious_verdict():
    strategy = Strategy(StrategyConfig(schedule="annealing", tau=3), N_INPUT)
    strategy.start(False, N_INPUT)
    for step in (1, 2, 4, 8):
        assert strategy.due(step)
        strategy.observe(False, step, N_INPUT + step)
    assert not strategy.due(15)
    strategy.observe(True, 16, N_INPUT + 16)
    strategy.observe(False, 17, N_INPUT + 17)  # false trigger
    assert strategy.due(18)
    strategy.observe(False, 18, N_INPUT + 18)
    assert not strategy.due(19) and strategy.due(20)


@pytest.mark.parametrize("bad", [dict(schedule="sometimes"), dict(tau=4), dict(tau=0), dict(r1=0),
                                 dict(threshold=1.0), dict(period=True)])
def test_config_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        StrategyConfig(**bad)


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="no content token"):
        Strategy(StrategyConfig(), 0)


def test_annealing_keeps_backing_off_once_refusing():
    strategy = Strategy(StrategyConfig(schedule="annealing"), N_INPUT)
    strategy.start(True, N_INPUT)
    checks = []
    for step in range(1, 40):
        if strategy.due(step):
            checks.append(step)
            strategy.observe(True, step, N_INPUT + step)
    assert checks == [1, 2, 4, 8, 16, 32]


def test_a_confirmed_switch_without_strategic_decoding_is_flagged_not_rechecked():
    strategy = Strategy(StrategyConfig(schedule="periodic", tau=2, strategic_decoding=False), N_INPUT)
    strategy.start(False, N_INPUT)
    strategy.observe(True, 10, N_INPUT + 10)
    assert strategy.observe(True, 11, N_INPUT + 11) is None and strategy.state == "refusing"
    assert not strategy.due(12) and strategy.due(20)
