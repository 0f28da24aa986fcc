"""Small pure helpers for measuring: percentiles, timed repeats of a run, result cells, memory, the machine,
quiet libraries."""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Sequence

from loadtests.peers import RunResult


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def distribution(values: Sequence[float]) -> dict:
    """Summary plus the raw samples (the CDF plot needs them)."""
    return {"n": len(values), "p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else None,
            "mean": statistics.fmean(values) if values else None, "samples": [float(v) for v in values]}


def timed_cell(run: Callable[[], RunResult], repeats: int) -> dict:
    """One untimed warm-up, then `repeats` runs; throughput is the best run's (interference only ever
    slows a run down), latencies pooled."""
    run()
    results = [run() for _ in range(repeats)]
    rates = [r.tokens / r.seconds for r in results]
    latencies = [x for r in results for x in r.latencies]
    return {"tokens_per_s": max(rates), "tokens_per_s_runs": rates,
            "tokens_per_run": results[0].tokens, "p50_latency_s": percentile(latencies, 50),
            "p99_latency_s": percentile(latencies, 99)}


def result_cell(peer_name: str, kind: str, n: int, rows: int, stats: dict, memory: int, projected=False) -> dict:
    """One throughput cell as results.json holds it: who ran what (kind, N distinct over `rows` rows), the
    timed stats, and the memory it took (`projected`: extrapolated, not measured)."""
    return {"peer": peer_name, "kind": kind, "distinct": n, "rows": rows, **stats, "memory_bytes": memory,
            "memory_projected": projected}


def quiet_libraries() -> None:
    """No transformers warnings or progress bars in a benchmark's log."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def machine() -> dict:
    """What the numbers were measured on."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]}
    try:
        import peft
        import transformers

        info.update(transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    return info
