"""Device planner: exact sizes from a config, budgets respected, contiguous split; split forward."""

from __future__ import annotations

import pytest
import torch

from serve.engine.base import t5_config
from serve.engine.device_map import GiB, apply_device_map, plan_bytes, plan_device_map, t5_groups
from serve.engine.errors import ConfigError

ORDER_PREFIXES = ("shared", "encoder.block", "encoder.final", "decoder.block", "decoder.final", "lm_head")


def _meta_model(preset):
    from transformers import T5ForConditionalGeneration

    with torch.device("meta"):  # real module shapes, no memory
        return T5ForConditionalGeneration(t5_config(preset))


@pytest.mark.parametrize("preset", ["tiny", "flan-t5-xl"])
def test_group_sizes_match_the_real_modules(preset):
    model = _meta_model(preset)
    model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))  # untied, like build_base
    groups = {g.name: g.nbytes for g in t5_groups(t5_config(preset), dtype_bytes=2)}
    for name, nbytes in groups.items():
        real = sum(p.numel() for p in model.get_submodule(name).parameters()) * 2
        assert nbytes == real, name
    total = sum(groups.values()) // 2
    if preset == "flan-t5-xl":
        assert 2.8e9 < total < 2.9e9  # FLAN-T5-XL has 2.85B parameters


def test_xl_over_four_a10s_is_balanced_contiguous_and_within_budget():
    cfg = t5_config("flan-t5-xl")
    budgets = {f"cuda:{i}": 20 * GiB for i in range(4)}
    plan = plan_device_map(cfg, budgets, dtype_bytes=2)
    per_device = plan_bytes(cfg, plan, dtype_bytes=2)
    assert set(per_device) == set(budgets)
    total = sum(per_device.values())
    assert all(b <= 20 * GiB for b in per_device.values())
    assert max(per_device.values()) < 0.35 * total  # roughly a quarter each
    order = [g.name for g in t5_groups(cfg, 2)]
    idx = [int(plan[name].split(":")[1]) for name in order]
    assert idx == sorted(idx)  # forward order never goes back to an earlier device
    assert plan["encoder.embed_tokens"] == plan["decoder.embed_tokens"] == plan["shared"]


def test_tight_budgets_spill_and_per_block_extras_count():
    cfg = t5_config("flan-t5-xl")
    budgets = {"cuda:0": int(1.2 * GiB), "cuda:1": 4 * GiB, "cuda:2": 4 * GiB}
    extra = {"extra_decoder_block": 50 * 2**20}
    plan = plan_device_map(cfg, budgets, dtype_bytes=2, **extra)
    per_device = plan_bytes(cfg, plan, dtype_bytes=2, **extra)
    assert all(per_device[d] <= budgets[d] for d in per_device)
    with pytest.raises(ConfigError, match="GiB"):
        plan_device_map(cfg, {"cuda:0": 3 * GiB}, dtype_bytes=2)


def test_split_forward_on_cpu_groups_matches_single_device(tiny_base_dir):
    """An explicit map with two logical groups (both cpu) runs the engine's own loop like one device."""
    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest

    cfg = t5_config("tiny")
    plan = plan_device_map(cfg, {"group0": 2**20 * 6, "group1": 2**20 * 20}, dtype_bytes=4)
    assert set(plan.values()) == {"group0", "group1"}
    cpu_plan = {k: "cpu" for k in plan}
    req = [GenerationRequest("split me", params=GenerationParams(max_new_tokens=8, logprobs=True))]
    small = dict(base=str(tiny_base_dir), max_batch_rows=2, max_new_tokens_cap=8, max_input_tokens=32,
                 device_slots={"lora": 1})
    with Engine.from_config(EngineConfig(**small, device_map=cpu_plan)) as split, \
            Engine.from_config(EngineConfig(**small)) as single:
        a, b = split.generate(req)[0], single.generate(req)[0]
    assert a.token_ids == b.token_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_apply_device_map_refuses_unplaced_parameters(tiny_base):
    import copy

    model = copy.deepcopy(tiny_base.model)
    plan = plan_device_map(t5_config("tiny"), {"cpu": GiB}, dtype_bytes=4)
    apply_device_map(model, plan)  # complete map: fine
    del plan["lm_head"]
    with pytest.raises(ConfigError, match="lm_head"):
        apply_device_map(model, plan)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_split_forward_cuda_and_cpu(tiny_base_dir):
    from serve.engine import Engine, EngineConfig, GenerationParams, GenerationRequest

    plan = plan_device_map(t5_config("tiny"), {"cuda:0": 2**20 * 6, "cpu": 2**20 * 20}, dtype_bytes=4)
    assert set(plan.values()) == {"cuda:0", "cpu"}
    req = [GenerationRequest("split me", params=GenerationParams(max_new_tokens=8))]
    small = dict(base=str(tiny_base_dir), dtype="float32", max_batch_rows=2, max_new_tokens_cap=8,
                 max_input_tokens=32, device_slots={"lora": 1})
    with Engine.from_config(EngineConfig(**small, device_map=plan)) as split, \
            Engine.from_config(EngineConfig(**small)) as single:
        assert split.generate(req)[0].token_ids == single.generate(req)[0].token_ids
