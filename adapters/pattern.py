"""An adapter's input pattern (pattern-based fine-tuning): the prompt pattern it was trained under and its
verbalizer (label -> the word the model answers), recorded in adapter_config.json.

Pure Python, shared by the trainer (which validates `--pattern/--verbalizer` and writes the record) and the
server (which validates the record at registration and applies the pattern to raw inputs). The pattern is
filled by plain substitution of every `{input}`, so other braces and braces in the input stay literal.
"""

from __future__ import annotations

from dataclasses import dataclass

CONFIG_KEY = "peftserve_input_pattern"  # in adapter_config.json: {"pattern": str, "verbalizer": {label: word}}
PLACEHOLDER = "{input}"


class PatternError(ValueError):
    """A pattern or verbalizer that cannot be used; the message says what to fix."""


@dataclass(frozen=True)
class InputPattern:
    pattern: str
    verbalizer: dict[str, str]  # label -> word; one word per label, distinct words

    def __post_init__(self):
        check_pattern(self.pattern)
        check_verbalizer(self.verbalizer)

    def apply(self, text: str) -> str:
        return self.pattern.replace(PLACEHOLDER, text)

    def word(self, label: str) -> str:
        return self.verbalizer[label]

    def label_of(self, word: str) -> str | None:
        """The label a generated word stands for; None for anything that is not a verbalizer word."""
        stripped = word.strip()
        return next((label for label, w in self.verbalizer.items() if w == stripped), None)

    def to_dict(self) -> dict:
        return {"pattern": self.pattern, "verbalizer": dict(self.verbalizer)}

    @classmethod
    def from_dict(cls, d: dict) -> InputPattern:
        if not isinstance(d, dict) or not isinstance(d.get("pattern"), str) or not isinstance(d.get("verbalizer"), dict):
            raise PatternError(f"{CONFIG_KEY} must be {{'pattern': str, 'verbalizer': {{label: word}}}}, got {d!r}")
        return cls(d["pattern"], {str(k): v for k, v in d["verbalizer"].items()})


def check_pattern(pattern: str) -> None:
    if not isinstance(pattern, str) or PLACEHOLDER not in pattern:
        raise PatternError(f"pattern {pattern!r} has no {PLACEHOLDER} placeholder; write where the input goes, "
                           f"e.g. 'Sentence: {PLACEHOLDER} Acceptable?'")


def check_verbalizer(verbalizer: dict[str, str]) -> None:
    if not verbalizer:
        raise PatternError("the verbalizer is empty; map every label to a word, e.g. 'acceptable=yes,unacceptable=no'")
    for label, word in verbalizer.items():
        if not isinstance(word, str) or not word.strip() or word != word.strip():
            raise PatternError(f"verbalizer word for label {label!r} must be a non-empty word without surrounding "
                               f"spaces, got {word!r}")
    seen: dict[str, str] = {}
    for label, word in verbalizer.items():
        if word in seen:
            raise PatternError(f"verbalizer maps labels {seen[word]!r} and {label!r} to the same word {word!r}; "
                               "each label needs its own word (evaluation maps words back to labels)")
        seen[word] = label


def parse_verbalizer(spec: str) -> dict[str, str]:
    """'acceptable=yes,unacceptable=no' -> {'acceptable': 'yes', 'unacceptable': 'no'} (validated)."""
    out: dict[str, str] = {}
    for item in (spec or "").split(","):
        if not item.strip():
            continue
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise PatternError(f"verbalizer entry {item.strip()!r} is not 'label=word' (e.g. 'acceptable=yes')")
        if label.strip() in out:
            raise PatternError(f"verbalizer lists label {label.strip()!r} twice")
        out[label.strip()] = word.strip()
    check_verbalizer(out)
    return out


def read_pattern(config: dict) -> InputPattern | None:
    """The pattern recorded in an adapter_config.json dict, validated; None when it records none."""
    record = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    return None if record is None else InputPattern.from_dict(record)
