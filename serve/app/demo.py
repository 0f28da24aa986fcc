"""Demo adapters at start-up: the app registers the ones `peftserve train demo` trained for its base.

The app never trains (serve/ does not import training/): `make serve` runs `peftserve train demo` before
`peftserve serve`. Training writes the adapters under `demo_root(fingerprint)` and, once every one is
complete, MANIFEST naming them; the Ingress reads MANIFEST and registers what it names. No MANIFEST: nothing
trained for this base yet, and the app starts without demo adapters.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("peftserve.app")
MANIFEST = "demo-adapters.json"  # {"version": N, "adapters": {name: directory relative to demo_root}}


def demo_root(fingerprint: str) -> Path:
    from serve.engine import default_home

    return default_home() / "demo-adapters" / fingerprint.removeprefix("sha256:")[:16]


def trained_demo_adapters(fingerprint: str) -> dict[str, Path]:
    """name -> adapter directory from MANIFEST; {} when none were trained for this base (or it is unreadable)."""
    root = demo_root(fingerprint)
    try:
        named = json.loads((root / MANIFEST).read_text())["adapters"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring unreadable %s: %r", root / MANIFEST, e)
        return {}
    paths = {str(name): (root / rel).resolve() for name, rel in named.items()}
    # MANIFEST names directories inside the demo root only
    return {name: p for name, p in paths.items() if p.is_relative_to(root.resolve()) and p.is_dir()}


def register_demo_adapters(registry, validate, fingerprint: str) -> list[str]:
    """Register every trained demo adapter not registered yet; returns the names registered now."""
    from serve.registry import AdapterExists

    paths = trained_demo_adapters(fingerprint)
    if not paths:
        log.info("no demo adapters trained for this base; `peftserve train demo` trains them (make serve does)")
        return []
    done = []
    for name, path in paths.items():
        try:
            registry.register(name, path, validate, False, f"demo:{path}")
        except AdapterExists:
            continue
        done.append(name)
        log.info("registered demo adapter %s", name)
    return done
