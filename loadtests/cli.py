"""`peftserve bench`: in-process benchmarks against peers, or HTTP load (locust) against a server.

    peftserve bench --preset cpu-small                      # in-process, results in loadtests/results/cpu-small
    peftserve bench --preset tiny --only swap,idle          # some sections (others kept from an earlier run)
    peftserve bench --preset cpu-small --threads 1 --only serving   # HTTP via Ray Serve / in-process engine
    peftserve bench --preset cpu-small --threads 1 --only methods   # DoRA, AdaLoRA, P-tuning vs LoRA / prompt
    peftserve bench --preset cpu-small --only runtime       # base decode vs CTranslate2, int8, adapters on it
    peftserve bench --preset cpu-small --http start         # start a loopback server, run the locust scenarios
    peftserve bench --preset cpu-small --http http://127.0.0.1:8000   # against a running server
    peftserve bench --registry [--only sync]                # multi-node registry (PostgreSQL + S3)
    peftserve bench --routing                               # adapter-aware vs random routing, 2 replicas
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from loadtests.presets import SECTIONS


class BenchArgumentError(ValueError):
    """A bench option has a value that cannot be used; the message says what to pass instead."""


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BenchArgumentError(f"expected comma-separated integers like 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise BenchArgumentError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser) -> None:
    parser.add_argument("--preset", choices=("tiny", "cpu-small", "gpu-xl"), default="cpu-small",
                        help="sizes: tiny (seconds; the test suite), cpu-small (flan-t5-small shape, minutes on "
                             "2 CPU cores), gpu-xl (FLAN-T5-XL shape, bf16, one CUDA device)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default: loadtests/results/<preset>, or .../<preset>/http)")
    parser.add_argument("--work", type=Path, default=None,
                        help="cache for the random base and adapters (default: $PEFTSERVE_HOME/bench)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of the in-process run: {','.join(SECTIONS)}")
    parser.add_argument("--distinct", default=None, help="override N distinct adapters per batch, e.g. 1,8,32")
    parser.add_argument("--repeats", type=int, default=None, help="override timed repeats per cell")
    parser.add_argument("--serving-rounds", type=int, default=None,
                        help="override the serving section's timed (engine, http) round pairs")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a machine shared with other busy "
                             "processes 1 is often faster and much steadier than all cores")
    parser.add_argument("--http", default=None, metavar="URL|start",
                        help="run the locust HTTP scenarios instead: against URL, or 'start' a loopback server")
    parser.add_argument("--scenarios", default="uniform,zipf,burst",
                        help="HTTP popularity scenarios (uniform, zipf, burst)")
    parser.add_argument("--api-key", default=None, help="API key for a server that requires one")
    parser.add_argument("--registry", action="store_true",
                        help="run the multi-node registry benchmark instead (starts PostgreSQL, an S3 server and "
                             "two nodes; results in loadtests/results/registry; minutes). --only picks its "
                             "sections: catalog, cold_load, registration, sync")
    parser.add_argument("--routing", action="store_true",
                        help="run the routing benchmark instead: adapter-aware vs random routing, 2 replicas, "
                             "Zipf over 1,000 adapters (results in loadtests/results/routing; minutes)")


def _command(args) -> str:
    """The command line that reproduces this run (written next to its results)."""
    parts = ["peftserve", "bench", "--preset", args.preset]
    for flag, value in (("--only", None if args.only == ",".join(SECTIONS) else args.only),
                        ("--distinct", args.distinct), ("--repeats", args.repeats),
                        ("--serving-rounds", getattr(args, "serving_rounds", None)), ("--threads", args.threads),
                        ("--http", args.http)):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    if getattr(args, "registry", False):
        from loadtests.registry_bench import SECTIONS as REGISTRY_SECTIONS
        from loadtests.registry_bench import run_registry_bench

        chosen = REGISTRY_SECTIONS if args.only == ",".join(SECTIONS) else tuple(
            s.strip() for s in args.only.split(",") if s.strip())
        unknown = set(chosen) - set(REGISTRY_SECTIONS)
        if unknown:
            raise BenchArgumentError(f"unknown registry sections {sorted(unknown)}; choose from "
                                     f"{', '.join(REGISTRY_SECTIONS)}")
        run_registry_bench(args.out or Path("loadtests/results/registry"), sections=chosen)
        return 0
    if getattr(args, "routing", False):
        from loadtests.routing import run_routing_bench
        from serve.engine.base import default_home

        run_routing_bench(args.out or Path("loadtests/results/routing"), args.work or default_home() / "bench")
        return 0
    from loadtests.presets import get_preset

    preset = get_preset(args.preset)
    if args.repeats is not None and args.repeats < 1:
        raise BenchArgumentError("--repeats must be >= 1")
    serving_rounds = getattr(args, "serving_rounds", None)
    if serving_rounds is not None and serving_rounds < 1:
        raise BenchArgumentError("--serving-rounds must be >= 1")
    overrides = {"repeats": args.repeats, "serving_rounds": serving_rounds}
    if args.distinct:
        overrides["distinct"] = _csv_ints(args.distinct)
    preset = preset.with_overrides(**overrides)
    if args.threads is not None:
        if args.threads < 1:
            raise BenchArgumentError("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise BenchArgumentError(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    from serve.engine.base import default_home

    work = args.work or default_home() / "bench"
    command = _command(args)
    if args.http:
        from loadtests.http_load import run_http

        out = args.out or Path("loadtests/results") / preset.name / "http"
        scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
        run_http(preset, out, work, args.http, scenarios, command, api_key=args.api_key)
        return 0
    from loadtests.bench import BenchUnavailableError
    from loadtests.bench import run as run_bench

    out = args.out or Path("loadtests/results") / preset.name
    try:
        run_bench(preset, out, work, command, sections)
    except BenchUnavailableError as e:
        print(f"peftserve bench: skipped: {e}", file=sys.stderr)
        return 0
    print(f"results: {out}/results.json, results.md, throughput.png, swap_latency_cdf.png"
          + (", serving_overhead.png" if "serving" in sections else "")
          + (", methods_throughput.png" if "methods" in sections else "")
          + (", combinations.png" if "combinations" in sections else ""))
    return 0
