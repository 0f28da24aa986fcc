"""What a finished run leaves behind: atomic adapter directory, train_report.json, curve, model card.

The adapter is written to a hidden sibling temp directory and renamed into place only when complete, so
an interrupted run (Ctrl-C, crash, OOM kill) never leaves a half-written adapter at the output path.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch

CURVE_FIELDS = ("step", "epoch", "loss", "eval_loss", "metric", "wall_s")


@contextmanager
def staged_output(output: Path, overwrite: bool):
    """Yield a temp dir next to `output`; on success swap it into place, on any failure remove it."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if output.exists():
        if not overwrite and any(output.iterdir()):  # appeared while we trained
            shutil.rmtree(tmp, ignore_errors=True)
            from training.errors import OutputExistsError

            raise OutputExistsError(f"--output {output} was created by someone else during training")
        old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
        output.rename(old)
    tmp.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class PeakMemory:
    """Peak memory over one run: CUDA max allocated on GPU, peak process RSS on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            try:  # Linux: "5" resets the VmHWM high-water mark, so the peak is this run's, not the process's
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def read(self) -> tuple[int, str]:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), "cuda_max_allocated"
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process_rss_peak"
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_rss_peak"


def write_curve(path: Path, curve: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        w.writeheader()
        for row in curve:
            w.writerow({k: row.get(k, "") for k in CURVE_FIELDS})


def read_curve(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


def write_report(out: Path, report: dict) -> None:
    (out / "train_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(model_card(report))


def model_card(r: dict) -> str:
    m = r["final_metrics"]
    cfg = r["config"]
    method_line = {
        "lora": f"LoRA, rank {cfg['lora_rank']}, alpha {cfg['lora_alpha']}, targets {r['targets']}",
        "dora": f"DoRA (weight-decomposed LoRA), rank {cfg['lora_rank']}, alpha {cfg['lora_alpha']}, "
                f"targets {r['targets']}",
        "adalora": f"AdaLoRA, rank {cfg.get('adalora_init_r') or 12} pruned to an average of "
                   f"{cfg.get('adalora_target_r') or cfg['lora_rank']}, alpha {cfg['lora_alpha']}, targets {r['targets']}",
        "ia3": f"(IA)3, targets {r['targets']}",
        "bitfit": f"BitFit (trainable biases), targets {r['targets']}",
        "prompt": f"prompt tuning, {cfg['num_virtual_tokens']} virtual tokens (encoder)",
        "ptuning": f"P-tuning, {cfg['num_virtual_tokens']} virtual tokens (encoder) from a "
                   f"{(cfg.get('ptuning_encoder') or 'MLP').upper()} prompt encoder",
        "prefix": f"prefix tuning, {cfg['num_virtual_tokens']} virtual key/value tokens per decoder layer"
                  + (" (trained through a projection MLP)" if cfg.get("prefix_projection") else ""),
        "full": "full fine-tuning (baseline)",
    }.get(r["method"]) or _adapterhub_line(r)
    return f"""---
library_name: {_library(r["method"])}
base_model: {r["base"]["name"]}
tags: [peftserve, {r["method"]}, t5]
---
# {r["name"]}

A {method_line} adapter for `{r["base"]["name"]}` (fingerprint `{r["base"]["fingerprint"][:19]}…`),
trained with `peftserve train`.

| | |
| --- | --- |
| task | {r["task"]} ({m["metric"]}) |
| eval {m["metric"]} | {m["value"]:.4f} (best at step {r["best_step"]}) |
| train rows / eval rows | {r["data"]["train_rows"]} / {r["data"]["eval_rows"]} |
| steps / epochs | {r["steps"]} / {r["epochs"]:.2f} |
| trainable parameters | {r["trainable_params"]:,} ({r["trainable_percent"]:.4f}% of {r["base_params"]:,}) |
| wall time | {r["train_seconds"]:.1f} s |
| peak memory | {r["peak_memory_bytes"] / 2**20:.0f} MiB ({r["peak_memory_kind"]}) |
{_recipe_rows(r)}
Data: `{cfg["train"]}` (input `{cfg["template"] or cfg["input_field"]}`, target `{cfg["target_field"]}`).
The learning curve is in `curve.csv`; the full configuration in `train_report.json`.

Serve it: `peftserve register {r["name"]} <this directory> --url URL` against a running server,
or {_load_hint(r["method"])}.
"""


def _recipe_rows(r: dict) -> str:
    """Model-card rows for a recipe run and out-of-domain sets (empty for a plain run)."""
    rows = []
    if r.get("recipe", "vanilla") != "vanilla":
        detail = r.get("input_pattern") or r.get("distill") or {
            k: v for k, v in (r.get("adaptive") or {}).items() if k.startswith(("steps", "held_out_loss"))}
        detail = {k: v for k, v in detail.items() if k != "recorded_in_adapter"}
        rows.append(f"| recipe | {r['recipe']}: {json.dumps(detail)} |")
    rows += [f"| out of domain: {name} | {m['metric']} {m['value']:.4f} ({m['rows']} rows) |"
             for name, m in (r.get("ood_metrics") or {}).items()]
    return "".join(row + "\n" for row in rows)


ADAPTERHUB_NAMES = {"adapter": "bottleneck (AdapterHub)", "ah_prefix": "prefix-tuning (AdapterHub)",
                    "unipelt": "UniPELT (AdapterHub)", "mam": "MAM (AdapterHub)"}


def _adapterhub_line(r: dict) -> str:
    from training.adapterhub.config import describe

    return f"{ADAPTERHUB_NAMES[r['method']]}: {describe(r['adapterhub_config'])},"


def _library(method: str) -> str:
    return "peftserve" if method in ("bitfit", "full") else "adapters" if method in ADAPTERHUB_NAMES else "peft"


def _load_hint(method: str) -> str:
    if method in ADAPTERHUB_NAMES:
        return ("load it with AdapterHub: `adapters.init(model); model.load_adapter(<this directory>, "
                "use_safetensors=True)` (its adapter.safetensors holds the shared prefix pool once)")
    return ("load it with `peft.PeftModel.from_pretrained(base, <this directory>)` (LoRA, DoRA, AdaLoRA, (IA)3, "
            "prompt, P-tuning, prefix: decode prefix tuning by repeated forwards, as peft's generate drops T5 "
            "prefixes)")


def environment() -> dict:
    import platform

    return {"python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
