"""The native dma copier's C loop (infer/native_copier.py) on its own, with the host stand-ins for the driver calls:
plans written into the ring by hand are copied in order and their done counts written; a bad entry, a block or an
expert out of range and a ring overrun each stop the loop with an error that names them."""

from __future__ import annotations

import ctypes
import time

import pytest
import torch

from infer import native_copier

R, N, M, E, P, X = 4, 2, 3, 5, 4, 6  # ring entries, plan entries, blocks, experts, slots, elements per expert


@pytest.fixture(scope="module")
def lib():
    try:
        return native_copier.build()
    except native_copier.NativeUnavailable as e:
        pytest.skip(str(e))


class Loop:
    """A started loop over small CPU buffers; post() writes a plan as the post kernel does (entry, then head)."""

    def __init__(self, lib, n=N):
        torch.manual_seed(0)
        self.n = n
        self.lib = lib
        self.store = torch.randn(M, E, X, dtype=torch.float64)
        self.pool = torch.randn(P, X, dtype=torch.float64)
        self.ring = torch.zeros(R, 2 * n + 3, dtype=torch.int64)
        self.head = torch.zeros(1, dtype=torch.int64)
        self.done = torch.zeros(M, dtype=torch.int64)
        self.posted = [0] * M
        self.g = 0
        c = self.c = native_copier.Copier()
        self.slot = (ctypes.c_uint64 * P)(*[self.pool[p].data_ptr() for p in range(P)])
        self.experts = (ctypes.c_uint64 * (M * E))(*[self.store[m, e].data_ptr() for m in range(M) for e in range(E)])
        c.head, c.ring = self.head.data_ptr(), self.ring.data_ptr()
        c.R, c.n, c.M, c.E, c.P = R, n, M, E, P
        c.slot_ptr, c.store_ptr = ctypes.addressof(self.slot), ctypes.addressof(self.experts)
        c.row_bytes, c.done_ptr = X * 8, self.done.data_ptr()
        for name, addr in native_copier.host_calls(lib).items():
            setattr(c, name, addr)
        c.idle_ns, c.sleep_ns = 10**9, 10**5
        assert lib.pgmoe_copier_start(ctypes.byref(c)) == 0

    def post(self, m, src, dst, tag=None, head=None, flags=0):
        self.g += 1
        self.posted[m] += 1
        tag = self.g if tag is None else tag
        self.ring[self.g % R] = torch.tensor([m | flags << 32, self.posted[m], *src, *dst, tag])
        self.head[0] = self.g if head is None else head

    def settle(self, until, timeout=10.0):
        t0 = time.time()
        while not until():
            assert time.time() - t0 < timeout, "the loop did not get there"
            time.sleep(0.001)

    def stop(self):
        assert self.lib.pgmoe_copier_stop(ctypes.byref(self.c)) == 0


def test_plans_are_copied_in_order_and_counted(lib):
    loop = Loop(lib)
    try:
        want = loop.pool.clone()
        plans = [(0, [3, -1], [1, 0]), (2, [4, 0], [2, 3]), (1, [-1, -1], [0, 0]), (0, [1, 2], [1, 0]),
                 (2, [2, -1], [3, 2]), (1, [0, 4], [0, 2])]  # wraps the ring; a later copy into slot 1 wins
        for m, src, dst in plans:
            for e, p in zip(src, dst):
                if e >= 0:
                    want[p] = loop.store[m, e]
            loop.post(m, src, dst)
            loop.settle(lambda: loop.c.seen == loop.g)
        assert torch.equal(loop.pool, want)
        assert loop.done.tolist() == loop.posted == [2, 2, 2]
        assert loop.c.error == 0 and loop.c.error_text() is None
    finally:
        loop.stop()


def test_done_events_rotate_and_calls_are_timed(lib):
    """done[m]'s event: events[g % n_events] for plan g (the host stand-in counts records per event: the events are
    counters here), so no plan re-records the one before's; the loop sums its time per driver call."""
    loop = Loop(lib)
    counts = torch.zeros(3, dtype=torch.int64)
    ptrs = (ctypes.c_void_p * 3)(*[counts.data_ptr() + 8 * i for i in range(3)])
    try:
        loop.c.events, loop.c.n_events, loop.c.direct_m = ctypes.addressof(ptrs), 3, -1
        for m, src, dst in [(0, [3, -1], [1, 0]), (2, [4, 0], [2, 3]), (1, [1, -1], [0, 0]), (0, [2, -1], [3, 2])]:
            loop.post(m, src, dst)
            loop.settle(lambda: loop.c.seen == loop.g)
        assert counts.tolist() == [1, 2, 1]  # plans 1..4 -> events 1, 2, 0, 1
        times = loop.c.call_times()
        assert times["cuMemcpyHtoDAsync"]["calls"] == 5 and times["cuEventRecord"]["calls"] == 4
        assert all(t["mean_us"] >= 0 for t in times.values())
    finally:
        loop.stop()


def test_early_guess_copies_ahead_and_its_plan_only_signals(lib):
    """The early guess: a (seq, expert) written into the early buffer is copied into early_slot at once; the guess's
    plan (flag 1) naming that expert and slot then copies nothing (the slot, spoiled after the early copy, stays
    spoiled) but signals done; a plan copying into the slot in between voids the early copy (the guess's plan then
    copies); with early_on off nothing is copied early."""
    loop = Loop(lib, n=1)
    early = torch.zeros(2, dtype=torch.int64)
    m, slot = 1, 2
    try:
        c = loop.c
        c.early_m, c.early_slot, c.early_e, c.early_on = m, slot, -1, 1
        c.early = early.data_ptr()

        def say(seq, e):
            early[1] = e
            early[0] = seq

        say(1, 3)
        loop.settle(lambda: c.early_copied == 1)
        assert torch.equal(loop.pool[slot], loop.store[m, 3])
        loop.pool[slot] = -7.0
        loop.post(m, [3], [slot], flags=1)
        loop.settle(lambda: c.seen == loop.g)
        assert c.early_used == 1 and torch.all(loop.pool[slot] == -7.0) and loop.done[m] == loop.posted[m]
        say(2, 4)
        loop.settle(lambda: c.early_copied == 2)
        loop.post(0, [1], [slot])  # another block's plan into the slot: the early copy no longer stands
        loop.post(m, [4], [slot], flags=1)
        loop.settle(lambda: c.seen == loop.g)
        assert c.early_used == 1 and torch.equal(loop.pool[slot], loop.store[m, 4])
        c.early_on = 0
        say(3, 0)
        loop.settle(lambda: c.early_seen == 3)
        assert c.early_copied == 2 and c.early_e == -1 and c.error == 0
    finally:
        loop.stop()


@pytest.mark.parametrize("direct", [-1, 2])
def test_the_last_blocks_done_is_written_on_the_copies_stream(lib, direct):
    """direct_m: that block's done count is written on the copies' stream itself, every other block's on the signal
    stream (the host stand-in counts the writes per stream: the streams are two counters here)."""
    loop = Loop(lib)
    counts = torch.zeros(2, dtype=torch.int64)  # [copies' stream, signal stream]
    try:
        loop.c.stream, loop.c.signal = counts.data_ptr(), counts.data_ptr() + 8
        loop.c.direct_m = direct
        for m, src, dst in [(0, [3, -1], [1, 0]), (2, [4, 0], [2, 3]), (1, [1, -1], [0, 0]), (2, [2, -1], [3, 2])]:
            loop.post(m, src, dst)
            loop.settle(lambda: loop.c.seen == loop.g)
        assert loop.done.tolist() == loop.posted == [1, 1, 2]
        assert counts.tolist() == ([0, 4] if direct < 0 else [2, 2])
    finally:
        loop.stop()


@pytest.mark.parametrize("bad, message", [
    (dict(tag=7), "ring entry of plan 1 reads as plan 7"),
    (dict(m=3), "plan 1 names block 3, out of range"),
    (dict(src=[E, -1]), f"plan 1 names expert or slot {E}, out of range"),
    (dict(dst=[P, 0]), f"plan 1 names expert or slot {P}, out of range"),
    (dict(head=R + 1), f"ring overrun (plans in flight: {R + 1}"),
])
def test_a_bad_plan_stops_the_loop_with_its_error(lib, bad, message):
    loop = Loop(lib)
    try:
        before = loop.pool.clone()
        m = bad.get("m", 0)
        if m >= M:  # post() counts per block: write the entry by hand
            loop.g = 1
            loop.ring[1] = torch.tensor([m, 1, 0, -1, 0, 0, 1])
            loop.head[0] = 1
        else:
            loop.post(0, bad.get("src", [1, -1]), bad.get("dst", [0, 0]), tag=bad.get("tag"), head=bad.get("head"))
        loop.settle(lambda: loop.c.error != 0)
        assert message in loop.c.error_text()
        assert loop.c.seen == 0 and loop.done.tolist() == [0, 0, 0] and torch.equal(loop.pool, before)
    finally:
        loop.stop()  # the loop has returned already: the join does not wait


def test_the_struct_layout_matches_the_c_side(lib):
    assert lib.pgmoe_copier_size() == ctypes.sizeof(native_copier.Copier)


def test_traced_plans_record_their_block_and_experts(lib):
    """With trace slots set (DmaCopier.trace on CUDA hands over CUDA events; the host stand-in records nothing),
    each handled plan fills one: (g, block, experts copied), until the slots run out."""
    loop = Loop(lib)
    try:
        cap = 2
        events = (ctypes.c_void_p * (2 * cap))()
        meta = (ctypes.c_int64 * (3 * cap))()
        loop.c.trace_events, loop.c.trace_meta = ctypes.addressof(events), ctypes.addressof(meta)
        loop.c.trace_cap = cap
        for m, src, dst in ((1, [2, 4], [0, 1]), (2, [-1, 3], [2, 3]), (0, [0, -1], [1, 0])):
            loop.post(m, src, dst)
            loop.settle(lambda: loop.c.seen == loop.g)
        assert loop.c.trace_n == cap and list(meta) == [1, 1, 2, 2, 2, 1]
        assert loop.c.error == 0
    finally:
        loop.stop()


def test_a_failed_build_is_remembered(monkeypatch):
    """Where the loop cannot be built, later calls (every pool, every beam run asks) raise the same error without
    compiling again."""
    calls = []

    def broken():
        calls.append(1)
        raise native_copier.NativeUnavailable("building the native copier failed (test)")

    monkeypatch.setattr(native_copier, "_LIB", None)
    monkeypatch.setattr(native_copier, "_FAILED", None)
    monkeypatch.setattr(native_copier, "_build", broken)
    for _ in range(3):
        with pytest.raises(native_copier.NativeUnavailable, match="failed \\(test\\)"):
            native_copier.build()
    assert len(calls) == 1 and not native_copier.usable("native")


def test_the_slowest_driver_call_is_kept(lib):
    """A driver call held back (here a memcpy stand-in that sleeps 50 ms on the second plan) is named with its plan
    and time: what infer.offload.DmaCopier adds to a timeout's error and to the run's stats."""
    memcpy_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    calls = []

    def slow_memcpy(dst, src, nbytes, _stream):
        calls.append(dst)
        if len(calls) == 2:
            time.sleep(0.05)
        ctypes.memmove(dst, src, nbytes)
        return 0

    fn = memcpy_t(slow_memcpy)  # kept alive until the loop stops
    loop = Loop(lib)
    try:
        assert loop.c.slowest_call() is None  # nothing handled yet
        loop.c.memcpy_h2d = ctypes.cast(fn, ctypes.c_void_p).value
        want = loop.pool.clone()
        for m, src, dst in [(0, [3, -1], [1, 0]), (1, [2, -1], [2, 0]), (2, [4, -1], [3, 0])]:
            want[dst[0]] = loop.store[m, src[0]]
            loop.post(m, src, dst)
            loop.settle(lambda: loop.c.seen == loop.g)
        slow = loop.c.slowest_call()
        assert slow["call"] == "cuMemcpyHtoDAsync" and slow["plan"] == 2 and 50 <= slow["ms"] < 5000
        assert torch.equal(loop.pool, want) and len(calls) == 3
    finally:
        loop.stop()
