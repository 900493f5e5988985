"""GPU probe: how fast do a decode step's expert copies cross PCIe when each expert's copy is split across
copy streams (and so across the GPU's copy engines)?

In copy_mode dma the copier issues one cudaMemcpyAsync per expert on one stream, back to back. On the H200
those run at ~95% of the pinned peak for a switch-base-128 packed expert (7.1 MB) and ~97-98% for 9.4-12.7 MB
(bench/results/e2e-h200-*-{base,large}.md, "GB/s while copying"): each copy pays a few microseconds of its own.
This probe queues a step's experts with everything issued ahead (the streams held behind a sleep kernel, so
the host's issue time is not measured) and times, with CUDA events, every layout of the same bytes:

  one        one copy per expert on one stream (today's dma copier)
  split<S>x<P>  each expert cut into P equal parts dealt round-robin to S streams; the next expert's parts
             queue behind on the same streams (an expert is done when all its parts are: the copier would
             signal it behind one event per stream)
  whole      the step's bytes as one copy (the link's best for these bytes)
  peak       three 256 MiB copies (bench_e2e's pinned_peak_GBps method)

For each: the step's copy time (first copy start -> last end), GB/s, % of peak, and when expert k is done
(events after each expert's parts on every stream; the latest of them). Medians over --reps steps.

    python3 scripts/probe_link_split.py --out $OUT/probe-link-split.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import torch

SIZES_MB = {"switch-base packed": 7.143, "switch-base bf16": 9.437, "switch-large packed": 12.71,
            "switch-large bf16": 16.777}


def layout_parts(nbytes: int, parts: int, align: int = 4096) -> list[tuple[int, int]]:
    """(offset, length) of `parts` near-equal pieces of nbytes, every cut on an `align` boundary."""
    if parts < 1:
        raise ValueError(f"parts={parts}: at least one")
    step = -(-nbytes // parts)
    step = -(-step // align) * align
    out, off = [], 0
    while off < nbytes:
        n = min(step, nbytes - off)
        out.append((off, n))
        off += n
    return out


def deal(n_parts: int, streams: int) -> list[int]:
    """The stream each part goes to: round-robin."""
    return [i % streams for i in range(n_parts)]


def run_variant(store, dst, ids, streams, parts: int, n_streams: int, cycles: int):
    """Queue one step's copies behind a sleep; returns (total_ms, [done_ms per expert]) after sync."""
    main = torch.cuda.current_stream()
    start = torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # the GPU is held while the host queues every copy
    start.record(main)
    for s in streams[:n_streams]:
        s.wait_stream(main)
    nbytes = store.shape[1]
    cuts = layout_parts(nbytes, parts)
    owner = deal(len(cuts), n_streams)
    done = []
    for k, e in enumerate(ids):
        for (off, n), si in zip(cuts, owner):
            with torch.cuda.stream(streams[si]):
                dst[k, off:off + n].copy_(store[e, off:off + n], non_blocking=True)
        evs = []
        for si in sorted(set(owner)):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(streams[si])
            evs.append(ev)
        done.append(evs)
    torch.cuda.synchronize()
    done_ms = [max(start.elapsed_time(ev) for ev in evs) for evs in done]
    return done_ms[-1], done_ms


def pinned_peak(device) -> float:
    n = 256 << 20
    src = torch.empty(n, dtype=torch.uint8).pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device=device)
    best = 0.0
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        b.record()
        torch.cuda.synchronize()
        best = max(best, 3 * n / (a.elapsed_time(b) / 1e3) / 1e9)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=6, help="experts copied per step (switch-base-128: 6)")
    ap.add_argument("--store-experts", type=int, default=24)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--variants", default="one,split2x2,split2x4,split2x8,split3x3,split4x4,split1x4,whole")
    ap.add_argument("--sizes", default=",".join(SIZES_MB))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.cuda.init()
    peak = pinned_peak(dev)
    res = {"probe": "link_split", "command": "python3 scripts/probe_link_split.py " + " ".join(sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(dev), "pinned_peak_GBps": peak, "experts_per_step": args.experts,
           "sizes": {}}
    streams = [torch.cuda.Stream() for _ in range(4)]
    cycles = 4_000_000  # ~2 ms at H200 clocks: longer than queuing any variant's copies
    g = torch.Generator().manual_seed(0)
    for label in args.sizes.split(","):
        nbytes = int(SIZES_MB[label] * 1e6) // 128 * 128
        store = torch.empty(args.store_experts, nbytes, dtype=torch.uint8).pin_memory()
        store.view(-1)[::4096].fill_(1)  # touched
        dst = torch.empty(args.experts, nbytes, dtype=torch.uint8, device=dev)
        whole_src = torch.empty(args.experts * nbytes, dtype=torch.uint8).pin_memory()
        rows = {}
        for v in args.variants.split(","):
            totals, dones = [], []
            for r in range(args.reps + 3):
                ids = torch.randperm(args.store_experts, generator=g)[: args.experts].tolist()
                if v == "whole":
                    t, d = run_variant(whole_src.view(1, -1), dst.view(1, -1), [0], streams, 1, 1, cycles)
                    d = [t * (k + 1) / args.experts for k in range(args.experts)]
                elif v == "one":
                    t, d = run_variant(store, dst, ids, streams, 1, 1, cycles)
                elif v.startswith("split"):
                    s_, p_ = v[5:].split("x")
                    t, d = run_variant(store, dst, ids, streams, int(p_), int(s_), cycles)
                else:
                    raise SystemExit(f"--variants: unknown {v!r}")
                if r >= 3:
                    totals.append(t)
                    dones.append(d)
            tot = statistics.median(totals)
            gbps = args.experts * nbytes / (tot / 1e3) / 1e9
            rows[v] = {"step_copy_ms": tot, "GBps": gbps, "pct_of_peak": 100 * gbps / peak,
                       "expert_done_ms": [statistics.median(d[k] for d in dones) for k in range(args.experts)],
                       "step_copy_ms_all": totals}
            print(f"{label:22s} {v:10s} {tot:.4f} ms {gbps:5.1f} GB/s {100 * gbps / peak:5.1f}%", flush=True)
        res["sizes"][label] = {"bytes": nbytes, "floor_ms": args.experts * nbytes / (peak * 1e9) * 1e3,
                               "variants": rows}
        del store, whole_src, dst
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
