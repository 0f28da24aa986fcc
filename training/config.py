"""One training config: data, loop hyper-parameters and per-method options, validated before any work.

Validation happens in two steps, both before the first optimizer step: `TrainConfig.validate()` checks
what needs no model (ranges, paths, output dir); `methods.select_modules` checks layer/module selections
against the loaded base.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from training.errors import OutputExistsError, TrainConfigError

# AdapterHub's bottleneck adapter, prefix tuning, UniPELT and MAM, built by training/adapterhub/ (own torch code)
ADAPTERHUB_METHODS = ("adapter", "ah_prefix", "unipelt", "mam")
METHODS = ("lora", "dora", "adalora", "ia3", "bitfit", "prompt", "ptuning", "prefix", *ADAPTERHUB_METHODS, "full")
LORA_FAMILY = ("lora", "dora", "adalora")  # the LoRA flags (--lora-*, --target-modules) apply to all three
PROMPT_METHODS = ("prompt", "ptuning")  # soft prompts on the encoder input
VIRTUAL_TOKEN_METHODS = (*PROMPT_METHODS, "prefix")  # --num-virtual-tokens; nothing selected per layer
SELECTABLE = ("lora", "dora", "adalora", "ia3", "bitfit")  # methods whose linears --layers/--module-groups pick
ADAPTERHUB_PREFIX_METHODS = ("ah_prefix", "unipelt", "mam")  # the AdapterHub methods with a prefix
ADAPTER_ARCHS = ("seq_bn", "double_seq_bn", "par_bn")  # --adapter-arch: AdapterHub's bottleneck configs
PTUNING_ENCODERS = ("MLP", "LSTM")  # peft's PromptEncoderReparameterizationType
TASKS = ("auto", "classification", "generation")
MODULE_GROUPS = ("attention", "feed-forward", "encoder", "decoder")
T5_LINEARS = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo")

# Defaults per method: what the method's papers use, scaled for short runs.
DEFAULT_TARGETS = {
    "lora": ["q", "v"],
    "dora": ["q", "v"],
    "adalora": ["q", "v"],
    "ia3": ["k", "v", "wo"],
    "bitfit": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
}
DEFAULT_LR = {"lora": 1e-3, "dora": 1e-3, "adalora": 1e-2, "ia3": 1e-2, "bitfit": 1e-2, "prompt": 3e-1,
              "ptuning": 1e-2, "prefix": 3e-2, "adapter": 1e-3, "ah_prefix": 1e-3, "unipelt": 1e-3, "mam": 1e-3,
              "full": 3e-4}
# --num-virtual-tokens when not given: AdapterHub's prefix_length for its methods (PrefixTuningConfig: 30,
# UniPELTConfig: 10, MAMConfig: 30); 20 for the peft soft prompts and prefix
DEFAULT_VIRTUAL_TOKENS = {"ah_prefix": 30, "unipelt": 10, "mam": 30}
# AdaLoRA: rank schedule as fractions of the run's optimizer steps (peft's tinit / tfinal / deltaT)
ADALORA_DEFAULT_INIT_R = 12
ADALORA_TINIT, ADALORA_TFINAL, ADALORA_DELTA_T = 0.1, 0.2, 1
ADALORA_MIN_STEPS = 2  # one importance update before the final allocation
PREFIX_DEFAULT_HIDDEN = 128  # prefix tuning's projection MLP width (--prefix-hidden-size)
PREFIX_PROJECTION_LR = 3e-3  # the default with --prefix-projection: the MLP is unstable at the plain 3e-2


@dataclass
class TrainConfig:
    method: str
    train: str
    output: Path
    eval: str | None = None
    base: str | None = None  # None: the embedded base
    # data
    input_field: str = "input"
    target_field: str = "target"
    template: str | None = None  # e.g. "Review: {text}" (any column by name)
    task: str = "auto"  # classification -> exact match; generation -> ROUGE-L
    max_train_samples: int | None = None
    max_eval_samples: int | None = 200
    max_source_length: int = 256
    max_target_length: int = 64
    # loop
    max_steps: int | None = None
    epochs: float | None = None  # used when max_steps is None (default 3)
    learning_rate: float | None = None  # None: DEFAULT_LR[method]
    batch_size: int = 8
    seed: int = 0
    eval_every: int | None = None  # None: about 10 evaluations per run
    patience: int = 3  # evaluations without improvement before early stopping; 0 disables
    stop_at_metric: float | None = None  # stop as soon as the eval metric reaches this (e.g. 1.0)
    device: str = "auto"  # auto: cuda when available, else cpu
    dropout: float | None = None  # override the base's dropout rate while training (None: keep it)
    threads: int | None = None  # CPU threads for torch (None: torch's default); 1 is fastest on busy machines
    eval_batch_size: int = 32
    # method options
    target_modules: list[str] | None = None  # short names (q, v, wo, ...); None: DEFAULT_TARGETS
    feedforward_modules: list[str] | None = None  # (IA)3: targets scaled on the input side
    layers: str = "all"  # "all", "first:N", "last:N" or "0,2,3"
    module_groups: list[str] = field(default_factory=list)  # subset of MODULE_GROUPS; empty = all
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    num_virtual_tokens: int | None = None  # None: DEFAULT_VIRTUAL_TOKENS[method], else 20 (set in __post_init__)
    prompt_init: str = "random"  # "random" or "text"
    prompt_init_text: str | None = None
    prompt_submodules: int = 1  # 1: encoder soft prompt only (as served); 2: peft's seq2seq default
    adalora_init_r: int | None = None  # AdaLoRA's rank before pruning (None: ADALORA_DEFAULT_INIT_R)
    adalora_target_r: int | None = None  # AdaLoRA's average rank after pruning (None: lora_rank)
    ptuning_encoder: str | None = None  # P-tuning's prompt encoder, MLP or LSTM (None: MLP)
    ptuning_hidden_size: int | None = None  # P-tuning's encoder hidden size (None: 128)
    prefix_projection: bool = False  # prefix tuning: train the prefix through an MLP (saved: its output)
    prefix_hidden_size: int | None = None  # that MLP's hidden size (None: PREFIX_DEFAULT_HIDDEN; AdapterHub's
    #                                        bottleneck_size for ah_prefix/unipelt/mam, None: 512, mam 800)
    adapter_arch: str | None = None  # --method adapter: one of ADAPTER_ARCHS (None: seq_bn)
    reduction_factor: float | None = None  # bottleneck d_model / size (None: AdapterHub's per arch, 16/16/2)
    # recipes (training/recipes/): how the task is trained, on top of any method; checked in recipes/options.py
    recipe: str = "vanilla"  # vanilla | pattern | distill | adaptive
    pattern: str | None = None  # pattern: the prompt pattern, with {input}
    verbalizer: str | None = None  # pattern: "label=word,label=word"
    context: str | None = None  # distill: the text the teacher sees before each input
    context_file: str | None = None  # distill: the context read from a file
    shots: int | None = None  # distill: few-shot demonstrations from the training rows in the teacher's context
    teacher: str | None = None  # distill: a teacher model (hub id or T5 dir; default: the base)
    teacher_adapter: str | None = None  # distill: the base plus this PEFT adapter as the teacher
    domain_text: str | None = None  # adaptive: unlabelled in-domain text (one document per line)
    adaptive_steps: int | None = None  # adaptive: span-corruption steps before the task (None: 100)
    eval_ood: list[str] = field(default_factory=list)  # out-of-domain eval sets, "NAME=FILE" or "FILE"
    # output
    overwrite: bool = False
    adapter_name: str | None = None  # default: the output dir's name
    register: str | None = None  # server URL to register the adapter with when done
    register_token: str | None = None
    progress: bool = True

    def __post_init__(self):
        self.output = Path(self.output)
        for name in ("module_groups", "target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if isinstance(value, str):  # "q,v" from the CLI or YAML
                setattr(self, name, [x.strip() for x in value.split(",") if x.strip()])
        if isinstance(self.eval_ood, str):
            self.eval_ood = [self.eval_ood]
        if self.num_virtual_tokens is None:  # resolved here: the report and model card show the length used
            self.num_virtual_tokens = DEFAULT_VIRTUAL_TOKENS.get(self.method, 20)

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        if self.method == "prefix" and self.prefix_projection is True:
            return PREFIX_PROJECTION_LR
        return DEFAULT_LR[self.method]

    @property
    def targets(self) -> list[str]:
        return list(self.target_modules or DEFAULT_TARGETS.get(self.method, []))

    @property
    def init_r(self) -> int:
        return self.adalora_init_r if self.adalora_init_r is not None else ADALORA_DEFAULT_INIT_R

    @property
    def target_r(self) -> int:
        return self.adalora_target_r if self.adalora_target_r is not None else self.lora_rank

    @property
    def encoder(self) -> str:
        return str(self.ptuning_encoder or "MLP").upper()

    @property
    def encoder_hidden_size(self) -> int:
        return self.ptuning_hidden_size if self.ptuning_hidden_size is not None else 128

    @property
    def prefix_hidden(self) -> int:
        return self.prefix_hidden_size if self.prefix_hidden_size is not None else PREFIX_DEFAULT_HIDDEN

    @property
    def name(self) -> str:
        return self.adapter_name or self.output.name

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = str(self.output)
        d["register_token"] = None  # never write a secret into the report
        return d

    def validate(self) -> TrainConfig:
        """Raise TrainConfigError / OutputExistsError with a message that says what to fix."""
        if self.method not in METHODS:
            _bad(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.task not in TASKS:
            _bad(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        _check_range("--learning-rate", self.lr, 0, 10, low_open=True)
        from training.recipes.options import validate_recipe  # plain Python, like this module

        validate_recipe(self)
        _check_range("--batch-size", self.batch_size, 1, 4096)
        _check_range("--eval-batch-size", self.eval_batch_size, 1, 4096)
        if self.max_steps is not None:
            _check_range("--max-steps", self.max_steps, 1, 10_000_000)
        if self.epochs is not None:
            _check_range("--epochs", self.epochs, 0, 10_000, low_open=True)
        if self.eval_every is not None:
            _check_range("--eval-every", self.eval_every, 1, 10_000_000)
        _check_range("--patience", self.patience, 0, 1000)
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None:
                _check_range("--" + name.replace("_", "-"), value, 1, 10**9)
        _check_range("--max-source-length", self.max_source_length, 1, 65536)
        _check_range("--max-target-length", self.max_target_length, 1, 65536)
        _check_range("--lora-rank", self.lora_rank, 1, 1024)
        _check_range("--lora-alpha", self.lora_alpha, 0, 1e6, low_open=True)
        _check_range("--lora-dropout", self.lora_dropout, 0, 1, high_open=True)
        if self.dropout is not None:
            _check_range("--dropout", self.dropout, 0, 1, high_open=True)
        _check_range("--num-virtual-tokens", self.num_virtual_tokens, 1, 1024)
        if self.prompt_submodules not in (1, 2):
            _bad(f"--prompt-submodules must be 1 (encoder prompt, as served) or 2, got {self.prompt_submodules}")
        if self.prompt_init not in ("random", "text"):
            _bad(f"--prompt-init must be 'random' or 'text', got {self.prompt_init!r}")
        if self.prompt_init == "text" and not (self.prompt_init_text or "").strip():
            _bad("--prompt-init text needs --prompt-init-text 'some words describing the task'")
        unknown = [t for t in self.targets if t not in T5_LINEARS]
        if unknown:
            _bad(f"unknown target module(s) {unknown}; T5 linears are {', '.join(T5_LINEARS)}")
        if self.method in DEFAULT_TARGETS and not self.targets:
            _bad(f"--target-modules is empty; {self.method} needs at least one of {', '.join(T5_LINEARS)}")
        if self.feedforward_modules:
            extra = sorted(set(self.feedforward_modules) - set(self.targets))
            if self.method != "ia3":
                _bad("--feedforward-modules applies to --method ia3 only")
            if extra:
                _bad(f"--feedforward-modules {extra} must also be in --target-modules {self.targets}")
        bad_groups = [g for g in self.module_groups if g not in MODULE_GROUPS]
        if bad_groups:
            _bad(f"unknown module group(s) {bad_groups}; choose from {', '.join(MODULE_GROUPS)}")
        if self.method in VIRTUAL_TOKEN_METHODS and (self.layers != "all" or self.module_groups):
            _bad(f"--layers/--module-groups do not apply to --method {self.method} (its virtual tokens are not "
                 "selected per layer)")
        self._validate_new_methods()
        self._validate_adapterhub()
        parse_layers(self.layers, num_layers=None)
        check_output_dir(self.output, self.overwrite)
        return self


    def _validate_new_methods(self) -> None:
        """DoRA / AdaLoRA / P-tuning / prefix options: each flag only with its method, ranks and sizes in range."""
        if self.prompt_submodules != 1 and self.method not in PROMPT_METHODS:
            _bad("--prompt-submodules applies to --method prompt or ptuning only")
        if self.method in ("ptuning", "prefix") and self.prompt_init != "random":
            _bad(f"--prompt-init text applies to --method prompt only (--method {self.method} starts from random "
                 "virtual-token embeddings)")
        for flag, value in (("--adalora-init-r", self.adalora_init_r), ("--adalora-target-r", self.adalora_target_r)):
            if value is not None and self.method != "adalora":
                _bad(f"{flag} applies to --method adalora only (got --method {self.method})")
        for flag, value in (("--ptuning-encoder", self.ptuning_encoder),
                            ("--ptuning-hidden-size", self.ptuning_hidden_size)):
            if value is not None and self.method != "ptuning":
                _bad(f"{flag} applies to --method ptuning only (got --method {self.method})")
        if self.prefix_projection is not False and self.method != "prefix":
            _bad(f"--prefix-projection applies to --method prefix only (got --method {self.method})")
        if self.prefix_hidden_size is not None and not (self.method == "prefix" and self.prefix_projection is True
                                                        or self.method in ADAPTERHUB_PREFIX_METHODS):
            _bad("--prefix-hidden-size applies to --method prefix with --prefix-projection only (it is the "
                 "projection MLP's width), or to ah_prefix/unipelt/mam (the prefix MLP's bottleneck_size)")
        if self.method == "adalora":
            _check_range("--adalora-init-r", self.init_r, 1, 1024)
            _check_range("--adalora-target-r", self.target_r, 1, 1024)
            if self.target_r >= self.init_r:
                source = "--adalora-target-r" if self.adalora_target_r is not None else "--lora-rank"
                _bad(f"AdaLoRA prunes from --adalora-init-r {self.init_r} down to {source} {self.target_r}: the "
                     f"target rank must be below the initial rank (raise --adalora-init-r or lower {source})")
            if self.max_steps is not None and self.max_steps < ADALORA_MIN_STEPS:
                _bad(f"--method adalora needs --max-steps >= {ADALORA_MIN_STEPS} (its rank schedule warms up, "
                     f"prunes, then fixes the ranks), got {self.max_steps}")
        if self.method == "ptuning":
            if not isinstance(self.encoder, str) or self.encoder not in PTUNING_ENCODERS:
                _bad(f"--ptuning-encoder must be {' or '.join(PTUNING_ENCODERS)}, got {self.ptuning_encoder!r}")
            _check_range("--ptuning-hidden-size", self.encoder_hidden_size, 1, 65536)
        if self.method == "prefix":
            if not isinstance(self.prefix_projection, bool):
                _bad(f"--prefix-projection is a switch (true or false), got {self.prefix_projection!r}")
            _check_range("--prefix-hidden-size", self.prefix_hidden, 1, 65536)

    def _validate_adapterhub(self) -> None:
        """adapter / ah_prefix / unipelt / mam options; the layer selection is checked against the base later."""
        if self.adapter_arch is not None:
            if self.method != "adapter":
                _bad(f"--adapter-arch applies to --method adapter only (got --method {self.method})")
            if self.adapter_arch not in ADAPTER_ARCHS:
                _bad(f"--adapter-arch must be one of {', '.join(ADAPTER_ARCHS)}, got {self.adapter_arch!r}")
        if self.reduction_factor is not None:
            if self.method not in ("adapter", "unipelt", "mam"):
                _bad(f"--reduction-factor applies to --method adapter, unipelt or mam only (got --method {self.method})")
            _check_range("--reduction-factor", self.reduction_factor, 0, 1e6, low_open=True)
        if self.method not in ADAPTERHUB_METHODS:
            return
        if self.target_modules or self.feedforward_modules:
            _bad(f"--target-modules/--feedforward-modules do not apply to --method {self.method} (AdapterHub places "
                 "its modules by config: bottleneck adapters per sublayer, LoRA on q and v)")
        if self.method == "ah_prefix" and (self.layers != "all" or self.module_groups):
            _bad("--layers/--module-groups do not apply to --method ah_prefix: AdapterHub's T5 shares layer 0's "
                 "position bias only across layers whose keys carry the prefix, so the prefix spans every layer")
        if "." in self.name:
            _bad(f"adapter name {self.name!r} contains '.', which AdapterHub's weight names cannot hold; pass --name "
                 "or choose an output directory name without dots")
        if self.method in ADAPTERHUB_PREFIX_METHODS and self.prefix_hidden_size is not None:
            _check_range("--prefix-hidden-size", self.prefix_hidden_size, 1, 65536)


def adalora_schedule(total_steps: int) -> dict:
    """peft's AdaLoraConfig schedule for a run of `total_steps` optimizer steps: warm up for the first 10%
    (tinit), prune towards the target rank until the last 20% (tfinal), then keep the ranks fixed."""
    if total_steps < ADALORA_MIN_STEPS:
        _bad(f"--method adalora needs at least {ADALORA_MIN_STEPS} optimizer steps, this run plans {total_steps}; "
             "raise --max-steps or --epochs")
    return {"total_step": total_steps, "tinit": int(ADALORA_TINIT * total_steps),
            "tfinal": int(ADALORA_TFINAL * total_steps), "deltaT": ADALORA_DELTA_T}


def parse_layers(spec: str, num_layers: int | None) -> list[int] | None:
    """'all' -> None (every layer); 'first:N' / 'last:N' / '0,2,3' -> sorted layer indices.

    With num_layers=None only the syntax is checked (the base is not loaded yet).
    """
    spec = (spec or "all").strip()
    if spec == "all":
        return None
    try:
        if spec.startswith(("first:", "last:")):
            kind, n = spec.split(":", 1)
            n = int(n)
            if n < 1:
                raise ValueError
            if num_layers is None:
                return []
            if n > num_layers:
                _bad(f"--layers {spec}: the base has only {num_layers} layers per stack")
            return list(range(n)) if kind == "first" else list(range(num_layers - n, num_layers))
        indices = sorted({int(x) for x in spec.split(",") if x.strip()})
        if not indices or min(indices) < 0:
            raise ValueError
    except ValueError:
        _bad(f"--layers must be 'all', 'first:N', 'last:N' or a list like '0,2,3' (N >= 1), got {spec!r}")
    if num_layers is not None and max(indices) >= num_layers:
        _bad(f"--layers {spec}: layer {max(indices)} does not exist; the base has layers 0..{num_layers - 1}")
    return indices


@dataclass(frozen=True)
class Selection:
    """What --layers/--module-groups keep: block indices per stack (None: all), stacks, and sublayer kinds."""

    layers: list[int] | None
    stacks: frozenset[str]
    kinds: frozenset[str]

    def keeps(self, stack: str, block: int) -> bool:
        return stack in self.stacks and (self.layers is None or block in self.layers)


def resolve_selection(cfg: TrainConfig, num_layers: int, num_decoder_layers: int) -> Selection:
    """The selection against a base with these depths; raises on a layer the base does not have."""
    layers = parse_layers(cfg.layers, num_layers)
    if layers is not None and max(layers, default=0) >= num_decoder_layers:
        _bad(f"--layers {cfg.layers}: the decoder has only {num_decoder_layers} layers")
    groups = set(cfg.module_groups)
    stacks = {g for g in groups if g in ("encoder", "decoder")} or {"encoder", "decoder"}
    kinds = {g for g in groups if g in ("attention", "feed-forward")} or {"attention", "feed-forward"}
    return Selection(layers, frozenset(stacks), frozenset(kinds))


def check_output_dir(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"--output {output} exists and is a file; choose a directory path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputExistsError(f"--output {output} exists and is not empty; pass --overwrite to replace it "
                                "or choose another directory")


def _check_range(name, value, low, high, low_open=False, high_open=False) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        _bad(f"{name} must be a number, got {value!r}")
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if too_low or too_high:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        _bad(f"{name} must be in {lo}{low}, {high}{hi}, got {value}")


def _bad(message: str):
    raise TrainConfigError(message)
