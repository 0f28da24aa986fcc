"""Engine end to end on the tiny base with real PEFT adapters: mixed continuous batches equal solo runs,
(IA)3 merge policy, remove/replace semantics, stop sequences, cancellation, cold loads."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import torch

from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest
from serve.engine.errors import AdapterExistsError, UnknownAdapterError
from serve.engine.observer import RecordingObserver
from tests.peft_zoo import bitfit, redraw, save_peft
from tests.serve.engine_helpers import staggered

ALL_LINEAR = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]


def make_adapters(base, root: Path) -> dict[str, Path]:
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    m = base.model
    z = {
        "lora_a": save_peft(m, LoraConfig(task_type="SEQ_2_SEQ_LM", r=8, lora_alpha=16, init_lora_weights=False,
                                           target_modules=ALL_LINEAR), root / "lora_a", 1),
        "lora_b": save_peft(m, LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, init_lora_weights=False,
                                           target_modules=["q", "v"]), root / "lora_b", 2),
        "ia3": save_peft(m, IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False), root / "ia3", 3,
                          init=redraw("ia3_l", lambda p: 1 + 0.5 * torch.randn_like(p))),
        "prompt": save_peft(m, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=5),
                             root / "prompt", 4, init=redraw("prompt_encoder", torch.randn_like)),
    }
    z["bitfit"] = bitfit(m, root / "bitfit", 5, base.name)
    return z


@pytest.fixture(scope="module")
def zoo(tiny_base, tmp_path_factory):
    return make_adapters(tiny_base, tmp_path_factory.mktemp("engine-zoo"))


def small_config(tiny_base_dir, **kw) -> EngineConfig:
    base = dict(base=str(tiny_base_dir), max_batch_rows=8, max_new_tokens_cap=24, max_input_tokens=64,
                device_slots={"lora": 3, "ia3": 2, "bitfit": 2, "prompt": 2}, ia3_merge_after_steps=2,
                request_timeout_s=60)
    base.update(kw)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def engine(tiny_base_dir, zoo):
    obs = RecordingObserver()
    eng = Engine.from_config(small_config(tiny_base_dir), observer=obs)
    for name, path in zoo.items():
        eng.register_adapter(name, path)
    yield eng
    eng.close()


INPUTS = ["the quick brown fox", "summarize: engines batch rows", "hello there, general", "x"]


def mixed_requests(sampled: bool) -> list[GenerationRequest]:
    adapters = [None, "lora_a", "lora_b", "ia3", "bitfit", "prompt"]
    reqs = []
    for i, name in enumerate(adapters * 2):
        params = GenerationParams(max_new_tokens=4 + (i * 7) % 17, logprobs=True, do_sample=sampled,
                                  temperature=0.9, top_k=40, top_p=0.95, seed=100 + i)
        reqs.append(GenerationRequest(INPUTS[i % len(INPUTS)], adapter=name, params=params))
    return reqs




@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_mixed_continuous_batch_equals_each_request_alone(engine, sampled):
    reqs = mixed_requests(sampled)
    alone = [engine.generate([r])[0] for r in reqs]
    steps_before = engine.counters["steps"]
    together = asyncio.run(staggered(engine, reqs))
    for r, a, t in zip(reqs, alone, together, strict=True):
        assert t.token_ids == a.token_ids, r.adapter
        assert t.finish_reason == a.finish_reason and t.text == a.text
        assert t.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    mixed_steps = engine.counters["steps"] - steps_before
    assert mixed_steps < sum(len(a.token_ids) for a in alone) / 2  # really batched
    assert max(engine.observer.values["on_step:distinct_adapters"]) >= 4
    # every adapter changes the output of the same input (they are live, not identity)
    base_out = {r.inputs: a.token_ids for r, a in zip(reqs, alone, strict=True) if r.adapter is None}
    for r, a in zip(reqs, alone, strict=True):
        if r.adapter is not None and r.inputs in base_out and not sampled:
            n = min(len(a.token_ids), len(base_out[r.inputs]))
            assert a.token_ids[:n] != base_out[r.inputs][:n], r.adapter


def test_ia3_merges_when_alone_and_unmerges_exactly_when_mixed(engine):
    req = GenerationRequest(INPUTS[0], adapter="ia3", params=GenerationParams(max_new_tokens=12, logprobs=True))
    merges = engine.counters["merges"]
    solo = engine.generate([req])[0]  # uniform batch: merged after ia3_merge_after_steps
    assert engine.counters["merges"] == merges + 1
    base_req = GenerationRequest(INPUTS[1], params=GenerationParams(max_new_tokens=12, logprobs=True))
    base_alone = engine.generate([base_req])[0]  # a base row: the merge must be undone first
    assert engine.counters["unmerges"] >= 1
    both = engine.generate([req, base_req])
    assert both[0].token_ids == solo.token_ids and both[1].token_ids == base_alone.token_ids
    assert both[1].logprobs == pytest.approx(base_alone.logprobs, abs=1e-5)
    assert engine.info()["counters"]["merge_s"] > 0


def test_unknown_adapter_and_remove_while_running(engine, zoo):
    with pytest.raises(UnknownAdapterError):
        engine.generate([GenerationRequest("hi", adapter="nope")])
    engine.register_adapter("temp", zoo["lora_b"])
    with pytest.raises(AdapterExistsError):
        engine.register_adapter("temp", zoo["lora_a"])
    req = GenerationRequest("hi", adapter="temp", params=GenerationParams(max_new_tokens=24))
    expected = engine.generate([req])[0]

    async def scenario():
        events = []
        agen = engine.stream(req)
        async for item in agen:
            events.append(item)
            if len(events) == 2:
                engine.remove_adapter("temp")  # running row keeps going
                with pytest.raises(UnknownAdapterError):
                    await engine.submit(req)
        return events[-1]

    final = asyncio.run(scenario())
    assert final.token_ids == expected.token_ids and final.finish_reason == expected.finish_reason
    assert "temp" not in {a["name"] for a in engine.adapters()}


def test_replace_in_flight_rows_finish_on_old_version(engine, zoo):
    v1 = GenerationRequest("replace me", adapter="swap", params=GenerationParams(max_new_tokens=24))
    engine.register_adapter("swap", zoo["lora_a"])
    old = engine.generate([v1])[0]
    engine.register_adapter("ref_b", zoo["lora_b"])
    new = engine.generate([GenerationRequest("replace me", adapter="ref_b", params=v1.params)])[0]
    assert old.token_ids != new.token_ids

    async def scenario():
        agen = engine.stream(v1)
        first = await agen.__anext__()
        engine.register_adapter("swap", zoo["lora_b"], replace=True)
        after = await engine.submit(v1)
        rest = [e async for e in agen]
        return first, rest[-1], after

    _, in_flight, after = asyncio.run(scenario())
    assert in_flight.token_ids == old.token_ids
    assert after.token_ids == new.token_ids
    versions = {a["name"]: a["version"] for a in engine.adapters()}
    assert versions["swap"] > versions["ref_b"]
    engine.remove_adapter("swap"), engine.remove_adapter("ref_b")


def test_stop_sequence_truncates_and_streams_consistently(engine):
    params = GenerationParams(max_new_tokens=24)
    full = engine.generate([GenerationRequest(INPUTS[0], params=params)])[0]
    assert len(full.text) >= 4
    stop = full.text[2:4]
    cut = full.text.find(stop)
    req = GenerationRequest(INPUTS[0], params=GenerationParams(max_new_tokens=24, stop=[stop, "never-seen"]))
    res = engine.generate([req])[0]
    assert res.finish_reason == "stop" and res.text == full.text[:cut]

    async def streamed():
        return [e async for e in engine.stream(req)]

    items = asyncio.run(streamed())
    assert "".join(e.text for e in items[:-1]) == items[-1].text == res.text


def test_cancelled_stream_and_submit_free_their_rows(engine):
    req = GenerationRequest("cancel me", params=GenerationParams(max_new_tokens=24))

    async def scenario():
        agen = engine.stream(req)
        await agen.__anext__()
        await agen.aclose()  # client went away
        task = asyncio.ensure_future(engine.submit(req))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    failed = engine.counters["failed"]
    asyncio.run(scenario())
    deadline = time.monotonic() + 10  # the loop thread frees them between steps
    while engine.counters["failed"] < failed + 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.counters["failed"] == failed + 2
    assert engine.info()["queue"] == {"waiting": 0, "running": 0}
    assert engine.observer.counts["on_request_failed:cancelled"] >= 2


def test_cold_adapter_load_overlaps_other_rows(engine, zoo, monkeypatch):
    real = engine._load_weights
    steps_during_load = []

    def slow(spec):
        before = engine.counters["steps"]
        time.sleep(0.3)
        steps_during_load.append(engine.counters["steps"] - before)
        return real(spec)

    monkeypatch.setattr(engine.cache, "_load", slow)
    engine.register_adapter("cold", zoo["lora_a"])

    async def scenario():
        busy = asyncio.ensure_future(engine.submit(GenerationRequest(
            "keep decoding", params=GenerationParams(max_new_tokens=24))))
        await asyncio.sleep(0.02)
        cold = await engine.submit(GenerationRequest("hi", adapter="cold",
                                                     params=GenerationParams(max_new_tokens=2)))
        return cold, await busy

    cold, busy = asyncio.run(scenario())
    assert cold.timings["queue_s"] >= 0.25  # it waited for its own adapter ...
    assert steps_during_load[0] > 0  # ... while the busy row kept decoding
    assert busy.generated_tokens == 24
    assert engine.observer.counts["on_swap:disk_to_host"] >= 1
    assert engine.observer.counts["on_swap:host_to_device"] >= 1
    engine.remove_adapter("cold")


def test_info_and_adapter_listing(engine):
    info = engine.info()
    assert info["dtype"] == "torch.float32" and info["devices"] == ["cpu"]
    assert info["adapters"]["by_kind"]["lora"] >= 2 and info["limits"]["max_new_tokens"] == 24
    listed = {a["name"]: a for a in engine.adapters()}
    assert listed["prompt"]["kind"] == "prompt" and listed["lora_a"]["tier"] in {"device", "host", "disk"}


def test_failed_encoder_pass_fails_only_the_joining_requests(engine, monkeypatch):
    from serve.engine.errors import PeftServeError

    real = engine.slots.encoder_inputs
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device failure")
        return real(*args, **kw)

    monkeypatch.setattr(engine.slots, "encoder_inputs", flaky)
    with pytest.raises(PeftServeError, match="simulated device failure"):
        engine.generate([GenerationRequest("boom", adapter="lora_a")])
    assert engine.cache.stats().pinned == 0
    ok = engine.generate([GenerationRequest("fine", adapter="lora_a", params=GenerationParams(max_new_tokens=3))])
    assert ok[0].generated_tokens >= 1


def test_static_scheduling_gives_the_same_outputs(tiny_base_dir, zoo, engine):
    reqs = mixed_requests(sampled=False)[:6]
    expected = [engine.generate([r])[0].token_ids for r in reqs]
    class JoinWatcher(RecordingObserver):
        joined_running_batch = 0

        def on_prefill(self, rows, tokens, seconds):
            if len(self.engine.loop.running) != rows:  # rows joined a batch that was already decoding
                self.joined_running_batch += 1

    for mode, joins in (("static", False), ("continuous", True)):
        watcher = JoinWatcher()
        with Engine.from_config(small_config(tiny_base_dir, scheduling=mode), observer=watcher) as eng:
            watcher.engine = eng
            for name in ("lora_a", "lora_b", "ia3", "bitfit", "prompt"):
                eng.register_adapter(name, zoo[name])
            got = asyncio.run(staggered(eng, reqs))
        assert [g.token_ids for g in got] == expected, mode
        assert (watcher.joined_running_batch > 0) == joins, mode


def test_warm_up_runs_before_start_returns_and_leaves_no_state(tiny_base_dir, zoo):
    """The warm-up (an encoder pass and decoder steps, before from_config returns, i.e. before /health is ready)
    runs outside the request path and leaves the batch as it found it: the same requests give the same tokens
    and log-probabilities after another warm-up as before it."""
    eng = Engine.from_config(small_config(tiny_base_dir))
    try:
        assert eng.info()["warm_up_s"] > 0
        assert eng.loop.counters["prefills"] == 0  # no request was served to warm up
        for name in ("lora_a", "prompt"):
            eng.register_adapter(name, zoo[name])
        reqs = lambda: [GenerationRequest(t, adapter=a, params=GenerationParams(max_new_tokens=6, logprobs=True))  # noqa: E731
                        for t, a in zip(INPUTS, [None, "lora_a", "prompt", None], strict=True)]
        before = eng.generate(reqs())
        eng.warm_up(rows=4, tokens=5)
        after = eng.generate(reqs())
        assert [r.token_ids for r in after] == [r.token_ids for r in before]
        for a, b in zip(after, before, strict=True):
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5)
    finally:
        eng.close()
