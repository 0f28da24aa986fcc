"""Benchmark presets: one frozen description of sizes per machine class.

Every scenario reads its sizes from here, so a preset is the whole recipe of a run and is written
into the results next to the numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

KINDS = ("lora", "ia3", "bitfit", "prompt")
# sections of the in-process run (`peftserve bench --only`), in run order
SECTIONS = ("throughput", "swap", "batching", "idle", "serving", "methods", "combinations", "runtime",
            "decoding")


@dataclass(frozen=True)
class Preset:
    name: str
    base_preset: str  # serve.base.PRESETS key
    device: str  # "cpu" or "cuda"
    dtype: str  # "float32" or "bfloat16"
    lora_rank: int = 16
    prompt_tokens: int = 8
    # Throughput sweep: N distinct adapters per batch; batch rows = max(batch_rows, N).
    distinct: tuple[int, ...] = (1, 8, 32, 128)
    batch_rows: int = 32
    wide_kinds: tuple[str, ...] = ("lora", "mixed")  # kinds also measured at N > batch_rows (more rows)
    input_chars: int = 32  # the tokenizer is byte-level: one char = one token
    new_tokens: int = 8
    repeats: int = 5  # timed rounds over every engine cell (after a warm-up round); the best is reported
    peer_repeats: int = 2  # timed runs per peft / HF peer cell (slow peers: fewer runs)
    # Peers that hold one model (or one resident adapter set) per adapter are bounded by memory:
    # beyond this many adapters they run on a round-robin pool and their memory is projected.
    max_materialized: int = 8
    peer_distinct: tuple[int, ...] = (1, 8, 32)  # N for the peft peers (each needs N adapters loaded)
    # Swap latency samples per tier, register -> first token samples.
    swap_samples: int = 40
    first_token_samples: int = 10
    # Continuous vs static batching.
    poisson_requests: int = 48
    poisson_rate: float = 8.0  # requests/s; chosen to keep the engine busy on the target machine
    out_len: tuple[int, int] = (4, 64)
    max_batch_rows: int = 16
    # Idle registrations.
    idle_adapters: int = 10_000
    # HTTP (locust) load.
    http_adapters: tuple[int, ...] = (100, 1000)
    http_requests: int = 200
    http_users: int = 8
    http_seconds: float = 60.0
    http_new_tokens: int = 8
    # Serving-layer cost: HTTP through Ray Serve vs the in-process engine, alternated per round.
    serving_concurrency: int = 64  # concurrent requests per round (and max_batch_rows on both sides)
    serving_new_tokens: int = 32
    serving_rounds: int = 5  # timed (engine, http) pairs after one untimed warm-up pair
    # the same requests with this many new tokens (a classifier's answer): the per-request cost dominates
    serving_short_new_tokens: int = 2
    # Runtime (issue 23): base decode vs CTranslate2, (rows, input tokens, new tokens) per shape, the first judged;
    # rounds per cycle and cycles (float32 engine, CTranslate2, int8 engine); training steps of the base whose
    # greedy outputs the int8/float32 agreement is measured on (loadtests/trained_base.py)
    runtime_shapes: tuple[tuple[int, int, int], ...] = ((32, 32, 32), (32, 64, 16), (8, 32, 32), (1, 32, 32))
    runtime_rounds: int = 3
    runtime_cycles: int = 2
    trained_base_steps: int = 300
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **kw) -> Preset:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


PRESETS: dict[str, Preset] = {
    # Seconds on a laptop core: the suite's smoke run of every scenario.
    "tiny": Preset(
        name="tiny", base_preset="tiny", device="cpu", dtype="float32", lora_rank=4, prompt_tokens=4,
        distinct=(1, 4), batch_rows=4, input_chars=12, new_tokens=4, repeats=1, peer_repeats=1, max_materialized=2,
        peer_distinct=(1, 4), swap_samples=5, first_token_samples=2, poisson_requests=8, poisson_rate=40.0,
        out_len=(2, 8), max_batch_rows=4, idle_adapters=100, http_adapters=(10,), http_requests=12,
        http_users=2, http_seconds=20.0, http_new_tokens=2, serving_concurrency=8, serving_new_tokens=8,
        serving_rounds=2, runtime_shapes=((4, 12, 4), (1, 12, 4)), runtime_rounds=1, runtime_cycles=1,
        trained_base_steps=30,
    ),
    # flan-t5-small shape on 2 CPU cores: a few minutes.
    "cpu-small": Preset(name="cpu-small", base_preset="flan-t5-small", device="cpu", dtype="float32"),
    # FLAN-T5-XL shape, bf16, on one CUDA device (skipped cleanly without one).
    "gpu-xl": Preset(
        name="gpu-xl", base_preset="flan-t5-xl", device="cuda", dtype="bfloat16", new_tokens=32, repeats=3,
        wide_kinds=("lora", "ia3", "bitfit", "prompt", "mixed"),
        peer_distinct=(1, 8, 32, 128), max_materialized=4, swap_samples=100, poisson_requests=128,
        poisson_rate=20.0, max_batch_rows=32, http_requests=1000, http_users=32,
    ),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown bench preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
