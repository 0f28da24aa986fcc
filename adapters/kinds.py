"""The four adapter kinds and the T5 modules they may target."""

from __future__ import annotations

from enum import Enum


class AdapterKind(str, Enum):
    LORA = "lora"
    IA3 = "ia3"
    BITFIT = "bitfit"
    PROMPT = "prompt"
    PREFIX = "prefix"
    # AdapterHub's family acting together on one row: bottleneck adapters after sublayers, prefixes on
    # every attention, gated LoRA/(IA)3 on linears, and their unions (UniPELT, MAM)
    ADAPTERHUB = "adapterhub"

    def __str__(self) -> str:  # f-strings and JSON show "lora", not "AdapterKind.LORA"
        return self.value


# peft_type in adapter_config.json -> kind. BITFIT is peftserve's own (peft has no BitFit tuner).
PEFT_TYPES: dict[str, AdapterKind] = {
    "LORA": AdapterKind.LORA,
    "IA3": AdapterKind.IA3,
    "BITFIT": AdapterKind.BITFIT,
    "PROMPT_TUNING": AdapterKind.PROMPT,
    # served through the same slots: AdaLoRA's SVD triplet and DoRA (LORA + use_dora) fold into LoRA at
    # load; P-tuning's saved prompt is the prompt encoder's output, a soft prompt like prompt tuning's
    "PREFIX_TUNING": AdapterKind.PREFIX,
    "ADALORA": AdapterKind.LORA,
    "P_TUNING": AdapterKind.PROMPT,
}

# Every method a spec may name (AdapterSpec.method_name): the label metrics and GET /adapters show.
METHODS = ("lora", "dora", "adalora", "ia3", "bitfit", "prompt", "p_tuning", "prefix",
           # AdapterHub's (the adapterhub kind; its ungated LoRA and (IA)3 are served as lora / ia3)
           "seq_bn", "double_seq_bn", "par_bn", "prefix_tuning", "gated_lora", "gated_ia3", "unipelt", "mam", "union")

# Kinds that act inside the wrapped linears (prompt acts on the encoder input, prefix on the decoder's
# self-attention keys and values, instead).
LINEAR_KINDS = (AdapterKind.LORA, AdapterKind.IA3, AdapterKind.BITFIT)

# Every linear of a T5 block an adapter may target: attention (self and cross) and the FFN
# (wi for relu T5, wi_0/wi_1 for gated-gelu FLAN-T5).
T5_TARGETS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")

SEQ2SEQ_TASK = "SEQ_2_SEQ_LM"
