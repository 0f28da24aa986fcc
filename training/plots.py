"""Sweep plots (PNG): metric vs data size per task, every cost normalised to full fine-tuning, and each
comparison of a combined method against its parts alone."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean


def _label(r: dict) -> str:
    return r["method"] if r["selection"] == "all" else f"{r['method']} ({r['selection']})"


def plot_sweep(rows: list[dict], output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        lines = defaultdict(list)
        for r in rows:
            if r["task"] == task:
                lines[_label(r)].append((r["data_size"] or 0, r["metric"]))
        for label, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        sub = [r for r in rows if r["task"] == task]
        ax.set(title=task, xlabel="training rows", ylabel=sub[0]["metric_name"])
        if len({r["data_size"] for r in sub}) > 1:
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "metric_by_data_size.png", dpi=120)
    plt.close(fig)
    written.append(output / "metric_by_data_size.png")

    keys = ["metric_vs_full", "steps_vs_full", "time_vs_full", "params_vs_full", "memory_vs_full",
            "grad_optim_vs_full"]
    methods = [m for m in dict.fromkeys(_label(r) for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(methods)), 4))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        vals = []
        for m in methods:
            xs = [r[key] for r in rows if _label(r) == m and r.get(key) is not None]
            vals.append(mean(xs) if xs else float("nan"))
        ax.bar([j + i * width for j in range(len(methods))], vals, width, label=key.replace("_vs_full", ""))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=20, fontsize=8)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    ax.set(ylabel="ratio to full fine-tuning (mean over tasks and sizes)", title="cost and quality vs full")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "normalized_to_full.png", dpi=120)
    plt.close(fig)
    written.append(output / "normalized_to_full.png")
    return written


def plot_comparison(c: dict, output: Path) -> Path:
    """compare_<method>.png: per task, metric vs data size for the method, each part alone (thin) and the best
    part at each size (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in c["rows"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        sub = sorted((r for r in c["rows"] if r["task"] == task), key=lambda r: r["data_size"] or 0)
        sizes = [r["data_size"] or 0 for r in sub]
        ax.plot(sizes, [r["metric"] for r in sub], marker="o", lw=2.5, label=c["method"])
        for part in c["parts"]:
            ax.plot(sizes, [r["parts"][part] for r in sub], marker=".", lw=1, label=part)
        ax.plot(sizes, [r["best_part_metric"] for r in sub], ls="--", color="black", lw=1, label="best part")
        ax.set(title=task, xlabel="training rows", ylabel=sub[0]["metric_name"] or "metric")
        if len(set(sizes)) > 1:
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = output / f"compare_{c['method']}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
