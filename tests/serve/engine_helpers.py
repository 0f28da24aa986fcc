"""Shared by the engine tests: drive one engine the way a server's clients do."""

from __future__ import annotations

import asyncio


async def staggered(engine, reqs):
    """Half now, the rest while the first half is decoding: rows join and leave between steps."""
    first = [asyncio.ensure_future(engine.submit(r)) for r in reqs[::2]]
    await asyncio.sleep(0.03)
    second = [asyncio.ensure_future(engine.submit(r)) for r in reqs[1::2]]
    a, b = await asyncio.gather(*first), await asyncio.gather(*second)
    out = [None] * len(reqs)
    out[::2], out[1::2] = a, b
    return out
