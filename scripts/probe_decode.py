"""GPU probe: the copy paths for offloaded experts and the decode step, measured side by side.

1. Host->GPU bandwidth of one Switch-base expert (9.4 MB bf16): cudaMemcpyAsync from pinned memory,
   and the device-driven gather kernel (kernels.expert_copy) at several grid sizes.
2. Overlap: the gather kernel on a side stream while a compute stream runs matrix work.
3. CUDA-graph capture of the gather kernel (ids on the GPU, no host sync).
4. The model's decode step (switch-base-128 shape, bf16, batch 1, all experts on the GPU):
   eager and replayed as one CUDA graph.

Usage: python scripts/probe_decode.py --out DIR   (writes DIR/probe-decode.json)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.expert_copy import gather_rows  # noqa: E402


def cuda_times(fn, warmup=5, iters=30) -> list[float]:
    """ms of each of `iters` calls (CUDA events, a sync after each), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return times


def cuda_time(fn, warmup=5, iters=30):
    return statistics.median(cuda_times(fn, warmup, iters))


def probe_copies(res):
    C = 2 * 768 * 3072  # one switch-base expert, elements
    E = 32
    store = torch.randn(E, C, dtype=torch.bfloat16).pin_memory()
    slots = torch.empty(8, C, dtype=torch.bfloat16, device="cuda")
    nbytes = C * 2
    ms = cuda_time(lambda: slots[0].copy_(store[5], non_blocking=True))
    res["memcpy_1expert_ms"] = ms
    res["memcpy_1expert_GBps"] = nbytes / ms / 1e6
    ms6 = cuda_time(lambda: [slots[i].copy_(store[i * 3], non_blocking=True) for i in range(6)])
    res["memcpy_6experts_GBps"] = 6 * nbytes / ms6 / 1e6
    big = torch.empty(E * C, dtype=torch.bfloat16, device="cuda")
    msb = cuda_time(lambda: big.copy_(store.view(-1), non_blocking=True), iters=5)
    res["memcpy_32experts_GBps"] = E * nbytes / msb / 1e6
    ids = torch.tensor([5], dtype=torch.int32, device="cuda")
    ids6 = torch.tensor([0, 3, 6, 9, 12, 15], dtype=torch.int32, device="cuda")
    gather = {}
    for progs in (4, 8, 16, 32, 64, 132):
        for block in (2048, 8192):
            ms1 = cuda_time(lambda: gather_rows(store, ids, slots, num_programs=progs, block=block))
            ok = torch.equal(slots[0].cpu(), store[5])
            ms6g = cuda_time(lambda: gather_rows(store, ids6, slots, num_programs=progs, block=block))
            gather[f"p{progs}_b{block}"] = dict(one_GBps=nbytes / ms1 / 1e6, six_GBps=6 * nbytes / ms6g / 1e6,
                                                 correct=ok)
    res["gather_kernel"] = gather

    # overlap: matmuls on the default stream, gather on a side stream
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()

    def compute():
        for _ in range(4):
            a @ a

    def both(kind):
        ev = torch.cuda.Event()
        ev.record()
        with torch.cuda.stream(side):
            side.wait_event(ev)
            if kind == "kernel":
                gather_rows(store, ids6, slots, num_programs=16, block=8192)
            else:
                for i in range(6):
                    slots[i].copy_(store[i * 3], non_blocking=True)
        compute()
        torch.cuda.current_stream().wait_stream(side)

    res["overlap"] = dict(
        compute_ms=cuda_time(compute),
        gather16_ms=cuda_time(lambda: gather_rows(store, ids6, slots, num_programs=16, block=8192)),
        both_kernel_ms=cuda_time(lambda: both("kernel")),
        both_memcpy_ms=cuda_time(lambda: both("memcpy")),
    )

    # graph capture of the gather, ids changed between replays on the device
    ids_buf = torch.tensor([1], dtype=torch.int32, device="cuda")
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        gather_rows(store, ids_buf, slots, num_programs=16, block=8192)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        gather_rows(store, ids_buf, slots, num_programs=16, block=8192)
    ids_buf.fill_(7)
    g.replay()
    torch.cuda.synchronize()
    res["graph_gather_correct"] = torch.equal(slots[0].cpu(), store[7])


def probe_decode(res, preset_name="switch-base-128"):
    from models.config import preset
    from models.switch import Switch

    cfg = preset(preset_name, expert_capacity=None)
    with torch.device("meta"):
        model = Switch(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    model.init_weights()
    model.eval().set_backend("triton")
    x = torch.randint(3, 32000, (1, 256), device="cuda")
    state = model.prefill(x, max_len=257)
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    out = {}

    def step():
        state.pos.zero_()
        return model.decode_one_token(state, tok)

    out["eager_ms"] = cuda_time(step, warmup=3, iters=20)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            logits = step()
        out["graph_ms"] = cuda_time(g.replay, warmup=5, iters=50)
        ref = step()
        g.replay()
        torch.cuda.synchronize()
        out["graph_matches_eager"] = bool(torch.equal(ref, logits))
    except Exception as e:  # record why capture failed, keep the rest
        out["graph_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    out["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    res[f"decode_{preset_name}"] = out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    res = dict(
        command=" ".join(sys.argv), date=dt.datetime.now(dt.timezone.utc).isoformat(),
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, python=platform.python_version(),
    )
    try:
        import triton

        res["triton"] = triton.__version__
    except ImportError:
        pass
    for name, fn in (("copies", probe_copies), ("decode", probe_decode)):
        try:
            fn(res)
        except Exception as e:
            res[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:600]}"
        print(json.dumps(res, indent=1), flush=True)
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "probe-decode.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
