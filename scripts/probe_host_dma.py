"""Probe: can host-issued DMA copies feed a captured pre-gated decode step faster than the device
copy kernel? (Issue 6's copy-efficiency lever; run on the GPU, writes JSON.)

    python3 scripts/probe_host_dma.py --out $OUT/probe-host-dma.json

Measured on the H200 (bench/results/probe-host-dma-h200.json): the event-driven host_dma variant
below delivered wrong experts in some steps (5 wait timeouts in 60 steps, checksums off), at a
median step of 1.21 ms vs the copy kernel's 1.22 (no copies: 0.73; 6 experts by DMA back to back:
1.08). The copy mode that came of it (offload.copy_mode=dma, infer.offload.DmaCopier) replaces the
events by a sequence-numbered ring the graph copies to pinned memory.

Today the decode step, copies included, is one CUDA graph: the pre-gate's expert ids stay on the
GPU and a gather kernel (kernels/expert_copy.py) reads the expert from mapped pinned host memory,
at ~41-46 GB/s during decoding against 51-55 GB/s for cudaMemcpyAsync (the DMA engines). The
alternative probed here keeps the compute in one graph but lets a host thread issue the copies:

  in the graph, per MoE block b:  routing for block b+1 -> its ids copied to pinned host memory ->
      external event ev[b+1] (an event-record node the host can wait on);
      before block b's expert FFN: a one-program kernel spins until flag[b] == 1, then clears it.
  a host thread, per step:        for b: ev[b].synchronize(); e = ids_host[b];
      on the copy stream: slot <- store[e] (cudaMemcpyAsync, DMA); flag[b] <- 1 (a fill kernel).

The copies queue back to back on the copy stream as soon as each block's ids are known, so the
host's reaction time is hidden behind the previous copy; what changes is the copy's bandwidth.
The host thread and the graph replays go in lockstep (replay i + 1 is launched once the thread has
issued replay i's copies: an event's synchronize waits for its latest launched record).

The step is emulated: NB MoE blocks, each `--block-us` of compute (torch.cuda._sleep, calibrated),
one expert of switch-base size (2 x 768 x 3072 bf16 = 9.4 MB) per block from a pinned store of E
experts, ids from a fixed random table indexed by a step counter on the GPU, and a checksum of
every slot the "FFN" reads (the copies must deliver the right expert: checked against the store).
Variants, each a captured graph replayed back to back (median of CUDA-event-timed replays):
  compute      no copies (the compute floor)
  kernel       the device gather kernel on a copy stream (today's design)
  host_dma     host-thread cudaMemcpyAsync + spin flags (the probe)
Plus single-expert copy times: DMA vs gather kernel. Block 0's expert is copied on demand in both
copy variants (no block before it can pre-gate it), as in the real step.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels.expert_copy import gather_rows  # noqa: E402
from scripts.probe_decode import cuda_times as cuda_ms  # noqa: E402

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _wait_flag_kernel(flag_ptr, err_ptr, MAX_ITERS: tl.constexpr):
        # spin until *flag != 0 (set by a kernel on the copy stream after its copy), then clear it;
        # after MAX_ITERS polls give up and count a timeout in *err (never hang the GPU)
        v = tl.load(flag_ptr, volatile=True)
        i = 0
        while (v == 0) & (i < MAX_ITERS):
            v = tl.load(flag_ptr, volatile=True)
            i += 1
        if v == 0:
            tl.atomic_add(err_ptr, 1)
        tl.store(flag_ptr, 0)
except ImportError:  # pragma: no cover
    triton = None


def wait_flag(flag: torch.Tensor, err: torch.Tensor, max_iters: int = 20_000_000) -> None:
    """Block the current stream until flag[0] != 0, then reset it to 0 (err[0] += 1 on a timeout)."""
    _wait_flag_kernel[(1,)](flag, err, MAX_ITERS=max_iters)


def calibrate_sleep(target_us: float) -> int:
    """torch.cuda._sleep cycles that take about target_us."""
    cycles = 100_000
    t = statistics.median(cuda_ms(lambda: torch.cuda._sleep(cycles), 3, 10)) * 1000
    return max(1000, int(cycles * target_us / max(t, 1e-3)))


class Step:
    """One emulated decode step, captured as a graph, for one copy variant."""

    def __init__(self, variant: str, store: torch.Tensor, table: torch.Tensor, nb: int, sleep_cycles: int):
        self.variant, self.store, self.table, self.nb = variant, store, table, nb
        dev = torch.device("cuda")
        C = store.shape[1]
        self.slots = torch.empty(2, C, dtype=store.dtype, device=dev)  # double buffer: block b uses b % 2
        self.counter = torch.zeros(1, dtype=torch.long, device=dev)  # the step number, on the GPU
        self.sums = torch.zeros(table.shape[0], nb, dtype=torch.float32, device=dev)  # per (step, block)
        self.err = torch.zeros(1, dtype=torch.int32, device=dev)
        self.flags = torch.zeros(nb, 1, dtype=torch.int32, device=dev)
        self.ids_dev = torch.zeros(nb, dtype=torch.long, device=dev)
        self.ids_host = torch.zeros(nb, dtype=torch.long).pin_memory()
        self.ev = [torch.cuda.Event(external=True) for _ in range(nb)]
        self.copy_done = [torch.cuda.Event() for _ in range(nb)]
        self.copy_stream = torch.cuda.Stream()
        self.cycles = sleep_cycles
        self.graph = torch.cuda.CUDAGraph()

    def _route(self, b: int) -> None:
        # the "pre-gate" of block b (computed at block b - 1, or at block 0 for itself): ids from the table
        row = self.table.index_select(0, self.counter % self.table.shape[0])[0]
        self.ids_dev[b : b + 1].copy_(row[b : b + 1])

    def _issue_kernel_copy(self, b: int) -> None:
        cur = torch.cuda.current_stream()
        self.copy_stream.wait_stream(cur)
        with torch.cuda.stream(self.copy_stream):
            gather_rows(self.store, self.ids_dev[b : b + 1], self.slots[b % 2 : b % 2 + 1],
                        num_programs=32, block=8192)
            self.copy_done[b].record()  # block b's FFN waits for it (body)

    def body(self) -> None:
        for b in range(self.nb):
            if b == 0:
                self._route(0)  # block 0 routes itself: its copy cannot start earlier
                self._announce(0)
            if b + 1 < self.nb:
                self._route(b + 1)  # the pre-gate at block b routes block b + 1
            if self.variant == "kernel":
                if b == 0:
                    self._issue_kernel_copy(0)
                if b + 1 < self.nb:
                    self._issue_kernel_copy(b + 1)
            elif self.variant == "host_dma" and b + 1 < self.nb:
                self._announce(b + 1)
            torch.cuda._sleep(self.cycles)  # the block's attention etc.
            if self.variant == "host_dma":
                wait_flag(self.flags[b], self.err)
            if self.variant == "kernel":
                torch.cuda.current_stream().wait_event(self.copy_done[b])
            if self.variant != "compute":  # the "expert FFN" reads the whole slot
                at = (self.counter % self.table.shape[0]) * self.nb + b  # flat (step, block), on the GPU
                self.sums.view(-1).index_copy_(0, at, self.slots[b % 2].float().sum().reshape(1))
        self.counter += 1

    def _announce(self, b: int) -> None:
        if self.variant != "host_dma":
            return
        self.ids_host[b : b + 1].copy_(self.ids_dev[b : b + 1], non_blocking=True)
        self.ev[b].record()

    def capture(self) -> None:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        if self.variant == "host_dma":
            # warm up (compiles the wait kernel) with the flags pre-set, so nothing waits on a thread
            with torch.cuda.stream(s):
                self.flags.fill_(1)
                wait_flag(self.flags[0], self.err)
            torch.cuda.synchronize()
            self.flags.zero_()
            self.err.zero_()
        else:
            with torch.cuda.stream(s):
                for _ in range(2):
                    self.body()
            torch.cuda.synchronize()
        with torch.cuda.graph(self.graph):
            self.body()
        torch.cuda.synchronize()
        self.counter.zero_()
        self.sums.zero_()


class HostCopier(threading.Thread):
    """Issues a Step's copies from the host, in lockstep with its replays."""

    def __init__(self, step: Step):
        super().__init__(daemon=True)
        self.step = step
        self.launched = threading.Semaphore(0)
        self.issued = threading.Semaphore(0)
        self.stop = False
        self.error: BaseException | None = None

    def run(self) -> None:
        st = self.step
        try:
            while True:
                self.launched.acquire()
                if self.stop:
                    return
                for b in range(st.nb):
                    st.ev[b].synchronize()
                    e = int(st.ids_host[b])
                    with torch.cuda.stream(st.copy_stream):
                        st.slots[b % 2].copy_(st.store[e], non_blocking=True)
                        st.flags[b].fill_(1)
                self.issued.release()
        except BaseException as ex:  # the graph's wait kernels time out instead of hanging
            self.error = ex
            self.issued.release()


def run_variant(variant: str, store, table, nb, cycles, warmup, iters) -> dict:
    st = Step(variant, store, table, nb, cycles)
    st.capture()
    copier = None
    if variant == "host_dma":
        copier = HostCopier(st)
        copier.start()

    def replay() -> None:
        st.graph.replay()
        if copier is not None:
            copier.launched.release()
            copier.issued.acquire()  # replay i + 1 only after replay i's copies were issued

    n = warmup + iters
    times = cuda_ms(replay, warmup, iters)
    torch.cuda.synchronize()
    if copier is not None:
        copier.stop = True
        copier.launched.release()
        copier.join(timeout=10)
    res = {"variant": variant, "step_ms_median": statistics.median(times), "step_ms_all": times}
    if variant != "compute":
        # every (step, block) slot sum equals the sum of the expert the table names
        want = store_sums[table[:n].cpu()]  # [n, nb]
        got = st.sums[:n].cpu()
        res["checked_steps"] = n
        res["max_abs_err"] = float((got - want).abs().max())
        res["correct"] = bool(torch.allclose(got, want, rtol=1e-4, atol=1.0))  # a wrong expert: ~3000 off
        res["wait_timeouts"] = int(st.err.item())
        if copier is not None and copier.error is not None:
            res["host_thread_error"] = repr(copier.error)
    return res


store_sums: torch.Tensor  # filled in main


def main(argv: list[str] | None = None) -> int:
    global store_sums
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=6, help="decoder MoE blocks (switch-base: 6)")
    ap.add_argument("--block-us", type=float, default=130.0, help="compute per block (switch-base: ~130 us)")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--d-ff", type=int, default=3072)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("probe_host_dma.py needs a CUDA GPU")
    torch.manual_seed(0)
    C = 2 * a.d_model * a.d_ff
    store = torch.randn(a.experts, C, dtype=torch.bfloat16).pin_memory()
    store_sums = store.float().sum(1)
    steps = a.warmup + a.iters
    table = torch.randint(0, a.experts, (steps, a.blocks), device="cuda")
    cycles = calibrate_sleep(a.block_us)
    rep: dict = {
        "probe": "host_dma",
        "command": " ".join(["python3", "scripts/probe_host_dma.py", *(sys.argv[1:] if argv is None else argv)]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": getattr(triton, "__version__", None),
        "expert_mb": C * 2 / 1e6,
        "blocks": a.blocks,
        "block_us_target": a.block_us,
        "sleep_cycles": cycles,
        "what": __doc__.split("\n\n")[0],
    }
    # single-expert copies: DMA vs the gather kernel (median ms; GB/s)
    dst = torch.empty(1, C, dtype=store.dtype, device="cuda")
    ids = torch.tensor([3], device="cuda")
    dma = statistics.median(cuda_ms(lambda: dst[0].copy_(store[3], non_blocking=True), 5, 30))
    ker = statistics.median(cuda_ms(lambda: gather_rows(store, ids, dst, num_programs=32, block=8192), 5, 30))
    rep["one_expert_copy"] = {"dma_ms": dma, "dma_gb_s": C * 2 / dma / 1e6,
                              "kernel_ms": ker, "kernel_gb_s": C * 2 / ker / 1e6}
    six = torch.empty(a.blocks, C, dtype=store.dtype, device="cuda")
    dma6 = statistics.median(cuda_ms(lambda: [six[i].copy_(store[i], non_blocking=True) for i in range(a.blocks)],
                                     5, 30))
    rep["blocks_experts_back_to_back_dma_ms"] = dma6
    rep["copy_floor_ms"] = dma6
    print(f"[probe] one expert: DMA {dma:.3f} ms ({C * 2 / dma / 1e6:.1f} GB/s), kernel {ker:.3f} ms "
          f"({C * 2 / ker / 1e6:.1f} GB/s); {a.blocks} experts by DMA back to back {dma6:.3f} ms", flush=True)
    rep["variants"] = {}
    for v in ("compute", "kernel", "host_dma"):
        t0 = time.perf_counter()
        try:
            r = run_variant(v, store, table, a.blocks, cycles, a.warmup, a.iters)
        except Exception as ex:  # report it, keep the others
            r = {"variant": v, "error": f"{type(ex).__name__}: {ex}"}
        r["wall_s"] = time.perf_counter() - t0
        rep["variants"][v] = r
        print(f"[probe] {v}: " + json.dumps({k: x for k, x in r.items() if k != "step_ms_all"}), flush=True)
    vs = rep["variants"]
    if all("step_ms_median" in vs[k] for k in ("kernel", "host_dma")):
        rep["host_dma_over_kernel"] = vs["host_dma"]["step_ms_median"] / vs["kernel"]["step_ms_median"]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rep, indent=2) + "\n")
    print(f"[probe] wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
