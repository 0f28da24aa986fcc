"""Training fixtures: one generated task, and one trained adapter per kind shared by every test module.

Settings per kind are chosen so each learns the task on the untrained embedded base in well under a
hundred steps: dropout off, a short eval every 10 steps, and a stop as soon as the eval set is solved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import TrainConfig

ALL_LINEAR = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
# Each kind: learning rate and options that make it learn the 'loudness' task quickly and reliably.
KIND_SETTINGS = {
    "lora": dict(learning_rate=3e-3, target_modules=ALL_LINEAR, max_steps=150),
    "dora": dict(learning_rate=3e-3, target_modules=ALL_LINEAR, max_steps=150),
    # 150 planned steps: tinit 15, so the stop at 1.0 (~step 20) comes after pruning has begun
    "adalora": dict(learning_rate=1e-2, target_modules=ALL_LINEAR, max_steps=150),
    "ia3": dict(learning_rate=3e-2, max_steps=150),
    "bitfit": dict(learning_rate=3e-2, max_steps=150),
    "prompt": dict(learning_rate=3e-1, num_virtual_tokens=20, max_steps=150),
    # P-tuning moves the soft prompt only through its encoder: ~100 steps here (a wider MLP is a little faster)
    "ptuning": dict(learning_rate=1e-2, num_virtual_tokens=20, ptuning_hidden_size=512, max_steps=120,
                    eval_every=20),
    # prefix tuning (key/values of the decoder's self-attention): ~50 steps at 3e-2
    "prefix": dict(learning_rate=3e-2, num_virtual_tokens=20, max_steps=150),
}
THRESHOLD = {"lora": 0.95, "dora": 0.95, "adalora": 0.95, "ia3": 0.95, "bitfit": 0.95, "prompt": 0.8,
             "ptuning": 0.8, "prefix": 0.95}
KINDS = tuple(KIND_SETTINGS)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one thread avoids OpenMP spin contention (~10x faster).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> tuple[Path, Path]:
    """'THE SOUP WAS GREAT.' -> loud, 'the soup was great.' -> calm: every byte carries the class, so even a
    soft prompt on a random base learns it in a few dozen steps."""
    from training.tasks import write_task

    return write_task(tmp_path_factory.mktemp("loudness-task"), "loudness", n_train=400, n_eval=48)


def kind_config(kind: str, task: tuple[Path, Path], base_dir: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(input_field="text", target_field="label", batch_size=16, eval_every=10, patience=0,
                    stop_at_metric=1.0, dropout=0.0, seed=0, progress=False)
    settings.update(KIND_SETTINGS[kind], **overrides)
    return TrainConfig(method=kind, train=str(task[0]), eval=str(task[1]), output=out, base=str(base_dir),
                       **settings)


@pytest.fixture(scope="session")
def trained(task_files, tiny_base_dir, tmp_path_factory) -> dict:
    """kind -> TrainResult, trained once per session (lazily, one kind at a time)."""
    from training.train import train

    root = tmp_path_factory.mktemp("trained")
    cache: dict = {}

    class Lazy(dict):
        def __missing__(self, kind):
            cache[kind] = train(kind_config(kind, task_files, tiny_base_dir, root / kind))
            self[kind] = cache[kind]
            return cache[kind]

    return Lazy()
