"""Request plans of the HTTP load scenarios: seeded, shaped as named, bounded."""

from collections import Counter

import pytest

from loadtests.popularity import burst, sequence, zipf_weights

NAMES = [f"a{i}" for i in range(100)]


def test_plans_are_reproducible_and_use_only_registered_names():
    for scenario in ("uniform", "zipf", "burst"):
        a = sequence(scenario, NAMES, 500, seed=3)
        assert a == sequence(scenario, NAMES, 500, seed=3)
        assert a != sequence(scenario, NAMES, 500, seed=4)
        assert len(a) == 500 and set(a) <= set(NAMES)


def test_zipf_weights_follow_one_over_rank():
    w = zipf_weights(4, 1.0)
    assert sum(w) == pytest.approx(1.0)
    assert w[0] / w[1] == pytest.approx(2.0) and w[0] / w[3] == pytest.approx(4.0)


def test_zipf_is_skewed_and_uniform_is_not():
    z = Counter(sequence("zipf", NAMES, 5000, seed=0)).most_common()
    u = Counter(sequence("uniform", NAMES, 5000, seed=0)).most_common()
    # Zipf s=1 over 100 names: the top name takes 1/H(100) ~ 19% of requests
    assert 0.15 < z[0][1] / 5000 < 0.24
    assert u[0][1] / 5000 < 0.04


def test_burst_sends_cold_adapters_in_bursts_between_a_hot_set():
    import random

    plan = burst(NAMES, 200, random.Random(0), hot=8, period=40, burst_len=8)
    in_bursts = [n for i, n in enumerate(plan) if i % 40 < 8]
    between = {n for i, n in enumerate(plan) if i % 40 >= 8}
    assert len(between) <= 8
    assert len(set(in_bursts)) == len(in_bursts)  # each burst request is a first use
    assert not set(in_bursts) & between


def test_burst_takes_cold_requests_from_the_given_cold_names_in_order():
    from loadtests.popularity import cold_slots

    cold = [f"cold-{i}" for i in range(cold_slots(100))]
    plan = sequence("burst", NAMES, 100, seed=3, cold=cold)
    assert [n for i, n in enumerate(plan) if i % 40 < 8] == cold  # each cold name once, in order
    assert len(cold) == 8 + 8 + 8  # bursts at 0, 40 and 80
    assert {n for i, n in enumerate(plan) if i % 40 >= 8} <= set(NAMES)


def test_unknown_scenario_and_empty_names_are_refused():
    with pytest.raises(ValueError, match="uniform, zipf, burst"):
        sequence("pareto", NAMES, 10)
    with pytest.raises(ValueError, match="no adapters"):
        sequence("uniform", [], 10)
