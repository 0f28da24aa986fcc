"""Admission policy for continuous batching: which waiting requests join the running batch now.

Pure logic over a small protocol (no torch, no threads), so fairness and bounds are unit-tested directly.

- Bounds: rows (`max_rows`) and tokens (sum over running rows of input + max_new_tokens).
- FIFO by arrival; a request that cannot go now does not block younger ones (work-conserving) ...
- ... unless it has been overtaken `max_skips` times because of *capacity* (no free slot for its adapter
  kind, not enough token budget): then admission turns strict FIFO until it is in (aging). Requests whose
  adapter is still loading from disk are not "blocked": they wait only for their own adapter.
- Joins are paced by `max_prefill_tokens` per encoder pass (running rows keep a steady token rate).
- static mode (the benchmark baseline): a new batch is admitted only when the running one is empty.
- `encoder_passes` splits one admission into encoder passes by length when padding would cost more
  than an extra pass (prompt-tuned rows are longer than the rows they join).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

OK, WAIT, BLOCKED, FAIL = "ok", "wait", "blocked", "fail"


class Schedulable(Protocol):
    cost_tokens: int  # input + soft prompt + max_new_tokens (x rows): what it holds while running
    rows: int  # batch rows it takes once admitted (beams, sampled candidates; usually 1)
    prefill_tokens: int  # input + soft prompt: the size of its encoder pass
    skips: int


@dataclass(frozen=True)
class Budget:
    rows: int
    tokens: int


def admit(waiting: Iterable[Schedulable], running_rows: int, running_tokens: int, *, max_rows: int,
          max_tokens: int, max_skips: int, static: bool, readiness: Callable[[Schedulable], str],
          max_prefill_tokens: int | None = None) -> tuple[list[Schedulable], list[Schedulable]]:
    """Pick requests (arrival order) to admit now. Returns (admitted, failed).

    `max_prefill_tokens` paces joins: one encoder pass takes at most that many tokens (but always at
    least one request), so running rows are not stalled by a burst of long inputs; the rest join at the
    next step.

    `readiness(req)` is asked only for requests that fit the budget; it may start loading their adapter
    and returns OK (servable now), WAIT (adapter loading), BLOCKED (no capacity for it) or FAIL.
    Mutates `skips` of requests that younger ones overtake.
    """
    if static and running_rows > 0:
        return [], []
    rows_left, tokens_left = max_rows - running_rows, max_tokens - running_tokens
    prefill_left = max_prefill_tokens if max_prefill_tokens is not None else float("inf")
    admitted: list[Schedulable] = []
    failed: list[Schedulable] = []
    overtaken: list[Schedulable] = []  # older requests held back by capacity
    for req in waiting:
        if rows_left <= 0 or (admitted and req.prefill_tokens > prefill_left):
            break
        width = getattr(req, "rows", 1)
        fits = req.cost_tokens <= tokens_left and width <= rows_left
        state = readiness(req) if fits else BLOCKED
        if state == OK:
            admitted.append(req)
            rows_left -= width
            tokens_left -= req.cost_tokens
            prefill_left -= req.prefill_tokens
            for old in overtaken:
                old.skips += 1
            overtaken = []
        elif state == FAIL:
            failed.append(req)
        elif state == BLOCKED:
            if req.skips >= max_skips:
                break  # aged: nobody younger goes first until this one is in
            overtaken.append(req)
    return admitted, failed


# What one more encoder pass costs, in padded tokens (per-pass work that does not scale with tokens:
# launching every layer's kernels, per-row adapter gathers). A split must save more padding than this.
PASS_COST_TOKENS = 64


def encoder_passes(lengths: list[int], pass_cost: int = PASS_COST_TOKENS) -> list[list[int]]:
    """Split requests (their encoder input lengths) into encoder passes minimizing padded tokens plus
    `pass_cost` per pass. A pass costs its longest input x its rows; with lengths sorted, the best
    passes are contiguous runs, so a small dynamic program over split points finds the optimum.
    Returns index lists, shortest inputs first."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_len = [lengths[i] for i in order]
    n = len(order)
    best = [0] + [float("inf")] * n  # best[j]: cost of the first j requests
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):  # one pass over sorted requests i..j-1, padded to sorted_len[j - 1]
            cost = best[i] + pass_cost + sorted_len[j - 1] * (j - i)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    passes, j = [], n
    while j > 0:
        passes.append(order[cut[j]:j])
        j = cut[j]
    return passes[::-1]
