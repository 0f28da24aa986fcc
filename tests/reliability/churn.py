"""In-process churn on the real Engine + AdapterRegistry (real SQLite, real store files): register -> generate
-> delete cycles with RSS sampled, and the pristine-base checks (output and a hash of the base weights)."""

from __future__ import annotations

import gc
import hashlib
import time
from pathlib import Path

KINDS = ("lora-a", "ia3-a", "bitfit-a", "prompt-a")
PROMPTS = ("translate: hello world", "summarize: the cat sat on the mat", "a")


def base_weights_hash(model) -> str:
    """sha256 over the base weights by their unwrapped names (slot tensors are not part of the base)."""
    h = hashlib.sha256()
    for name, t in sorted((n.replace(".base_layer.", "."), t) for n, t in model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def base_outputs(engine) -> list[str]:
    from serve.engine.requests import GenerationParams, GenerationRequest

    reqs = [GenerationRequest(inputs=p, params=GenerationParams(max_new_tokens=12)) for p in PROMPTS]
    return [r.text for r in engine.generate(reqs, timeout=60)]


def make_engine(base_dir: Path):
    from serve.engine import Engine
    from serve.engine.config import EngineConfig

    return Engine.from_config(EngineConfig(
        base=str(base_dir), max_batch_rows=4, max_new_tokens_cap=16, default_max_new_tokens=4, host_bytes="4MiB",
        device_slots={"lora": 2, "ia3": 2, "bitfit": 2, "prompt": 2}, ia3_merge_after_steps=1))


def churn(engine, registry, zoo: dict, cycles: int, time_limit_s: float, samples: int = 20) -> dict:
    """`cycles` register -> generate -> delete cycles (bounded by `time_limit_s`), each with a new name;
    RSS sampled `samples` times after a 20 % warm-up. Returns the figures."""
    from serve.app.admin_routes import make_validator
    from serve.engine.requests import GenerationParams, GenerationRequest

    from .harness import rss_bytes

    validate = make_validator(engine.base_desc, engine.limits)
    warmup = max(1, cycles // 5)
    every = max(1, (cycles - warmup) // samples)
    rss: list[int] = []
    t0 = time.monotonic()
    done = 0
    for i in range(cycles):
        if time.monotonic() - t0 > time_limit_s:
            break
        name = f"churn-{i}"
        rec = registry.register(name, zoo[KINDS[i % len(KINDS)]], validate)
        engine.register_adapter(name, rec.path)
        # two rows of the same adapter: (IA)3 gets merged (ia3_merge_after_steps=1) and unmerged again
        reqs = [GenerationRequest(inputs=PROMPTS[j], adapter=name, params=GenerationParams(max_new_tokens=4))
                for j in range(2)]
        assert all(r.generated_tokens >= 1 for r in engine.generate(reqs, timeout=60))
        engine.remove_adapter(name)
        registry.delete(name)
        done += 1
        if i >= warmup and (i - warmup) % every == 0:
            gc.collect()
            rss.append(rss_bytes())
    elapsed = time.monotonic() - t0
    first = sum(rss[:3]) / max(1, len(rss[:3]))
    last = sum(rss[-3:]) / max(1, len(rss[-3:]))
    return {"cycles": done, "seconds": round(elapsed, 1), "cycles_per_s": round(done / elapsed, 1),
            "rss_first_mib": round(first / 2**20, 1), "rss_last_mib": round(last / 2**20, 1),
            "rss_drift_pct": round(100 * (last - first) / first, 3) if rss else None,
            "rss_samples_mib": [round(x / 2**20, 1) for x in rss]}
