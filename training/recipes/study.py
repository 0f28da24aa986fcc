"""The recipe study's outputs (Srinivasan et al. 2024's table shape): per task and training-set size, each
entry's in-domain metric, OOD metric, trainable parameters, peak memory and time; plots; and a summary of
which recipe wins where, computed from the rows (nothing in it is written in advance).

Written by the sweep (training/sweep.py) when a run uses a recipe or OOD sets: study.md, study.json,
study_in_vs_ood.png, study_ood_by_size.png.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

TIE = 0.01  # metrics closer than this count as a match


def _cells(rows: list[dict]) -> dict[tuple, list[dict]]:
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("selection", "all") == "all":
            cells[(r["task"], r["data_size"])].append(r)
    return cells


def _best(rows: list[dict], key: str) -> dict | None:
    scored = [r for r in rows if r.get(key) is not None]
    return max(scored, key=lambda r: r[key]) if scored else None


def _compare(a: dict | None, b: dict | None, key: str, what: str) -> dict | None:
    """a against b on `key`: 'beats' / 'matches' / 'trails', with both numbers."""
    if not a or not b or a.get(key) is None or b.get(key) is None:
        return None
    diff = a[key] - b[key]
    verdict = "matches" if abs(diff) < TIE else "beats" if diff > 0 else "trails"
    return {"finding": what, "a": a["method"], "b": b["method"], "metric": key, "a_value": a[key],
            "b_value": b[key], "difference": diff, "verdict": verdict,
            "sentence": f"{a['method']} {verdict} {b['method']} {'out of domain' if key == 'ood_metric' else 'in domain'}"
                        f" ({a[key]:.3f} vs {b[key]:.3f})"}


def summarise(rows: list[dict]) -> list[dict]:
    """Per task and size: the winners in and out of domain, and the study's comparisons where both sides ran."""
    out = []
    for (task, size), cell in _cells(rows).items():
        by_recipe = defaultdict(list)
        for r in cell:
            by_recipe[r.get("recipe", "vanilla")].append(r)
        full = next((r for r in by_recipe["vanilla"] if r.get("trained_method") == "full"), None)
        vanilla = {r.get("trained_method"): r for r in by_recipe["vanilla"]}
        findings = [
            _compare(_best(by_recipe["distill"], "ood_metric"), full, "ood_metric",
                     "context distillation vs full fine-tuning, out of domain"),
            *(_compare(r, vanilla.get(r.get("trained_method")), "ood_metric",
                       "pattern-based vs vanilla fine-tuning of the same method, out of domain")
              for r in by_recipe["pattern"]),
            *(_compare(r, full, "metric", f"{r['method']} vs full fine-tuning, in domain")
              for r in (*by_recipe["adaptive"], *(v for m, v in vanilla.items() if m != "full"))),
            _compare(_best(by_recipe["icl"], "metric"), _best([r for r in cell if r.get("recipe") != "icl"], "metric"),
                     "metric", "in-context learning vs the best trained entry, in domain"),
        ]
        best_in, best_ood = _best(cell, "metric"), _best(cell, "ood_metric")
        out.append({"task": task, "data_size": size,
                    "best_in_domain": best_in and {"method": best_in["method"], "value": best_in["metric"]},
                    "best_ood": best_ood and {"method": best_ood["method"], "value": best_ood["ood_metric"]},
                    "findings": [f for f in findings if f]})
    return out


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def study_markdown(rows: list[dict], summary: list[dict]) -> str:
    lines = ["# Recipe study", "",
             "In-domain and out-of-domain metric side by side (OOD: mean over the run's --eval-ood sets). Time is "
             "training time (0 for in-context learning, which trains nothing); peak memory as in results.md.", ""]
    cells = _cells(rows)
    for (task, size), cell in cells.items():
        lines += [f"## {task}, {size or 'all'} training rows", "",
                  "| entry | recipe | method | in-domain | OOD | trainable params | peak MiB | time s |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in cell:
            lines.append("| " + " | ".join(_fmt(x) for x in (
                r["method"], r.get("recipe"), r.get("trained_method"), r["metric"], r.get("ood_metric"),
                r["trainable_params"], r["peak_memory_mb"], r["train_seconds"])) + " |")
        lines.append("")
    lines += ["## Summary (computed from the rows above)", ""]
    for s in summary:
        where = f"{s['task']}, {s['data_size'] or 'all'} rows"
        best_in, best_ood = s["best_in_domain"], s["best_ood"]
        lines.append(f"- **{where}**: best in domain **{best_in['method']}** ({best_in['value']:.3f})"
                     + (f"; best out of domain **{best_ood['method']}** ({best_ood['value']:.3f})" if best_ood else ""))
        lines += [f"  - {f['finding']}: {f['sentence']}" for f in s["findings"]]
    return "\n".join(lines) + "\n"


def write_study(rows: list[dict], output: Path) -> dict:
    summary = summarise(rows)
    (output / "study.json").write_text(json.dumps({"summary": summary}, indent=2, default=str) + "\n")
    (output / "study.md").write_text(study_markdown(rows, summary))
    plot_study(rows, output)
    return {"summary": summary}


def plot_study(rows: list[dict], output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for r in (r for r in rows if r["task"] == task and r.get("ood_metric") is not None):
            ax.scatter(r["metric"], r["ood_metric"], s=20 + 8 * (r["data_size"] or 1) ** 0.5)
            ax.annotate(f"{r['method']} ({r['data_size']})", (r["metric"], r["ood_metric"]), fontsize=6)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls="--")
        ax.set(title=task, xlabel="in-domain metric", ylabel="out-of-domain metric")
    fig.tight_layout()
    scatter = output / "study_in_vs_ood.png"
    fig.savefig(scatter, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        lines = defaultdict(list)
        for r in rows:
            if r["task"] == task and r.get("ood_metric") is not None and r.get("selection", "all") == "all":
                lines[r["method"]].append((r["data_size"] or 0, r["ood_metric"]))
        for label, pts in lines.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set(title=task, xlabel="training rows", ylabel="out-of-domain metric")
        if len({r["data_size"] for r in rows if r["task"] == task}) > 1:
            ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    by_size = output / "study_ood_by_size.png"
    fig.savefig(by_size, dpi=120)
    plt.close(fig)
    return [scatter, by_size]
