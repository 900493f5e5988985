"""The inference engine: the encoder pass and the decoder step loop of models.Switch under one
offload policy, with greedy or beam search over a batch of prompts, and the measurements.

The model's non-expert weights live on the compute device; its experts live in an ExpertStore
(CPU). `gpu_only` materialises the experts on the device for its run and frees them afterwards;
every other policy attaches an OffloadRunner as the MoE blocks' expert source. On CUDA the decode
step is captured as one CUDA graph (copies and slot decisions included) when every operation in it
is capturable; otherwise it runs eagerly and the reason is recorded.
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from infer import cpu_compute as cc
from infer import native_copier
from infer.offload import CopySettings, ExpertStore, OffloadError, PackFailed, is_expert_param
from infer.policies import OffloadRunner, PolicySpec, check_cpu_compute, guess_mode
from kernels.expert_ffn import Int8Weights
from models.generate import BeamSelect, GreedySelect, beam_search, greedy
from models.switch import DecodeState, Switch


# ----------------------------------------------------------------------------------------------- loading
def load_offloaded(
    path: str | Path, device, dtype: torch.dtype | None, budget_bytes: float | None, quantize: str | None = None,
    compress: str | None = None, fallback: bool = False,
) -> tuple[Switch, ExpertStore]:
    """Non-expert weights onto `device`, experts straight from the checkpoint into the (pinned) store
    (quantize="int8": stored, copied and computed as per-row int8; compress="exp4" / "expv": bf16 packed losslessly, see
    ExpertStore, on the GPU when `device` is one). The budget is checked from config.json before anything is
    allocated. fallback (offload.compress=auto): an expert that does not pack losslessly leaves the whole store in
    the next format (expv, then exp4, then unpacked: store.compress None) instead of raising PackFailed."""
    from models.checkpoint import load_config, load_switch

    device = torch.device(device)
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    ExpertStore.check_settings(dtype, quantize, compress)  # before anything is read
    cfg = load_config(path)
    n_moe = len(cfg.sparse_layers(False)) + len(cfg.sparse_layers(True))
    per_expert = (ExpertStore.CODECS[compress].layout(2 * cfg.d_ff * cfg.d_model).nbytes if compress else
                  cfg.expert_bytes(1 if quantize else torch.empty((), dtype=dtype).element_size()))
    if budget_bytes is not None and n_moe * cfg.num_experts * per_expert > budget_bytes:
        ExpertStore(cfg, n_moe, dtype, budget_bytes, pin=False, quantize=quantize, compress=compress)  # raises
    model = load_switch(path, device=device, dtype=dtype, skip=is_expert_param)
    while True:
        failed = None
        try:
            store = ExpertStore.from_checkpoint(path, model, dtype, budget_bytes, pin=device.type == "cuda",
                                                quantize=quantize, compress=compress, pack_device=device)
        except PackFailed as e:
            if not fallback:
                raise
            failed = str(e)  # (out of the handler first: the traceback holds the half-filled pinned store)
        if failed is None:
            return model, store
        compress = {"expv": "exp4"}.get(compress)
        print(f"[infer] offload.compress=auto: {failed}; trying {compress or 'none'}", flush=True)


def materialize_experts(model: Switch, store: ExpertStore, device) -> None:
    """Put every expert on the device (gpu_only): tensors, or Int8Weights with a quantized store (a compressed
    store's blocks unpacked on the device straight from the pinned chunks, w_in and w_out views of one block)."""
    for m, moe in enumerate(model.moes):
        if store.compress:
            w_in, w_out = store.weights(store.unpacked_block(m, device))
        else:
            w_in, w_out = (_block_on_device(store, m, which, device) for which in (0, 1))
        if store.quantize:
            moe._parameters.pop("w_in", None)  # plain attributes: int8 weights are not parameters
            moe._parameters.pop("w_out", None)
            moe.w_in, moe.w_out = w_in, w_out
        else:
            moe.w_in = torch.nn.Parameter(w_in, requires_grad=False)
            moe.w_out = torch.nn.Parameter(w_out, requires_grad=False)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _block_on_device(store: ExpertStore, m: int, which: int, device):
    """Block m's w_in (which 0) or w_out (1) of every expert, stacked on the device, expert by expert from
    the contiguous pinned pieces (straight DMA, no temporary block on either side)."""
    def pieces(e):
        w = store.weights(store.data[m, e])[which]
        return tuple(w) if isinstance(w, Int8Weights) else (w,)

    out = [torch.empty((store.E, *p.shape), dtype=p.dtype, device=device) for p in pieces(0)]
    for e in range(store.E):
        for dst, src in zip(out, pieces(e)):
            dst[e].copy_(src, non_blocking=True)
    return Int8Weights(*out) if store.quantize else out[0]


def drop_experts(model: Switch) -> None:
    dtype = next(p.dtype for n, p in model.named_parameters() if not is_expert_param(n))
    E, F, D = model.cfg.num_experts, model.cfg.d_ff, model.cfg.d_model
    for moe in model.moes:
        for name, shape in (("w_in", (E, F, D)), ("w_out", (E, D, F))):
            moe.__dict__.pop(name, None)  # Int8Weights attributes (a quantized gpu_only run)
            setattr(moe, name, torch.nn.Parameter(torch.empty(shape, device="meta", dtype=dtype),
                                                  requires_grad=False))


BEAM_DMA_NOTE = (
    "copy_mode=dma with a Python copier thread (offload.dma_api driver or torch): beam search runs with the device "
    "copy kernel instead (measured when beam search read each step's top-k on the host, whose Python loop then "
    "competed with the copier thread for the GIL: switch-base-128 beam 4 pregated 9.32 ms/token with dma vs 4.90 "
    "with the copy kernel on the H200, bench/results/e2e-h200-beam-dma.md; not measured again since the choice moved "
    "to the device); the native copier (dma_api=native) needs no GIL"
)


# ----------------------------------------------------------------------------------------------- graphs
_SIDE_STREAMS: dict = {}


def greedy_head_fused() -> bool:
    """PGMOE_GREEDY_HEAD: 1 (the default) lets a captured greedy step fuse its LM head with the choice
    (kernels/lm_head.py) where GreedySelect.fuses_head says it can; 0: the matrix product, the logits' cast and
    the choice over them (bench_e2e's variant #headops)."""
    v = os.environ.get("PGMOE_GREEDY_HEAD", "1")
    if v not in ("0", "1"):
        raise ValueError(f"PGMOE_GREEDY_HEAD={v!r}: expected 1 (fused head, the default) or 0")
    return v == "1"


def _side_stream(device) -> torch.cuda.Stream:
    """One warm-up stream per device for every capture. A new stream per capture made cuBLAS(Lt) allocate
    a workspace for it (torch keeps one per handle and stream for the life of the process: 64 MiB on
    Hopper), so each generate call left ~64 MiB allocated until torch's 32 pooled streams came round."""
    key = torch.device(device)
    if key not in _SIDE_STREAMS:
        _SIDE_STREAMS[key] = torch.cuda.Stream(key)
    return _SIDE_STREAMS[key]


class GraphStep:
    """decode_one_token captured as one CUDA graph for a given DecodeState (its buffers keep their
    addresses; the position is a device tensor advanced inside the graph). select: the decoding's token
    choice (models.generate.GreedySelect, or BeamSelect, which also reorders the state's caches), captured
    after the step: the graph then reads its input tokens from select.tok and writes the next ones there,
    and the select is reset after the capture."""

    def __init__(self, model: Switch, state: DecodeState, batch: int, on_warm=None,
                 select: GreedySelect | BeamSelect | None = None, hold=None):
        self.model = model
        dev = state.pos.device
        self.tok = select.tok if select is not None else torch.zeros(batch, dtype=torch.long, device=dev)
        pos0 = state.pos.clone()
        side = _side_stream(dev)
        side.wait_stream(torch.cuda.current_stream())
        # warm up (allocator, Triton autotuning, first launches) outside the capture; hold: a context the warm-up
        # steps run in (the offload pool's dma_held: no dma wait spins while a first launch loads a kernel)
        # greedy: the LM head and the choice fused (kernels/lm_head.py) where GreedySelect takes them
        self.fused_head = isinstance(select, GreedySelect) and greedy_head_fused() and select.fuses_head(model)
        # with the final add and norm in the head's kernel too, unless PGMOE_HEAD_NORM=0 (bench variant #normops)
        self.head_norm = self.fused_head and os.environ.get("PGMOE_HEAD_NORM", "1") != "0"
        with hold() if hold is not None else contextlib.nullcontext(), torch.cuda.stream(side):
            for _ in range(2):
                self._step(model, state, select)
                state.pos.copy_(pos0)
        torch.cuda.current_stream().wait_stream(side)
        if on_warm is not None:
            on_warm()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._step(model, state, select)
        state.pos.copy_(pos0)
        if select is not None:
            select.reset()
            select.captured = True

    def _step(self, model: Switch, state: DecodeState, select) -> torch.Tensor:
        if self.fused_head:
            return select.from_hidden(model, model.decode_hidden(state, self.tok, split_last=self.head_norm))
        logits = model.decode_one_token(state, self.tok)
        if select is not None:
            select(logits)
        return logits

    def __call__(self, state: DecodeState, tok: torch.Tensor) -> torch.Tensor:
        if tok is not self.tok:
            self.tok.copy_(tok)
        self.graph.replay()
        return self.out


# ----------------------------------------------------------------------------------------------- stall
STALL_REPLAYS = 20


def stall_by_difference(
    runner: OffloadRunner,
    state: DecodeState,
    step_with,
    make_step_without,
    inputs: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    replays: int | None = None,
    restart=None,
) -> dict:
    """Stall per token of a step whose waits cannot be timed (a captured graph), by difference:
    median time of `replays` steps with copies minus that of the same steps with none launched
    (make_step_without() is called under runner.no_copies(): a second capture of the step in which
    plans and tables update but nothing is copied), clamped at 0. Both passes replay the run's first
    recorded steps (inputs: (token, pos) per step) from the same runner state, so they make the same
    plans; the runner's counters and placement, and state.pos, are restored afterwards (the run's
    results are already taken; the replays' outputs are discarded). restart(): called with each return to
    the first recorded step, for what else the steps carry along (a captured BeamSelect: its reset, so the
    caches' rows follow the recorded beams again and the replays route as the run did, rather than the
    recorded tokens meeting other beams' caches). replays: steps per timed pass; None: every recorded step with
    a restart (the replays are then the run's own steps: the medians cover what the run's did, not only its first
    steps, which copy more in beam search, where the beams still differ), else STALL_REPLAYS. The traced pass
    replays at most STALL_REPLAYS. Timing: CUDA events around each step on CUDA, perf_counter otherwise (tests)."""
    saved, pos_saved = runner.save_state(), state.pos.clone()
    cuda = device.type == "cuda"
    if replays is None:
        replays = len(inputs) if restart is not None else STALL_REPLAYS

    def time_steps(step, keep: list | None = None, count: int = replays) -> list[float]:
        times = []
        for j in range(count):
            i = j % len(inputs)
            if i == 0:  # (again) from the state the recorded steps started from
                if restart is not None and j > 0:
                    # replays in flight: let them finish before the restart. Restarting behind them (a run's 2
                    # recorded steps cycled through 20 replays) made the dma copier's waits time out on the H200,
                    # switch-large-128 beam 4, in 5 runs of 5 (a host call holding the copier's next copies behind
                    # steps that wait for them, the likely cause); with the replays finished first, none did
                    _sync(device)
                runner.load_state(saved)
                if restart is not None:
                    restart()
            tok, pos = inputs[i]
            state.pos.copy_(pos)
            if cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                step(state, tok)
                b.record()
                times.append((a, b))
                if len(times) > 2:
                    # at most two steps ahead of the GPU, as the run's loop: 256 beam-4 replays launched at once
                    # made the dma copier's waits time out on the H200 (switch-base-128 pregated, 2 runs of 2; the
                    # likely cause: a launch blocked on CUDA's full launch queue holding the copier's calls behind
                    # it); bounded, 4 runs of 4 passed
                    times[-3][1].synchronize()
            else:
                t = time.perf_counter()
                step(state, tok)
                times.append(1e3 * (time.perf_counter() - t))
        if cuda:
            torch.cuda.synchronize(device)
            if keep is not None:
                keep.extend(times)
            times = [a.elapsed_time(b) for a, b in times]
        return times

    dma = runner.pool.dma if cuda else None
    timeline = None
    try:
        with_ms = statistics.median(time_steps(step_with))
        if dma is not None:  # a third pass, traced (the trace's events would perturb the timed one)
            steps_ev: list = []
            dma.trace = []
            try:
                time_steps(step_with, steps_ev, min(replays, STALL_REPLAYS))
                if dma.trace:  # (no dma plans, e.g. on_demand's: no timeline)
                    timeline = dma_timeline(steps_ev, dma.trace)
            finally:
                dma.trace = None
        with runner.no_copies():
            state.pos.copy_(inputs[0][1])  # a capture's warm-up runs steps: from a valid position
            runner.load_state(saved)
            step_without = make_step_without()
            without_ms = statistics.median(time_steps(step_without))
            del step_without
    finally:
        runner.load_state(saved)
        state.pos.copy_(pos_saved)
        _sync(device)
    out = {} if timeline is None else {"dma_timeline": timeline}
    return out | {
        "stall_ms_per_token": max(0.0, with_ms - without_ms),
        "step_ms_median_with_copies": with_ms,
        "step_ms_median_without_copies": without_ms,
        "stall_method": (
            f"derived by difference: median of {replays} graph replays with copies minus the same "
            "steps captured without copies (clamped at 0)"
            + (f"; the replays are the run's {len(inputs)} recorded steps (beams reset at the first)"
               if restart is not None else f"; the run's first {len(inputs)} steps")
        ),
    }


def dma_timeline(steps_ev: list, trace: list) -> dict:
    """Where copy_mode dma's copies ran inside the replayed steps: per plan of a step (in the order the
    copier handled them), the median start and end of its copies on the copier's stream, in ms from the
    step's start, and the link's idle gap before each (start minus the previous plan's end; the first's:
    from the step's start), and the experts each copied (median). steps_ev: (start, end) CUDA events per step;
    trace: the copier's (g, block, start, end[, experts copied]) per plan."""
    by_step: list[list[tuple]] = [[] for _ in steps_ev]
    early: list[tuple[float, float]] = []  # the copier's early guess copies (traced as plan -seq): the step they serve
    for _g, m, a, b, *copied in trace:
        offs = [s.elapsed_time(a) for s, _ in steps_ev]
        if _g < 0:  # issued at the step before's end: relative to the nearest step start
            i = min(range(len(offs)), key=lambda j: abs(offs[j]))
            early.append((offs[i], steps_ev[i][0].elapsed_time(b)))
            continue
        i = max((j for j, o in enumerate(offs) if o >= 0), default=None)
        if i is not None:
            by_step[i].append((m, offs[i], steps_ev[i][0].elapsed_time(b), copied[0] if copied else None))
    counts = {len(x) for x in by_step}
    if len(counts) != 1 or not by_step or not by_step[0]:
        return {"error": f"plans per step vary ({sorted(counts)}): no timeline"}
    k = counts.pop()
    med = statistics.median
    start = [med(x[j][1] for x in by_step) for j in range(k)]
    end = [med(x[j][2] for x in by_step) for j in range(k)]
    out = {
        "blocks": [by_step[0][j][0] for j in range(k)],
        "copy_start_ms": start,
        "copy_end_ms": end,
        "idle_before_ms": [start[0]] + [start[j] - end[j - 1] for j in range(1, k)],
        "step_ms": med(s.elapsed_time(e) for s, e in steps_ev),
        "steps": len(steps_ev),
        "method": "CUDA events recorded by the copier around each plan's copies, against events around "
                  "each replayed step (a separate, traced pass); medians over the steps",
    }
    if all(x[j][3] is not None for x in by_step for j in range(k)):
        out["experts_per_plan"] = [med(x[j][3] for x in by_step) for j in range(k)]
    if early:  # ms from the start of the step whose guess it copies (negative: before that step began)
        out["early_copy_start_ms"] = med(a for a, _ in early)
        out["early_copy_end_ms"] = med(b for _, b in early)
        out["early_copies"] = len(early)
    return out


# ----------------------------------------------------------------------------------------------- running
@dataclass
class RunResult:
    policy: str
    tokens: list[list[int]]
    metrics: dict
    step_logits: list[torch.Tensor] = field(default_factory=list)  # kept when asked (tests)
    notes: list[str] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


class Engine:
    """Runs generation for one model + expert store under any policy."""

    def __init__(
        self,
        model: Switch,
        store: ExpertStore,
        device,
        *,
        cuda_graph: bool = True,
        copy_mode: str = "auto",
        measure_stall: bool = False,
        measure_copy: bool = False,
        cpu_compute: str = "off",
        link_GBps: float | None = None,
        cpu_overhead_ms: float | None = None,
        prefill_slots: int = 16,
        copy: CopySettings | None = None,
        first_block_guess: str = "keep",
    ):
        self.model, self.store = model, store
        model.fuse_for_inference()  # q/k/v as one matrix product (views: no extra memory)
        self.device = torch.device(device)
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.copy_mode = copy_mode
        self.measure_stall = measure_stall
        # CUDA events around each block's copies (eager steps only): metrics' copy_kernel (bandwidth while
        # the copy stream copies, beside the whole step's lower bound)
        self.measure_copy = measure_copy
        if cpu_compute not in cc.MODES:
            raise OffloadError(f"offload.cpu_compute={cpu_compute!r}; expected one of {', '.join(cc.MODES)}")
        self.cpu_compute = cpu_compute
        self.link_GBps, self.cpu_overhead_ms = link_GBps, cpu_overhead_ms
        self._calibration: cc.Calibration | None = None
        self.prefill_slots = prefill_slots
        self.first_block_guess = guess_mode(first_block_guess)  # pregated / lookahead: infer/policies.py
        self.guess_tables: dict[int, torch.Tensor] = {}  # first_block_guess=keep: the runners' tables, kept
        self.copy = copy or CopySettings()  # the device copy kernel's stream priority and grid

    def calibration(self) -> cc.Calibration:
        """The CPU-compute cost model's numbers, measured once on this engine's store."""
        if self._calibration is None:
            self._calibration = cc.calibrate(self.store, self.device, self.link_GBps, self.cpu_overhead_ms)
        return self._calibration

    def run(
        self,
        spec: PolicySpec,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        num_beams: int = 1,
        keep_logits: bool = False,
        warmup: bool = False,
        cpu_compute: str | None = None,
    ) -> RunResult:
        """cpu_compute: overrides the engine's offload.cpu_compute for this run. keep_logits: each step's logits in
        RunResult.step_logits (CPU tensors; held on the device until the run ends, B x vocab fp32 per step, since a
        copy to host memory during the loop would stall copy_mode dma: infer.offload.DMA_HOST_COPY_NOTE)."""
        cpu_mode = self.cpu_compute if cpu_compute is None else cpu_compute
        check_cpu_compute(self.store, cpu_mode)  # before a calibration reads the store
        dev, model = self.device, self.model
        input_ids = input_ids.to(dev)
        attention_mask = None if attention_mask is None else attention_mask.to(dev)
        B, S = input_ids.shape
        rows = B * max(1, num_beams)
        notes: list[str] = []
        runner = None
        baseline = None
        if dev.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
            # what is already allocated (the model's resident weights, anything an earlier run in this
            # process still holds): the run's own need is its peak minus this
            baseline = torch.cuda.memory_allocated(dev)
        copy_mode = self.copy_mode
        if copy_mode == "dma" and num_beams > 1 and not native_copier.usable(self.copy.dma_api):
            copy_mode = "device"
            notes.append(BEAM_DMA_NOTE)
        if spec.name == "gpu_only":
            materialize_experts(model, self.store, dev)
        else:
            runner = OffloadRunner(
                model,
                self.store,
                spec,
                dev,
                n_enc=rows * S,
                n_dec=rows,
                copy_mode=copy_mode,
                cpu_compute=cpu_mode,
                calibration=self.calibration() if cpu_mode != "off" else None,
                prefill_slots=self.prefill_slots,
                copy=self.copy,
                first_block_guess=self.first_block_guess,
                guess_tables=self.guess_tables,
            ).attach()
            # timing events cannot sit in a captured graph: eager steps time each wait; a graph step's
            # stall is derived after the run (stall_by_difference)
            eager = not self.cuda_graph or bool(self._not_capturable(runner))
            runner.pool.measure_stall = self.measure_stall and eager
            runner.pool.measure_copy = self.measure_copy and eager
        try:
            if warmup:  # one untimed pass (allocator, kernels); cache and counters reset after
                self._generate(input_ids, attention_mask, min(2, max_new_tokens), num_beams, False, runner)
                if runner is not None:
                    runner.reset()
            res = self._generate(
                input_ids, attention_mask, max_new_tokens, num_beams, keep_logits, runner, notes
            )
        finally:
            if runner is not None:
                runner.detach()
            else:
                drop_experts(model)
        res.policy = spec.label
        res.metrics["baseline_allocated_bytes"] = baseline
        return res

    def _not_capturable(self, runner) -> str | None:
        if any(m.backend != "triton" for m in self.model.moes):
            return "the reference expert FFN (backend torch) reads group sizes on the host"
        if runner is not None and runner.pool.copy_mode not in ("device", "dma"):
            return f"copy_mode={runner.pool.copy_mode} reads each plan on the host"
        if runner is not None and runner.cpu_active:
            return (
                f"cpu_compute={runner.cpu_compute} reads each on-demand plan's misses on the host "
                "and computes them on the CPU (a host sync)"
            )
        return None

    def _generate(self, ids, mask, max_new_tokens, num_beams, keep_logits, runner, notes=None) -> RunResult:
        dev, model = self.device, self.model
        notes = notes if notes is not None else []
        B = ids.shape[0]
        nb = max(1, num_beams)
        if nb > 1:
            ids_p = ids.repeat_interleave(nb, dim=0)
            mask_p = None if mask is None else mask.repeat_interleave(nb, dim=0)
        else:
            ids_p, mask_p = ids, mask
        _sync(dev)
        t0 = time.perf_counter()
        state = model.prefill(ids_p, mask_p, max_len=max_new_tokens)
        _sync(dev)
        t_prefill = time.perf_counter() - t0

        step = model.decode_one_token
        capture_ms = None
        graphed = False
        why_not = self._not_capturable(runner)
        if self.cuda_graph and why_not:
            notes.append(f"decode step not graph-captured: {why_not}")
        elif runner is not None and runner.cpu_active:  # no graphs here, but say what would stop one
            notes.append(f"cpu_compute={runner.cpu_compute}: decode step not graph-capturable (host sync)")
        if runner is not None and runner.cpu_compute == "auto" and not runner.cpu_active:
            c = runner.calibration
            notes.append(
                f"cpu_compute=auto: copying predicted faster ({c.copy_ms:.3f} ms per expert) than the CPU "
                f"({c.cpu_ms(1):.3f} ms for one token, round trip included): nothing computed on the CPU"
            )
        # each token's choice (greedy's, or beam search's with the caches' reorder) in static buffers, captured in
        # the step's graph where there is one
        mc = model.cfg
        if nb == 1:
            select = GreedySelect(B, max_new_tokens, dev, mc.decoder_start_token_id, mc.pad_token_id, mc.eos_token_id)
            # the dma copier's early first-block guess (infer.policies.OffloadRunner.early_guess), one row only
            select.early = runner.early_guess if runner is not None else None
        else:
            select = BeamSelect(B, nb, max_new_tokens, dev, mc.decoder_start_token_id, mc.pad_token_id,
                                mc.eos_token_id, state=state)
        if self.cuda_graph and not why_not:
            try:
                tc = time.perf_counter()
                saved = runner.snapshot() if runner else None  # warm-up steps are not part of the run
                step = GraphStep(
                    model, state, B * nb, on_warm=(lambda: runner.restore(saved)) if runner else None,
                    select=select, hold=runner.pool.dma_held if runner else None,
                )
                _sync(dev)
                capture_ms = 1e3 * (time.perf_counter() - tc)
                graphed = True
            except Exception as e:  # an operation in the step is not capturable: run eagerly
                notes.append(
                    f"decode step not graph-captured ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                )
                torch.cuda.synchronize()
                if runner is not None:
                    runner.clear_pending()  # a capture that broke mid-step leaves half a step's plans queued
                if select is not None:
                    select.reset()
                    select.captured = False
                step = model.decode_one_token
        logits: list[torch.Tensor] = []
        # graph steps' waits cannot be timed: their stall is derived afterwards, by difference
        stall_diff = self.measure_stall and graphed and runner is not None
        step_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

        # beam search with a captured select replays the whole run (stall_by_difference: restart), greedy its first
        # STALL_REPLAYS steps. The whole run's inputs are derived after it, nothing recorded per step: the graph
        # reads its tokens from select.tok (which the reset select then fills as in the run), and step i runs at
        # the first step's position + i
        whole = stall_diff and isinstance(select, BeamSelect) and select.captured

        def recording_step(state, tok):
            if whole:
                if not step_inputs:
                    step_inputs.append((select.tok, state.pos.clone()))
            elif stall_diff and len(step_inputs) < STALL_REPLAYS:
                step_inputs.append((tok.clone(), state.pos.clone()))
            out = step(state, tok)
            if keep_logits:  # kept on the device until the loop ends (infer.offload.DMA_HOST_COPY_NOTE)
                logits.append(out.detach().clone())
            return out

        stamps: list[float] = []
        executed = [0]  # steps run: greedy runs one past the output where every row ended (its docstring)
        # CUDA events around each step on the compute stream: how long the GPU ran each step, and how long it
        # sat idle between two (the host's loop not keeping ahead of it)
        step_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

        def counting_step(state, tok):
            executed[0] += 1
            if dev.type != "cuda":
                return recording_step(state, tok)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = recording_step(state, tok)
            b.record()
            step_events.append((a, b))
            return out

        def on_token(_t):  # called once step t is complete (its event): no device-wide sync
            stamps.append(time.perf_counter())

        t1 = time.perf_counter()
        if nb > 1:
            out = beam_search(
                model,
                ids,
                mask,
                max_new_tokens,
                num_beams=nb,
                step=counting_step,
                state=state,
                on_token=on_token,
                select=select,
            )
        else:
            out = greedy(
                model, ids, mask, max_new_tokens, step=counting_step, state=state, on_token=on_token,
                select=select,
            )
        _sync(dev)
        t_end = time.perf_counter()
        steps = len(stamps)
        per_token = [1e3 * (b - a) for a, b in zip([t1] + stamps[:-1], stamps)]
        decode_ms = per_token[1:] if len(per_token) > 1 else per_token
        total_s = t_prefill + (t_end - t1)
        m = {
            "device": str(dev),
            "compute_device": "cpu" if dev.type == "cpu" else torch.cuda.get_device_name(dev),
            "batch_size": B,
            "num_beams": nb,
            "input_tokens": int(ids.shape[1]),
            "new_tokens": steps,
            "decode_steps_executed": executed[0],
            "ttft_ms": 1e3 * t_prefill + (per_token[0] if per_token else 0.0),
            "prefill_ms": 1e3 * t_prefill,
            "ms_per_token_median": statistics.median(decode_ms) if decode_ms else None,
            "ms_per_token_p90": _pct(decode_ms, 0.9),
            "tokens_per_s": (B * steps / total_s) if total_s > 0 else None,
            "decode_ms": decode_ms,
            "total_ms": 1e3 * total_s,
            "cuda_graph": graphed,
            "graph_capture_ms": capture_ms,
            # beam search's update after the top-2k: kernels/beam_select.py or BeamSelect's tensor ops
            "beam_update": None if nb == 1 else ("kernel" if select.kernel else "tensor ops"),
            # where the caches' reorder to the chosen beams runs (models.generate.BeamSelect, PGMOE_BEAM_DEFER)
            "beam_reorder": None if nb == 1 else ("next step's start" if select.defer else "end of step"),
            # how it moves the self caches (models.switch.DecodeState.reorder_form, PGMOE_KV_REORDER)
            "kv_reorder": None if nb == 1 else state.reorder_form(),
            # greedy's LM head: with the choice in kernels/lm_head.py (a captured step) or the matrix product
            "greedy_head": None if nb != 1 else ("matmul" if not getattr(step, "fused_head", False) else
                                                 "kernel with the final add and norm" if step.head_norm else "kernel"),
        }
        m["gpu_step_ms_median"] = m["gpu_idle_between_steps_ms_median"] = None
        if len(step_events) > 2:  # the first step (in ttft) left out, as in decode_ms
            ev = step_events[1:]
            m["gpu_step_ms_median"] = statistics.median(a.elapsed_time(b) for a, b in ev)
            m["gpu_idle_between_steps_ms_median"] = statistics.median(
                max(0.0, b0.elapsed_time(a1)) for (_, b0), (a1, _) in zip(ev, ev[1:]))
        if dev.type == "cuda":
            m["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            m["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
        else:
            m["peak_allocated_bytes"] = m["peak_reserved_bytes"] = None  # no GPU: no GPU memory figures
        if runner is not None:
            st = runner.stats()
            m.update(st)
            if runner.calibration is not None:
                m["cpu_compute_calibration"] = runner.calibration.as_dict()
            dur = t_prefill + (t_end - t1)
            m["copy_GBps"] = (st["bytes_copied"] / dur / 1e9) if dev.type == "cuda" and dur > 0 else None
            m.update(
                stall_ms_per_token=None,
                step_ms_median_with_copies=None,
                step_ms_median_without_copies=None,
                stall_method=None,
            )
            if st["stall_ms"] is not None:  # eager steps: CUDA events around each wait
                m["stall_ms_per_token"] = st["stall_ms"] / steps if steps else None
                m["stall_method"] = "CUDA events around each wait (eager steps; the prefill's waits included)"
            elif stall_diff and step_inputs:  # after the run: its outputs and counters are taken
                if whole:  # every step the run executed, as the run ran them
                    pos0 = step_inputs[0][1]
                    step_inputs = [(select.tok, pos0 + i) for i in range(executed[0])]
                try:
                    m.update(
                        stall_by_difference(
                            runner,
                            state,
                            step,
                            lambda: GraphStep(model, state, B * nb,
                                              select=select if select is not None and select.captured else None),
                            step_inputs,
                            dev,
                            # beams: the recorded steps start at the first (step_inputs holds the run's first
                            # steps), so a reset select replays them as they ran
                            restart=select.reset if isinstance(select, BeamSelect) and select.captured else None,
                        )
                    )
                except Exception as e:
                    notes.append(
                        f"stall by difference failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
                    )
                    torch.cuda.synchronize()
        else:
            m.update(
                experts_copied=0,
                bytes_copied=0,
                hit_rate=None,
                stall_ms=None,
                stall_ms_per_token=None,
                stall_method=None,
                copy_GBps=None,
                pool_bytes=0,
                copy_mode=None,
                dma_api_used=None,
                dma_api_fallback=None,
                experts_cpu_computed=0,
                tokens_cpu_computed=0,
            )
        # (a step greedy ran past the output, where every row had ended, is not one of the output's)
        kept = [t.cpu() for t in logits[:steps]]  # (after the loop's last sync: no step in flight)
        return RunResult(policy="", tokens=out.tolist(), metrics=m, step_logits=kept, notes=notes)


def check_offload_possible(spec: PolicySpec, model: Switch) -> None:
    """Raise early (before any run) for a policy the model cannot serve."""
    if spec.name in ("pregated", "lookahead") and not model.cfg.pregated:
        raise OffloadError(
            f"policy {spec.name!r} needs a pre-gated model (config.json has pregated=false): this is an "
            "unconverted Switch model. Fine-tune it with pre-gates (python -m train), or run it with "
            "policy=on_demand, prefetch_all or speculative"
        )
