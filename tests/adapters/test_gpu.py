"""On CUDA: slot tensors live on the wrapped weights' device; fp32 matches CPU, bf16 stays close."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters import AdapterKind, RowAdapters, SlotConfig, attach_slots, load_adapter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype, rel_tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_mixed_batch_on_cuda_matches_cpu(tiny_base, tiny_desc, zoo, slot_of, mixed_batch, run_batch, wrapped,
                                         dtype, rel_tol):
    torch.backends.cuda.matmul.allow_tf32 = False
    names, ids, mask, dec, _ = mixed_batch
    rows = RowAdapters.from_pairs([None if n is None else slot_of[n] for n in names])
    cpu_model, cpu_slots = wrapped
    ref = run_batch(cpu_model, cpu_slots, rows, ids, mask, dec)
    model = copy.deepcopy(tiny_base.model).to("cuda", dtype)
    slots = attach_slots(model, SlotConfig(slots={k: 4 for k in AdapterKind}, max_rank=8, max_virtual_tokens=12))
    assert all(layer.slots["lora"].a.device.type == "cuda" for layer in slots.layers.values())
    assert slots.layers[next(iter(slots.layers))].slots["lora"].a.dtype == dtype
    for name, (kind, slot) in slot_of.items():
        slots.write(kind, slot, load_adapter(zoo[name], tiny_desc))
    out = run_batch(model, slots, rows, ids.cuda(), mask.cuda(), dec.cuda()).float().cpu()
    assert (out - ref).abs().max().item() <= rel_tol * ref.abs().max().item()
