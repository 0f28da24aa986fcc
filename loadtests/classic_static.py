"""Classic static batching: what a server built on `model.generate` does with open-loop arrivals.

Collect the requests that have arrived (up to `max_rows`), run them as one `generate` call to the
batch's longest output, then the next batch. Rows that finished early stay in the forward as
padding until the longest one ends; each request's result is its own prefix of the batch output,
delivered when the whole batch returns. The engine's `scheduling="static"` differs in one way that
matters: it drops finished rows from the batch at once (it only delays admissions), so a step costs
only the rows still running. This peer is the baseline "continuous vs static" targets refer to.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from loadtests.measure import percentile
from loadtests.workload import Request


def next_batch(pending: list[int], arrivals: list[float], now: float, max_rows: int) -> list[int]:
    """Indices (in arrival order) of the requests arrived by `now`, at most `max_rows` of them."""
    return [i for i in pending if arrivals[i] <= now][:max_rows]


def run_classic_static(base_dir: Path, device: str, dtype: torch.dtype, requests: list[Request],
                       arrivals: list[float], max_rows: int) -> dict:
    """Serve `requests` (arriving at `arrivals`, seconds from start) batch by batch with HF generate on
    the base (adapters are ignored: base rows). Same statistics as `engine_driver.run_arrivals`."""
    from loadtests.peers import HFBasePeer

    peer = HFBasePeer(base_dir, device, dtype)
    peer.run(requests[:max_rows])  # warm-up, untimed: first calls allocate
    pending = list(range(len(requests)))
    latencies = [0.0] * len(requests)
    tokens, batches = 0, 0
    t0 = time.perf_counter()
    while pending:
        now = time.perf_counter() - t0
        batch = next_batch(pending, arrivals, now, max_rows)
        if not batch:  # idle server: wait for the next arrival
            time.sleep(max(0.0, arrivals[pending[0]] - now))
            continue
        outputs = peer.run([requests[i] for i in batch]).outputs  # runs to the batch's longest
        done = time.perf_counter() - t0
        for i, out in zip(batch, outputs, strict=True):
            own = out[: requests[i].max_new_tokens]  # a request's answer is its own length
            tokens += len(own)
            latencies[i] = done - arrivals[i]
        taken = set(batch)
        pending = [i for i in pending if i not in taken]
        batches += 1
    makespan = time.perf_counter() - t0
    return {"requests": len(requests), "tokens": tokens, "seconds": makespan, "tokens_per_s": tokens / makespan,
            "p50_latency_s": percentile(latencies, 50), "p99_latency_s": percentile(latencies, 99),
            "batches": batches, "latencies": latencies}
