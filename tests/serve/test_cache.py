"""AdapterCache with fake weights: eviction order, pinning, byte bounds, background loads, removal."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest

from serve.engine.cache import BLOCKED, FAILED, LOADING, READY, AdapterCache
from serve.engine.observer import RecordingObserver


@dataclass
class W:
    name: str
    nbytes: int


class Harness:
    def __init__(self, slots=None, host_bytes=10_000, device_bytes=None, load_delay=0.0, fail=()):
        self.writes: list[tuple[str, int, str]] = []
        self.loaded = threading.Event()
        self.obs = RecordingObserver()
        self.load_delay, self.fail = load_delay, set(fail)
        self.cache = AdapterCache(load=self._load, write=lambda k, s, w: self.writes.append((k, s, w.name)),
                                  slots=slots or {"lora": 2, "ia3": 1}, host_bytes=host_bytes,
                                  device_bytes=device_bytes, loader_threads=2, observer=self.obs,
                                  on_loaded=self.loaded.set)

    def _load(self, source):
        time.sleep(self.load_delay)
        if source[0] in self.fail:
            raise OSError(f"{source[0]}: file vanished")
        return W(*source)

    def add(self, name, kind="lora", nbytes=100):
        self.cache.add(name, kind, (name, nbytes), nbytes)

    def ready(self, key, timeout=5.0):
        """prepare until READY (waits for the background load)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.cache.prepare(key)
            if p.state != LOADING:
                return p
            self.loaded.wait(0.05)
            self.loaded.clear()
        raise AssertionError(f"{key} never loaded")


def test_cold_prepare_returns_at_once_and_loads_in_background():
    h = Harness(load_delay=1.0)
    h.add("a")
    t0 = time.perf_counter()
    assert h.cache.prepare("a", count=True).state == LOADING
    assert time.perf_counter() - t0 < 0.5  # the caller (engine loop) never waits for the 1 s disk read
    p = h.ready("a")
    assert p.state == READY and h.writes == [("lora", p.slot, "a")]
    assert h.cache.prepare("a", count=True).state == READY  # device hit, no second write
    assert len(h.writes) == 1
    s = h.cache.stats()
    assert s.misses["device"] == 1 and s.hits["device"] == 1 and s.loads == 1
    assert h.obs.counts["on_swap:disk_to_host"] == 1 and h.obs.counts["on_swap:host_to_device"] == 1


def test_device_lru_evicts_least_recently_used_unpinned():
    h = Harness(slots={"lora": 2})
    for n in "abc":
        h.add(n)
    slot_a, slot_b = h.ready("a").slot, h.ready("b").slot
    h.cache.prepare("a")  # touch a: b is now least recently used
    p = h.ready("c")
    assert p.slot == slot_b
    assert h.cache.resident() == ["a", "c"]
    assert h.cache.stats().evictions["device"] == 1
    assert slot_a != slot_b


def test_pinned_adapters_are_never_evicted():
    h = Harness(slots={"lora": 2})
    for n in "abc":
        h.add(n)
    h.ready("a"), h.ready("b")
    h.cache.pin("a")
    h.cache.pin("b")
    assert h.ready("c").state == BLOCKED  # both slots pinned by running rows
    h.cache.release("a")
    assert h.ready("c").state == READY
    assert set(h.cache.resident()) == {"b", "c"}


def test_slots_are_per_kind():
    h = Harness(slots={"lora": 1, "ia3": 1})
    h.add("l1"), h.add("l2"), h.add("i1", kind="ia3")
    h.ready("i1")
    h.cache.pin("i1")
    h.ready("l1")
    assert h.ready("l2").state == READY  # evicts l1 (lora), never the pinned ia3 adapter
    assert h.cache.resident() == ["i1", "l2"]
    assert h.writes[-1] == ("lora", 0, "l2")


def test_host_byte_bound_lru():
    h = Harness(slots={"lora": 8}, host_bytes=250)
    for n in "abc":
        h.add(n, nbytes=100)
        h.ready(n)
    s = h.cache.stats()
    assert s.host_bytes <= 250 and h.cache.host_keys() == ["b", "c"]
    assert s.evictions["host"] == 1
    assert h.cache.prepare("a").state == READY  # still on device although gone from host


def test_device_byte_bound_evicts_across_kinds_and_blocks_when_pinned():
    h = Harness(slots={"lora": 4, "ia3": 4}, device_bytes=300)
    h.add("a", nbytes=150), h.add("b", kind="ia3", nbytes=100), h.add("c", nbytes=120)
    h.ready("a"), h.ready("b")
    assert h.ready("c").state == READY  # 150+100+120 > 300: LRU "a" goes
    assert h.cache.stats().device_bytes == 220 and h.cache.resident() == ["b", "c"]
    h.add("big", nbytes=301)
    p = h.ready("big")
    assert p.state == FAILED and "device_bytes" in str(p.error)  # can never fit: fail fast, not wait
    h.cache.pin("b"), h.cache.pin("c")
    h.add("d", nbytes=100)
    assert h.ready("d").state == BLOCKED


def test_discard_while_pinned_frees_slot_after_release():
    h = Harness(slots={"lora": 1})
    h.add("a"), h.add("b")
    h.ready("a")
    h.cache.pin("a")
    h.cache.discard("a")
    assert not h.cache.contains("a")
    assert h.cache.prepare("a").state == FAILED
    assert h.ready("b").state == BLOCKED  # a's slot is still in use by its running row
    h.cache.release("a")
    assert h.ready("b").state == READY


def test_load_failure_is_reported_not_raised():
    h = Harness(fail={"bad"})
    h.add("bad")
    p = h.ready("bad")
    assert p.state == FAILED and "vanished" in str(p.error)
    assert h.cache.stats().load_failures == 1


def test_thousands_of_registrations_cost_metadata_only():
    h = Harness(slots={"lora": 2})
    for i in range(5000):
        h.add(f"a{i}")
    s = h.cache.stats()
    assert s.registered == 5000 and s.host_entries == 0 and s.device_entries == 0 and not h.writes
    assert s.disk_bytes == 5000 * 100


def test_duplicate_key_and_unknown_kind_refused():
    h = Harness()
    h.add("a")
    with pytest.raises(KeyError):
        h.add("a")
    with pytest.raises(ValueError, match="no device slots"):
        h.cache.add("p", "prompt", ("p", 1), 1)


def test_staged_loads_are_not_evicted_before_their_first_use():
    """Several cold adapters loading at once over a small host budget: none is thrown away (and reloaded)
    before its request copied it to a slot."""
    h = Harness(slots={"lora": 8}, host_bytes=150)
    names = [f"s{i}" for i in range(5)]
    for n in names:
        h.add(n, nbytes=100)
        assert h.cache.prepare(n).state == LOADING
    deadline = time.monotonic() + 5
    while h.cache.stats().loads < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(h.cache.host_keys()) == names  # over the bound while staged
    for n in names:
        assert h.cache.prepare(n).state == READY
    s = h.cache.stats()
    assert s.loads == 5 and s.host_bytes <= 150


def test_prefetch_warms_host_without_pinning_it():
    h = Harness(slots={"lora": 2}, host_bytes=150)
    h.add("a"), h.add("b")
    assert h.cache.prefetch("a") is True
    deadline = time.monotonic() + 5
    while h.cache.stats().loads < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.cache.prefetch("a") is False  # already on host
    assert h.cache.prepare("a", count=True).state == READY  # host hit: no disk read on first use
    assert h.cache.stats().hits["host"] == 1
    h.cache.prefetch("b")
    while h.cache.stats().loads < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert h.cache.stats().host_bytes <= 150  # prefetched entries obey the host bound
