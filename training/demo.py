"""Demo adapters: one of each kind doing a recognizable task on the embedded base, trained on first use.

`ensure_demo_adapters()` (`peftserve train demo`; `make serve` runs it before `peftserve serve`) trains them
once (a few minutes at most on 2 CPU cores, progress shown) and caches them under
`$PEFTSERVE_HOME/demo-adapters/<base fingerprint>/v<N>/`; later calls return the cached paths at once. A file
lock plus a second check after taking it keeps two concurrent callers from training twice. Once all are
complete it writes the MANIFEST the serving app reads at start-up to register them (serve/app/demo.py: the
app never imports training).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)
ALL_LINEAR = ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]
DEMO_VERSION = 1  # bump when DEMOS change, so cached adapters are retrained
# Threads of one process serialise here (transformers' model loading is not thread-safe); processes
# (replicas) serialise on the file lock below.
_PROCESS_LOCK = threading.Lock()


@dataclass(frozen=True)
class DemoSpec:
    kind: str
    task: str  # a generator in training.tasks
    example: str  # what to send it
    options: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"demo-{self.task}-{self.kind}"


DEMOS = (
    DemoSpec("lora", "shout", "shout: owl  ->  OWL", dict(learning_rate=3e-3, target_modules=ALL_LINEAR, max_steps=300)),
    DemoSpec("ia3", "color", "paint it blue  ->  cool", dict(learning_rate=3e-2, max_steps=300)),
    DemoSpec("bitfit", "topic", "we talked about the rain today  ->  weather", dict(learning_rate=3e-2, max_steps=300)),
    DemoSpec("prompt", "loudness", "THE SOUP WAS GREAT.  ->  loud",
             dict(learning_rate=3e-1, num_virtual_tokens=20, max_steps=300)),
)


def demo_dir(fingerprint: str) -> Path:
    from serve.app.demo import demo_root

    return demo_root(fingerprint) / f"v{DEMO_VERSION}"


def ensure_demo_adapters(base_dir: str | Path | None = None, progress: bool = True,
                         demos: tuple[DemoSpec, ...] | None = None) -> dict[str, Path]:
    """name -> adapter directory for every demo adapter (`demos`, default DEMOS), training the missing ones first."""
    with _PROCESS_LOCK:
        return _ensure(base_dir, progress, DEMOS if demos is None else demos)


def _ensure(base_dir, progress: bool, demos: tuple[DemoSpec, ...]) -> dict[str, Path]:
    from serve.engine import load_base

    base_source = str(base_dir) if base_dir is not None else None
    fingerprint = load_base(base_source).fingerprint
    root = demo_dir(fingerprint)
    root.mkdir(parents=True, exist_ok=True)
    paths = {d.name: root / d.name for d in demos}
    if all(_complete(p) for p in paths.values()):
        _write_manifest(root, paths)
        return paths
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be training them right now
        missing = [d for d in demos if not _complete(paths[d.name])]  # second check, under the lock
        if missing and progress:
            print(f"training {len(missing)} demo adapters on {base_source or 'the embedded base'} (first run only; "
                  f"cached in {root})",
                  flush=True)
        for i, demo in enumerate(missing, 1):
            t0 = time.perf_counter()
            metric = _train_demo(demo, base_source, root, progress)
            msg = (f"[{i}/{len(missing)}] {demo.name}: exact match {metric:.2f} in "
                   f"{time.perf_counter() - t0:.0f} s  (try: {demo.example})")
            log.info(msg)
            if progress:
                print(msg, flush=True)
        _write_manifest(root, paths)
    return paths


def _write_manifest(root: Path, paths: dict[str, Path]) -> None:
    """The serving app's list of demo adapters (serve/app/demo.py), replaced atomically when it changes."""
    from serve.app.demo import MANIFEST

    target = root.parent / MANIFEST
    text = json.dumps({"version": DEMO_VERSION, "adapters": {n: str(p.relative_to(root.parent)) for n, p in paths.items()}},
                      indent=2, sort_keys=True) + "\n"
    if target.is_file() and target.read_text() == text:
        return
    tmp = target.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def _complete(path: Path) -> bool:
    return (path / "train_report.json").exists() and (path / "adapter_config.json").exists()


def _train_demo(demo: DemoSpec, base_source: str | None, root: Path, progress: bool) -> float:
    from training.config import TrainConfig
    from training.tasks import write_task
    from training.train import train

    train_file, eval_file = write_task(root / ".data" / demo.task, demo.task, n_train=400, n_eval=48)
    cfg = TrainConfig(method=demo.kind, train=str(train_file), eval=str(eval_file), output=root / demo.name,
                      base=base_source, input_field="text", target_field="label", batch_size=16, eval_every=10,
                      patience=0, stop_at_metric=1.0, dropout=0.0, seed=0, overwrite=True, progress=progress,
                      threads=1,  # tiny matmuls: one thread is as fast alone and far faster on a busy machine
                      **demo.options)
    result = train(cfg)
    report = json.loads((result.output / "train_report.json").read_text())
    report["demo"] = {"task": demo.task, "example": demo.example}
    (result.output / "train_report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return result.metric
