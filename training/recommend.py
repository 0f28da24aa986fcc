"""The seed paper's selection framework, computed from a sweep's rows rather than hard-coded.

For each task type and data size: keep the methods whose metric is within `tolerance` of the best run
(full fine-tuning included), then choose the one that is cheapest to converge (time to reach 97% of its
best), ties broken by fewer trainable parameters. If no PEFT method is within tolerance, full tuning is
the recommendation: that is the seed's finding for larger data scales made checkable on your data.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import mean


def _key(r: dict) -> str:
    return r["method"] if r["selection"] == "all" else f"{r['method']} ({r['selection']})"


def _converge_seconds(r: dict) -> float:
    steps, conv = r.get("steps") or 1, r.get("steps_to_converge") or r.get("steps") or 1
    return r["train_seconds"] * conv / steps


def recommend(rows: list[dict], tolerance: float = 0.95) -> list[dict]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["task_type"], r["data_size"])].append(r)
    out = []
    for (task_type, size), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 1 << 60)):
        by_method: dict[str, list[dict]] = defaultdict(list)
        for r in group:
            by_method[_key(r)].append(r)
        # average over the tasks of this type, each task's metric relative to its own best run
        best_per_task = {t: max(r["metric"] for r in group if r["task"] == t) for t in {r["task"] for r in group}}
        stats = {m: {"relative_metric": mean(r["metric"] / best_per_task[r["task"]] if best_per_task[r["task"]]
                                             else 1.0 for r in rs),
                     "converge_seconds": mean(_converge_seconds(r) for r in rs),
                     "trainable_params": mean(r["trainable_params"] for r in rs),
                     "metric": mean(r["metric"] for r in rs)} for m, rs in by_method.items()}
        good = [m for m, s in stats.items() if s["relative_metric"] >= tolerance and not m.startswith("full")]
        if good:
            choice = min(good, key=lambda m: (stats[m]["converge_seconds"], stats[m]["trainable_params"]))
            why = (f"within {tolerance:.0%} of the best metric ({stats[choice]['relative_metric']:.3f} of best) "
                   f"and the cheapest such method to converge ({stats[choice]['converge_seconds']:.1f} s)")
        else:
            choice = "full"
            best_peft = max((m for m in stats if not m.startswith("full")), key=lambda m: stats[m]["relative_metric"],
                            default=None)
            why = ("no PEFT method reached " f"{tolerance:.0%} of the best metric"
                   + (f" (best: {best_peft} at {stats[best_peft]['relative_metric']:.3f})" if best_peft else ""))
        out.append({"task_type": task_type, "data_size": size, "recommended": choice, "why": why,
                    "candidates": {m: {k: round(v, 4) for k, v in s.items()} for m, s in sorted(stats.items())}})
    return out


def recommendation_markdown(recs: list[dict]) -> str:
    lines = ["## Recommended method per task type and data size", "",
             "| task type | train rows | recommended | why |", "| --- | ---: | --- | --- |"]
    for r in recs:
        lines.append(f"| {r['task_type']} | {r['data_size'] or 'all'} | **{r['recommended']}** | {r['why']} |")
    return "\n".join(lines) + "\n"
