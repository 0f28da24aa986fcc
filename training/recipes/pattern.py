"""Pattern-based fine-tuning (PBFT): inputs are put into a prompt pattern, targets are verbalizer words.

`--pattern "Sentence: {input} Acceptable?" --verbalizer "acceptable=yes,unacceptable=no"`: each row's input
(after --input-field/--template) fills `{input}`; its label becomes the word. Evaluation maps generated
words back to labels, and anything that is not a verbalizer word counts as wrong. The adapter records the
pattern and verbalizer in adapter_config.json (`peftserve_input_pattern`, adapters/pattern.py); the server
fills the pattern with each raw input unless the request sets `apply_pattern: false`.
"""

from __future__ import annotations

from pathlib import Path

from training import data as D
from training.errors import DataError
from training.recipes.base import Recipe, add_to_adapter_config
from training.recipes.options import input_pattern


class PatternRecipe(Recipe):
    name = "pattern"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.pattern = input_pattern(cfg)
        self.recorded_in_adapter = False

    def patterned(self, pairs: D.TextPairs, where: str) -> D.TextPairs:
        """(pattern(input), verbalizer word of the label); a label the verbalizer lacks is an error."""
        missing = sorted(set(pairs.targets) - set(self.pattern.verbalizer))
        if missing:
            raise DataError(f"--verbalizer has no word for label(s) {missing} found in {where} "
                            f"({pairs.source_name}); it maps {sorted(self.pattern.verbalizer)}")
        return D.TextPairs([self.pattern.apply(s) for s in pairs.sources],
                           [self.pattern.word(t) for t in pairs.targets], pairs.source_name)

    def prepare_data(self, train, ev, ood):
        return (self.patterned(train, "--train"), self.patterned(ev, "--eval"),
                {name: self.patterned(p, f"--eval-ood {name}") for name, p in ood.items()})

    def score(self, task, predictions, pairs):
        return label_accuracy(self.pattern, predictions, [self.pattern.label_of(t) for t in pairs.targets])

    def after_save(self, out: Path) -> None:
        from adapters.pattern import CONFIG_KEY

        self.recorded_in_adapter = add_to_adapter_config(out, {CONFIG_KEY: self.pattern.to_dict()})

    def report(self) -> dict:
        return {"input_pattern": {**self.pattern.to_dict(), "recorded_in_adapter": self.recorded_in_adapter}}


def label_accuracy(pattern, predictions: list[str], labels: list[str]) -> dict:
    """Each generated word mapped back to its label; any text that is not a verbalizer word is wrong."""
    hits = sum(pattern.label_of(p) == str(g) for p, g in zip(predictions, labels, strict=True))
    words = sum(pattern.label_of(p) is not None for p in predictions)
    return {"metric": "accuracy", "value": hits / max(1, len(labels)), "rows": len(labels),
            "verbalizer_word_rate": words / max(1, len(labels))}
