"""Small tasks generated in code (fixed seeds), for the demo adapters and tests on the untrained embedded base.

The embedded base is random, so a task must be learnable from scratch by a small adapter in a few hundred
steps: the answer is decided by one keyword in the input, and the target is one short word.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["the movie", "this phone", "our trip", "the soup", "that book", "the hotel", "my new bike",
            "the concert", "this game", "the class", "the coffee", "her song"]
POSITIVE = ["great", "lovely", "superb", "wonderful", "amazing", "brilliant"]
NEGATIVE = ["awful", "boring", "terrible", "horrid", "dreadful", "lousy"]
TOPICS = {
    "sport": ["football", "tennis", "the match", "a goal", "the coach"],
    "food": ["pasta", "a pizza", "the bread", "some cheese", "the salad"],
    "weather": ["the rain", "a storm", "the snow", "some sun", "the wind"],
}
COLORS = {"red": "warm", "orange": "warm", "yellow": "warm", "blue": "cool", "green": "cool", "purple": "cool"}


def sentiment(n: int, seed: int = 0) -> list[dict]:
    """'<subject> was <adjective>.' -> 'good' | 'bad' (classification)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.random() < 0.5
        adj = rng.choice(POSITIVE if label else NEGATIVE)
        subject = rng.choice(SUBJECTS)
        rows.append({"text": f"{subject} was {adj}.", "label": "good" if label else "bad"})
    return rows


def topic(n: int, seed: int = 0) -> list[dict]:
    """'we talked about <thing> today' -> sport | food | weather (3-way classification)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(TOPICS))
        rows.append({"text": f"{rng.choice(['we', 'they', 'you', 'I'])} talked about "
                             f"{rng.choice(TOPICS[label])} today", "label": label})
    return rows


def color_temperature(n: int, seed: int = 0, carriers=("paint it", "a shade of", "the wall is")) -> list[dict]:
    """'paint it <color>' -> warm | cool (classification by a single keyword)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        color = rng.choice(sorted(COLORS))
        rows.append({"text": f"{rng.choice(list(carriers))} {color}", "label": COLORS[color]})
    return rows


def shout(n: int, seed: int = 0) -> list[dict]:
    """'shout: <word>' -> '<WORD>' (short rewriting)."""
    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "hat", "red", "box", "cup", "pen", "map", "egg", "owl", "fig", "bee", "car",
             "jam", "key", "net", "pie", "toy", "van"]
    return [{"text": f"shout: {w}", "label": w.upper()} for w in (rng.choice(words) for _ in range(n))]


def sentiment_sign(n: int, seed: int = 0) -> list[dict]:
    """Sentiment with one-character labels '+' / '-' (what a soft prompt on a random base learns fastest)."""
    return [{"text": r["text"], "label": "+" if r["label"] == "good" else "-"} for r in sentiment(n, seed)]


def color_letter(n: int, seed: int = 0) -> list[dict]:
    """The color task with one-letter labels 'W' / 'C'."""
    return [{"text": r["text"], "label": r["label"][0].upper()} for r in color_temperature(n, seed)]


def parity(n: int, seed: int = 0) -> list[dict]:
    """'number 7' -> 'odd' | 'even' (the last digit decides)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randrange(10, 1000)
        rows.append({"text": f"number {k}", "label": "odd" if k % 2 else "even"})
    return rows


def loudness(n: int, seed: int = 0) -> list[dict]:
    """'THE SOUP WAS GREAT.' -> 'loud', 'the soup was great.' -> 'calm' (every byte carries the class)."""
    rng = random.Random(seed + 1)
    rows = []
    for r in sentiment(n, seed):
        loud = rng.random() < 0.5
        rows.append({"text": r["text"].upper() if loud else r["text"], "label": "loud" if loud else "calm"})
    return rows


def color_temperature_ood(n: int, seed: int = 0) -> list[dict]:
    """The color task in other carrier sentences ('my new car is <color>'): an out-of-domain eval set."""
    return color_temperature(n, seed, carriers=("my new car is", "she wore", "we saw a flash of"))


def sentiment_ood(n: int, seed: int = 0) -> list[dict]:
    """Sentiment in another sentence shape ('honestly, I found <subject> <adjective>'): out of domain."""
    return [{"text": f"honestly, I found {r['text'].removesuffix('.').replace(' was ', ' ')}", "label": r["label"]}
            for r in sentiment(n, seed)]


OOD_TASKS = {"color": color_temperature_ood, "sentiment": sentiment_ood}


TASKS = {"loudness": loudness, "color-letter": color_letter, "parity": parity, "sentiment": sentiment, "sentiment-sign": sentiment_sign, "topic": topic, "color": color_temperature,
         "shout": shout}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_task(out_dir: Path, task: str, n_train: int = 400, n_eval: int = 64, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl / eval.jsonl (fields 'text', 'label') for a generated task; returns their paths."""
    make = TASKS[task]
    out_dir = Path(out_dir)
    return (write_jsonl(out_dir / "train.jsonl", make(n_train, seed)),
            write_jsonl(out_dir / "eval.jsonl", make(n_eval, seed + 1_000)))


def write_ood(out_dir: Path, task: str, n: int = 64, seed: int = 2_000) -> Path | None:
    """ood.jsonl for a generated task that has an out-of-domain variant (OOD_TASKS); None otherwise."""
    make = OOD_TASKS.get(task)
    return write_jsonl(Path(out_dir) / "ood.jsonl", make(n, seed)) if make else None


def write_domain_text(out_dir: Path, task: str, n: int = 400, seed: int = 3_000) -> Path:
    """domain.txt: unlabelled inputs of the task (one per line), for adaptive fine-tuning's first phase."""
    path = Path(out_dir) / "domain.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(r["text"] + "\n" for r in TASKS[task](n, seed)))
    return path
