"""Recipe options, checked before any data or model is loaded (called from `TrainConfig.validate`).

What needs the data (a verbalizer missing a label, more shots than training rows) or the base (a teacher
with another vocabulary, a tokenizer without sentinels) is checked in each recipe's `prepare`, still before
the first optimizer step.
"""

from __future__ import annotations

from pathlib import Path

from training.errors import TrainConfigError

RECIPES = ("vanilla", "pattern", "distill", "adaptive")
# which options belong to which recipe: one given to another recipe is an error, not silently ignored
RECIPE_OPTIONS = {
    "pattern": ("pattern", "verbalizer"),
    "distill": ("context", "context_file", "shots", "teacher", "teacher_adapter"),
    "adaptive": ("domain_text", "adaptive_steps"),
}
DEFAULT_ADAPTIVE_STEPS = 100


def flag(option: str) -> str:
    return "--" + option.replace("_", "-")


def validate_recipe(cfg) -> None:
    if cfg.recipe not in RECIPES:
        _bad(f"--recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
    for recipe, options in RECIPE_OPTIONS.items():
        given = [flag(o) for o in options if getattr(cfg, o) is not None]
        if given and cfg.recipe != recipe:
            _bad(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --recipe {recipe} only "
                 f"(got --recipe {cfg.recipe})")
    parse_ood(cfg.eval_ood)
    {"pattern": _pattern, "distill": _distill, "adaptive": _adaptive}.get(cfg.recipe, lambda c: None)(cfg)


def parse_ood(specs: list[str]) -> dict[str, str]:
    """["ood=cola/ood_dev.jsonl", "x.jsonl"] -> {"ood": "cola/ood_dev.jsonl", "x": "x.jsonl"} (names unique)."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, source = str(spec).partition("=")
        if not sep:
            name, source = Path(spec).stem, spec
        if not name.strip() or not source.strip():
            _bad(f"--eval-ood {spec!r}: give FILE or NAME=FILE")
        if name in out:
            _bad(f"--eval-ood name {name!r} is given twice; name each set: --eval-ood NAME=FILE")
        out[name.strip()] = source.strip()
    return out


def input_pattern(cfg):
    """The validated `adapters.pattern.InputPattern` of a pattern run."""
    from adapters.pattern import InputPattern, PatternError, parse_verbalizer

    try:
        return InputPattern(cfg.pattern, parse_verbalizer(cfg.verbalizer))
    except PatternError as e:
        raise TrainConfigError(f"--pattern/--verbalizer: {e}") from None


def context_text(cfg) -> str:
    """The distillation context from --context or --context-file ('' when only --shots builds it)."""
    if cfg.context_file is not None:
        path = Path(cfg.context_file).expanduser()
        if not path.is_file():
            _bad(f"--context-file {cfg.context_file} does not exist")
        return path.read_text(encoding="utf-8").strip()
    return (cfg.context or "").strip()


def adaptive_steps(cfg) -> int:
    return cfg.adaptive_steps if cfg.adaptive_steps is not None else DEFAULT_ADAPTIVE_STEPS


def _pattern(cfg) -> None:
    if cfg.pattern is None or cfg.verbalizer is None:
        _bad("--recipe pattern needs --pattern 'TEXT {input} TEXT' and --verbalizer 'label=word,label=word'")
    input_pattern(cfg)


def _distill(cfg) -> None:
    if cfg.context is not None and cfg.context_file is not None:
        _bad("give --context or --context-file, not both")
    if cfg.context is None and cfg.context_file is None and cfg.shots is None:
        _bad("--recipe distill needs the teacher's context: --context TEXT, --context-file FILE and/or --shots K")
    if (cfg.context is not None or cfg.context_file is not None) and not context_text(cfg):
        source = f"--context-file {cfg.context_file}" if cfg.context_file is not None else "--context"
        _bad(f"{source} is empty; the teacher needs a non-empty context to distill")
    if cfg.shots is not None and (not isinstance(cfg.shots, int) or cfg.shots < 1):
        _bad(f"--shots must be a whole number >= 1, got {cfg.shots!r}")
    if cfg.teacher is not None and cfg.teacher_adapter is not None:
        _bad("give --teacher (a whole model) or --teacher-adapter (the base plus an adapter), not both")
    if cfg.teacher_adapter is not None and not (Path(cfg.teacher_adapter).expanduser() / "adapter_config.json").is_file():
        _bad(f"--teacher-adapter {cfg.teacher_adapter} is not an adapter directory (no adapter_config.json)")


def _adaptive(cfg) -> None:
    if cfg.domain_text is None:
        _bad("--recipe adaptive needs --domain-text FILE (unlabelled in-domain text, one document per line)")
    path = Path(cfg.domain_text).expanduser()
    if not path.is_file():
        _bad(f"--domain-text {cfg.domain_text} does not exist")
    if not path.read_text(encoding="utf-8").strip():
        _bad(f"--domain-text {cfg.domain_text} is empty")
    if not isinstance(adaptive_steps(cfg), int) or not 1 <= adaptive_steps(cfg) <= 10_000_000:
        _bad(f"--adaptive-steps must be a whole number >= 1, got {cfg.adaptive_steps!r}")


def _bad(message: str):
    raise TrainConfigError(message)
