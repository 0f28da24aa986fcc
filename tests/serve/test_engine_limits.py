"""Bad input gets typed errors naming the field; bounded queue; deadlines; closed engine; adapter churn
leaves the base untouched; registrations cost metadata only."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest

try:  # same directory, pytest's default (prepend) import mode
    from test_engine import make_adapters, small_config
except ImportError:  # tests/ laid out as packages
    from tests.serve.test_engine import make_adapters, small_config

from serve.engine import Engine, GenerationParams, GenerationRequest
from serve.engine.config import EngineConfig
from serve.engine.errors import (
    AdapterError,
    ConfigError,
    EngineClosedError,
    OverloadedError,
    RequestTimeoutError,
    RequestValidationError,
)


@pytest.fixture(scope="module")
def zoo(tiny_base, tmp_path_factory):
    return make_adapters(tiny_base, tmp_path_factory.mktemp("limits-zoo"))


@pytest.fixture(scope="module")
def engine(tiny_base_dir):
    eng = Engine.from_config(small_config(tiny_base_dir, max_stop_sequences=2, max_input_tokens=16,
                                          device_slots={"lora": 2, "ia3": 1, "bitfit": 1, "prompt": 1}))
    yield eng
    eng.close()


@pytest.mark.parametrize("params, field", [
    (GenerationParams(max_new_tokens=0), "params.max_new_tokens"),
    (GenerationParams(max_new_tokens=25), "params.max_new_tokens"),
    (GenerationParams(max_new_tokens=2.5), "params.max_new_tokens"),
    (GenerationParams(temperature=-0.1), "params.temperature"),
    (GenerationParams(temperature=float("nan")), "params.temperature"),
    (GenerationParams(top_p=0.0), "params.top_p"),
    (GenerationParams(top_p=1.01), "params.top_p"),
    (GenerationParams(top_k=-1), "params.top_k"),
    (GenerationParams(stop=["a", "b", "c"]), "params.stop"),
    (GenerationParams(stop=[""]), "params.stop"),
    (GenerationParams(seed=-1), "params.seed"),
])
def test_out_of_range_params_name_the_field(engine, params, field):
    with pytest.raises(RequestValidationError) as e:
        engine.generate([GenerationRequest("hi", params=params)])
    assert e.value.field == field and field in str(e.value)


def test_input_too_long_and_bad_request_fields(engine):
    with pytest.raises(RequestValidationError, match="at most 16 input tokens") as e:
        engine.generate([GenerationRequest("x" * 40)])
    assert e.value.field == "inputs"
    with pytest.raises(RequestValidationError) as e:
        engine.generate([GenerationRequest(123)])
    assert e.value.field == "inputs"
    with pytest.raises(RequestValidationError) as e:
        engine.register_adapter("bad name!", "/nonexistent")
    assert e.value.field == "name"


def test_bad_adapter_directory_is_a_typed_error_and_registers_nothing(engine, tmp_path):
    before = engine.info()["adapters"]["registered"]
    with pytest.raises(AdapterError):
        engine.register_adapter("missing", tmp_path / "nothing-here")
    assert engine.info()["adapters"]["registered"] == before


def test_validation_happens_before_anything_runs(engine):
    steps = engine.counters["steps"]
    with pytest.raises(RequestValidationError):
        engine.generate([GenerationRequest("ok"), GenerationRequest("bad", params=GenerationParams(top_k=-3))])
    assert engine.counters["steps"] == steps


def test_fp16_refused_unless_forced():
    with pytest.raises(ConfigError, match="overflow"):
        EngineConfig(dtype="float16").torch_dtype()
    assert str(EngineConfig(dtype="float16", force_fp16=True).torch_dtype()) == "torch.float16"
    assert str(EngineConfig(device="cuda:0").torch_dtype()) == "torch.bfloat16"
    assert str(EngineConfig().torch_dtype()) == "torch.float32"


def test_queue_bound_and_deadline(tiny_base_dir):
    cfg = small_config(tiny_base_dir, max_batch_rows=1, max_queue=1, request_timeout_s=0.3, max_new_tokens_cap=200)
    with Engine.from_config(cfg) as eng:
        long = GenerationRequest("busy", params=GenerationParams(max_new_tokens=200))

        async def scenario():
            running = asyncio.ensure_future(eng.submit(long))
            await asyncio.sleep(0.05)  # admitted: the one row is taken
            waiting = asyncio.ensure_future(eng.submit(long))
            await asyncio.sleep(0.01)
            with pytest.raises(OverloadedError, match="max_queue=1"):
                await eng.submit(long)
            return await asyncio.gather(running, waiting, return_exceptions=True)

        results = asyncio.run(scenario())
        # 200 tokens take over 1 s even on an idle machine, so the running row outlives its 0.3 s deadline
        assert any(isinstance(r, RequestTimeoutError) for r in results)
    with pytest.raises(EngineClosedError):
        eng.generate([GenerationRequest("after close")])


def test_base_output_unchanged_after_1000_adapter_churn_cycles(tiny_base_dir, zoo):
    """1,000 x (register -> generate one token -> remove), ten adapters of all kinds per round sharing one
    batch (so every slot is evicted and reused every round), plus solo (IA)3 rounds that merge and unmerge."""
    kinds = ["lora_b", "ia3", "bitfit", "prompt", "lora_a"] * 2
    cfg = small_config(tiny_base_dir, max_batch_rows=10, device_slots={"lora": 4, "ia3": 2, "bitfit": 2, "prompt": 2},
                       host_bytes=2**20, ia3_merge_after_steps=0, max_new_tokens_cap=16)
    probe = GenerationRequest("base probe text", params=GenerationParams(max_new_tokens=16, logprobs=True))
    lite = GenerationParams(max_new_tokens=1)
    cycles = 0
    with Engine.from_config(cfg) as eng:
        before = eng.generate([probe])[0]
        for rnd in range(100):
            names = [f"churn-{rnd}-{i}" for i in range(len(kinds))]
            for name, kind in zip(names, kinds, strict=True):
                eng.register_adapter(name, zoo[kind])
            if rnd % 10 == 0:  # a uniform (IA)3 batch: merged, then unmerged when the mix comes back
                eng.generate([GenerationRequest("x", adapter=names[1], params=lite)])
            eng.generate([GenerationRequest("x", adapter=name, params=lite) for name in names])
            for name in names:
                eng.remove_adapter(name)
            cycles += len(names)
        after = eng.generate([probe])[0]
        stats = eng.cache.stats()
        assert eng.counters["merges"] >= 10 and eng.counters["unmerges"] >= 10
    assert cycles == 1000
    assert stats.loads == 1000
    assert after.token_ids == before.token_ids
    assert after.logprobs == before.logprobs  # bit-identical: merges were undone exactly
    assert stats.registered == 0 and stats.pinned == 0 and stats.device_entries == 0


def test_registrations_cost_only_metadata(engine, zoo):
    for i in range(10):  # warm up: interned module paths, caches
        engine.register_adapter(f"warm-{i}", zoo["lora_a"])
    n = 40
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.take_snapshot()
    for i in range(n):
        engine.register_adapter(f"meta-{i}", zoo["lora_a"])  # all-linear LoRA: the longest module list
    gc.collect()
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(start, "filename"))
    tracemalloc.stop()
    assert grown / n < 10_000, f"{grown / n:.0f} bytes per registered adapter"
    assert engine.cache.stats().host_entries == 0 and engine.cache.stats().device_entries == 0
    for name in [f"meta-{i}" for i in range(n)] + [f"warm-{i}" for i in range(10)]:
        engine.remove_adapter(name)


def test_bfloat16_engine_serves_every_kind_like_float32(tiny_base_dir, zoo, engine):
    """bf16 (the GPU default) through the same loop: KV cache, slots and soft prompts in bf16."""
    reqs = [GenerationRequest("quick fox", adapter=a, params=GenerationParams(max_new_tokens=3))
            for a in [None, *zoo]]
    for name, path in zoo.items():
        engine.register_adapter(name, path)
    try:
        fp32 = engine.generate(reqs)
    finally:
        for name in zoo:
            engine.remove_adapter(name)
    with Engine.from_config(small_config(tiny_base_dir, dtype="bfloat16")) as bf16:
        for name, path in zoo.items():
            bf16.register_adapter(name, path)
        got = bf16.generate(reqs)
        assert bf16.info()["dtype"] == "torch.bfloat16"
    assert [g.token_ids[0] for g in got] == [f.token_ids[0] for f in fp32]
