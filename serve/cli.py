"""`peftserve` console script: one argparse tree; each subcommand lives in the package that owns it.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int` and keeps heavy imports
(torch, ray) inside `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve.app.launch", "start the Ray Serve app (HTTP API) on a base model"),
    "register": ("serve.app.client", "register an adapter with a running server"),
    "train": ("training.cli", "train an adapter (lora, ia3, bitfit, prompt) or a full fine-tune; sweeps"),
    "base": ("serve.engine.base", "build the embedded base model or inspect a base"),
    "bench": ("loadtests.cli", "run throughput and swap-latency benchmarks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peftserve",
        description="Multi-adapter inference server for FLAN-T5: LoRA, (IA)3, BitFit and prompt-tuning "
                    "adapters chosen per request, all sharing one batch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # expected, user-facing failures carry a message; no traceback for them
        if type(e).__name__.endswith(("LoadError", "Error")) and getattr(e, "user_facing", True) and _is_ours(e):
            print(f"peftserve {args.command}: error: {e}", file=sys.stderr)
            return 1
        raise


def _is_ours(e: Exception) -> bool:
    return type(e).__module__.split(".")[0] in {"serve", "training", "adapters", "loadtests"}


if __name__ == "__main__":
    sys.exit(main())
