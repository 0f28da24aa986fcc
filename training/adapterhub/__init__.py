"""AdapterHub-family methods trained with the project's own torch code: `--method adapter` (bottleneck:
seq_bn, double_seq_bn, par_bn), `ah_prefix` (prefix tuning), `unipelt` and `mam` (AdapterHub's ConfigUnions).

The `adapters` library itself pins transformers 4.57 and cannot be imported here; these modules reproduce
its math on T5 (gates served incrementally, see modules.py) and write its on-disk layout, which AdapterHub's
`load_adapter(dir, use_safetensors=True)` reads. config.py: the config dicts; modules.py: the nn.Modules
and how they attach to a transformers-5 T5; layout.py: adapter_config.json + adapter.safetensors.
"""
