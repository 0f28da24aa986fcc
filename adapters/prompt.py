"""Prompt tuning: a learned soft prompt placed before each row's encoder input.

PEFT format: `prompt_embeddings` shaped [num_virtual_tokens * num_transformer_submodules, d_model]. For
SEQ_2_SEQ_LM peft defaults num_transformer_submodules to 2 and saves a decoder half too, which peft's own
`generate` ignores (it prepends only the first num_virtual_tokens rows to the encoder input). peftserve
serves exactly that: the encoder half; the spec's notes say so.

P-tuning (P_TUNING) is served the same way: peft's `save_pretrained` writes `prompt_embeddings` as the output
of the prompt encoder (`get_prompt_embedding_to_save` runs the MLP or LSTM over the virtual-token
embeddings), and a model loaded for inference uses exactly those rows. The encoder ran once, at save time;
nothing of it is needed, or run, per request.

Batch layout: each row is [its soft prompt, its real tokens, padding] — left-aligned and right-padded,
so every row's content is contiguous from position 0 exactly as peft builds that row alone, and T5's
relative position bias (which depends only on distances) sees the same positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import BaseDescription
from .common import base_model_of, check_task_type
from .errors import (
    AdapterLimitError,
    AdapterMismatchError,
    CorruptAdapterError,
    SlotError,
    UnsupportedAdapterError,
)
from .format import AdapterFiles
from .kinds import AdapterKind
from .spec import AdapterLimits, AdapterSpec

KEY = "prompt_embeddings"
PROMPT_ENCODERS = ("MLP", "LSTM")  # peft's PromptEncoderReparameterizationType


@dataclass
class PromptWeights:
    spec: AdapterSpec
    embeddings: torch.Tensor  # [num_virtual_tokens, d_model] (encoder half)

    @property
    def nbytes(self) -> int:
        return self.embeddings.numel() * self.embeddings.element_size()


def _geometry(files: AdapterFiles) -> tuple[int, int]:
    n, subs = files.config.get("num_virtual_tokens"), files.config.get("num_transformer_submodules") or 2
    if not isinstance(n, int) or n <= 0 or not isinstance(subs, int) or subs not in (1, 2):
        raise CorruptAdapterError(f"adapter {files.path}: num_virtual_tokens must be a positive integer and "
                                  f"num_transformer_submodules 1 or 2 (got {n!r}, {subs!r}); re-save the adapter")
    return n, subs


def inspect(files: AdapterFiles, base: BaseDescription, limits: AdapterLimits, name: str) -> AdapterSpec:
    check_task_type(files, required=True)
    ptuning = files.config.get("peft_type") == "P_TUNING"
    if ptuning:
        encoder = files.config.get("encoder_reparameterization_type", "MLP")
        if str(encoder).upper() not in PROMPT_ENCODERS:
            raise UnsupportedAdapterError(
                f"adapter {files.path}: P-tuning prompt encoder {encoder!r} is unknown; peft's encoders are "
                f"{', '.join(PROMPT_ENCODERS)} (encoder_reparameterization_type in adapter_config.json)")
    n, subs = _geometry(files)
    if set(files.tensors) != {KEY}:
        extra = sorted(set(files.tensors) - {KEY}) or [f"missing {KEY}"]
        raise UnsupportedAdapterError(f"adapter {files.path}: a prompt-tuning file holds exactly '{KEY}' "
                                      f"(found {extra[0]!r}); re-save it with PeftModel.save_pretrained")
    shape = tuple(files.tensors[KEY].shape)
    if shape != (n * subs, base.d_model):
        raise AdapterMismatchError(
            f"adapter {files.path}: {KEY} has shape {list(shape)}, expected [{n * subs}, {base.d_model}] "
            f"({n} virtual tokens x {subs} submodules, d_model {base.d_model} of base {base.name!r}); "
            "the adapter was trained for a different model size")
    if n > limits.max_virtual_tokens:
        raise AdapterLimitError(f"adapter {files.path}: {n} virtual tokens is above this server's "
                                f"max_virtual_tokens={limits.max_virtual_tokens}; retrain shorter or raise the limit")
    notes = ()
    if subs == 2:
        notes = (f"the file also holds a {n}-token decoder prompt; served as peft generates: encoder prompt only",)
    return AdapterSpec(
        name=name, kind=AdapterKind.PROMPT, rank=None, targets=(), num_virtual_tokens=n,
        size_bytes=files.size_bytes, base_model=base_model_of(files), path=str(files.path), notes=notes,
        options={"num_transformer_submodules": subs,
                 **({"prompt_encoder": str(files.config.get("encoder_reparameterization_type", "MLP")).upper()}
                    if ptuning else {})},
        method="p_tuning" if ptuning else None)


def build(spec: AdapterSpec, files: AdapterFiles, tensors: dict[str, torch.Tensor], base: BaseDescription | None = None) -> PromptWeights:
    return PromptWeights(spec=spec, embeddings=tensors[KEY][: spec.num_virtual_tokens].contiguous())


def place(embeds: torch.Tensor, mask: torch.Tensor, prompts: torch.Tensor, lengths: torch.Tensor,
          max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Build [prompt_i, real tokens_i, pad] per row without a loop over rows.

    embeds [B, L, d], mask [B, L] (real tokens anywhere; their order is kept), prompts [B, P, d] (row i's
    prompt in its first lengths[i] rows), max_len = max(lengths) on the host (no device sync here).
    """
    b, seq, d = embeds.shape
    total = max_len + seq
    real = mask.bool()
    # positions of real tokens first, in order (a stable sort of "is padding")
    order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
    count = real.sum(1, keepdim=True)
    pos = torch.arange(total, device=embeds.device)[None, :]
    n = lengths[:, None]
    is_prompt = pos < n
    is_token = (pos >= n) & (pos < n + count)
    src = order.gather(1, (pos - n).clamp(0, seq - 1))
    tokens = embeds.gather(1, src[..., None].expand(b, total, d))
    soft = prompts.to(embeds.dtype).gather(1, pos.clamp(max=prompts.shape[1] - 1).expand(b, total)[..., None]
                                            .expand(b, total, d))
    out = torch.where(is_prompt[..., None], soft, torch.where(is_token[..., None], tokens, torch.zeros_like(tokens)))
    return out, (is_prompt | is_token).to(mask.dtype)


class PromptSlots(nn.Module):
    """Stacked soft prompts [slots+1, max_virtual_tokens, d_model] on the embedding's device; slot 0 is empty."""

    def __init__(self, n: int, max_tokens: int, d_model: int, dtype, device) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(n + 1, max_tokens, d_model, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("lengths", torch.zeros(n + 1, dtype=torch.long, device=device), persistent=False)
        self.length = [0] * (n + 1)

    def write(self, slot: int, weights: PromptWeights) -> None:
        n, d = weights.embeddings.shape
        if n > self.table.shape[1] or d != self.table.shape[2]:
            raise SlotError(f"prompt adapter {weights.spec.name!r} is [{n}, {d}]; slots hold at most "
                            f"[{self.table.shape[1]}, {self.table.shape[2]}] (SlotConfig.max_virtual_tokens)")
        with torch.no_grad():
            self.table[slot].zero_()
            self.table[slot, :n].copy_(weights.embeddings)
            self.lengths[slot] = n
        self.length[slot] = n

    def clear(self, slot: int) -> None:
        with torch.no_grad():
            self.table[slot].zero_()
            self.lengths[slot] = 0
        self.length[slot] = 0

    def place(self, embeds: torch.Tensor, mask: torch.Tensor, index_host: tuple[int, ...]):
        index = torch.tensor(index_host, dtype=torch.long, device=self.table.device)
        max_len = max(self.length[s] for s in index_host)
        prompts = self.table[:, : max(max_len, 1)].index_select(0, index).to(embeds.device)
        return place(embeds, mask, prompts, self.lengths.index_select(0, index).to(embeds.device), max_len)
