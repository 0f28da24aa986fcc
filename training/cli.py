"""`peftserve train ...` (one adapter) and `peftserve train sweep --config sweep.yaml` (the seed paper's grid).

Heavy imports (torch, datasets, peft) happen inside `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """examples:
  peftserve train --method lora --train data/train.jsonl --eval data/dev.jsonl --output adapters/my-lora
  peftserve train --method ia3 --train cola/train.jsonl --max-train-samples 500 --layers last:2 \\
      --module-groups feed-forward --output out/cola-ia3 --register http://127.0.0.1:8000
  peftserve train --method adalora --train data/train.jsonl --adalora-init-r 12 --lora-rank 4 --output out/ada
  peftserve train --method ptuning --train data/train.jsonl --ptuning-encoder MLP --output out/ptuning
  peftserve train --method prefix --train data/train.jsonl --num-virtual-tokens 20 --output out/prefix
  peftserve train --method adapter --adapter-arch par_bn --train data/train.jsonl --output out/par-bn
  peftserve train --method unipelt --train data/train.jsonl --layers last:4 --output out/unipelt
  peftserve train --method prompt --train rows.csv --input-field sentence --target-field label \\
      --template "Is this acceptable? {sentence}" --num-virtual-tokens 20 --output out/prompt
  peftserve train --method lora --recipe pattern --pattern "Sentence: {input} Acceptable?" \\
      --verbalizer "acceptable=yes,unacceptable=no" --train cola/train.jsonl --output out/cola-pbft
  peftserve train --method lora --recipe distill --context-file instructions.txt --shots 4 \\
      --train cola/train.jsonl --eval-ood ood=cola/ood_dev.jsonl --output out/cola-distill
  peftserve train --method lora --recipe adaptive --domain-text domain.txt --adaptive-steps 200 \\
      --train cola/train.jsonl --output out/cola-adaptive
  peftserve train sweep --config training/sweeps/seed_paper.yaml --output sweeps/seed
  peftserve train demo     # the demo adapters `peftserve serve` registers (make serve runs this first)

Data files are JSONL/JSON/CSV rows; a name that is not a local file is loaded as a hub dataset
(NAME or NAME:SPLIT) when online. Without --eval, 10% of the training rows are held out.
"""


def _csv(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.config import ADAPTER_ARCHS, METHODS  # no heavy imports: config.py is plain Python
    from training.recipes.options import RECIPES

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("action", nargs="?", choices=["sweep", "demo"], default=None,
                        help="'sweep': run a grid of methods x data sizes from --config; 'demo': train (first run "
                             "only) the demo adapters the server registers at start, on --base (omit to train one "
                             "adapter)")
    g = parser.add_argument_group("what to train")
    g.add_argument("--method", choices=list(METHODS),
                   help="adapter kind, or full fine-tuning (the baseline); required unless 'sweep'. dora and "
                        "adalora take the LoRA options; ptuning the prompt options; prefix --num-virtual-tokens "
                        "and --prefix-projection. adapter, ah_prefix, unipelt and mam are AdapterHub's (saved in "
                        "its layout): adapter takes --adapter-arch and --reduction-factor")
    g.add_argument("--base", default=None, help="base model: hub id or local T5 directory (default: embedded base)")
    g.add_argument("--output", type=Path, help="output directory (the adapter; for sweep: the results directory)")
    g.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    g.add_argument("--name", dest="adapter_name", default=None, help="adapter name (default: the output dir's name)")
    d = parser.add_argument_group("data")
    d.add_argument("--train", help="training data: .jsonl/.json/.csv file or hub dataset id[:split]")
    d.add_argument("--eval", default=None, help="eval data (default: hold out 10%% of --train)")
    d.add_argument("--input-field", default="input", help="column holding the model input (default: input)")
    d.add_argument("--target-field", default="target", help="column holding the target text (default: target)")
    d.add_argument("--template", default=None,
                   help="prompt template over columns, e.g. 'Classify: {text}' (overrides --input-field)")
    d.add_argument("--task", choices=["auto", "classification", "generation"], default="auto",
                   help="classification -> exact match, generation -> ROUGE-L (default: auto from the targets)")
    d.add_argument("--max-train-samples", type=int, default=None, help="random subset of N training rows (seeded)")
    d.add_argument("--max-eval-samples", type=int, default=200, help="evaluate on at most N rows (default 200)")
    d.add_argument("--max-source-length", type=int, default=256, help="truncate inputs to N tokens")
    d.add_argument("--max-target-length", type=int, default=64, help="truncate targets to N tokens")
    t = parser.add_argument_group("optimisation")
    t.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (overrides --epochs)")
    t.add_argument("--epochs", type=float, default=None, help="passes over the training rows (default 3)")
    t.add_argument("--learning-rate", type=float, default=None,
                   help="default per method: lora/dora 1e-3, adalora 1e-2, ia3 1e-2, bitfit 1e-2, prompt 0.3, "
                        "ptuning 1e-2, prefix 3e-2 (3e-3 with --prefix-projection), adapter/ah_prefix/unipelt/mam "
                        "1e-3, full 3e-4")
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: 10 per run)")
    t.add_argument("--patience", type=int, default=3, help="early stop after N evals without improvement (0: off)")
    t.add_argument("--stop-at-metric", type=float, default=None, help="stop once the eval metric reaches this")
    t.add_argument("--dropout", type=float, default=None, help="override the base's dropout while training")
    t.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    t.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    m = parser.add_argument_group("method options")
    m.add_argument("--target-modules", type=_csv, default=None,
                   help="T5 linears, comma-separated (q,k,v,o,wi_0,wi_1,wo); defaults: lora/dora/adalora q,v; "
                        "ia3 k,v,wo; bitfit all")
    m.add_argument("--feedforward-modules", type=_csv, default=None,
                   help="(IA)3: targets scaled on their input side (default: the feed-forward ones)")
    m.add_argument("--layers", default="all", help="train only these blocks: all, first:N, last:N or 0,2,3")
    m.add_argument("--module-groups", type=_csv, default=[],
                   help="restrict to groups: attention, feed-forward, encoder, decoder (comma-separated)")
    m.add_argument("--lora-rank", type=int, default=8, help="LoRA/DoRA rank; AdaLoRA's target average rank")
    m.add_argument("--lora-alpha", type=float, default=16.0)
    m.add_argument("--lora-dropout", type=float, default=0.0)
    m.add_argument("--adalora-init-r", type=int, default=None,
                   help="AdaLoRA: rank of every adapted linear before pruning (default 12)")
    m.add_argument("--adalora-target-r", type=int, default=None,
                   help="AdaLoRA: average rank after pruning (default: --lora-rank); below --adalora-init-r")
    m.add_argument("--num-virtual-tokens", type=int, default=None,
                   help="prompt tuning / P-tuning: soft prompt length; prefix, ah_prefix, unipelt, mam: prefix "
                        "length (default 20; AdapterHub's for its methods: ah_prefix 30, unipelt 10, mam 30)")
    m.add_argument("--ptuning-encoder", type=str.upper, default=None, metavar="{MLP,LSTM}",
                   help="P-tuning: the prompt encoder (default MLP)")
    m.add_argument("--ptuning-hidden-size", type=int, default=None,
                   help="P-tuning: the prompt encoder's hidden size (default 128)")
    m.add_argument("--prefix-projection", action="store_true",
                   help="prefix tuning: train the prefix through a two-layer MLP (saved: its output, the same size)")
    m.add_argument("--prefix-hidden-size", type=int, default=None,
                   help="prefix tuning: the projection MLP's hidden size (default 128; needs --prefix-projection); "
                        "ah_prefix/unipelt/mam: the prefix MLP's bottleneck_size (default 512, mam 800)")
    m.add_argument("--adapter-arch", choices=list(ADAPTER_ARCHS), default=None,
                   help="--method adapter: AdapterHub's SeqBnConfig (default), DoubleSeqBnConfig or ParBnConfig")
    m.add_argument("--reduction-factor", type=float, default=None,
                   help="adapter/unipelt/mam: bottleneck size = d_model / this (default AdapterHub's: seq_bn and "
                        "double_seq_bn 16, par_bn 2)")
    m.add_argument("--prompt-init", choices=["random", "text"], default="random")
    m.add_argument("--prompt-init-text", default=None, help="prompt tuning: text whose embeddings start the prompt")
    m.add_argument("--prompt-submodules", type=int, choices=[1, 2], default=1,
                   help="prompt/ptuning: 1 (default): encoder soft prompt only, exactly what is served; 2: "
                        "peft's seq2seq default, which also saves a decoder prompt that generation never uses")
    c = parser.add_argument_group("recipes (how the task is trained, with any --method; docs/TRAINING.md)")
    c.add_argument("--recipe", choices=list(RECIPES), default="vanilla",
                   help="vanilla (default); pattern: pattern-based fine-tuning; distill: context distillation; "
                        "adaptive: span-corruption continued pre-training on --domain-text, then the task")
    c.add_argument("--pattern", default=None, help="pattern: the prompt pattern, e.g. 'Sentence: {input} Correct?'")
    c.add_argument("--verbalizer", default=None, help="pattern: label=word pairs, e.g. 'acceptable=yes,unacceptable=no'")
    c.add_argument("--context", default=None, help="distill: the text the teacher reads before each input")
    c.add_argument("--context-file", default=None, help="distill: the teacher's context, read from a file")
    c.add_argument("--shots", type=int, default=None,
                   help="distill: K demonstrations from --train added to the teacher's context")
    c.add_argument("--teacher", default=None, help="distill: teacher model (hub id / T5 dir; default: the base)")
    c.add_argument("--teacher-adapter", default=None, help="distill: the teacher is the base plus this adapter")
    c.add_argument("--domain-text", default=None, help="adaptive: unlabelled in-domain text, one document per line")
    c.add_argument("--adaptive-steps", type=int, default=None, help="adaptive: span-corruption steps (default 100)")
    c.add_argument("--eval-ood", action="append", default=[], metavar="[NAME=]FILE",
                   help="an out-of-domain eval set, scored at the end (repeatable)")
    r = parser.add_argument_group("register / sweep")
    r.add_argument("--register", metavar="URL", default=None, help="register the finished adapter with this server")
    r.add_argument("--token", dest="register_token", default=None,
                   help="admin token for --register (default: $PEFTSERVE_ADMIN_TOKEN)")
    r.add_argument("--config", type=Path, default=None, help="sweep: the sweep YAML")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args):
    from training.config import TrainConfig

    fields = TrainConfig.__dataclass_fields__
    kwargs = {k: v for k, v in vars(args).items() if k in fields}
    kwargs["progress"] = not args.quiet
    return TrainConfig(**kwargs)


def run(args) -> int:
    from training.errors import TrainConfigError

    if args.action == "sweep":
        if args.config is None:
            raise TrainConfigError("peftserve train sweep needs --config sweep.yaml "
                                   "(see training/sweeps/seed_paper.yaml)")
        from training.sweep import run_sweep

        result = run_sweep(args.config, output=args.output, overwrite=args.overwrite, progress=not args.quiet,
                           threads=args.threads)
        print(f"sweep results in {result.output}: {result.table_md}")
        return 0
    if args.action == "demo":
        from training.demo import ensure_demo_adapters

        paths = ensure_demo_adapters(args.base, progress=not args.quiet)
        print(f"demo adapters ready: {', '.join(paths)} (in {next(iter(paths.values())).parent})")
        return 0
    missing = [flag for flag, v in (("--method", args.method), ("--train", args.train), ("--output", args.output))
               if v is None]
    if missing:
        raise TrainConfigError(f"missing {', '.join(missing)} (or use 'peftserve train sweep --config FILE')")
    from training.train import train

    result = train(config_from_args(args))
    r = result.report
    ood = "".join(f" ood {n}: {m['metric']}={m['value']:.4f}" for n, m in r["ood_metrics"].items())
    print(f"{r['final_metrics']['metric']}={r['final_metrics']['value']:.4f}{ood} trainable={r['trainable_params']} "
          f"({r['trainable_percent']:.3f}%) steps={r['steps']} time={r['train_seconds']:.1f}s -> {result.output}")
    return 0
