"""`peftserve eval`: in-context learning (k-shot prompts, no training) or an existing adapter, scored on
in-domain and out-of-domain sets like a training run (training/evaluate.py). Heavy imports stay in `run`."""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  peftserve eval --base google/flan-t5-base --eval cola/dev.jsonl --eval-ood ood=cola/ood_dev.jsonl
  peftserve eval --eval cola/dev.jsonl --shots 4 --train cola/train.jsonl --output out/icl-4shot
  peftserve eval --adapter out/cola-pbft --eval cola/dev.jsonl --eval-ood ood=cola/ood_dev.jsonl

A k-shot prompt is k demonstrations ("SOURCE\\nTARGET", a seeded sample of --train) and the query's source,
separated by blank lines. Reports: eval_report.json (the fields of train_report.json; trainable 0).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--base", default=None, help="base model: hub id or local T5 directory (default: embedded)")
    parser.add_argument("--adapter", default=None, help="score this adapter directory (as the server serves it)")
    parser.add_argument("--eval", required=True, help="eval data: .jsonl/.json/.csv file or hub dataset id[:split]")
    parser.add_argument("--eval-ood", action="append", default=[], metavar="[NAME=]FILE",
                        help="an out-of-domain eval set (repeatable)")
    parser.add_argument("--shots", type=int, default=0, help="demonstrations per prompt, drawn from --train")
    parser.add_argument("--train", default=None, help="rows the demonstrations are drawn from")
    parser.add_argument("--template", default=None, help="prompt template over columns (as for train)")
    parser.add_argument("--input-field", default="input")
    parser.add_argument("--target-field", default="target")
    parser.add_argument("--task", choices=["auto", "classification", "generation"], default="auto")
    parser.add_argument("--max-train-samples", type=int, default=None, help="demonstration pool: N rows (seeded)")
    parser.add_argument("--max-eval-samples", type=int, default=200)
    parser.add_argument("--max-target-length", type=int, default=64, help="tokens generated per row")
    parser.add_argument("--seed", type=int, default=0, help="which demonstrations are drawn")
    parser.add_argument("--output", type=Path, default=None, help="write eval_report.json into this directory")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")


def run(args) -> int:
    from training.evaluate import EvalConfig, run_eval

    fields = EvalConfig.__dataclass_fields__
    cfg = EvalConfig(**{k: v for k, v in vars(args).items() if k in fields}, progress=not args.quiet)
    r = run_eval(cfg)
    ood = " ".join(f"{n}={m['value']:.4f}" for n, m in r["ood_metrics"].items())
    print(f"{r['final_metrics']['metric']}={r['final_metrics']['value']:.4f}{' ood: ' + ood if ood else ''} "
          f"shots={r['shots']} rows={r['final_metrics']['eval_rows']} time={r['eval_seconds']:.1f}s"
          + (f" -> {cfg.output}" if cfg.output else ""))
    return 0
