"""Build the trainable model per method, and save what the server loads.

LoRA, DoRA (LoRA with use_dora), AdaLoRA, (IA)3, prompt tuning, P-tuning and prefix tuning go through peft;
AdapterHub's bottleneck adapters, prefix tuning, UniPELT and MAM are the project's own modules
(training/adapterhub/), saved in AdapterHub's layout; BitFit is the project's own (T5 linears have no bias,
so each selected linear gets a zero-initialised trainable bias, saved in the adapters/ BitFit layout); full
fine-tuning trains every weight and is the sweep's baseline. Selective training (seed paper §5): restrict to
layers (first/last N, explicit list) and module groups (attention, feed-forward, encoder, decoder).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.config import ADAPTERHUB_METHODS, TrainConfig, adalora_schedule, resolve_selection
from training.errors import TrainConfigError

# encoder.block.3.layer.1.DenseReluDense.wo -> stack, block, sub-module, linear
_T5_LINEAR = re.compile(r"^(?P<stack>encoder|decoder)\.block\.(?P<block>\d+)\.layer\.\d+\."
                        r"(?P<part>SelfAttention|EncDecAttention|DenseReluDense)\.(?P<name>\w+)$")


@dataclass
class Trainable:
    """The model to optimise plus how to save it. `model` is a peft model for every method but bitfit/full.

    The loop calls `after_optimizer_step(step)` once per step (after backward and the optimizer step, before
    the next zero_grad), and `snapshot()` / `restore()` to keep and bring back the best evaluation's state.
    """

    method: str
    model: torch.nn.Module
    modules: list[str] = field(default_factory=list)  # full paths of adapted linears (empty for prompt/full)
    peft: bool = False

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def counts(self) -> tuple[int, int]:
        """(trainable, total base parameters); base total excludes the adapter's own parameters."""
        trainable = sum(p.numel() for p in self.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        base_total = total if self.method == "full" else total - trainable
        return trainable, base_total

    def after_optimizer_step(self, step: int) -> None:
        """Per-method work once the gradients of `step` (1-based) are in and applied; nothing by default."""

    def report_details(self) -> dict:
        """Method-specific entries for train_report.json; none by default."""
        return {}

    def snapshot(self):
        return [t.detach().clone() for t in self.parameters()]

    def restore(self, state) -> None:
        with torch.no_grad():
            for t, saved in zip(self.parameters(), state, strict=True):
                t.copy_(saved)


@dataclass
class AdaLoraTrainable(Trainable):
    """AdaLoRA: peft's rank allocator scores each SVD triplet from the step's gradients and masks the least
    important ones (`update_and_allocate`); the resulting rank_pattern travels with the weights it masked."""

    def _config(self):
        return self.model.peft_config[self.model.active_adapter]

    def after_optimizer_step(self, step: int) -> None:
        # peft: "called in every training step after loss.backward() and before zero_grad()"; the gradients
        # are still there (the loop zeroes them just before the next backward)
        self.model.base_model.update_and_allocate(step)

    def snapshot(self):
        pattern = self._config().rank_pattern
        return super().snapshot(), copy.deepcopy(pattern)

    def restore(self, state) -> None:
        weights, pattern = state
        super().restore(weights)
        self._config().rank_pattern = pattern
        if pattern:  # what is saved (tensors cut to rank_pattern) is exactly what was evaluated
            self.model.base_model.rankallocator.mask_using_rank_pattern(self.model.base_model.model, pattern)


@dataclass
class AdapterHubTrainable(Trainable):
    """adapter / ah_prefix / unipelt / mam: the project's AdapterHub modules attached to the base
    (training/adapterhub/); `config` is the AdapterHub config they implement, saved with them as `name`."""

    config: dict = field(default_factory=dict)
    name: str = ""

    def report_details(self) -> dict:
        return {"adapterhub_config": self.config}


def select_modules(model: torch.nn.Module, cfg: TrainConfig) -> list[str]:
    """Full module paths of the T5 linears the method adapts (targets ∩ layers ∩ groups)."""
    selection = resolve_selection(cfg, model.config.num_layers, model.config.num_decoder_layers)
    targets = set(cfg.targets)
    if "wi" in targets:  # gated-gelu T5 (FLAN) splits wi into wi_0/wi_1
        targets |= {"wi_0", "wi_1"}
    chosen = []
    for path, module in model.named_modules():
        m = _T5_LINEAR.match(path)
        if not m or not isinstance(module, torch.nn.Linear) or m["name"] not in targets:
            continue
        kind = "feed-forward" if m["part"] == "DenseReluDense" else "attention"
        if kind in selection.kinds and selection.keeps(m["stack"], int(m["block"])):
            chosen.append(path)
    if not chosen:
        raise TrainConfigError(
            f"no T5 linear matches --target-modules {cfg.targets} with --layers {cfg.layers} and "
            f"--module-groups {sorted(cfg.module_groups) or 'all'} (e.g. feed-forward has wi_0/wi_1/wo, attention "
            "q/k/v/o)")
    return chosen


def _peft_targets(cfg: TrainConfig, modules: list[str], every: list[str]) -> list[str]:
    """Short names when every matching linear is selected (the common case); full paths otherwise."""
    return sorted({p.rsplit(".", 1)[1] for p in modules}) if modules == every else modules


def build(cfg: TrainConfig, base, total_steps: int | None = None) -> Trainable:
    """Wrap `base.model` (a LoadedBase's T5) for `cfg.method`; only the method's parameters train.

    `total_steps` (the run's planned optimizer steps) sets AdaLoRA's rank schedule; other methods ignore it.
    """
    model = base.model
    model.requires_grad_(False)
    if cfg.dropout is not None:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = cfg.dropout
    if cfg.method == "full":
        model.requires_grad_(True)
        return Trainable("full", model)
    if cfg.method == "prompt":
        return Trainable("prompt", _prompt_model(cfg, base), peft=True)
    if cfg.method == "ptuning":
        return Trainable("ptuning", _ptuning_model(cfg, base), peft=True)
    if cfg.method == "prefix":
        return Trainable("prefix", _prefix_model(cfg, base), peft=True)
    if cfg.method in ADAPTERHUB_METHODS:
        return _adapterhub_trainable(cfg, model)
    modules = select_modules(model, cfg)
    if cfg.method == "bitfit":
        add_biases(model, modules)
        return Trainable("bitfit", model, modules)
    from peft import AdaLoraConfig, IA3Config, LoraConfig, TaskType, get_peft_model

    every = select_modules(model, _all_layers(cfg))
    targets = _peft_targets(cfg, modules, every)
    if cfg.method in ("lora", "dora"):
        pcfg = LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                          lora_dropout=cfg.lora_dropout, target_modules=targets, use_dora=cfg.method == "dora")
    elif cfg.method == "adalora":
        if total_steps is None:
            raise TrainConfigError("AdaLoRA needs the run's total optimizer steps (build(..., total_steps=N))")
        pcfg = AdaLoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, init_r=cfg.init_r, target_r=cfg.target_r,
                             lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                             **adalora_schedule(total_steps))
        return AdaLoraTrainable("adalora", get_peft_model(model, pcfg), modules, peft=True)
    else:
        ff_short = set(cfg.feedforward_modules or [t for t in cfg.targets if t in ("wo", "wi", "wi_0", "wi_1")])
        if "wi" in ff_short:
            ff_short |= {"wi_0", "wi_1"}
        feedforward = [t for t in targets if t.rsplit(".", 1)[-1] in ff_short]
        pcfg = IA3Config(task_type=TaskType.SEQ_2_SEQ_LM, target_modules=targets, feedforward_modules=feedforward)
    peft_model = get_peft_model(model, pcfg)
    return Trainable(cfg.method, peft_model, modules, peft=True)


def _all_layers(cfg: TrainConfig) -> TrainConfig:
    from dataclasses import replace

    return replace(cfg, layers="all", module_groups=[], output=cfg.output)


def _prompt_model(cfg: TrainConfig, base):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    text = cfg.prompt_init == "text"
    pcfg = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=cfg.num_virtual_tokens,
        # Why 1: peft's seq2seq default (2) also trains a decoder prompt that peft's generate and the
        # server never use, so what is trained and what is served would differ.
        num_transformer_submodules=cfg.prompt_submodules,
        prompt_tuning_init=PromptTuningInit.TEXT if text else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=cfg.prompt_init_text if text else None,
        tokenizer_name_or_path=base.path if text else None,
    )
    model = get_peft_model(base.model, pcfg)
    if not text:
        # peft's random init is N(0, 1); T5's embeddings are much smaller (and the tiny base's more so).
        # Starting at the embedding scale keeps the first steps from swamping the real input.
        emb = model.word_embeddings.weight
        with torch.no_grad():
            pe = model.prompt_encoder["default"].embedding.weight
            pe.normal_(0.0, float(emb.std()))
    return model


def _ptuning_model(cfg: TrainConfig, base):
    from peft import PromptEncoderConfig, TaskType, get_peft_model

    pcfg = PromptEncoderConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,
        num_virtual_tokens=cfg.num_virtual_tokens,
        # Why 1, as for prompt tuning: peft's seq2seq forward and generate prepend only the first
        # num_virtual_tokens encoder outputs; with 2 the MLP's decoder rows never get a gradient, and the
        # LSTM's are trained only as context for the encoder rows (docs/TRAINING.md).
        num_transformer_submodules=cfg.prompt_submodules,
        encoder_reparameterization_type=cfg.encoder,
        encoder_hidden_size=cfg.encoder_hidden_size,
    )
    return get_peft_model(base.model, pcfg)


def prefix_geometry(base) -> tuple[int, int]:
    """(num_attention_heads, token_dim) of a prefix for `base` (a LoadedBase); raises on a base it cannot fit.

    token_dim is heads x d_kv, never peft's default d_model: T5 shapes where they differ (flan-t5-small:
    6 x 64 = 384, d_model 512) make peft's own forward fail to reshape the prefix. peft sizes the prefix by
    the encoder's depth (num_layers); a deeper decoder makes its forward fail, and the server refuses it.
    """
    c = base.model.config
    if c.num_decoder_layers > c.num_layers:
        raise TrainConfigError(
            f"--method prefix cannot train on base {base.name!r}: its decoder has {c.num_decoder_layers} layers "
            f"but its encoder {c.num_layers}, and peft sizes the prefix by the encoder (its forward fails on "
            "the deeper decoder, and the server refuses such a prefix); pick another method or base")
    return c.num_heads, c.num_heads * c.d_kv


def _prefix_model(cfg: TrainConfig, base):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    heads, token_dim = prefix_geometry(base)
    pcfg = PrefixTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM,  # num_transformer_submodules 2: the encoder-decoder layout served
        num_virtual_tokens=cfg.num_virtual_tokens,
        token_dim=token_dim,
        num_attention_heads=heads,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.prefix_hidden if cfg.prefix_projection else None,
    )
    return get_peft_model(base.model, pcfg)


def adapterhub_config(cfg: TrainConfig, model: torch.nn.Module) -> dict:
    """The AdapterHub config `cfg` trains on `model` (selection applied); raises on one that adapts nothing."""
    from training.adapterhub.config import selected_config

    return selected_config(cfg, model.config.num_layers, model.config.num_decoder_layers)


def _adapterhub_trainable(cfg: TrainConfig, model: torch.nn.Module) -> AdapterHubTrainable:
    from training.adapterhub.modules import attach

    config = adapterhub_config(cfg, model)
    attach(model, config, cfg.name)
    return AdapterHubTrainable(cfg.method, model, config=config, name=cfg.name)


# ---- BitFit: trainable biases on bias-free T5 linears ------------------------------------------------

def add_biases(model: torch.nn.Module, modules: list[str]) -> None:
    """Give each selected Linear a zero trainable bias (F.linear then adds it; output unchanged at init)."""
    for path in modules:
        linear = model.get_submodule(path)
        if linear.bias is not None:
            raise TrainConfigError(f"{path} already has a bias; BitFit here targets T5's bias-free linears")
        linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                     device=linear.weight.device))


def remove_biases(model: torch.nn.Module, modules: list[str]) -> None:
    """Undo add_biases, so the shared base is bias-free again after training."""
    for path in modules:
        model.get_submodule(path).bias = None


def bitfit_biases(model: torch.nn.Module, modules: list[str]) -> dict[str, torch.Tensor]:
    return {path: model.get_submodule(path).bias.detach().to("cpu", torch.float32).clone() for path in modules}


def save(trainable: Trainable, out: Path, base) -> None:
    """Write what the server (or, for full, from_pretrained) loads as-is into `out`."""
    if trainable.method == "bitfit":
        from adapters.bitfit import save_bitfit

        layers = sorted({int(_T5_LINEAR.match(p)["block"]) for p in trainable.modules})
        save_bitfit(out, bitfit_biases(trainable.model, trainable.modules), base_model_name_or_path=base.name,
                    layers_to_transform=layers, base_fingerprint=base.fingerprint)
    elif isinstance(trainable, AdapterHubTrainable):
        from training.adapterhub.layout import save as save_adapterhub

        save_adapterhub(out, trainable.model, trainable.config, trainable.name, base.name)
    elif trainable.method == "full":
        trainable.model.save_pretrained(out, safe_serialization=True)
        base.tokenizer.save_pretrained(out)
    else:
        # save_embedding_layers=False: embeddings are frozen, and "auto" would look the base up on the hub.
        trainable.model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
        # peft writes the local path it saw; the server matches adapters to bases by name.
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base.name
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))



def save_bitfit(out: Path, biases: dict[str, torch.Tensor], base_name: str) -> Path:
    """Kept for callers of the first training API (loadtests); delegates to adapters.bitfit.save_bitfit."""
    from adapters.bitfit import save_bitfit as write

    return write(out, biases, base_model_name_or_path=base_name)
