"""GPU check and benchmark of kernels/ (routing, expert FFN) on Switch-base/large expert shapes, bf16.

    python3 scripts/bench_kernels.py --out DIR [--tune] [--quick]

1. Ceilings: HBM bandwidth (device copy, bytes read + written) and the bf16 matmul rate (8192^3).
2. Correctness on the GPU, outputs poisoned with NaN first: routing vs the reference (ids, weights);
   expert FFN (both paths, all activations, slot table, k = 2, fp32) vs the reference in fp64, next to
   PyTorch's own bf16 error; no host sync on the decode path (sync debug mode); CUDA-graph capture and
   replay of a decode step (route + FFN) and of a prefill call.
3. Timing (CUDA events, L2 flushed before every rep, 8 rotating input sets, median): routing vs
   PyTorch; expert FFN vs the per-expert PyTorch loop (transformers' style: loop over the experts hit),
   torch._grouped_mm, and the floors (activated experts' weight bytes / HBM rate; FLOPs / bf16 rate).
   Decode sizes are also timed as CUDA-graph replays.
Writes kernels-<gpu>.json (machine, versions, command, date, all numbers), kernels-<gpu>.md (the
table) and kernels-configs-<gpu>.json (the configs used; copy to kernels/configs/<gpu>.json) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import tuning  # noqa: E402
from kernels.expert_ffn import (  # noqa: E402
    _decode_config,
    _default_config,
    _fused_config,
    _np2,
    expert_ffn,
    expert_ffn_reference,
    expert_ffn_triton,
    fused_candidates,  # noqa: E402
    gridsync_candidates,  # noqa: E402
    gridsync_config,  # noqa: E402
    gridsync_timeouts,  # noqa: E402
    quantize_experts,  # noqa: E402
)
from kernels.routing import _route_candidates, route, route_reference, route_triton  # noqa: E402

SHAPES = {"switch-base": (768, 3072), "switch-large": (1024, 4096)}
EXPERTS = (8, 64, 128)
TOKENS = (1, 4, 16, 256, 2048)
N_SETS = 8
DEV = torch.device("cuda")
T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


# ------------------------------------------------------------------------------------------------ timing
_flush = None


def bench_us(fns, reps: int) -> float:
    """Median microseconds of fns[i % len(fns)]() over `reps`, each after an L2 flush, CUDA events.

    The flush reads 512 MB (a read leaves no dirty lines behind, whose write-back would be charged to
    the timed call) and takes ~0.1 ms, time in which the host queues the timed call."""
    global _flush
    if _flush is None:
        _flush = torch.ones(512 << 20, dtype=torch.int8, device=DEV)
    for f in fns:  # warm-up: compiles, autotunes, caches
        f()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        _flush.max()
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return 1000 * sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[reps // 2]


def graph_of(*fns):
    """A CUDA graph of the calls fns (in order); returns its replay."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    return g.replay


def graph_per_call_us(fns, reps: int = 20) -> float:
    """Per-call microseconds of len(fns) calls back to back in one CUDA graph (median replay / n).
    Callers rotate weights so that the calls of one replay read more than L2 holds."""
    replay = graph_of(*fns)
    return bench_us([replay], reps) / len(fns)


def ceilings() -> dict:
    n = 1 << 30  # 1 GiB each way
    src = torch.randn(n // 2, dtype=torch.bfloat16, device=DEV)
    dst = torch.empty_like(src)
    copy_us = bench_us([lambda: dst.copy_(src)], 20)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEV)
    mm_us = bench_us([lambda: a @ b], 10)
    return {"hbm_GBps": 2 * n / copy_us / 1e3, "bf16_TFLOPs": 2 * 8192**3 / mm_us / 1e6,
            "how": "copy of 1 GiB (read+write bytes); 8192^3 bf16 matmul on random data; medians"}


# ----------------------------------------------------------------------------------------------- problems
def make_sets(T, E, k, d, seed, n_sets=N_SETS, small_rotation=True):
    """Rotating (x, ids, weights) sets. For small T the ids walk through the experts, so consecutive
    reps touch different weights; for large T they are uniform at random (as a router gives)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    sets = []
    for i in range(n_sets):
        x = torch.randn(T, d, device=DEV, generator=g).to(torch.bfloat16)
        if T * k <= 64 and small_rotation:
            base = (i * T * k * 5 + torch.arange(T * k, device=DEV)) % E
            ids = base.view(T, k).to(torch.int32)
        else:
            ids = torch.rand(T, E, device=DEV, generator=g).argsort(dim=1)[:, :k].to(torch.int32)
        w = torch.rand(T, k, device=DEV, generator=g) + 0.1
        sets.append((x, ids, w))
    return sets


def experts(E, d, f, seed, gated=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    w_in = (torch.randn(E, (2 if gated else 1) * f, d, device=DEV, generator=g) / d**0.5).to(torch.bfloat16)
    w_out = (torch.randn(E, d, f, device=DEV, generator=g) / f**0.5).to(torch.bfloat16)
    return w_in, w_out


def torch_loop(x, w_in, w_out, ids, weights):
    """Per-expert PyTorch loop over the experts hit (as transformers' MoE blocks do); host syncs."""
    y = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, j = torch.where(ids == e)
        h = F.relu(x[tok] @ w_in[e].t())
        y.index_add_(0, tok, (h @ w_out[e].t()) * weights[tok, j, None].to(x.dtype))
    return y


def torch_grouped(x, w_in, w_out, ids, weights):
    """torch._grouped_mm over token slots sorted by expert; no host sync."""
    T, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat.long(), minlength=w_in.shape[0]), 0, dtype=torch.int32)
    xs = x[order // k]
    h = F.relu(torch._grouped_mm(xs, w_in.transpose(1, 2), offs=offs))
    o = torch._grouped_mm(h, w_out.transpose(1, 2), offs=offs) * weights.reshape(-1)[order, None].to(x.dtype)
    rows = torch.empty_like(o).index_copy_(0, order, o)
    return rows if k == 1 else rows.view(T, k, -1).sum(1)


def rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


# ------------------------------------------------------------------------------------------- correctness
def poison():
    """Fill the caching allocator's free blocks (both pools) with NaN so unwritten outputs show."""
    big = torch.full((1 << 29,), float("nan"), device=DEV)
    small = [torch.full((1 << 17,), float("nan"), device=DEV) for _ in range(256)]
    del big, small


def check_routing(out: list):
    split = {"BLOCK_T": 16, "BLOCK_D": 64, "TILE_E": 32, "SPLIT_D": 4, "num_warps": 4, "num_stages": 3}
    for (T, E, d, k, renorm, dtype, G, cfg) in [
        (1, 128, 768, 1, False, torch.bfloat16, 1, None), (4, 8, 1024, 2, True, torch.bfloat16, 1, None),
        (2048, 128, 1024, 1, False, torch.bfloat16, 2, None), (257, 64, 768, 2, True, torch.float32, 1, None),
        (16, 7, 768, 2, False, torch.float16, 1, None), (1, 128, 1024, 1, False, torch.bfloat16, 2, split),
        (16, 100, 1000, 2, True, torch.bfloat16, 1, split), (3, 64, 768, 2, False, torch.float32, 1, split),
    ]:
        g = torch.Generator(device=DEV).manual_seed(T + E)
        x = torch.randn(T, d, device=DEV, generator=g).to(dtype)
        w_dtype = torch.bfloat16 if dtype == torch.float16 else dtype  # fp16 x, bf16 gate: mixed
        w = (torch.randn(G, E, d, device=DEV, generator=g) * 0.05).to(w_dtype)
        w = w if G > 1 else w[0]
        poison()
        ids, wts = route_triton(x, w, k=k, renormalize=renorm, config=cfg)
        rid, rwt = route_reference(x, w, k=k, renormalize=renorm)
        probs = torch.softmax(torch.einsum("td,...ed->...te", x.double(), w.double()), -1)
        diff = ids != rid
        gap = (probs.gather(-1, ids.long()) - probs.gather(-1, rid.long())).abs()
        ok = bool((gap[diff] <= 1e-6).all()) and rel(wts, rwt) <= 1e-4 and bool(torch.isfinite(wts).all())
        out.append({"what": "route", "T": T, "E": E, "d": d, "k": k, "renormalize": renorm, "G": G,
                    "split": cfg is not None,
                    "dtype": str(dtype), "ids_differ": int(diff.sum()), "weights_rel_err": rel(wts, rwt),
                    "ok": ok})
        log(out[-1])


def check_ffn(out: list):
    decode = {"path": "decode", "in": {"BLOCK_F": 16, "BLOCK_D": 256, "num_warps": 4},
              "out": {"BLOCK_D": 8, "BLOCK_F": 512, "num_warps": 4}}
    decode_whole_rows = {"path": "decode", "pdl": True, "in": {"BLOCK_F": 8, "BLOCK_D": 1024, "num_warps": 4},
                         "out": {"BLOCK_D": 2, "BLOCK_F": 4096, "num_warps": 4}}
    decode_no_pdl = {**decode_whole_rows, "pdl": False}
    gemm = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    prefill = {"path": "prefill", "BLOCK_M": 32, "in": gemm, "out": gemm}
    fused = fused_candidates(1024)[0]
    fused_small = {**fused, "BLOCK_D": 256, "BLOCK_DO": 128}  # several W_out chunks, d = 200
    grid = gridsync_config(768, 3072, 16, 8, 8)
    cases = [  # (T, E, k, d, F, activation, config, slot table, dtype)
        (1, 128, 1, 768, 3072, "relu", _decode_config(2, 1024, 2, 2, 4096, 2, preload=True), True, torch.bfloat16),
        (4, 8, 2, 1024, 4096, "gelu", _decode_config(2, 1024, 2, 4, 4096, 4, preload=True), True, torch.bfloat16),
        (1, 128, 1, 768, 3072, "relu", grid, True, torch.bfloat16),
        (1, 8, 1, 1024, 4096, "swiglu", gridsync_config(1024, 4096, 16, 8, 8), False, torch.bfloat16),
        (2, 64, 2, 768, 3072, "gelu", gridsync_config(768, 3072, 16, 16, 8), True, torch.bfloat16),
        (3, 7, 2, 200, 328, "relu", gridsync_config(200, 328, 16, 8, 4), True, torch.float32),
        (1, 128, 1, 1024, 4096, "relu", fused, False, torch.bfloat16),
        (4, 64, 2, 768, 3072, "gelu", fused, True, torch.bfloat16),
        (3, 7, 2, 200, 328, "swiglu", fused_small, True, torch.bfloat16),
        (5, 8, 2, 200, 328, "geglu", fused_small, False, torch.float32),
        (1, 8, 1, 768, 3072, "relu", None, False, torch.bfloat16),
        (1, 128, 1, 1024, 4096, "relu", None, False, torch.bfloat16),
        (4, 64, 2, 768, 3072, "relu", None, True, torch.bfloat16),
        (16, 8, 1, 768, 3072, "relu", decode, False, torch.bfloat16),
        (16, 8, 1, 768, 3072, "relu", decode_whole_rows, False, torch.bfloat16),
        (16, 8, 1, 768, 3072, "relu", decode_no_pdl, False, torch.bfloat16),
        (4, 8, 2, 1024, 4096, "relu", decode_whole_rows, True, torch.bfloat16),
        (16, 8, 1, 768, 3072, "relu", prefill, False, torch.bfloat16),
        (256, 128, 1, 768, 3072, "relu", None, False, torch.bfloat16),
        (2048, 8, 1, 1024, 4096, "relu", None, False, torch.bfloat16),
        (2048, 128, 2, 768, 3072, "relu", None, True, torch.bfloat16),
        (3, 7, 2, 200, 328, "gelu", decode, True, torch.bfloat16),
        (3, 7, 2, 200, 328, "swiglu", decode, False, torch.bfloat16),
        (300, 16, 2, 200, 328, "geglu", prefill, True, torch.bfloat16),
        (300, 16, 1, 200, 328, "silu", prefill, False, torch.bfloat16),
        (5, 8, 2, 200, 328, "swiglu", decode, True, torch.float32),
        (300, 8, 2, 200, 328, "gelu", prefill, False, torch.float32),
        (2048, 1, 1, 768, 3072, "relu", None, False, torch.bfloat16),
    ]
    for T, E, k, d, f, act, cfg, slots, dtype in cases:
        gated = act in ("geglu", "swiglu")
        S = E + 3 if slots else E
        w_in, w_out = experts(S, d, f, seed=T + E + d, gated=gated)
        w_in, w_out = w_in.to(dtype), w_out.to(dtype)
        (x, ids, wts), = make_sets(T, E, k, d, seed=T * E, n_sets=1, small_rotation=False)
        x = x.to(dtype)
        slot_map = torch.randperm(S, device=DEV)[:E].to(torch.int32) if slots else None
        poison()
        y = expert_ffn_triton(x, w_in, w_out, ids, wts, slot_map, act, config=cfg)
        up = [t.double() for t in (x, w_in, w_out)]
        ref = expert_ffn_reference(*up, ids, wts.double(), slot_map, act)
        err = rel(y, ref)
        torch_err = rel(expert_ffn_reference(x, w_in, w_out, ids, wts, slot_map, act), ref)
        bound = 1e-4 if dtype == torch.float32 else 2 * torch_err
        ok = bool(torch.isfinite(y).all()) and err <= bound
        path = (cfg or tuning.current(_ffn_key(T, k, E, d, f, gated, dtype), DEV) or {}).get("path")
        extra = {}
        if path == "gridsync":  # the grid barrier: repeated calls equal, and no program timed out of it
            ys = [expert_ffn_triton(x, w_in, w_out, ids, wts, slot_map, act, config=cfg) for _ in range(50)]
            extra = {"repeat_equal": all(torch.equal(v, y) for v in ys), "barrier_timeouts": gridsync_timeouts(DEV)}
            ok = ok and extra["repeat_equal"] and extra["barrier_timeouts"] == 0
        out.append({"what": "expert_ffn", "T": T, "E": E, "S": S, "k": k, "d": d, "F": f,
                    "activation": act, "path": path, "dtype": str(dtype), "rel_err": err,
                    "torch_rel_err": torch_err, "ok": ok, **extra})
        log(out[-1])
    # int8 experts (Int8Weights, offload.quantize=int8): both paths against float64 on the dequantized weights
    for T, E, k, d, f, act, slots in [(1, 128, 1, 768, 3072, "relu", True), (4, 64, 2, 1024, 4096, "gelu", False),
                                      (256, 128, 1, 768, 3072, "relu", True), (3, 7, 2, 200, 328, "swiglu", True),
                                      (300, 16, 2, 200, 328, "geglu", False)]:
        gated = act in ("geglu", "swiglu")
        S = E + 3 if slots else E
        w_in, w_out = experts(S, d, f, seed=T + E + d + 1, gated=gated)
        qi, qo = quantize_experts(w_in), quantize_experts(w_out)
        (x, ids, wts), = make_sets(T, E, k, d, seed=T * E + 1, n_sets=1, small_rotation=False)
        slot_map = torch.randperm(S, device=DEV)[:E].to(torch.int32) if slots else None
        poison()
        y = expert_ffn_triton(x, qi, qo, ids, wts, slot_map, act)
        deq = [torch.stack([w.dequantize(s, torch.float64) for s in range(S)]) for w in (qi, qo)]
        ref = expert_ffn_reference(x.double(), *deq, ids, wts.double(), slot_map, act)
        err = rel(y, ref)
        torch_err = rel(expert_ffn_reference(x, qi, qo, ids, wts, slot_map, act), ref)
        ok = bool(torch.isfinite(y).all()) and err <= 2 * torch_err
        path = (tuning.current(tuning.config_key("ffn" + ("-glu" if gated else "") + (f"-k{k}" if k > 1 else ""),
                                                 E, d, f, T, x.dtype, torch.int8), DEV) or {}).get("path")
        out.append({"what": "expert_ffn_int8", "T": T, "E": E, "S": S, "k": k, "d": d, "F": f, "activation": act,
                    "path": path, "rel_err": err, "torch_rel_err": torch_err, "ok": ok})
        log(out[-1])


def host_profile(out: dict):
    """Where the host time of an eager decode step (route + expert FFN, T = 1) goes."""
    import cProfile
    import io
    import pstats

    d, f, E = 768, 3072, 128
    w_in, w_out = experts(E, d, f, seed=3)
    gate = (torch.randn(E, d, device=DEV) * 0.05).to(torch.bfloat16)
    x = torch.randn(1, d, device=DEV).to(torch.bfloat16)
    step = lambda: expert_ffn(x, w_in, w_out, *route(x, gate))  # noqa: E731
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    out["eager_step_host_us"] = (time.perf_counter() - t0) / 200 * 1e6
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        step()
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
    out["profile_tottime_200_steps"] = s.getvalue()[-3500:]
    log("host:", out["eager_step_host_us"], "us per eager step")


def probe_pdl(out: dict):
    """Programmatic dependent launch must give bit-identical results, eager and in a CUDA graph;
    otherwise it is switched off (PGMOE_PDL=0) for the rest of the run."""
    d, f, E = 768, 3072, 128
    w_in, w_out = experts(E, d, f, seed=5)
    gate = (torch.randn(E, d, device=DEV) * 0.05).to(torch.bfloat16)
    cfg = {"path": "decode", "in": {"BLOCK_F": 8, "BLOCK_D": 1024, "num_warps": 4},
           "out": {"BLOCK_D": 2, "BLOCK_F": 4096, "num_warps": 4}}
    ok, why = True, []
    try:
        for T, k in ((1, 1), (4, 2)):
            x = torch.randn(T, d, device=DEV).to(torch.bfloat16)

            def step(pdl, x=x, k=k):
                ids, wts = route(x, gate, k=k)
                return expert_ffn_triton(x, w_in, w_out, ids, wts, config={**cfg, "pdl": pdl})

            os.environ["PGMOE_PDL"] = "0"
            plain = step(False)
            os.environ["PGMOE_PDL"] = "1"
            with_pdl = step(True)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                y_graph = step(True)
            y_graph.fill_(0)
            g.replay()
            torch.cuda.synchronize()
            for name, y in (("eager", with_pdl), ("graph", y_graph)):
                if not torch.equal(y, plain):
                    ok = False
                    why.append(f"T={T} k={k} {name}: differs from the plain launch")
    except Exception as e:  # noqa: BLE001
        ok, why = False, why + [f"{type(e).__name__}: {e}"[:300]]
    if not ok:
        os.environ["PGMOE_PDL"] = "0"
    out.append({"what": "pdl", "ok": ok, "enabled": ok, "why": why})
    log(out[-1])


def _ffn_key(T, k, S, d, f, gated=False, dtype=torch.bfloat16):
    kernel = "ffn" + ("-glu" if gated else "") + (f"-k{k}" if k > 1 else "")
    return tuning.config_key(kernel, S, d, f, T, dtype, dtype)


def check_greedy(out: list):
    """The greedy-choice kernel (kernels/greedy.py) against its PyTorch reference on the GPU: bitwise equal
    tokens, columns, flags and counter (T5's vocabulary; ties, NaN, rows already ended), and its time per call
    beside the reference's ops (one CUDA graph of 16 calls each)."""
    from kernels.greedy import greedy_select, greedy_select_reference

    V, n = 32128, 8
    for B in (1, 4, 32):
        for case in ("random", "ties", "nan", "done"):
            g = torch.Generator(device=DEV).manual_seed(B * 7 + len(case))
            logits = torch.randn(B, V, device=DEV, generator=g)
            if case == "ties":
                logits[:, 100] = logits[:, 20000] = 40.0
            if case == "nan":
                logits[:, 5] = 50.0
                logits[:, 30000] = float("nan")
            done = torch.arange(B, device=DEV) % 2 == 1 if case == "done" else torch.zeros(B, dtype=torch.bool,
                                                                                                   device=DEV)
            state = [torch.zeros(B, dtype=torch.long, device=DEV), torch.zeros((B, n), dtype=torch.long, device=DEV),
                     done, torch.zeros(n, dtype=torch.bool, device=DEV), torch.tensor(n + 3, device=DEV)]
            a, b = [x.clone() for x in state], [x.clone() for x in state]
            greedy_select(logits, *a, 0, 1)
            greedy_select_reference(logits, *b, 0, 1)
            ok = all(torch.equal(x, y) for x, y in zip(a, b))
            out.append({"what": "greedy_select", "B": B, "case": case, "ok": ok})
        log(out[-4:])
        logits = torch.randn(B, V, device=DEV)
        st = [torch.zeros(B, dtype=torch.long, device=DEV), torch.zeros((B, n), dtype=torch.long, device=DEV),
              torch.zeros(B, dtype=torch.bool, device=DEV), torch.zeros(n, dtype=torch.bool, device=DEV),
              torch.zeros((), dtype=torch.long, device=DEV)]
        us = {name: graph_per_call_us([lambda f=f: f(logits, *st, 0, 1)] * 16)
              for name, f in (("kernel_us", greedy_select), ("torch_us", greedy_select_reference))}
        out.append({"what": "greedy_select_time", "B": B, "V": V, "ok": True, **us})
        log(out[-1])


def check_sync_and_graphs(out: list):
    d, f, E = 768, 3072, 128
    w_in, w_out = experts(E, d, f, seed=1)
    gate = (torch.randn(E, d, device=DEV) * 0.05).to(torch.bfloat16)
    for T, k in ((1, 1), (4, 2), (256, 1)):
        x = torch.randn(T, d, device=DEV).to(torch.bfloat16)

        def step(x=x, k=k):
            ids, wts = route(x, gate, k=k, renormalize=k > 1)
            return expert_ffn(x, w_in, w_out, ids, wts)

        eager = step()
        torch.cuda.synchronize()
        sync_free = True
        if T * k <= 16:  # the decode path: any host sync raises in this mode
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            except RuntimeError as e:
                sync_free = f"host sync: {e}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_static = step()
        x.copy_(torch.randn(T, d, device=DEV).to(torch.bfloat16))  # new input in the captured buffer
        g.replay()
        fresh = step()
        torch.cuda.synchronize()
        ok = sync_free is True and torch.equal(y_static, fresh) and not torch.equal(fresh, eager)
        out.append({"what": "graph", "T": T, "k": k, "E": E, "no_host_sync": sync_free,
                    "replay_equals_eager": torch.equal(y_static, fresh), "ok": ok})
        log(out[-1])


# ------------------------------------------------------------------------------------------------ timing
def _cfg_name(cfg: dict) -> str:
    if cfg.get("path") == "fused":
        red = cfg.get("red", {}).get("BLOCK_D", 64)
        return f"fused-{cfg.get('reduce', 'scratch')} BF{cfg['BLOCK_F']} w{cfg['num_warps']}" + (
            f" red BD{red}" if red != 64 else "")
    if cfg.get("path") == "decode":
        ci, co = cfg["in"], cfg["out"]
        return (f"2-kernel in BF{ci['BLOCK_F']} BD{ci['BLOCK_D']} w{ci['num_warps']} out BD{co['BLOCK_D']} "
                f"BF{co['BLOCK_F']} w{co['num_warps']}" + (" preload" if co.get("preload") else ""))
    if cfg.get("path") == "gridsync":
        return f"grid-barrier BF{cfg['BLOCK_F']} BDO{cfg['BLOCK_DO']} w{cfg['num_warps']}"
    if "SPLIT_D" in cfg:
        return f"split TILE_E{cfg['TILE_E']} SPLIT_D{cfg['SPLIT_D']} BD{cfg['BLOCK_D']}"
    return f"whole-gate BD{cfg['BLOCK_D']} w{cfg['num_warps']}"


def decode_candidates(d: int, f: int) -> list[dict]:
    """Two-kernel decode configs around the tuned one: W_in rows per program and warps, W_out rows per
    program and warps (whole rows per load in both)."""
    bd, bf = min(_np2(d), 2048), min(_np2(f), 4096)
    ins = ((1, bd, 1), (1, bd, 2), (2, bd, 1), (2, bd, 2), (2, bd, 4), (4, bd, 4), (2, 256, 1))
    outs = ((1, bf, 1), (2, bf, 1), (2, bf, 2), (2, bf, 4), (4, bf, 2), (2, 1024, 2), (4, 1024, 4))
    return [_decode_config(ibf, ibd, iw, obd, obf, ow) for ibf, ibd, iw in ins for obd, obf, ow in outs]


def preload_candidates(pinned: dict, f: int) -> list[dict]:
    """The pinned two-kernel config's W_in tiles with whole-row W_out tiles that the second kernel loads into
    registers before its wait (out "preload"), over W_out rows per program and warps."""
    if pinned.get("path") != "decode":
        return []
    ci, bf = pinned["in"], min(_np2(f), 4096)
    return [_decode_config(ci["BLOCK_F"], ci["BLOCK_D"], ci["num_warps"], obd, bf, ow, preload=True)
            for obd, ow in ((1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8))]


def layout_candidates(d: int) -> list[dict]:
    """Fused decode configs for W_out stored transposed (F x d in memory): each program then reads BLOCK_F
    whole contiguous d-rows of W_out (a [d, BLOCK_F] tile in registers: BLOCK_F stays small, more warps hold
    the wider ones); wider F tiles mean fewer partials to reduce; red BD: output columns per reduce program (fewer:
    more programs share the partials' read)."""
    return [_fused_config(bf, d, w, red_bd=r) for bf, w, r in ((8, 4, 64), (16, 4, 64), (16, 4, 16), (16, 8, 32),
                                                               (32, 8, 16), (32, 8, 64), (32, 16, 16))]


def sweep_decode(out: list, reps: int, sweep_one_launch: bool = False, expert_counts=None, layout: bool = False,
                 preload: bool = False):
    """T = 1: time the two-kernel decode path against the fused decode kernel variants (single call after
    an L2 flush, and 16 calls back to back in one CUDA graph), and the split-gate routing against the
    whole-gate kernel; pin the fastest (FFN: by the graph b2b time; routing: single call) for the timings.
    layout: time the fused kernel and the pinned two-kernel config with W_out stored transposed (rows named
    "[W_out F x d]"; a storage the offload pool does not use yet, so never pinned) beside the pinned config
    on the usual storage, instead of the two-kernel sweep. preload: time the two-kernel path with W_out preloaded
    into registers (preload_candidates) beside the pinned config, instead of the two-kernel sweep."""
    gpu = tuning.gpu_name(DEV)
    for name, (d, f) in SHAPES.items():
        for E in expert_counts or EXPERTS:
            gate = (torch.randn(E, d, device=DEV) * 0.05).to(torch.bfloat16)
            sets = make_sets(1, E, 1, d, seed=E + d + 7)
            rkey = tuning.config_key("route", E, d, 0, 1)
            rows = []
            for cfg in _route_candidates(1, E, d, 2, 2):
                try:
                    us = bench_us([lambda x=x, cfg=cfg: route_triton(x, gate, config=cfg) for x, _, _ in sets], reps)
                    rows.append({"config": cfg, "name": _cfg_name(cfg), "us": us})
                except Exception as e:  # noqa: BLE001
                    rows.append({"config": cfg, "name": _cfg_name(cfg), "error": f"{type(e).__name__}: {e}"[:200]})
            ok = [r for r in rows if "us" in r]
            best = min(ok, key=lambda r: r["us"])
            tuning.set_config(rkey, DEV, best["config"])
            out.append({"what": "route", "shape": name, "E": E, "T": 1, "best": best["name"], "rows": rows})
            log("sweep", name, E, "route:", [(r["name"], round(r.get("us", -1), 2)) for r in rows])

            w_in, w_out = experts(E, d, f, seed=E + d)
            fkey = _ffn_key(1, 1, E, d, f)
            old = tuning._table(gpu).get(fkey) or _default_config(1, E, d, f)
            expert_bytes = (w_in[0].numel() + w_out[0].numel()) * 2
            n_copies = max(1, min(4, -(-200_000_000 // (E * expert_bytes))))
            copies = [(w_in, w_out)] + [experts(E, d, f, seed=E + d + c) for c in range(1, n_copies)]
            b2b = make_sets(1, E, 1, d, seed=E + 1, n_sets=16)
            rows = []
            one_launch = (fused_candidates(d) + gridsync_candidates(d, f) if sweep_one_launch
                          else preload_candidates(old, f) if preload else [])
            # layout / preload: only the pinned config beside their rows (the wide sweep is its own run)
            plain = [(cfg, False) for cfg in [old] + ([] if layout or preload else decode_candidates(d, f))
                     + one_launch]
            transposed = [(cfg, True) for cfg in [old] + layout_candidates(d)] if layout else []
            t_copies = ([(wi, wo.transpose(1, 2).contiguous().transpose(1, 2)) for wi, wo in copies]
                        if layout else [])
            for cfg, tr in plain + transposed:
                r = {"config": cfg, "name": _cfg_name(cfg) + (" [W_out F x d]" if tr else "")}
                if tr:
                    r["w_out_storage"] = "F x d"
                cps = t_copies if tr else copies
                w_in, w_out = cps[0]
                try:
                    r["us"] = bench_us([lambda x=x, i=i, w=w, cfg=cfg, w_in=w_in, w_out=w_out: expert_ffn_triton(
                        x, w_in, w_out, i, w, config=cfg) for x, i, w in sets], reps)
                    calls = [lambda x=x, i=i, w=w, c=c, cfg=cfg, cps=cps: expert_ffn_triton(x, *cps[c % n_copies], i,
                                                                                            w, config=cfg)
                             for c, (x, i, w) in enumerate(b2b)]
                    r["graph_b2b_us"] = graph_per_call_us(calls)
                    x, i, w = sets[0]
                    ys = [expert_ffn_triton(x, w_in, w_out, i, w, config=cfg) for _ in range(20)]
                    r["bitwise_deterministic"] = all(torch.equal(y, ys[0]) for y in ys)
                    if cfg.get("path") == "gridsync":
                        r["wait_timeouts"] = gridsync_timeouts(DEV)
                    ref = expert_ffn_reference(x.double(), w_in.double(), w_out.double(), i, w.double())
                    r["rel_err"] = rel(ys[0], ref)
                    r["torch_rel_err"] = rel(expert_ffn_reference(x, w_in, w_out, i, w), ref)
                except Exception as e:  # noqa: BLE001
                    r["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(r)
            ok = [r for r in rows if "graph_b2b_us" in r and r["rel_err"] <= 2 * r["torch_rel_err"]
                  and "w_out_storage" not in r and r["bitwise_deterministic"] and not r.get("wait_timeouts")]
            best = min(ok, key=lambda r: r["graph_b2b_us"])
            tuning.set_config(fkey, DEV, best["config"])
            out.append({"what": "ffn", "shape": name, "E": E, "T": 1, "best": best["name"], "rows": rows})
            log("sweep", name, E, "ffn:", [(r["name"], round(r.get("us", -1), 2), round(r.get("graph_b2b_us", -1), 2),
                                           r.get("bitwise_deterministic")) for r in rows])
            del copies, t_copies
            torch.cuda.synchronize()


_read_kernels = None


def _read_kernel_pair():
    """Two bare-read Triton kernels: each program loads BLOCK contiguous elements and stores their sum.
    'first' waits for the previous grid before loading (like _decode_in_kernel, whose expert id comes
    from the routing); 'second' loads, then waits (like _decode_out_kernel: only its h comes from the
    kernel before it). IDS: the bytes are those of expert ids[0] of a stacked [E, ...] buffer (row
    stride stride_e), so the address waits for one load of the id, as the decode FFN's does."""
    global _read_kernels
    if _read_kernels is None:
        import triton
        import triton.language as tl
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        @triton.jit
        def first(src, out, n, ids, stride_e, BLOCK: tl.constexpr, USE_PDL: tl.constexpr, IDS: tl.constexpr):
            if USE_PDL:
                gdc_wait()
                gdc_launch_dependents()
            if IDS:  # the expert's id first, then its bytes (one dependent load, as the decode FFN has)
                src += tl.load(ids).to(tl.int64) * stride_e
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(src + offs, mask=offs < n, other=0.0, eviction_policy="evict_first")
            tl.store(out + tl.program_id(0), tl.sum(v.to(tl.float32)))

        @triton.jit
        def second(src, out, n, ids, stride_e, BLOCK: tl.constexpr, USE_PDL: tl.constexpr, IDS: tl.constexpr):
            if IDS:
                src += tl.load(ids).to(tl.int64) * stride_e
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(src + offs, mask=offs < n, other=0.0, eviction_policy="evict_first")
            if USE_PDL:
                gdc_wait()
            tl.store(out + tl.program_id(0), tl.sum(v.to(tl.float32)))

        _read_kernels = first, second
    return _read_kernels


def read_floor(out: list, reps: int):
    """The fastest bare read of one expert's weight bytes (bf16): one kernel over all of them, and two
    kernels over half each, chained with PDL as the decode FFN's two kernels are; each also through the
    expert's id (the address loaded first, as every expert FFN call's is). Per call, 16 calls back to back
    in one CUDA graph over distinct experts (>= 150 MB per replay, more than L2 holds); the best of a sweep
    of program sizes and warps. A practical floor for the T = 1 expert FFN next to the bytes / HBM-rate
    one."""
    import triton

    from kernels.routing import use_pdl

    first, second = _read_kernel_pair()
    pdl = use_pdl(DEV)
    kw = {"launch_pdl": True} if pdl else {}
    n_calls, n_experts = 16, 32
    for name, (d, f) in SHAPES.items():
        n = d * f  # elements of one weight matrix; an expert is two
        stack = torch.randn(n_experts, 2 * n, device=DEV).to(torch.bfloat16)
        # call c reads expert (5 c) mod 32: 16 distinct experts per replay, never the one read just before
        ids = [torch.tensor([5 * c % n_experts], dtype=torch.int32, device=DEV) for c in range(n_calls)]
        sink = torch.empty(2 * n, device=DEV)
        se = stack.stride(0)
        rows = []
        for block in (2048, 4096, 8192, 16384):
            for warps in (4, 8):
                def one(c, via_id, block=block, warps=warps):
                    src = stack if via_id else stack[5 * c % n_experts]
                    first[(triton.cdiv(2 * n, block),)](src, sink, 2 * n, ids[c], se, BLOCK=block, USE_PDL=pdl,
                                                        IDS=via_id, num_warps=warps, **kw)

                def two(c, via_id, block=block, warps=warps):
                    src = stack if via_id else stack[5 * c % n_experts]
                    first[(triton.cdiv(n, block),)](src, sink, n, ids[c], se, BLOCK=block, USE_PDL=pdl,
                                                    IDS=via_id, num_warps=warps, **kw)
                    second[(triton.cdiv(n, block),)](src[..., n:], sink[n:], n, ids[c], se, BLOCK=block,
                                                     USE_PDL=pdl, IDS=via_id, num_warps=warps, **kw)
                r = {"BLOCK": block, "num_warps": warps}
                for label, fn, via_id in (("one_kernel_us", one, False), ("two_kernels_us", two, False),
                                          ("one_kernel_via_id_us", one, True),
                                          ("two_kernels_via_id_us", two, True)):
                    r[label] = graph_per_call_us([lambda c=c, fn=fn, v=via_id: fn(c, v) for c in range(n_calls)],
                                                 reps)
                rows.append(r)
        nbytes = 4 * n
        rec = {"shape": name, "expert_bytes": nbytes, "pdl": pdl, "rows": rows}
        for label in ("one_kernel_us", "two_kernels_us", "one_kernel_via_id_us", "two_kernels_via_id_us"):
            best = min(rows, key=lambda r, label=label: r[label])
            rec[label] = best[label]
            rec[label.replace("_us", "_GBps")] = nbytes / best[label] / 1e3
        rec["how"] = ("bare reads of the expert's bytes, per call of 16 back to back in one CUDA graph (16 distinct "
                      "experts of a stacked buffer); 'via id': the kernel loads the expert's id, then its bytes; best "
                      "of BLOCK in 2048-16384 x 4/8 warps")
        out.append(rec)
        log("read floor", name, {k: v for k, v in out[-1].items() if k not in ("rows", "how")})
        del stack
        torch.cuda.synchronize()


def time_case(name, d, f, E, T, ceil, reps) -> dict:
    k = 1
    w_in, w_out = experts(E, d, f, seed=E + d)
    gate = (torch.randn(E, d, device=DEV) * 0.05).to(torch.bfloat16)
    sets = make_sets(T, E, k, d, seed=T + E)
    r = {"shape": name, "d": d, "F": f, "E": E, "T": T, "k": k}
    fast = T * k <= 16
    reps_fast, reps_slow = (reps, max(5, reps // 4))

    r["route_us"] = bench_us([lambda x=x: route(x, gate) for x, _, _ in sets], reps_fast)
    r["route_torch_us"] = bench_us([lambda x=x: route_reference(x, gate) for x, _, _ in sets], reps_fast)
    r["route_config"] = tuning.current(tuning.config_key("route", E, d, 0, T), DEV)

    ours = [lambda x=x, i=i, w=w: expert_ffn(x, w_in, w_out, i, w) for x, i, w in sets]
    r["ffn_us"] = bench_us(ours, reps_fast)
    r["ffn_config"] = tuning.current(_ffn_key(T, k, E, d, f), DEV)
    if fast:
        r["ffn_graph_us"] = bench_us([graph_of(fn) for fn in ours], reps_fast)
        # Back to back in one graph, as in a captured decode loop: 16 calls over weight copies and
        # experts chosen so that one replay reads >= 150 MB of distinct weights (L2: 60 MB).
        expert_bytes = (w_in[0].numel() + w_out[0].numel()) * 2
        n_copies = max(1, min(4, -(-200_000_000 // (E * expert_bytes))))
        copies = [(w_in, w_out)] + [experts(E, d, f, seed=E + d + c) for c in range(1, n_copies)]
        b2b = make_sets(T, E, k, d, seed=T + E + 1, n_sets=16)
        calls = [lambda x=x, i=i, w=w, c=c: expert_ffn(x, *copies[c % n_copies], i, w)
                 for c, (x, i, w) in enumerate(b2b)]
        r["ffn_graph_b2b_us"] = graph_per_call_us(calls)
        steps16 = [lambda x=x, c=c: expert_ffn(x, *copies[c % n_copies], *route(x, gate))
                   for c, (x, _, _) in enumerate(b2b)]
        r["step_graph_b2b_us"] = graph_per_call_us(steps16)
        r["b2b_weight_copies"] = n_copies
        # int8 experts (offload.quantize=int8): half the weight bytes; the same back-to-back measure
        q_copies = [tuple(quantize_experts(w) for w in c) for c in copies]
        calls_q = [lambda x=x, i=i, w=w, c=c: expert_ffn(x, *q_copies[c % n_copies], i, w)
                   for c, (x, i, w) in enumerate(b2b)]
        r["ffn_int8_graph_b2b_us"] = graph_per_call_us(calls_q)
        del q_copies, calls_q
        del copies
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(200):  # eager back to back, no flush: bounded by the host's launch cost here
            ours[i % len(ours)]()
        torch.cuda.synchronize()
        r["ffn_eager_back_to_back_us"] = (time.perf_counter() - t0) / 200 * 1e6
        steps = [lambda x=x: expert_ffn(x, w_in, w_out, *route(x, gate)) for x, _, _ in sets]
        r["step_graph_us"] = bench_us([graph_of(fn) for fn in steps], reps_fast)
    r["loop_us"] = bench_us([lambda x=x, i=i, w=w: torch_loop(x, w_in, w_out, i, w) for x, i, w in sets],
                            reps_fast if fast else reps_slow)
    try:
        r["grouped_mm_us"] = bench_us(
            [lambda x=x, i=i, w=w: torch_grouped(x, w_in, w_out, i, w) for x, i, w in sets],
            reps_fast if fast else reps_slow)
    except Exception as e:  # noqa: BLE001 - report, don't stop
        r["grouped_mm_us"] = None
        r["grouped_mm_error"] = f"{type(e).__name__}: {e}"[:200]

    x, i, w = sets[0]  # the baselines compute the same function
    y = ours[0]()
    r["loop_rel_diff"] = rel(torch_loop(x, w_in, w_out, i, w), y)
    if r["grouped_mm_us"]:
        r["grouped_mm_rel_diff"] = rel(torch_grouped(x, w_in, w_out, i, w), y)
    active = sum(torch.unique(i).numel() for _, i, _ in sets) / len(sets)
    weight_bytes = active * (w_in[0].numel() + w_out[0].numel()) * 2
    flops = 2 * T * k * (w_in[0].numel() + w_out[0].numel())
    r["active_experts"] = active
    r["floor_bytes_us"] = (weight_bytes + 2 * T * d * 2) / (ceil["hbm_GBps"] * 1e3)
    r["floor_flops_us"] = flops / (ceil["bf16_TFLOPs"] * 1e6)
    if r.get("ffn_int8_graph_b2b_us"):  # int8 weights and their fp32 row scales
        r["floor_int8_us"] = active * (2 * d * f + 4 * (d + f)) / (ceil["hbm_GBps"] * 1e3)
        r["x_floor_int8_graph_b2b"] = r["ffn_int8_graph_b2b_us"] / max(r["floor_int8_us"], r["floor_flops_us"])
    r["floor_us"] = max(r["floor_bytes_us"], r["floor_flops_us"])
    r["x_floor"] = r["ffn_us"] / r["floor_us"]
    r["x_floor_graph"] = r["ffn_graph_us"] / r["floor_us"] if fast else None
    r["x_floor_graph_b2b"] = r["ffn_graph_b2b_us"] / r["floor_us"] if fast else None
    r["speedup_vs_loop"] = r["loop_us"] / r["ffn_us"]  # both eager (the loop syncs, it cannot be graphed)
    r["speedup_vs_grouped_mm"] = (r["grouped_mm_us"] / r["ffn_us"]) if r["grouped_mm_us"] else None
    return r


def targets(rows) -> list[dict]:
    out = []
    for r in rows:
        if r["T"] == 1 and r["shape"] == "switch-base":
            for key, how in (("x_floor", "one call"), ("x_floor_graph", "one call, graph"),
                             ("x_floor_graph_b2b", "graph, back to back")):
                v = r.get(key)
                out.append({"target": f"decode T=1 within 2x of HBM floor ({how})", "E": r["E"],
                            "value": v, "ok": v is not None and v <= 2})
            out.append({"target": "decode T=1 >= 3x faster than loop", "E": r["E"],
                        "value": r["speedup_vs_loop"], "ok": r["speedup_vs_loop"] >= 3})
        if r["T"] == 1:
            out.append({"target": "routing T=1 <= 10 us", "shape": r["shape"], "E": r["E"],
                        "value": r["route_us"], "ok": r["route_us"] <= 10})
        if r["T"] in (4, 16):
            out.append({"target": "T=4..16 >= 2x faster than loop", "shape": r["shape"], "E": r["E"],
                        "T": r["T"], "value": r["speedup_vs_loop"], "ok": r["speedup_vs_loop"] >= 2})
        if r["T"] >= 256 and r["E"] == 128:
            out.append({"target": "prefill E=128 >= 1.5x faster than loop", "shape": r["shape"], "T": r["T"],
                        "value": r["speedup_vs_loop"], "ok": r["speedup_vs_loop"] >= 1.5})
            g = r.get("grouped_mm_us")
            out.append({"target": "prefill E=128 at least as fast as torch._grouped_mm", "shape": r["shape"],
                        "T": r["T"], "value": (g / r["ffn_us"]) if g else None,
                        "ok": bool(g) and r["ffn_us"] <= g})
    return out


def markdown(meta, ceil, rows, tgts, sweep=(), read=()) -> str:
    lines = [
        f"# Kernel benchmark: {meta['gpu']}",
        "",
        f"{meta['date']}; torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; "
        f"`{meta['command']}`.",
        f"Ceilings measured here: HBM {ceil['hbm_GBps']:.0f} GB/s (copy), "
        f"bf16 matmul {ceil['bf16_TFLOPs']:.0f} TFLOP/s. Times in us: median over reps, L2 flushed before "
        "each, 8 rotating input sets; top-1, bf16, relu. 'FFN graph' = the same single call replayed from a "
        "CUDA graph; 'b2b' = 16 calls back to back in one graph (rotating experts and weight copies, "
        ">= 150 MB of distinct weights per replay), per call; 'step' = route + FFN. Speed-ups are eager "
        "vs eager. "
        "Floor = max(activated experts' weight bytes / HBM rate, FLOPs / bf16 rate).",
        "",
        "| shape | E | T | route | route torch | FFN | FFN graph | FFN graph b2b | step graph b2b | loop "
        "| grouped_mm | floor | x floor | x floor (graph b2b) | vs loop | vs grouped_mm |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['E']} | {r['T']} | {f(r['route_us'])} | {f(r['route_torch_us'])} | "
            f"{f(r['ffn_us'])} | {f(r.get('ffn_graph_us'))} | {f(r.get('ffn_graph_b2b_us'))} | "
            f"{f(r.get('step_graph_b2b_us'))} | {f(r['loop_us'])} | "
            f"{f(r.get('grouped_mm_us'))} | {f(r['floor_us'])} | {f(r['x_floor'], 2)} | "
            f"{f(r.get('x_floor_graph_b2b'), 2)} | "
            f"{f(r['speedup_vs_loop'], 2)} | {f(r.get('speedup_vs_grouped_mm'), 2)} |")
    lines += ["", "| target | case | value | met |", "|---|---|---|---|"]
    for t in tgts:
        case = ", ".join(f"{k}={v}" for k, v in t.items() if k not in ("target", "value", "ok"))
        lines.append(f"| {t['target']} | {case} | {f(t['value'], 2)} | {'yes' if t['ok'] else 'NO'} |")
    q_rows = [r for r in rows if r.get("ffn_int8_graph_b2b_us")]
    if q_rows:
        lines += ["", "Int8 experts (Int8Weights, offload.quantize=int8; default configs): per call, 16 back to back "
                  "in a graph, beside bf16; floor = activated experts' int8 weights and row scales / HBM rate.", "",
                  "| shape | E | T | bf16 b2b | int8 b2b | int8 floor | int8 x floor |", "|---|---|---|---|---|---|---|"]
        for r in q_rows:
            lines.append(f"| {r['shape']} | {r['E']} | {r['T']} | {f(r.get('ffn_graph_b2b_us'))} | "
                         f"{f(r['ffn_int8_graph_b2b_us'])} | {f(r.get('floor_int8_us'))} | "
                         f"{f(r.get('x_floor_int8_graph_b2b'), 2)} |")
    if sweep:
        lines += ["", "T = 1 sweep (us; FFN: single call after L2 flush / per call, 16 back to back in a graph; "
                  "det = bitwise equal over 20 runs; the best, marked *, is used above):", "",
                  "| kernel | shape | E | config | single | graph b2b | det |", "|---|---|---|---|---|---|---|"]
        for sw in sweep:
            for r in sw["rows"]:
                mark = " *" if r["name"] == sw["best"] else ""
                lines.append(f"| {sw['what']} | {sw['shape']} | {sw['E']} | {r['name']}{mark} | {f(r.get('us'), 2)} "
                             f"| {f(r.get('graph_b2b_us'), 2)} | {r.get('bitwise_deterministic', '-')} |")
    read = [r for r in read if "one_kernel_us" in r]
    if read:
        lines += ["", "Bare reads of one expert's weight bytes (bf16; per call, 16 back to back in one graph over "
                  "distinct experts; best of BLOCK 2048-16384 x 4/8 warps): one kernel over all of them, and two "
                  "kernels over half each, chained with PDL like the decode FFN's two kernels; 'via id': the "
                  "kernel loads the expert's id first, then its bytes, as every expert FFN call does; x floor = "
                  "time / (bytes / HBM rate).", "",
                  "| shape | MB | HBM floor us | one kernel us | x floor | two kernels us | x floor "
                  "| one kernel via id us | x floor | two kernels via id us | x floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in read:
            hbm = r["expert_bytes"] / ceil["hbm_GBps"] / 1e3
            cells = [f"{r['expert_bytes'] / 1e6:.2f}", f"{hbm:.2f}"]
            for label in ("one_kernel_us", "two_kernels_us", "one_kernel_via_id_us", "two_kernels_via_id_us"):
                v = r.get(label)
                cells += ["-", "-"] if v is None else [f"{v:.2f}", f"{v / hbm:.2f}"]
            lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    global EXPERTS
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tune", action="store_true", help="autotune configs not in kernels/configs/<gpu>.json")
    ap.add_argument("--quick", action="store_true", help="fewer shapes and reps")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true", help="no T = 1 decode/routing sweep")
    ap.add_argument("--sweep-one-launch", action="store_true",
                    help="the T = 1 sweep also times the one-launch decode variants (fused, grid barrier)")
    ap.add_argument("--sweep-layout", action="store_true",
                    help="the decode sweep times the fused kernel (and the pinned two-kernel config) with W_out "
                    "stored transposed (F x d), rows named [W_out F x d], never pinned, beside the pinned config on "
                    "the usual storage (instead of the two-kernel sweep)")
    ap.add_argument("--sweep-preload", action="store_true",
                    help="the decode sweep times the two-kernel path with W_out preloaded into registers beside the "
                    "pinned config (instead of the two-kernel sweep)")
    ap.add_argument("--sweep-experts", default=None,
                    help="expert counts for the T = 1 sweep (default: --experts)")
    ap.add_argument("--read-floor", action="store_true",
                    help="also time bare reads of one expert's bytes (one kernel, and two kernels chained like the "
                         "decode FFN's): the fastest a kernel of that size reads on this GPU")
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which timing cases are skipped")
    ap.add_argument("--experts", default=",".join(map(str, EXPERTS)),
                    help="comma-separated expert counts for the sweep and timings (default: 8,64,128)")
    args = ap.parse_args()
    EXPERTS = tuple(int(e) for e in args.experts.split(","))
    if args.tune:
        os.environ["PGMOE_AUTOTUNE"] = "1"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    import triton

    gpu = tuning.gpu_name(DEV)
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:  # noqa: BLE001
        driver = None
    table = tuning.CONFIG_DIR / f"{gpu}.json"
    meta = {"gpu": torch.cuda.get_device_name(), "gpu_key": gpu,
            "sms": torch.cuda.get_device_properties(0).multi_processor_count, "driver": driver,
            "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "host": platform.node(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python3", Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "tuned_table": table.name if table.exists() else None, "autotune": args.tune}
    result = {"meta": meta}

    def save():
        (out_dir / f"kernels-{gpu}.json").write_text(json.dumps(result, indent=1, default=str))
        (out_dir / f"kernels-configs-{gpu}.json").write_text(
            json.dumps({"gpu": gpu, "configs": tuning.chosen(gpu)}, indent=1))

    log(meta)
    result["ceilings"] = ceil = ceilings()
    log(ceil)
    save()
    if args.read_floor:
        result["read_floor"] = rf = []
        try:
            read_floor(rf, max(20, args.reps // 2))
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            rf.append({"error": f"{type(e).__name__}: {e}"[:500]})
        save()
    result["sweep"] = sweep = []
    if not args.skip_sweep:
        try:
            sweep_experts = [int(e) for e in args.sweep_experts.split(",")] if args.sweep_experts else None
            sweep_decode(sweep, max(20, args.reps // 2), args.sweep_one_launch, sweep_experts, args.sweep_layout,
                         args.sweep_preload)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            sweep.append({"what": "sweep", "error": f"{type(e).__name__}: {e}"[:500], "rows": [], "best": None})
        save()
    if not args.skip_checks:
        checks: list = []
        result["checks"] = checks
        for fn in (probe_pdl, check_routing, check_ffn, check_greedy, check_sync_and_graphs):
            try:
                fn(checks)
            except Exception as e:  # noqa: BLE001 - record and go on to the timings
                import traceback
                traceback.print_exc()
                checks.append({"what": fn.__name__, "ok": False, "error": f"{type(e).__name__}: {e}"[:500]})
            save()
        log("checks:", sum(c["ok"] for c in checks), "ok of", len(checks))
        result["host"] = {}
        try:
            host_profile(result["host"])
        except Exception as e:  # noqa: BLE001
            result["host"]["error"] = f"{type(e).__name__}: {e}"[:300]

    rows: list = []
    result["timings"] = rows
    shapes = {"switch-base": SHAPES["switch-base"]} if args.quick else SHAPES
    order = [(name, d, f, E, T) for T in TOKENS[:1] for name, (d, f) in shapes.items() for E in EXPERTS]
    order += [(name, d, f, E, T) for name, (d, f) in shapes.items() for E in EXPERTS for T in TOKENS[1:]]
    for name, d, f, E, T in order:  # all T = 1 cases first (the targets), then the rest while time lasts
        if time.time() - T0 > args.budget:
            log(f"time budget {args.budget}s spent: skipping {name} E={E} T={T}")
            continue
        try:
            rows.append(time_case(name, d, f, E, T, ceil, args.reps))
            r = rows[-1]
            log(f"{name} E={E} T={T}: route {r['route_us']:.1f} us, ffn {r['ffn_us']:.1f} "
                f"(graph {r.get('ffn_graph_us') or 0:.1f}), loop {r['loop_us']:.1f}, grouped_mm "
                f"{r.get('grouped_mm_us') or 0:.1f}, floor {r['floor_us']:.1f}, "
                f"path {(r['ffn_config'] or {}).get('path')}")
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            rows.append({"shape": name, "E": E, "T": T, "error": f"{type(e).__name__}: {e}"[:500]})
        save()
    result["autotune_history"] = tuning.history
    rank = {(n, E, T): i for i, (n, _, _, E, T) in enumerate(
        (n, d, f, E, T) for n, (d, f) in shapes.items() for E in EXPERTS for T in TOKENS)}
    good = sorted((r for r in rows if "error" not in r), key=lambda r: rank[(r["shape"], r["E"], r["T"])])
    result["targets"] = tgts = targets(good)
    save()
    md = markdown(meta, ceil, good, tgts, [sw for sw in sweep if sw.get("rows")], result.get("read_floor", ()))
    (out_dir / f"kernels-{gpu}.md").write_text(md)
    print(md)
    log("done")


if __name__ == "__main__":
    main()
