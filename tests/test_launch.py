"""fastsae/ops/launch.py's tuner: it keeps the candidate whose back-to-back calls take the least wall
time (host time included), once per key, until its picks are forgotten."""

import time

from fastsae.ops import launch


def test_tuner_picks_the_fastest_back_to_back_and_remembers(monkeypatch):
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "_best", {})  # this test's picks only
    monkeypatch.setenv("FASTSAE_AUTOTUNE", "1")
    calls = []

    def run(candidate):
        calls.append(candidate)
        time.sleep(candidate)  # host time, as a launch-bound route spends it

    key = ("test_tuner", 1)
    assert launch.tuned(key, [0.004, 0.001, 0.003], run) == 0.001
    assert launch.tuned_choices("test_tuner") == [0.001]
    assert launch.tuned_items("test_tuner") == [(key, 0.001)]
    timed = len(calls)
    assert launch.tuned(key, [0.004, 0.001, 0.003], run) == 0.001 and len(calls) == timed  # not timed again
    assert 0.001 <= launch.seconds_per_call(lambda: time.sleep(0.001), calls=3, rounds=2) < 0.01
    launch.forget_tuned()
    assert launch.tuned_items("test_tuner") == []
    assert launch.tuned(key, [0.003, 0.004], run) == 0.003 and len(calls) > timed  # timed again
