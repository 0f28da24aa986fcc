"""AdapterHub's method family on T5: bottleneck adapters (seq_bn, double_seq_bn, par_bn), prefix tuning on
every attention, LoRA and (IA)3 in its layout, gates, and unions (UniPELT, MAM).

    config.py      adapter_config.json -> one dataclass per method, validated
    load.py        inspect (header only) / build: AdapterHub's tensor keys -> weights.py's host tensors
    bottleneck.py  SublayerSlots: per-row bottleneck adapters replacing a sublayer's residual add
    prefix.py      AttentionPrefixSlots: per-row encoder/self/cross prefixes, with their gates
    linear.py      GatedLinearSlots: per-row LoRA/(IA)3 with gates inside the wrapped linears
    gates.py       the per-row gate: masked mean of sigmoid(x·w + b)
    convert.py     `peftserve adapters convert`: pytorch_adapter.bin -> adapter.safetensors (offline, weights_only)
"""

from .weights import AdapterHubWeights

__all__ = ["AdapterHubWeights"]
