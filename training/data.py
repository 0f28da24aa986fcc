"""Data via `datasets`: local JSONL/CSV or a hub dataset id, fields + template, validated, tokenized.

Everything is checked here before training starts: the file exists and has rows, the fields (or the
template's placeholders) exist, targets are non-empty. Rows become (source text, target text) pairs.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from training.errors import DataError

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataclass
class TextPairs:
    """Rows as (source, target) text pairs; `source_name` says where they came from."""

    sources: list[str]
    targets: list[str]
    source_name: str

    def __len__(self) -> int:
        return len(self.sources)

    @property
    def label_set(self) -> list[str]:
        return sorted(set(self.targets))


def load_rows(spec: str, split: str = "train"):
    """A `datasets.Dataset` from a local .jsonl/.json/.csv file or a hub dataset id, `name[@config][:split]`
    (e.g. `nyu-mll/glue@mnli:validation_mismatched`: GLUE's MNLI, its out-of-domain dev set)."""
    import datasets

    path = Path(spec).expanduser()
    looks_local = path.suffix.lower() in LOCAL_FORMATS or spec.startswith((".", "/", "~")) or path.exists()
    if looks_local:
        if not path.is_file():
            raise DataError(f"data file {spec} does not exist (expected a .jsonl, .json or .csv file)")
        fmt = LOCAL_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"data file {spec}: unsupported extension {path.suffix!r}; use .jsonl, .json or .csv")
        if path.stat().st_size == 0:
            raise DataError(f"data file {spec} is empty; it needs at least one row")
        try:
            return datasets.load_dataset(fmt, data_files=str(path), split="train", keep_in_memory=True)
        except Exception as e:  # malformed JSON/CSV surfaces as various pyarrow/datasets errors
            raise DataError(f"could not read {spec} as {fmt.upper()}: {str(e).splitlines()[0][:300]}") from None
    name, _, hub_split = spec.partition(":")
    name, _, config = name.partition("@")
    try:
        return datasets.load_dataset(name, config or None, split=hub_split or split)
    except Exception as e:
        raise DataError(f"could not load hub dataset {spec!r} (offline, or no such dataset/split?): "
                        f"{str(e).splitlines()[0][:300]}. Use a local .jsonl/.csv file instead.") from None


def template_fields(template: str) -> list[str]:
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f]
    except ValueError as e:
        raise DataError(f"--template {template!r} is not a valid format string: {e}") from None


def to_pairs(rows, spec: str, input_field: str, target_field: str, template: str | None,
             max_samples: int | None = None, seed: int = 0, require_targets: bool = True) -> TextPairs:
    """Build (source, target) pairs; a random subset of `max_samples` rows under a fixed seed.

    require_targets=False (context distillation): the target column may be absent or empty ('' then)."""
    columns = list(rows.column_names)
    needed = template_fields(template) if template else [input_field]
    missing = [f for f in [*needed, *([target_field] if require_targets else [])] if f not in columns]
    if missing:
        flag = "--template placeholders" if template and set(missing) - {target_field} else "fields"
        raise DataError(f"{spec}: {flag} {missing} not found; the data has columns {columns} "
                        "(set --input-field/--target-field/--template)")
    if len(rows) == 0:
        raise DataError(f"{spec} has no rows")
    indices = list(range(len(rows)))
    if max_samples is not None and max_samples < len(indices):
        indices = sorted(random.Random(seed).sample(indices, max_samples))
        rows = rows.select(indices)
    sources, targets = [], []
    for i, row in enumerate(rows):
        target = row.get(target_field)
        if not require_targets and (target is None or not str(target).strip()):
            target = ""
        elif target is None or not str(target).strip():
            raise DataError(f"{spec}: row {i} has an empty {target_field!r}; every row needs a target")
        source = template.format(**row) if template else row[input_field]
        if source is None or not str(source).strip():
            raise DataError(f"{spec}: row {i} has an empty input; check --input-field/--template")
        sources.append(str(source))
        targets.append(str(target).strip())
    return TextPairs(sources, targets, spec)


def load_pairs(spec: str, input_field="input", target_field="target", template=None,
               max_samples=None, seed=0, split="train", require_targets=True) -> TextPairs:
    return to_pairs(load_rows(spec, split), spec, input_field, target_field, template, max_samples, seed,
                    require_targets)


def split_eval(pairs: TextPairs, fraction: float = 0.1, seed: int = 0) -> tuple[TextPairs, TextPairs]:
    """Hold out a fixed-seed fraction of the training rows when no --eval file is given."""
    if len(pairs) < 2:
        raise DataError(f"{pairs.source_name} has {len(pairs)} row(s); give --eval or at least 2 training rows")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, int(len(pairs) * fraction))
    ev, tr = order[:n_eval], order[n_eval:]

    def pick(idx):
        return TextPairs([pairs.sources[i] for i in idx], [pairs.targets[i] for i in idx], pairs.source_name)

    return pick(tr), pick(ev)


def infer_task(train: TextPairs, task: str) -> str:
    """'classification' when targets come from a small label set of short strings, else 'generation'."""
    if task != "auto":
        return task
    labels = train.label_set
    short = all(len(t.split()) <= 3 for t in labels)
    few = len(labels) <= max(2, min(50, len(train) // 4))
    return "classification" if short and few else "generation"


def check_labels(train: TextPairs, task: str) -> None:
    if task == "classification" and len(train.label_set) < 2:
        raise DataError(f"{train.source_name}: classification needs at least 2 distinct labels, found "
                        f"{train.label_set}; check --target-field or use --task generation")


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # -100 on padding


def encode_pairs(tokenizer, pairs: TextPairs, max_source_length: int, max_target_length: int) -> list[tuple]:
    """Tokenize once up front: a list of (source_ids, target_ids) with EOS, truncated."""
    src = tokenizer(pairs.sources, truncation=True, max_length=max_source_length)["input_ids"]
    tgt = tokenizer(pairs.targets, truncation=True, max_length=max_target_length)["input_ids"]
    return list(zip(src, tgt, strict=True))


def collate(examples: list[tuple], pad_id: int) -> Batch:
    src_len = max(len(s) for s, _ in examples)
    tgt_len = max(len(t) for _, t in examples)
    input_ids = torch.full((len(examples), src_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), src_len), dtype=torch.long)
    labels = torch.full((len(examples), tgt_len), -100, dtype=torch.long)
    for i, (s, t) in enumerate(examples):
        input_ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, : len(t)] = torch.tensor(t)
    return Batch(input_ids, mask, labels)


def batches(encoded: list[tuple], batch_size: int, pad_id: int, seed: int):
    """An endless stream of shuffled batches (a new fixed-seed order every epoch)."""
    rng = random.Random(seed)
    epoch = 0
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield epoch, collate([encoded[i] for i in order[start:start + batch_size]], pad_id)
        epoch += 1
