"""BatchLoop: the engine thread. It owns the waiting and running rows, the KV cache rows and every slot
write; callers only enqueue (any thread) and get results through each Sequence's callbacks.

One iteration (`_loop`): take the inbox, drop cancelled / timed-out requests (`_reap`), admit what the
scheduler allows (`_admit`: adapters made resident, joining rows' encoder pass, `_prefill`), then one
decoder step for every running row (`_step`: sample, stream, finish rows that ended). Between steps
rows join and leave (continuous batching); `scheduling="static"` only delays admissions. Everything the
step needs is passed explicitly: the running list is the KV cache's row order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from serve.engine.cache import BLOCKED as CACHE_BLOCKED
from serve.engine.cache import LOADING, READY, AdapterCache
from serve.engine.config import EngineConfig
from serve.engine.decode import KVCache, T5Parts, decode_step, encode, prefill_cross
from serve.engine.detokenize import Detokenizer
from serve.engine.errors import (
    AdapterLoadError,
    EngineClosedError,
    OverloadedError,
    PeftServeError,
    RequestCancelledError,
    RequestTimeoutError,
    UnknownAdapterError,
)
from serve.engine.groups import RowGroup
from serve.engine.logits import LogitsPipeline
from serve.engine.merge_policy import MergePolicy
from serve.engine.observer import EngineObserver, safe_call
from serve.engine.sampling import sample, top_alternatives
from serve.engine.scheduler import BLOCKED, FAIL, OK, WAIT, admit, encoder_passes
from serve.engine.sequence import Sequence

log = logging.getLogger("peftserve.engine")


class BatchLoop:
    def __init__(self, config: EngineConfig, observer: EngineObserver, parts: T5Parts, kv: KVCache, slots,
                 cache: AdapterCache, detokenizer: Detokenizer, resolve: Callable[[Sequence], tuple],
                 wake: threading.Event) -> None:
        """`resolve(seq)` -> the row's terms (serve/engine/combinations.py: cache key, kind, weight), raising a
        PeftServeError when its adapters are gone; `wake` is set by anyone with news for the loop (a request,
        a cancel, a removal, a finished background load)."""
        self.config, self.observer, self.parts, self.kv, self.slots = config, observer, parts, kv, slots
        self.cache, self._resolve, self._wake = cache, resolve, wake
        self.detokenizer = detokenizer
        self.vocab = parts.model.config.vocab_size  # the LM head's width (T5 pads it past the tokenizer)
        self.logits = LogitsPipeline(parts.decoder_start_token_id, parts.eos_token_id)
        self._inbox: deque[Sequence] = deque()
        self._inbox_lock = threading.Lock()
        self._queued = 0  # waiting + inbox, for the queue bound
        self._waiting: list[Sequence] = []  # loop thread only, arrival order
        self._running: list[Sequence] = []  # loop thread only, index == KV-cache row
        self._rows_cache = None
        self._merged: tuple[str, int] | None = None  # key of the (IA)3 adapter merged into the weights
        # an int8 base has no float weights to merge into: (IA)3 stays per row
        merge_mode = "never" if config.dtype == "int8" else config.ia3_merge
        self.merge_policy = MergePolicy(merge_mode, config.ia3_merge_after_steps, config.dedicated_adapter)
        self.counters = {"steps": 0, "tokens": 0, "prefills": 0, "merges": 0, "unmerges": 0, "merge_s": 0.0,
                         "unmerge_s": 0.0, "finished": 0, "failed": 0}
        self._closed = False
        self._last_mem_report = 0.0
        self._thread = threading.Thread(target=self._loop, name="peftserve-engine", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        """Requests accepted and not yet running (inbox + waiting)."""
        return self._queued

    @property
    def running(self) -> list[Sequence]:
        """The running rows in KV-cache order (read-only outside the loop thread)."""
        return self._running

    def close(self) -> None:
        """Stop the loop: waiting and running requests fail with EngineClosedError."""
        self._closed = True
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self.logits.close()

    def enqueue(self, seq: Sequence) -> None:
        with self._inbox_lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            if self._queued >= self.config.max_queue:
                raise OverloadedError(f"{self._queued} requests are waiting (max_queue="
                                      f"{self.config.max_queue}); retry later")
            self._queued += 1
            self._inbox.append(seq)
        safe_call(self.observer, "on_request_queued", seq.adapter, self._queued)
        self._wake.set()

    def cancel(self, seq: Sequence) -> None:
        """Free the row (or queue place) of a request whose caller went away. Safe from any thread."""
        seq.cancelled = True
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            self._take_inbox()
            if self._closed:
                self._fail_all(EngineClosedError("the engine is shut down"))
                return
            try:
                self._reap()
                self._admit()
                safe_call(self.observer, "on_queue_depth", self._queued, len(self._running))
                if self._running:
                    self._step()
                else:
                    self._release_idle_merge()
                    self._wake.wait(timeout=0.02 if self._waiting else 0.5)
                self._report_memory()
            except Exception as e:  # noqa: BLE001 - a failing batch must not kill the server
                log.exception("engine step failed; failing the running requests")
                self._fail_running(e)

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            while self._inbox:
                self._waiting.append(self._inbox.popleft())

    def _dequeue(self, seq: Sequence) -> None:
        with self._inbox_lock:
            self._queued -= 1

    def _reap(self) -> None:
        now = time.perf_counter()
        keep = []
        for seq in self._waiting:
            if seq.gone or now > seq.deadline:
                self._dequeue(seq)
                self._fail(seq, None if seq.cancelled else RequestTimeoutError(
                    f"request timed out after {self.config.request_timeout_s} s in the queue"))
            else:
                keep.append(seq)
        self._waiting = keep
        gone = [i for i, s in enumerate(self._running) if s.gone or now > s.deadline]
        for i in reversed(gone):
            seq = self._running[i]
            self._remove_row(i)
            self._fail(seq, None if seq.gone else RequestTimeoutError(
                f"request timed out after {self.config.request_timeout_s} s"))

    def _readiness(self, seq: Sequence) -> str:
        """OK when every adapter of the row is resident (then all are pinned); otherwise none stays pinned, so
        a waiting combination never holds slots its own other parts, or other rows, need."""
        if not seq.wants_adapters:
            return OK
        try:
            seq.terms = self._resolve(seq)  # newest versions; a ties/dare combination: its derived adapter
        except PeftServeError as e:  # removed, or no longer a valid combination, since it was queued
            seq.error = e
            return FAIL
        slots, state, failed = [], OK, None
        for term in seq.terms:
            prepared = self.cache.prepare(term.key, count=term.key not in seq.counted)
            seq.counted.add(term.key)
            if prepared.state != READY:
                state, failed = prepared.state, (term, prepared.error)
                break
            slots.append(self.cache.pin(term.key))
        if state == OK:
            seq.slots = tuple(slots)
            return OK
        for term in seq.terms[:len(slots)]:
            self.cache.release(term.key)
        if state == LOADING:
            return WAIT
        if state == CACHE_BLOCKED:
            return BLOCKED
        term, err = failed
        name = term.key[0]
        if isinstance(err, KeyError):  # removed between lookup and prepare
            seq.error = UnknownAdapterError(name)
        else:
            seq.error = AdapterLoadError(name, f"could not be loaded: {err}")
            seq.error.__cause__ = err
        return FAIL

    def _admit(self) -> None:
        if not self._waiting:
            return
        cfg = self.config
        running_tokens = sum(s.cost_tokens for s in self._running)
        admitted, failed = admit(self._waiting, len(self._running), running_tokens,
                                 max_rows=cfg.max_batch_rows, max_tokens=cfg.max_batch_tokens,
                                 max_skips=cfg.fairness_max_skips, static=cfg.scheduling == "static",
                                 readiness=self._readiness, max_prefill_tokens=cfg.max_prefill_tokens)
        if not admitted and not failed:
            return
        gone = set(map(id, admitted)) | set(map(id, failed))
        self._waiting = [s for s in self._waiting if id(s) not in gone]
        for seq in failed:
            self._dequeue(seq)
            self._fail(seq, seq.error)
        if admitted:
            for seq in admitted:
                self._dequeue(seq)
            try:
                self._prefill(admitted)
            except Exception as e:  # noqa: BLE001 - only the joining rows fail; running rows are intact
                log.exception("encoder pass failed for %d joining requests", len(admitted))
                joined = set(map(id, self._running))
                error = PeftServeError(f"generation failed: {e!r}")
                for seq in admitted:
                    for row in seq.group.rows if seq.group is not None else [seq]:  # clones hold pins too
                        if id(row) in joined:
                            self._remove_row(self._running.index(row))
                        else:
                            self._release(row)
                    self._fail(seq, error)

    def _rows(self, seqs: list[Sequence]):
        from adapters import RowAdapters

        spec = tuple(None if (key := s.key) is None or key == self._merged else s.row for s in seqs)
        # same mapping as last step: reuse it, and the wrapped layers keep their gathered weights
        if self._rows_cache is None or self._rows_cache[0] != spec:
            self._rows_cache = (spec, RowAdapters.from_rows(spec))
        return self._rows_cache[1]

    def _prefill(self, seqs: list[Sequence]) -> None:
        """The joining rows' encoder pass(es) and cross-attention K/V; then they are running rows.
        Rows of very different lengths (soft prompts make rows longer) go in separate passes when the
        padding would cost more than a pass (`encoder_passes`)."""
        self._apply_merge_policy(self._running + seqs)
        for group in encoder_passes([s.prefill_tokens for s in seqs]):
            self._encode_join([seqs[i] for i in group])

    def _encode_join(self, seqs: list[Sequence]) -> None:
        t0 = time.perf_counter()
        width = max(len(s.input_ids) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s.input_ids)] = torch.tensor(s.input_ids)
            mask[i, :len(s.input_ids)] = 1
        rows = self._rows(seqs)
        emb_dev = self.slots.embedding.weight.device
        embeds, mask = self.slots.encoder_inputs(ids.to(emb_dev), mask.to(emb_dev), rows)
        self.slots.set_rows(rows, token_mask=mask)  # gates average over each row's real tokens
        hidden = encode(self.parts, embeds, mask, self.slots.encoder_prefix(rows))
        # a request of several rows (beams, n / best_of): one encoder pass, its output in each of its rows
        joining, owner = [], []
        for i, s in enumerate(seqs):
            expanded = self._expand(s)
            joining += expanded
            owner += [i] * len(expanded)
        if len(joining) != len(seqs):
            pick = torch.tensor(owner)
            hidden, mask = hidden.index_select(0, pick.to(hidden.device)), mask.index_select(0, pick.to(mask.device))
            rows = self._rows(joining)
            self.slots.set_rows(rows, token_mask=mask)  # the cross-attention K/V projections run per row
        first = len(self._running)
        prefill_cross(self.parts, self.kv, list(range(first, first + len(joining))), hidden, mask)
        # prefix tuning: the joining rows' KV prefixes, copied once
        self.kv.set_prefixes(first, len(joining), self.slots.decoder_prefixes(rows))
        now = time.perf_counter()
        start = self.parts.decoder_start_token_id
        for s in joining:
            s.t_admit = now
            s.start(start, self.vocab)
            self._running.append(s)
            if s.index == 0:
                safe_call(self.observer, "on_request_admitted", s.adapter, s.method, now - s.t_submit)
        self.counters["prefills"] += 1
        safe_call(self.observer, "on_prefill", len(seqs), int(mask.sum()), now - t0)

    def _expand(self, seq: Sequence) -> list[Sequence]:
        """The rows a joining request takes: itself, plus clones for its other beams or candidates (each
        pins the request's adapters once more, so every row releases its own pins when it leaves)."""
        if seq.rows == 1:
            return [seq]
        group = RowGroup(seq, self.parts.eos_token_id)
        per_row = seq.cost_tokens // seq.rows
        for row in group.rows:
            row.cost_tokens = per_row
        for _ in group.rows[1:]:
            for term in seq.terms[:len(seq.slots)]:
                self.cache.pin(term.key)
        return group.rows

    @torch.inference_mode()  # the logits are inference tensors; beams and processors update them in place
    def _step(self) -> None:
        t0 = time.perf_counter()
        running = self._running
        self._apply_merge_policy(running)
        self.slots.set_rows(self._rows(running))
        start = self.parts.decoder_start_token_id
        tokens = torch.tensor([s.last_token(start) for s in running], dtype=torch.long)
        positions = torch.tensor([len(s.tokens) for s in running], dtype=torch.long)
        logits = decode_step(self.parts, self.kv, tokens, positions)
        groups: dict[int, tuple] = {}  # beam searches in this step: id -> (group, its rows' indices by beam)
        for i, s in enumerate(running):
            if s.group is not None and s.group.search is not None:
                groups.setdefault(id(s.group), (s.group, [None] * len(s.group.rows)))[1][s.index] = i
        if groups:  # HF's beam search processes (and scores) log-probabilities, not logits
            logits = logits.contiguous()  # the LM head may return a transposed view (decode.project_vocab)
            beam_rows = torch.tensor([i for _, idx in groups.values() for i in idx], device=logits.device)
            logits[beam_rows] = torch.log_softmax(logits[beam_rows], dim=-1)
        scores = self.logits.process(logits, [s.proc for s in running], [len(s.tokens) for s in running])
        sampling = [None if s.group is not None and s.group.search is not None else s.sampling for s in running]
        want_lp = any(s.keeps_logprobs for s, r in zip(running, sampling, strict=True) if r is not None)
        next_ids, logprobs = sample(logits, sampling, want_lp, scores)
        asking = [i for i, s in enumerate(running) if s.params.top_n_tokens and sampling[i] is not None]
        tops = dict(zip(asking, top_alternatives(logits, asking, [running[i].params.top_n_tokens for i in asking]),
                        strict=True))
        done_groups = self._beam_steps(list(groups.values()), scores, logits, next_ids) if groups else []
        self.logits.observe([s.proc for s in running], next_ids)
        now = time.perf_counter()
        finished: list[tuple[int, str | None]] = []
        for i, s in enumerate(running):
            if s.t_first is None:
                s.t_first = now
                if s.index == 0:
                    safe_call(self.observer, "on_first_token", s.adapter, s.method, now - s.t_submit)
            if sampling[i] is None:
                continue  # a beam: its tokens were placed by _beam_step
            reason = s.append(next_ids[i], logprobs[i] if logprobs else None, self.parts.eos_token_id,
                              self.detokenizer, tops.get(i))
            if reason is not None:
                finished.append((i, reason))
        finished += [(i, None) for g in done_groups for i in groups[id(g)][1]]
        n = len(running)
        distinct = len({s.key for s in running})
        for i, reason in sorted(finished, key=lambda f: f[0], reverse=True):
            seq = running[i]
            self._remove_row(i)
            self._finished(seq, reason)
        self.counters["steps"] += 1
        self.counters["tokens"] += n
        safe_call(self.observer, "on_step", n, distinct, n, time.perf_counter() - t0)

    def _beam_steps(self, groups: list[tuple[RowGroup, list[int]]], scores: torch.Tensor, logprobs: torch.Tensor,
                    next_ids: list[int]) -> list[RowGroup]:
        """Every beam request's step: its rows' scores gathered once for all, one KV reorder copy for all.
        Places the beams' tokens in `next_ids`; returns the requests whose search ended."""
        pick = torch.tensor([i for _, idx in groups for i in idx], device=scores.device)
        beam_scores, beam_logprobs = scores.index_select(0, pick), logprobs.index_select(0, pick)
        moves: list[tuple[int, int]] = []  # (row, the row it continues)
        done, at = [], 0
        for group, idx in groups:
            part = slice(at, at + len(idx))
            at += len(idx)
            if self._beam_step(group, idx, beam_scores[part], beam_logprobs[part], next_ids, moves):
                done.append(group)
        if moves:
            filled = max(len(self._running[dst].tokens) for dst, _ in moves)  # this step's K/V included
            self.kv.copy_rows([d for d, _ in moves], [s for _, s in moves], filled)
        return done

    def _beam_step(self, group: RowGroup, idx: list[int], scores: torch.Tensor, logprobs: torch.Tensor,
                   next_ids: list[int], moves: list[tuple[int, int]]) -> bool:
        """One request's beam step over its rows `idx` (by beam; `scores` / `logprobs` [k, vocab] are theirs): pick
        the continuations, give each row the decoding state of the beam it continues (its KV rows: `moves`),
        place the new tokens. True when the search ended."""
        rows = group.rows
        src, toks, lps = group.search.step(scores, logprobs, [(r.tokens, r.logprobs) for r in rows])
        if src != list(range(len(rows))):
            moves += [(idx[j], idx[b]) for j, b in enumerate(src) if j != b]
            state = [(list(rows[b].tokens), list(rows[b].logprobs), rows[b].proc) for b in src]
            taken = set()
            for row, (tokens, lp, proc) in zip(rows, state, strict=True):
                row.tokens, row.logprobs = tokens, lp
                row.proc = proc if proc is None or id(proc) not in taken else proc.fork()
                if proc is not None:
                    taken.add(id(proc))
        for row, i, t, lp in zip(rows, idx, toks, lps, strict=True):
            row.tokens.append(t)
            row.logprobs.append(lp)
            next_ids[i] = t
        return group.search.done

    def _finished(self, seq: Sequence, reason: str | None) -> None:
        """A row left with `reason` (None: its beam search ended); its request finishes when all its rows have."""
        group = seq.group
        if group is None:
            result = seq.result(reason)
        elif group.search is not None:
            if seq.index != 0:
                return
            result = group.beam_result(self.detokenizer)
        else:
            result = group.row_finished(seq, seq.result(reason))
            if result is None:
                return
        owner = seq if group is None else group.owner
        self.counters["finished"] += 1
        safe_call(self.observer, "on_request_finished", owner.adapter, owner.method, result.finish_reason,
                  result.prompt_tokens, result.generated_tokens, result.timings["total_s"])
        owner.finish(result, None)

    def _remove_row(self, i: int) -> None:
        """Row i leaves: the last row moves into its place (KV cache and list), its pin is released."""
        running = self._running
        seq = running[i]
        last = len(running) - 1
        if i != last:
            moved = running[last]
            self.kv.move_row(last, i, len(moved.tokens))
            running[i] = moved
        running.pop()
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Unpin every adapter of a row that leaves (or never joined)."""
        for term in seq.terms[:len(seq.slots)]:
            self.cache.release(term.key)
        seq.slots = ()

    def _apply_merge_policy(self, seqs: list[Sequence]) -> None:
        """Merge the (IA)3 adapter every row uses (serve/engine/merge_policy.py); unmerge exactly when rows mix."""
        want = self.merge_policy.target([(s.key, s.kind) for s in seqs], self._merged)
        if want == self._merged:
            return
        if self._merged is not None:
            self._unmerge()
        if want is not None:
            t0 = time.perf_counter()
            self.slots.merge(seqs[0].kind, seqs[0].slots[0])
            dt = time.perf_counter() - t0
            self.cache.pin(want)  # a merged adapter's slot must not be evicted while merged
            self._merged = want
            self.counters["merges"] += 1
            self.counters["merge_s"] += dt
            safe_call(self.observer, "on_merge", "ia3", dt)
        self._rows_cache = None

    def _release_idle_merge(self) -> None:
        """No rows run: a removed merged adapter, or one holding a slot others wait for, is unmerged."""
        if self.merge_policy.release_when_idle(self._merged, self._merged is not None and not
                                               self.cache.contains(self._merged), bool(self._waiting)):
            self._unmerge()

    def _unmerge(self) -> None:
        t0 = time.perf_counter()
        self.slots.unmerge()
        dt = time.perf_counter() - t0
        self.cache.release(self._merged)
        self._merged = None
        self._rows_cache = None
        self.counters["unmerges"] += 1
        self.counters["unmerge_s"] += dt
        safe_call(self.observer, "on_unmerge", "ia3", dt)

    def _fail(self, seq: Sequence, error: BaseException | None) -> None:
        if seq.group is not None:  # a row of a request of several: the request fails once
            seq = seq.group.owner
            if seq.done:
                return
        self.counters["failed"] += 1
        safe_call(self.observer, "on_request_failed", seq.adapter,
                  "cancelled" if error is None else type(error).__name__)
        seq.finish(None, error if error is not None else RequestCancelledError("request cancelled"))

    def _fail_running(self, error: BaseException) -> None:
        wrapped = error if isinstance(error, PeftServeError) else PeftServeError(f"generation failed: {error!r}")
        while self._running:
            seq = self._running[-1]
            self._remove_row(len(self._running) - 1)
            self._fail(seq, wrapped)
        if self._merged is not None:
            self._unmerge()

    def _fail_all(self, error: BaseException) -> None:
        self._fail_running(error)
        self._take_inbox()
        for seq in self._waiting:
            self._dequeue(seq)
            self._fail(seq, error)
        self._waiting = []

    def _report_memory(self) -> None:
        now = time.monotonic()
        if now - self._last_mem_report < 5.0 or not torch.cuda.is_available():
            return
        self._last_mem_report = now
        for dev in {t.device for t in self.kv.self_k if t.device.type == "cuda"}:
            safe_call(self.observer, "on_device_memory", str(dev), torch.cuda.memory_allocated(dev),
                      torch.cuda.memory_reserved(dev))
