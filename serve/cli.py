"""`peftserve` console script: one argparse tree; each subcommand lives in the package that owns it.

A subcommand module exposes `add_arguments(parser)` and `run(args) -> int` and keeps heavy imports
(torch, ray) inside `run`, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("serve.app.launch", "start the Ray Serve app (HTTP API) on a base model"),
    "register": ("serve.app.client", "register an adapter with a running server"),
    "train": ("training.cli", "train an adapter (lora, ia3, bitfit, prompt) or a full fine-tune; sweeps"),
    "eval": ("training.eval_cli", "score in-context learning (k-shot, no training) or an adapter, in and out of domain"),
    "base": ("serve.engine.base", "build the embedded base model or inspect a base"),
    "adapters": ("adapters.adapterhub.convert", "convert an AdapterHub pytorch_adapter.bin to safetensors"),
    "bench": ("loadtests.cli", "run throughput and swap-latency benchmarks"),
    "registry": ("serve.registry.migrate", "registry operations: migrate SQLite + local files to PostgreSQL + S3"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but an unknown option is reported by name.

    Plain argparse hands `--recipe x` to an optional positional and reports
    "argument action: invalid choice: 'x'", which names the wrong thing."""

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        unknown = [] if message.startswith("unrecognized arguments") else self._unknown_options()
        if unknown:
            message = f"unrecognized option{'s' if len(unknown) > 1 else ''}: {' '.join(unknown)} (see {self.prog} --help)"
        super().error(message)

    def _unknown_options(self) -> list[str]:
        known = set(self._option_string_actions)
        out = []
        for token in getattr(self, "_argv", []):
            if token == "--":
                break
            if not token.startswith("-") or token == "-" or _is_number(token):
                continue
            name = token.split("=", 1)[0]
            if name in known or (self.allow_abbrev and name.startswith("--")
                                 and any(k.startswith(name) for k in known)):
                continue
            out.append(name)
        return out


def _is_number(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    # Installed explicitly: a command started from a script as a background job inherits SIGINT ignored,
    # and Ctrl-C must still stop it cleanly (exit 130, nothing half-written).
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
