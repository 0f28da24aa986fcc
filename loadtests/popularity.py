"""Which adapter each HTTP load-test request uses: uniform, Zipf-skewed, or bursts of cold adapters.

Pure and seeded: `sequence(scenario, names, n, seed)` is the whole request plan, so a run is
reproducible and the locust users only walk a precomputed list.
"""

from __future__ import annotations

import bisect
import itertools
import random

SCENARIOS = ("uniform", "zipf", "burst")


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    """P(rank k) proportional to 1 / k^s, k = 1..n (rank 1 is the most popular)."""
    w = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def uniform(names: list[str], n: int, rng: random.Random) -> list[str]:
    return [rng.choice(names) for _ in range(n)]


def zipf(names: list[str], n: int, rng: random.Random, s: float = 1.0) -> list[str]:
    # popularity rank is a random permutation, so rank 1 is not always the first kind/file
    ranked = rng.sample(names, len(names))
    cum = list(itertools.accumulate(zipf_weights(len(ranked), s)))
    return [ranked[min(bisect.bisect_left(cum, rng.random() * cum[-1]), len(ranked) - 1)] for _ in range(n)]


BURST_PERIOD, BURST_LEN = 40, 8


def cold_slots(n: int, period: int = BURST_PERIOD, burst_len: int = BURST_LEN) -> int:
    """How many of `n` burst-scenario requests fall in bursts (= cold names needed for no wrap-around)."""
    return sum(1 for i in range(n) if i % period < burst_len)


def burst(names: list[str], n: int, rng: random.Random, hot: int = 8, period: int = BURST_PERIOD,
          burst_len: int = BURST_LEN, cold: list[str] | None = None) -> list[str]:
    """A hot working set (`hot` adapters, uniform) interrupted every `period` requests by `burst_len`
    requests for adapters never used before in the run (cold: disk -> host -> device on the server).
    The cold ones come from `cold` in order when given (names whose files are each distinct, so a cold
    request really loads from disk), else from the names outside the hot set. When every cold adapter
    has been used, bursts wrap around to the least recently burst ones."""
    order = rng.sample(names, len(names))
    hot_set = order[:hot]
    cold_iter = itertools.cycle(cold or order[hot:] or order)
    return [next(cold_iter) if i % period < burst_len else rng.choice(hot_set) for i in range(n)]


def sequence(scenario: str, names: list[str], n: int, seed: int = 0, cold: list[str] | None = None) -> list[str]:
    if not names:
        raise ValueError("no adapters to choose from")
    rng = random.Random(seed)
    if scenario == "uniform":
        return uniform(names, n, rng)
    if scenario == "zipf":
        return zipf(names, n, rng)
    if scenario == "burst":
        return burst(names, n, rng, cold=cold)
    raise ValueError(f"unknown popularity scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
