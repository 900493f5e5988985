"""The dma copier's host loop in C (offload.dma_api=native): a native thread that never needs Python's GIL.

Why: under copy_mode dma every decode step starts with a plan (the first-block guess) that a host thread must
see and turn into copies before the link does anything. The Python thread (dma_api driver / torch) shares the
GIL with the decode loop's thread, which wakes at exactly that moment (the previous step's event) and runs
its Python; on the H200 the first copy of a switch-base-128 step began 0.03-0.04 ms after its plan's post kernel
ended (bench/results/profile-decode-h200-driver.json, e2e-h200-driver-prenative.md).
This loop polls the pinned head the post kernel writes (kernels/mailbox.py), and for each new ring entry
issues one cuMemcpyHtoDAsync per expert, then an event and a cuStreamWriteValue64 of done[m] on the signal
stream: the same work as infer.offload.DmaCopier._poll, in C.

The C source is compiled once per source version with the system C compiler (cc, or $CC) into the cache
directory ($PGMOE_CACHE, else ~/.cache/pgmoe, else the temp directory) and loaded with ctypes. The driver
calls are function pointers handed in by the caller: infer.offload passes libcuda's; the tests pass the
host stand-ins compiled beside the loop (pgmoe_host_*: a CPU "device", where device addresses are host
addresses), so the loop itself runs in the CPU test suite. Where no compiler works, build() raises
NativeUnavailable and the copier falls back to the Python thread (the run's metrics name the API used).

Legend as in kernels/mailbox.py: R ring entries of W = 2n + 3 int64 ([m, posted[m], src[n], dst[n], g]).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

SOURCE = r"""
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef int (*memcpy_fn)(uint64_t dst, const void *src, size_t bytes, void *stream);
typedef int (*record_fn)(void *event, void *stream);
typedef int (*wait_fn)(void *stream, void *event, unsigned int flags);
typedef int (*write_fn)(void *stream, uint64_t addr, uint64_t value, unsigned int flags);
typedef int (*ctx_fn)(void *ctx);

/* mirrored field by field by infer/native_copier.py's Copier (checked through pgmoe_copier_size) */
typedef struct {
    volatile int64_t *head;     /* pinned: the last posted plan g */
    volatile int64_t *ring;     /* pinned: [R, 2n + 3] */
    int64_t R, n, M, E, P;
    const uint64_t *slot_ptr;   /* [P]: device address of each slot */
    const uint64_t *store_ptr;  /* [M * E]: host address of each expert */
    uint64_t row_bytes;         /* bytes of one expert */
    uint64_t done_ptr;          /* device address of done[0] (int64 [M]) */
    void *ctx, *stream, *signal, *event;
    memcpy_fn memcpy_h2d;
    record_fn record;
    wait_fn wait_event;
    write_fn write64;
    ctx_fn set_ctx;             /* may be 0 */
    int64_t idle_ns, sleep_ns;  /* poll without pause until idle_ns without a plan, then sleep sleep_ns per poll */
    void **trace_events;        /* [2 * trace_cap]: recorded before / after each plan's copies */
    int64_t *trace_meta;        /* [trace_cap, 3]: (g, m, experts copied) per traced plan */
    volatile int64_t trace_cap, trace_n;
    volatile int64_t stop, seen;
    volatile int64_t error, error_rc, error_plan, error_value;
    uint64_t thread;
    volatile int64_t slow_ns, slow_plan, slow_call;  /* the slowest driver call so far: ns, its plan, CALL_* */
    int64_t direct_m;           /* this block's done[m] is written on the copies' stream itself (-1: none) */
    /* the early first-block guess (DmaCopier.enable_early): the greedy choice writes (seq, expert) into `early`
       (pinned; 0: off); the loop copies that expert of block early_m into slot early_slot at once, and the guess's
       plan (flag 1) that names the same expert and slot then finds its copy done */
    volatile int64_t *early;
    int64_t early_m, early_slot;
    volatile int64_t early_on;  /* copy early (off while the pool holds dma back, or copies nothing) */
    int64_t early_seen, early_e;  /* the last sequence seen; the expert copied early, not yet met by its plan (-1) */
    volatile int64_t early_copied, early_used;  /* early copies; guess plans that found theirs done */
    /* done[m]'s events, one per plan in turn (events[g % n_events]; n_events 0: `event` for every plan), so that no
       plan re-records an event whose last record may still be pending behind a copy */
    void **events;
    int64_t n_events;
    volatile int64_t call_ns[6], call_n[6];  /* time in each driver call (CALL_*) and calls, summed */
} pgmoe_copier;

_Static_assert(sizeof(pthread_t) <= sizeof(uint64_t), "pthread_t does not fit");

enum { ERR_OVERRUN = 1, ERR_ENTRY = 2, ERR_BLOCK = 3, ERR_INDEX = 4, ERR_DRIVER = 5 };
enum { CALL_MEMCPY = 1, CALL_RECORD = 2, CALL_WAIT = 3, CALL_WRITE = 4, CALL_CTX = 5 };

int64_t pgmoe_copier_size(void) { return (int64_t)sizeof(pgmoe_copier); }

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* rc of a driver call begun at t0; keeps the slowest (a call the driver held back shows here: see
   infer.offload.DMA_HOST_COPY_NOTE) */
static int timed(pgmoe_copier *c, int rc, int64_t t0, int64_t g, int64_t call) {
    int64_t dt = now_ns() - t0;
    if (call >= 0 && call < 6) {
        c->call_ns[call] += dt;
        c->call_n[call] += 1;
    }
    if (dt > c->slow_ns) {
        c->slow_plan = g;
        c->slow_call = call;
        c->slow_ns = dt;
    }
    return rc;
}

static int fail(pgmoe_copier *c, int64_t code, int64_t rc, int64_t plan, int64_t value) {
    c->error_rc = rc;
    c->error_plan = plan;
    c->error_value = value;
    __atomic_store_n(&c->error, code, __ATOMIC_RELEASE);
    return -1;
}

static int handle(pgmoe_copier *c, int64_t g) {
    const int64_t n = c->n, W = 2 * n + 3;
    volatile int64_t *row = c->ring + (g % c->R) * W;
    int64_t tag = row[W - 1];
    if (tag != g) return fail(c, ERR_ENTRY, 0, g, tag);
    /* the first word: m | flags << 32 (kernels/mailbox.py) */
    int64_t m = (int64_t)((uint64_t)row[0] & 0xFFFFFFFFULL), b = row[1];
    if (row[0] < 0 || m >= c->M) return fail(c, ERR_BLOCK, 0, g, row[0]);
    /* the guess's plan (flag 1) meets the early copy of its expert into its slot: that copy is done, in stream order */
    int early_hit = (((uint64_t)row[0] >> 32) & 1ULL) && c->early_e >= 0 && n == 1 && m == c->early_m &&
                    row[2] == c->early_e && row[2 + n] == c->early_slot;
    int rc;
    int64_t k = -1;
    if (c->trace_n < c->trace_cap) {
        k = c->trace_n;
        int64_t t0 = now_ns();
        if ((rc = timed(c, c->record(c->trace_events[2 * k], c->stream), t0, g, CALL_RECORD)))
            return fail(c, ERR_DRIVER, rc, g, CALL_RECORD);
    }
    int64_t copied = 0;
    for (int64_t j = 0; j < n; j++) {
        int64_t e = row[2 + j], p = row[2 + n + j];
        if (e < 0 || p < 0) continue;
        if (e >= c->E || p >= c->P) return fail(c, ERR_INDEX, 0, g, e >= c->E ? e : p);
        if (p == c->early_slot) c->early_e = -1;  /* the slot's next contents: this plan's, not the early copy's */
        if (early_hit) continue;  /* copied early (traced as its own plan, -seq) */
        int64_t t0 = now_ns();
        rc = timed(c, c->memcpy_h2d(c->slot_ptr[p], (const void *)(uintptr_t)c->store_ptr[m * c->E + e],
                                    c->row_bytes, c->stream), t0, g, CALL_MEMCPY);
        if (rc) return fail(c, ERR_DRIVER, rc, g, CALL_MEMCPY);
        copied++;
    }
    if (early_hit) c->early_used++;
    if (k >= 0) {
        int64_t t0 = now_ns();
        if ((rc = timed(c, c->record(c->trace_events[2 * k + 1], c->stream), t0, g, CALL_RECORD)))
            return fail(c, ERR_DRIVER, rc, g, CALL_RECORD);
        c->trace_meta[3 * k] = g;
        c->trace_meta[3 * k + 1] = m;
        c->trace_meta[3 * k + 2] = copied;
        __atomic_store_n(&c->trace_n, k + 1, __ATOMIC_RELEASE);
    }
    int64_t t0 = now_ns();
    if (m == c->direct_m) {
        /* the step's last block: nothing follows its copies until the next step's first plan, so done[m] is written
           right behind them on their stream, without the event's hop to the signal stream */
        if ((rc = timed(c, c->write64(c->stream, c->done_ptr + 8 * (uint64_t)m, (uint64_t)b, 0), t0, g, CALL_WRITE)))
            return fail(c, ERR_DRIVER, rc, g, CALL_WRITE);
        return 0;
    }
    /* done[m] = b on the signal stream, behind the copies (so the next plan's copies need not wait for it) */
    t0 = now_ns();
    void *ev = c->n_events > 0 ? c->events[g % c->n_events] : c->event;
    if ((rc = timed(c, c->record(ev, c->stream), t0, g, CALL_RECORD)))
        return fail(c, ERR_DRIVER, rc, g, CALL_RECORD);
    t0 = now_ns();
    if ((rc = timed(c, c->wait_event(c->signal, ev, 0), t0, g, CALL_WAIT)))
        return fail(c, ERR_DRIVER, rc, g, CALL_WAIT);
    t0 = now_ns();
    if ((rc = timed(c, c->write64(c->signal, c->done_ptr + 8 * (uint64_t)m, (uint64_t)b, 0), t0, g, CALL_WRITE)))
        return fail(c, ERR_DRIVER, rc, g, CALL_WRITE);
    return 0;
}

/* a new (seq, expert) from the greedy choice: copy that expert of block early_m into slot early_slot now */
static int poll_early(pgmoe_copier *c) {
    int64_t s = __atomic_load_n(c->early, __ATOMIC_ACQUIRE);
    if (s == c->early_seen) return 0;
    c->early_seen = s;
    int64_t e = c->early[1];
    c->early_e = -1;
    if (!__atomic_load_n(&c->early_on, __ATOMIC_ACQUIRE) || e < 0 || e >= c->E) return 0;
    int rc;
    int64_t k = -1;
    if (c->trace_n < c->trace_cap) {
        k = c->trace_n;
        int64_t t0 = now_ns();
        if ((rc = timed(c, c->record(c->trace_events[2 * k], c->stream), t0, -s, CALL_RECORD)))
            return fail(c, ERR_DRIVER, rc, -s, CALL_RECORD);
    }
    int64_t t0 = now_ns();
    rc = timed(c, c->memcpy_h2d(c->slot_ptr[c->early_slot],
                                (const void *)(uintptr_t)c->store_ptr[c->early_m * c->E + e], c->row_bytes,
                                c->stream), t0, -s, CALL_MEMCPY);
    if (rc) return fail(c, ERR_DRIVER, rc, -s, CALL_MEMCPY);
    if (k >= 0) {
        t0 = now_ns();
        if ((rc = timed(c, c->record(c->trace_events[2 * k + 1], c->stream), t0, -s, CALL_RECORD)))
            return fail(c, ERR_DRIVER, rc, -s, CALL_RECORD);
        c->trace_meta[3 * k] = -s;  /* traced as plan -seq */
        c->trace_meta[3 * k + 1] = c->early_m;
        c->trace_meta[3 * k + 2] = 1;
        __atomic_store_n(&c->trace_n, k + 1, __ATOMIC_RELEASE);
    }
    c->early_e = e;
    c->early_copied++;
    return 0;
}

static void *loop(void *arg) {
    pgmoe_copier *c = (pgmoe_copier *)arg;
    int rc;
    if (c->set_ctx && (rc = c->set_ctx(c->ctx))) {
        fail(c, ERR_DRIVER, rc, 0, CALL_CTX);
        return 0;
    }
    int64_t idle_since = now_ns();
    while (!__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE)) {
        int64_t head = __atomic_load_n(c->head, __ATOMIC_ACQUIRE), seen = c->seen;
        if (head > seen) {
            if (head - seen > c->R) {
                fail(c, ERR_OVERRUN, 0, head, head - seen);
                return 0;
            }
            for (int64_t g = seen + 1; g <= head; g++) {
                if (handle(c, g)) return 0;
                __atomic_store_n(&c->seen, g, __ATOMIC_RELEASE);
            }
            idle_since = now_ns();
        } else if (c->early && __atomic_load_n(c->early, __ATOMIC_ACQUIRE) != c->early_seen) {
            if (poll_early(c)) return 0;
            idle_since = now_ns();
        } else if (now_ns() - idle_since > c->idle_ns) {
            struct timespec t = {0, (long)c->sleep_ns};
            nanosleep(&t, 0);
        } else {
            sched_yield();
        }
    }
    return 0;
}

int pgmoe_copier_start(pgmoe_copier *c) {
    pthread_t t;
    int rc = pthread_create(&t, 0, loop, c);
    if (!rc) memcpy(&c->thread, &t, sizeof t);
    return rc;
}

int pgmoe_copier_stop(pgmoe_copier *c) {
    pthread_t t;
    memcpy(&t, &c->thread, sizeof t);
    __atomic_store_n(&c->stop, 1, __ATOMIC_RELEASE);
    return pthread_join(t, 0);
}

/* host stand-ins for the driver calls: a CPU "device" whose addresses are host addresses (tests) */
int pgmoe_host_memcpy(uint64_t dst, const void *src, size_t bytes, void *stream) {
    (void)stream;
    memcpy((void *)(uintptr_t)dst, src, bytes);
    return 0;
}
int pgmoe_host_record(void *event, void *stream) {
    (void)stream;
    if (event) __atomic_add_fetch((int64_t *)event, 1, __ATOMIC_RELAXED);  /* a test's count of records per event */
    return 0;
}
int pgmoe_host_wait(void *stream, void *event, unsigned int flags) { (void)stream; (void)event; (void)flags; return 0; }
int pgmoe_host_write64(void *stream, uint64_t addr, uint64_t value, unsigned int flags) {
    (void)flags;
    if (stream) __atomic_add_fetch((int64_t *)stream, 1, __ATOMIC_RELAXED);  /* a test's count of writes per stream */
    __atomic_store_n((int64_t *)(uintptr_t)addr, (int64_t)value, __ATOMIC_RELEASE);
    return 0;
}
"""

ERRORS = {1: "ring overrun (plans in flight: {value}, more than the ring holds)",
          2: "ring entry of plan {plan} reads as plan {value}",
          3: "plan {plan} names block {value}, out of range",
          4: "plan {plan} names expert or slot {value}, out of range",
          5: "the CUDA driver's {call} failed for plan {plan} (error {rc})"}
CALLS = {1: "cuMemcpyHtoDAsync", 2: "cuEventRecord", 3: "cuStreamWaitEvent", 4: "cuStreamWriteValue64",
         5: "cuCtxSetCurrent"}

_p, _i64, _u64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64


class Copier(ctypes.Structure):
    """pgmoe_copier, field by field."""

    _fields_ = [
        ("head", _p), ("ring", _p),
        ("R", _i64), ("n", _i64), ("M", _i64), ("E", _i64), ("P", _i64),
        ("slot_ptr", _p), ("store_ptr", _p), ("row_bytes", _u64), ("done_ptr", _u64),
        ("ctx", _p), ("stream", _p), ("signal", _p), ("event", _p),
        ("memcpy_h2d", _p), ("record", _p), ("wait_event", _p), ("write64", _p), ("set_ctx", _p),
        ("idle_ns", _i64), ("sleep_ns", _i64),
        ("trace_events", _p), ("trace_meta", _p), ("trace_cap", _i64), ("trace_n", _i64),
        ("stop", _i64), ("seen", _i64),
        ("error", _i64), ("error_rc", _i64), ("error_plan", _i64), ("error_value", _i64),
        ("thread", _u64),
        ("slow_ns", _i64), ("slow_plan", _i64), ("slow_call", _i64),
        ("direct_m", _i64),
        ("early", _p), ("early_m", _i64), ("early_slot", _i64), ("early_on", _i64), ("early_seen", _i64),
        ("early_e", _i64), ("early_copied", _i64), ("early_used", _i64),
        ("events", _p), ("n_events", _i64), ("call_ns", _i64 * 6), ("call_n", _i64 * 6),
    ]

    def error_text(self) -> str | None:
        if not self.error:
            return None
        fmt = ERRORS.get(self.error, "error {code}")
        return fmt.format(code=self.error, plan=self.error_plan, value=self.error_value, rc=self.error_rc,
                          call=CALLS.get(self.error_value, "call"))

    def slowest_call(self) -> dict | None:
        """The loop's slowest driver call so far (ms, plan, name): a call held back by the driver (a blocking call
        in another thread, infer.offload.DMA_HOST_COPY_NOTE) shows here; None before any call."""
        if not self.slow_call:
            return None
        return {"ms": self.slow_ns / 1e6, "plan": int(self.slow_plan), "call": CALLS.get(self.slow_call, "call")}

    def call_times(self) -> dict:
        """Per driver call the loop made: calls and mean microseconds (time in the call, on the host)."""
        return {CALLS[k]: {"calls": int(self.call_n[k]), "mean_us": self.call_ns[k] / self.call_n[k] / 1e3}
                for k in CALLS if self.call_n[k]}


class NativeUnavailable(RuntimeError):
    """The C loop could not be built or loaded here (no C compiler, a failed compile)."""


_LIB: ctypes.CDLL | None = None
_FAILED: NativeUnavailable | None = None
_LOCK = threading.Lock()


def cache_dir() -> Path:
    for d in (os.environ.get("PGMOE_CACHE"), os.path.join(os.path.expanduser("~"), ".cache", "pgmoe"),
              os.path.join(tempfile.gettempdir(), "pgmoe")):
        if not d:
            continue
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
            if os.access(d, os.W_OK):
                return Path(d)
        except OSError:
            continue
    raise NativeUnavailable("no writable cache directory for the native copier (set PGMOE_CACHE)")


def build() -> ctypes.CDLL:
    """The compiled loop (built once per source version and cached; loaded once per process). A failure is
    remembered too: every later call raises it again without another compile."""
    global _LIB, _FAILED
    with _LOCK:
        if _LIB is not None:
            return _LIB
        if _FAILED is not None:
            raise _FAILED
        try:
            _LIB = _build()
        except NativeUnavailable as e:
            _FAILED = e
            raise
        return _LIB


def _build() -> ctypes.CDLL:
    """Compile (where the cache has no build of this source) and load the loop; NativeUnavailable on failure."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise NativeUnavailable("no C compiler (cc, gcc or clang; or set CC) to build the native copier")
    tag = hashlib.sha256((SOURCE + cc).encode()).hexdigest()[:16]
    so = cache_dir() / f"native_copier-{tag}.so"
    if not so.exists():
        with tempfile.TemporaryDirectory() as tmp:
            src, out = Path(tmp) / "copier.c", Path(tmp) / "copier.so"
            src.write_text(SOURCE)
            cmd = [cc, "-O2", "-std=c11", "-D_GNU_SOURCE", "-shared", "-fPIC", "-pthread", str(src), "-o", str(out)]
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise NativeUnavailable(f"building the native copier failed: {e}") from e
            if r.returncode != 0:
                raise NativeUnavailable(f"building the native copier failed ({' '.join(cmd)}): {r.stderr[-2000:]}")
            part = so.with_name(f"{so.name}.{os.getpid()}.part")
            shutil.copyfile(out, part)
            os.replace(part, so)  # atomic: a concurrent process loads a whole file or builds its own
    try:
        lib = ctypes.CDLL(str(so))
    except OSError as e:
        raise NativeUnavailable(f"loading the native copier {so} failed: {e}") from e
    lib.pgmoe_copier_size.restype = _i64
    if lib.pgmoe_copier_size() != ctypes.sizeof(Copier):
        raise NativeUnavailable(f"the native copier's struct is {lib.pgmoe_copier_size()} bytes, its Python "
                                f"mirror {ctypes.sizeof(Copier)}")
    for f in (lib.pgmoe_copier_start, lib.pgmoe_copier_stop):
        f.argtypes, f.restype = [ctypes.POINTER(Copier)], ctypes.c_int
    return lib


def usable(dma_api: str) -> bool:
    """Whether offload.dma_api asks for the native loop and it builds here (needs no GIL, so no eager loading)."""
    if dma_api != "native":
        return False
    try:
        build()
    except NativeUnavailable:
        return False
    return True


def address(fn) -> int:
    """A ctypes function's address, for the struct's function pointers."""
    return ctypes.cast(fn, ctypes.c_void_p).value


def host_calls(lib: ctypes.CDLL) -> dict[str, int]:
    """The host stand-ins (a CPU device) as the struct's driver calls."""
    return {"memcpy_h2d": address(lib.pgmoe_host_memcpy), "record": address(lib.pgmoe_host_record),
            "wait_event": address(lib.pgmoe_host_wait), "write64": address(lib.pgmoe_host_write64), "set_ctx": 0}


__all__ = ["Copier", "NativeUnavailable", "build", "usable", "address", "host_calls", "cache_dir", "SOURCE"]
