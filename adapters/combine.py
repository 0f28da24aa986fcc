"""Several adapters on one row: which combinations one row can take, and the derived LoRA of a ties/dare merge.

Two ways to combine (LoRAX's `merged_adapters`, `merge_strategy`):
- `linear`: every adapter acts on the row directly, no merged copy (`adapters/rows.py`). LoRAs add their
  weighted deltas, y = W x + Σ wᵢ Bᵢ Aᵢ x: PEFT's `add_weighted_adapter(combination_type="cat")`, exactly.
  (LoRAX's own `linear` averages the A and B matrices separately, which PEFT calls a rough approximation.)
  Other kinds stack, each in its own place, in this order: the LoRAs (and a BitFit bias) act as if merged
  into the base linears; (IA)3 scales on top of that; a soft prompt or a prefix acts on the inputs or the
  keys. The oracle is PEFT's: `merge_and_unload` the LoRAs, then load the other adapter on top.
- `ties`, `dare_linear`, `dare_ties`: trimmed, sign-elected or randomly dropped A and B matrices — not a sum of
  row terms. `merge_loras` builds that LoRA once with PEFT's own functions (`peft.utils.merge_utils`, the same
  per-module glue as `LoraModel.add_weighted_adapter`); the engine caches it as a derived adapter.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch

from .errors import AdapterError
from .kinds import AdapterKind
from .lora import LoraWeights
from .spec import AdapterSpec

STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
MAX_WEIGHT = 100.0  # |w| beyond this is no blend but a blow-up (fp16/bf16 overflow); refused, not clipped
SIGN_METHODS = ("total", "frequency")
PROMPT_KINDS = (AdapterKind.PROMPT, AdapterKind.PREFIX)


class CombinationError(AdapterError):
    """A combination of adapters that one row cannot take; the message names the problem (HTTP 422)."""


@dataclass(frozen=True)
class MergeOptions:
    strategy: str = "linear"
    density: float = 1.0  # ties / dare: the fraction of each A and B kept
    majority_sign_method: str = "total"  # ties / dare_ties


def _describe(spec: AdapterSpec) -> str:
    n = spec.num_virtual_tokens
    return f"{spec.name!r} ({spec.method_name}{f', {n} virtual tokens' if n else ''})"


def check_combination(specs: list[AdapterSpec], weights: list[float], options: MergeOptions,
                      max_adapters: int) -> None:
    """Everything knowable from the specs; raises CombinationError naming the problem and the fix."""
    n = len(specs)
    if not 1 <= n <= max_adapters:
        raise CombinationError(f"a combination takes 1 to {max_adapters} adapters (this server's "
                               f"max_combined_adapters), got {n}")
    if len(weights) != n:
        raise CombinationError(f"{n} adapters but {len(weights)} weights; give one weight per adapter, or none")
    for spec, w in zip(specs, weights, strict=True):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise CombinationError(f"the weight of {spec.name!r} must be a finite number, got {w!r}")
        if abs(w) > MAX_WEIGHT:
            raise CombinationError(f"the weight of {spec.name!r} is {w}; weights lie in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}]")
    twice = [name for name, c in Counter(s.name for s in specs).items() if c > 1]
    if twice:
        raise CombinationError(f"adapter {twice[0]!r} appears more than once; give it once, with the summed weight")
    if options.strategy not in STRATEGIES:
        raise CombinationError(f"unknown merge_strategy {options.strategy!r}; use one of {', '.join(STRATEGIES)}")
    if options.strategy == "linear":
        return _check_stack(specs, weights)
    _check_merge(specs, options)


def _check_stack(specs: list[AdapterSpec], weights: list[float]) -> None:
    if len(specs) > 1 and any(s.kind == AdapterKind.ADAPTERHUB for s in specs):
        hub = next(s for s in specs if s.kind == AdapterKind.ADAPTERHUB)
        raise CombinationError(f"{_describe(hub)} is an AdapterHub adapter, which is served alone: combine its "
                               "parts in one AdapterHub config (architecture 'union') instead")
    prompts = [s for s in specs if s.kind in PROMPT_KINDS]
    if len(prompts) > 1:
        lengths = {s.num_virtual_tokens for s in prompts}
        why = " (and their lengths differ)" if len(lengths) > 1 else ""
        raise CombinationError(f"one row takes at most one soft prompt or prefix, got {', '.join(map(_describe, prompts))}"
                               f"{why}: peft applies one prompt-learning adapter per forward; keep one of them")
    for kind in (AdapterKind.IA3, AdapterKind.BITFIT):
        same = [s for s in specs if s.kind == kind]
        if len(same) > 1:
            raise CombinationError(f"one row takes at most one {kind} adapter, got "
                                   f"{', '.join(map(_describe, same))}; keep one of them")
    for spec, w in zip(specs, weights, strict=True):
        if spec.kind != AdapterKind.LORA and w != 1:
            raise CombinationError(f"{_describe(spec)} has weight {w}, but only LoRA deltas can be weighted; "
                                   "give it weight 1")
    loras = [(s, w) for s, w in zip(specs, weights, strict=True) if s.kind == AdapterKind.LORA]
    dora = [s for s, w in loras if s.method_name == "dora" and (len(loras) > 1 or w != 1)]
    if dora:
        raise CombinationError(f"{_describe(dora[0])} cannot be summed with other LoRAs or weighted: DoRA's "
                               "magnitude rescales the whole layer output; serve it alone or with other kinds")


def _check_merge(specs: list[AdapterSpec], options: MergeOptions) -> None:
    other = [s for s in specs if s.kind != AdapterKind.LORA or s.method_name != "lora"]
    if other:
        raise CombinationError(f"merge_strategy {options.strategy!r} merges plain LoRA adapters only, and "
                               f"{_describe(other[0])} is not one; use merge_strategy 'linear' to stack kinds")
    patterned = [s for s in specs if s.options.get("rank_pattern")]
    if patterned:
        raise CombinationError(f"merge_strategy {options.strategy!r} needs one rank on every module, and "
                               f"{_describe(patterned[0])} has a rank_pattern; use merge_strategy 'linear'")
    ranks = {s.name: s.rank for s in specs}
    if len(set(ranks.values())) > 1:
        raise CombinationError(f"merge_strategy {options.strategy!r} needs LoRAs of one rank (PEFT's rule), got "
                               f"{', '.join(f'{k!r} r={v}' for k, v in ranks.items())}; use 'linear' for mixed ranks")
    d = options.density
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d <= 1:
        raise CombinationError(f"density must be in (0, 1] for merge_strategy {options.strategy!r}, got {d!r}")
    if options.majority_sign_method not in SIGN_METHODS:
        raise CombinationError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got "
                               f"{options.majority_sign_method!r}")


def derived_spec(specs: list[AdapterSpec], options: MergeOptions, name: str) -> AdapterSpec:
    """What the merged LoRA will be (known before it is built): rank, modules, notes."""
    modules = sorted({m for s in specs for m in s.modules})
    first = specs[0]
    return AdapterSpec(
        name=name, kind=AdapterKind.LORA, rank=first.rank, targets=tuple(sorted({m.rsplit(".", 1)[-1] for m in modules})),
        num_virtual_tokens=None, size_bytes=sum(s.size_bytes for s in specs), base_model=first.base_model, path="",
        modules=tuple(modules), options={"use_rslora": bool(first.options.get("use_rslora")), "derived": True},
        notes=(f"derived: {options.strategy} of {', '.join(s.name for s in specs)}, built once with "
               "peft.utils.merge_utils as LoraModel.add_weighted_adapter does",),
        method=options.strategy)


def merge_loras(parts: list[LoraWeights], weights: list[float], options: MergeOptions, name: str,
                seed: int = 0) -> LoraWeights:
    """PEFT's `add_weighted_adapter(combination_type=strategy)` for LoRA, on host tensors: per module, the A
    matrices of the adapters that have it are merged with weights sign·√|w·s| and the B matrices with √|w·s|
    (s: each adapter's scaling); the result has r = the adapters' rank and alpha = r. dare's random drops use
    a generator seeded with `seed`, so a rebuild (another node, an evicted copy) gives the same adapter."""
    from peft.utils import merge_utils

    merge = {"ties": lambda t, w: merge_utils.ties(t, w, options.density, options.majority_sign_method),
             "dare_linear": lambda t, w: merge_utils.dare_linear(t, w, options.density),
             "dare_ties": lambda t, w: merge_utils.dare_ties(t, w, options.density, options.majority_sign_method),
             }[options.strategy]
    spec = derived_spec([p.spec for p in parts], options, name)
    rank = spec.rank
    new_scaling = math.sqrt(rank) if spec.options["use_rslora"] else 1.0  # alpha = r (and rslora as the first's)
    a, b, scaling = {}, {}, {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in spec.modules:
            have = [(p, w) for p, w in zip(parts, weights, strict=True) if module in p.a]
            ws = [w * p.scaling[module] for p, w in have]
            w_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws])
            w_b = torch.tensor([math.sqrt(abs(x)) for x in ws])
            merged_a = merge([p.a[module].float() for p, _ in have], w_a)
            merged_b = merge([p.b[module].float() / p.scaling[module] for p, _ in have], w_b)
            a[module], b[module], scaling[module] = merged_a.contiguous(), (merged_b * new_scaling).contiguous(), new_scaling
    return LoraWeights(spec=spec, a=a, b=b, scaling=scaling)
