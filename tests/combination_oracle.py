"""The oracle for several adapters on one row, computed by PEFT itself (docs/ADAPTERS.md):

- LoRAs with weights: `add_weighted_adapter(..., combination_type="cat")`, then `merge_and_unload`;
- other kinds on top: BitFit biases as forward hooks on the merged linears (dense math: peft has no BitFit),
  then the (IA)3 adapter loaded with PeftModel (merged when a soft prompt or prefix follows), then the soft
  prompt (as peft's generate uses it) or the prefix (peft's forward);
- ties / dare: `add_weighted_adapter(..., combination_type=strategy)` itself.

`model_for(base, parts)` returns a callable (input_ids, decoder_input_ids) -> logits for ONE row's combination;
`greedy(step, ...)` decodes with it by repeated full forwards; `add_bitfit` is BitFit's dense reference, shared
with the single-adapter oracles.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch


def _peft_type(adapter_dir: Path) -> str:
    return json.loads((Path(adapter_dir) / "adapter_config.json").read_text())["peft_type"]


def _merged_loras(model, loras: list[tuple[Path, float]], strategy: str = "cat", **merge):
    from peft import PeftModel

    if len(loras) == 1 and loras[0][1] == 1.0 and strategy == "cat":
        return PeftModel.from_pretrained(model, str(loras[0][0])).merge_and_unload()
    pm = PeftModel.from_pretrained(model, str(loras[0][0]), adapter_name="a0")
    for i, (path, _) in enumerate(loras[1:], 1):
        pm.load_adapter(str(path), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(loras))]
    pm.add_weighted_adapter(names, [w for _, w in loras], "mix", combination_type=strategy, **merge)
    pm.set_adapter("mix")
    return pm.merge_and_unload()


def add_bitfit(model, adapter_dir: Path) -> None:
    """BitFit's dense reference: a forward hook adding each trained bias to its linear's output."""
    from safetensors.torch import load_file

    for key, bias in load_file(Path(adapter_dir) / "adapter_model.safetensors").items():
        model.get_submodule(key[len("base_model.model."):-len(".bias")]).register_forward_hook(
            lambda mod, inp, out, b=bias: out + b)


def model_for(base_model, parts: list[tuple[Path, float]], strategy: str = "cat", seed: int | None = None, **merge):
    """parts: (adapter dir, weight) of one row. Returns step(ids, dec) -> logits [1, T, vocab]."""
    from peft import PeftModel

    model = copy.deepcopy(base_model)
    by_type: dict[str, list] = {}
    for path, w in parts:
        by_type.setdefault(_peft_type(path), []).append((path, w))
    loras = by_type.pop("LORA", [])
    if loras:
        if seed is not None:
            torch.manual_seed(seed)
        model = _merged_loras(model, loras, strategy, **merge)
    for path, _ in by_type.pop("BITFIT", []):
        add_bitfit(model, path)
    prompt = by_type.pop("PROMPT_TUNING", []) + by_type.pop("P_TUNING", [])
    prefix = by_type.pop("PREFIX_TUNING", [])
    for path, _ in by_type.pop("IA3", []):
        model = PeftModel.from_pretrained(model, str(path))
        if prompt or prefix:
            model = model.merge_and_unload()
    assert not by_type, f"no oracle for {sorted(by_type)}"
    if prefix:  # peft's forward (its generate drops T5 prefixes; docs/ADAPTERS.md)
        model = PeftModel.from_pretrained(model, str(prefix[0][0]))
    model.eval()
    if not prompt:
        def step(ids, dec):
            with torch.no_grad():
                return model(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=dec).logits
        return step
    pm = PeftModel.from_pretrained(model, str(prompt[0][0])).eval()
    n = pm.peft_config["default"].num_virtual_tokens

    def prompted(ids, dec):  # peft's generate: the encoder half of the prompt before the input
        with torch.no_grad():
            embeds = torch.cat((pm.get_prompt(batch_size=1)[:, :n], pm.word_embeddings(ids)), dim=1)
            return pm.base_model(inputs_embeds=embeds, decoder_input_ids=dec).logits
    return prompted


def greedy(step, new_tokens: int, eos: int) -> tuple[list[int], list[float]]:
    """(greedy tokens, their log-probabilities) by repeated full forwards; step(decoder_input_ids) -> logits."""
    dec, logprobs = torch.zeros(1, 1, dtype=torch.long), []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = step(dec)[0, -1].float()
            nxt = int(out.argmax())
            logprobs.append(float(torch.log_softmax(out, -1)[nxt]))
            dec = torch.cat((dec, torch.tensor([[nxt]])), 1)
            if nxt == eos:
                break
    return dec[0, 1:].tolist(), logprobs
