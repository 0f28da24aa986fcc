"""(IA)3 merge policy decisions: hysteresis in auto mode, immediate unmerge on mixing, dedicated, never."""

from __future__ import annotations

import pytest

from serve.engine.merge_policy import MergePolicy

A, B = ("a", 1), ("b", 2)
IA3_A = [(A, "ia3"), (A, "ia3")]


def test_auto_merges_after_uniform_steps_and_unmerges_at_once_when_mixed():
    p = MergePolicy("auto", after_steps=2)
    assert p.target(IA3_A, None) is None
    assert p.target(IA3_A, None) is None
    assert p.target(IA3_A, None) == A  # third uniform forward: worth merging
    assert p.target(IA3_A, A) == A  # stays
    assert p.target([(A, "ia3"), (None, "base")], A) is None  # a base row joined: unmerge now
    assert p.target(IA3_A, None) is None  # the count starts again


def test_only_ia3_and_only_uniform_batches_merge():
    p = MergePolicy("auto", after_steps=0)
    assert p.target([(A, "lora")], None) is None
    assert p.target([(A, "ia3"), (B, "ia3")], None) is None
    assert p.target([(B, "ia3")], None) == B
    assert p.target([(A, "ia3")], B) == A  # the engine unmerges B, then merges A
    slow = MergePolicy("auto", after_steps=1)
    slow.target([(B, "ia3")], None), slow.target([(B, "ia3")], None)
    assert slow.target([(A, "ia3")], B) is None  # switching adapters: B goes now, A waits its steps


def test_dedicated_merges_only_its_adapter_at_once_and_stays_when_idle():
    p = MergePolicy("dedicated", after_steps=100, dedicated="a")
    assert p.target([(B, "ia3")], None) is None
    assert p.target([(A, "ia3")], None) == A
    assert not p.release_when_idle(A, removed=False, others_waiting=True)
    assert p.release_when_idle(A, removed=True, others_waiting=False)


def test_never_and_idle_rules():
    assert MergePolicy("never").target(IA3_A, None) is None
    auto = MergePolicy("auto")
    assert auto.release_when_idle(A, removed=False, others_waiting=True)
    assert not auto.release_when_idle(A, removed=False, others_waiting=False)
    assert not auto.release_when_idle(None, removed=True, others_waiting=True)
    with pytest.raises(ValueError):
        MergePolicy("sometimes")
