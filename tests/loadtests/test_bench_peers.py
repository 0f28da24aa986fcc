"""The peft peers on the tiny base: same requests, same answers, whichever way they are served."""

from pathlib import Path

import pytest
import torch

from loadtests.peers import (
    HFBasePeer,
    MergedPerAdapterPeer,
    PeftAdapters,
    PeftMixedPeer,
    SwapPerRequestPeer,
    unique_tensor_bytes,
)
from loadtests.workload import make_adapters, make_requests, random_texts


@pytest.fixture(scope="module")
def lora(tiny_base_dir, tmp_path_factory) -> dict[str, Path]:
    paths = make_adapters(tiny_base_dir, tmp_path_factory.mktemp("adapters"), "lora", 3, rank=4)
    return {p.name: p for p in paths}


@pytest.fixture(scope="module")
def requests(lora):
    return make_requests(random_texts(4, 12, seed=1), [*lora, None], 4)


def test_adapters_are_real_peft_safetensors_and_cached(tiny_base_dir, lora, tmp_path):
    from safetensors import safe_open

    for p in lora.values():
        assert (p / "adapter_config.json").exists()
        with safe_open(str(p / "adapter_model.safetensors"), "pt") as f:
            keys = list(f.keys())
        assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    root = next(iter(lora.values())).parent.parent
    mtime = {p: (p / "adapter_model.safetensors").stat().st_mtime_ns for p in lora.values()}
    again = make_adapters(tiny_base_dir, root, "lora", 3, rank=4)  # cached: nothing rewritten
    assert {p: (p / "adapter_model.safetensors").stat().st_mtime_ns for p in again} == mtime


def test_mixed_swap_and_merged_peers_agree_token_for_token(tiny_base_dir, lora, requests):
    shared = PeftAdapters(tiny_base_dir, lora, "cpu", torch.float32)
    mixed = PeftMixedPeer(shared).run(requests)
    swap = SwapPerRequestPeer(shared).run(requests)
    merged = MergedPerAdapterPeer(tiny_base_dir, lora, "cpu", torch.float32, max_models=3).run(requests)
    base = HFBasePeer(tiny_base_dir, "cpu", torch.float32).run(requests)
    assert mixed.outputs == swap.outputs == merged.outputs
    assert mixed.tokens == 4 * 4 and all(len(o) == 4 for o in mixed.outputs)
    assert mixed.outputs[3] == base.outputs[3]  # the base row is the base
    assert mixed.outputs[:3] != base.outputs[:3]  # adapter rows are not
    assert swap.latencies == sorted(swap.latencies)  # served one after another


def test_memory_accounting(tiny_base_dir, lora):
    shared = PeftAdapters(tiny_base_dir, lora, "cpu", torch.float32)
    assert shared.adapter_bytes > 0
    assert shared.memory_bytes(3) == unique_tensor_bytes(shared.model)
    merged = MergedPerAdapterPeer(tiny_base_dir, lora, "cpu", torch.float32, max_models=2)
    assert merged.projected
    # a merged model shares its unchanged tensors with the template: cheaper than a full copy
    assert merged.memory_bytes(1) < 2 * unique_tensor_bytes(merged.template)
    assert merged.memory_bytes(3) > merged.memory_bytes(2) > merged.memory_bytes(1)
