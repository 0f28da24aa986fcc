"""Admission: row/token bounds, FIFO, skipping over loading adapters, aging, static mode."""

from __future__ import annotations

from dataclasses import dataclass

from serve.engine.scheduler import BLOCKED, FAIL, OK, WAIT, admit


@dataclass(eq=False)
class R:
    name: str
    cost_tokens: int = 10
    prefill_tokens: int = 4
    skips: int = 0
    state: str = OK


def run(waiting, running_rows=0, running_tokens=0, max_rows=4, max_tokens=100, max_skips=3, static=False,
        max_prefill=None):
    admitted, failed = admit(waiting, running_rows, running_tokens, max_rows=max_rows, max_tokens=max_tokens,
                             max_skips=max_skips, static=static, readiness=lambda r: r.state,
                             max_prefill_tokens=max_prefill)
    return [r.name for r in admitted], [r.name for r in failed]


def test_fifo_within_row_and_token_bounds():
    w = [R("a"), R("b"), R("c", cost_tokens=80), R("d")]
    assert run(w, running_rows=1, running_tokens=20) == (["a", "b", "d"], [])  # c does not fit 60 tokens
    assert run(w, running_rows=3) == (["a"], [])


def test_loading_adapter_waits_alone_without_aging():
    w = [R("cold", state=WAIT), R("x"), R("y")]
    for _ in range(10):
        assert run(w)[0] == ["x", "y"]
    assert w[0].skips == 0  # waiting for its own adapter is not starvation


def test_blocked_request_ages_then_blocks_younger_ones():
    old = R("old", state=BLOCKED)  # e.g. every slot of its kind pinned by a popular adapter
    for i in range(3):
        assert run([old, R(f"young{i}")])[0] == [f"young{i}"]
    assert old.skips == 3
    assert run([old, R("young3")])[0] == []  # aged: no one overtakes it any more
    old.state = OK  # the popular adapter's rows drained, its slot is free
    assert run([old, R("young4")])[0] == ["old", "young4"]


def test_big_request_is_not_starved_by_small_ones():
    big = R("big", cost_tokens=90)
    rounds = []
    running_tokens = 50
    for i in range(6):
        got, _ = run([big, R(f"s{i}", cost_tokens=5)], running_rows=1, running_tokens=running_tokens)
        rounds.append(got)
        if "big" in got:
            break
        running_tokens = 0 if i >= 3 else 50  # small rows finish eventually; nothing new got in once aged
    assert rounds[:3] == [["s0"], ["s1"], ["s2"]]
    assert rounds[3] == []  # aged: the small request waits behind it
    assert rounds[-1][0] == "big"


def test_failed_requests_are_returned_and_do_not_consume_rows():
    assert run([R("bad", state=FAIL), R("a")], max_rows=1) == (["a"], ["bad"])


def test_static_mode_admits_only_into_an_empty_batch():
    w = [R("a"), R("b")]
    assert run(w, running_rows=1, static=True) == ([], [])
    assert run(w, running_rows=0, static=True) == (["a", "b"], [])


def test_prefill_budget_paces_joins_but_always_admits_one():
    w = [R("a", prefill_tokens=6), R("b", prefill_tokens=6), R("c", prefill_tokens=2)]
    assert run(w, max_prefill=10)[0] == ["a"]  # b would exceed the encoder budget: next step
    assert run([R("huge", prefill_tokens=50)], max_prefill=10)[0] == ["huge"]
    assert run(w, max_prefill=None)[0] == ["a", "b", "c"]


def test_encoder_passes_split_only_when_padding_costs_more_than_a_pass():
    from serve.engine.scheduler import encoder_passes

    assert encoder_passes([32] * 8) == [list(range(8))]
    assert encoder_passes([30, 32, 31, 32]) == [[0, 2, 1, 3]]  # shortest first, stable
    # 24 plain rows of 32 tokens joined by 8 prompt-tuned rows of 40: 192 padded tokens > one pass (64)
    lengths = [32] * 24 + [40] * 8
    passes = encoder_passes(lengths)
    assert [sorted(p) for p in passes] == [list(range(24)), list(range(24, 32))]
    # 2 long rows among 2 short: padding (2 x 8) is cheaper than a second pass
    assert len(encoder_passes([32, 40, 32, 40])) == 1
    assert encoder_passes([]) == [] and encoder_passes([5]) == [[0]]
    # every index exactly once, for arbitrary lengths
    import random

    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(1, 200) for _ in range(rng.randint(1, 40))]
        flat = sorted(i for p in encoder_passes(lengths) for i in p)
        assert flat == list(range(len(lengths)))
