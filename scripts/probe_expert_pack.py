"""GPU probe of the lossless expert packing (offload.compress=exp4, kernels/expert_pack.py).

For one Switch expert shape at a time (w_in then w_out rows drawn as scripts/bench_e2e.py draws them: N(0, d^-1/2)
and N(0, d_ff^-1/2), bf16): the packed size against bf16's, the exceptions per row, the time to pack a block on the
GPU, a bitwise check of every unpack path (from GPU memory, from pinned host memory through its mapped address,
and replayed from a CUDA graph), and per-expert times, 16 experts back to back in one CUDA graph:
  - unpack of a landed packed row (GPU memory to a GPU slot; copy_mode dma's step after each wait);
  - unpack straight from the pinned store (copy_mode device's copy kernel, the runner's copy settings);
  - the plain copy kernel moving the bf16 row from the pinned store (what the unpack replaces);
  - a cudaMemcpyAsync of the packed row and of the bf16 row from pinned memory (the copy engines: dma's copies).
Writes JSON (with the command) and markdown. On a machine without a GPU it runs a small shape under the Triton
interpreter (a smoke test, no timings).

    python3 scripts/probe_expert_pack.py --out bench/results/probe-expert-pack-h200.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():  # Triton reads it on import: the interpreter runs the kernels on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from infer.offload import CopySettings, SlotPool  # noqa: E402
from kernels import expert_copy, expert_pack  # noqa: E402

SHAPES = {"switch-base": (768, 3072), "switch-large": (1024, 4096), "tiny": (32, 64)}


def rows(n: int, d: int, f: int, dev, seed: int) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(seed)
    t = torch.empty((n, 2 * d * f), dtype=torch.bfloat16, device=dev)
    t[:, : d * f].normal_(0.0, d**-0.5, generator=g)
    t[:, d * f :].normal_(0.0, f**-0.5, generator=g)
    return t


def per_call_us(fns, reps: int) -> float:
    """Median microseconds per call of the fns run back to back in one CUDA graph (replays timed by CUDA events)."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fns))
    return statistics.median(times)


def memcpy_us(src_rows: torch.Tensor, dst: torch.Tensor, n: int, reps: int) -> float:
    """Median microseconds per row of n back-to-back cudaMemcpyAsync from pinned rows (CUDA events)."""
    times = []
    for r in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for i in range(n):
            dst[i % dst.shape[0]].copy_(src_rows[i], non_blocking=True)
        b.record()
        b.synchronize()
        if r >= 2:
            times.append(a.elapsed_time(b) * 1e3 / n)
    return statistics.median(times)


def probe(name: str, d: int, f: int, dev, n_rows: int, reps: int) -> dict:
    X = 2 * d * f
    lay = expert_pack.layout(X)
    w = rows(n_rows, d, f, dev, seed=d)
    cuda = dev.type == "cuda"
    rec: dict = {"shape": name, "d_model": d, "d_ff": f, "X": X, "bf16_bytes": 2 * X, "packed_bytes": lay.nbytes,
                 "ratio": lay.nbytes / (2 * X), "exception_capacity": lay.cap, "rows": n_rows}
    if cuda:
        expert_pack.pack_rows(w[:2], lay)  # warm-up
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
    packed = expert_pack.pack_rows(w, lay)
    if cuda:
        b.record()
        b.synchronize()
        rec["pack_ms_per_row"] = a.elapsed_time(b) / n_rows
    cnt = packed[:, lay.off_cnt : lay.off_cnt + 4].contiguous().view(torch.int32).flatten()
    rec["exceptions_per_row"] = {"max": int(cnt.max()), "mean": float(cnt.float().mean())}
    host = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=cuda)
    host.copy_(packed)
    host_bf16 = torch.empty(w.shape, dtype=torch.bfloat16, pin_memory=cuda)
    host_bf16.copy_(w)
    ids = torch.arange(n_rows, dtype=torch.int32, device=dev)
    checks = {}
    for label, src in (("from GPU memory", packed), ("from pinned host memory", host)):
        for pairs in (False, True):
            out = torch.full_like(w, float("nan"))
            expert_pack.unpack_rows(src, ids, out, lay, pairs=pairs)
            checks[label + (", pairs kernel" if pairs else "")] = bool(
                torch.equal(out.view(torch.int16), w.view(torch.int16)))
    ref = expert_pack.unpack_rows_reference(host[:2], lay)
    checks["reference"] = bool(torch.equal(ref.view(torch.int16), w[:2].cpu().view(torch.int16)))
    cs = CopySettings()
    if cuda:  # replayed from a CUDA graph (ids on the GPU, no host sync), a reversed slot table
        out = torch.full_like(w, float("nan"))
        dst_row = ids.flip(0).contiguous()
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            expert_pack.unpack_rows(host, ids, out, lay, dst_row, cs.programs, cs.block, cs.warps)
        g.replay()
        torch.cuda.synchronize()
        checks["from pinned host memory, replayed from a CUDA graph"] = bool(
            torch.equal(out.flip(0).view(torch.int16), w.view(torch.int16)))
    rec["bitwise_equal"] = checks
    if not cuda:
        return rec
    n = 16
    slots = torch.empty((2, X), dtype=torch.bfloat16, device=dev)
    one = [torch.tensor([i % n_rows], dtype=torch.int32, device=dev) for i in range(n)]
    slot = [torch.tensor([i % 2], dtype=torch.int32, device=dev) for i in range(n)]
    P = SlotPool
    timings = {
        "unpack landed row (GPU memory -> slot), dma's step": per_call_us(
            [lambda i=i: expert_pack.unpack_rows(packed, one[i], slots, lay, slot[i], P.UNPACK_PROGRAMS,
                                                 P.UNPACK_BLOCK, P.UNPACK_WARPS) for i in range(n)], reps),
        "unpack landed row, pairs kernel": per_call_us(
            [lambda i=i: expert_pack.unpack_rows(packed, one[i], slots, lay, slot[i], P.UNPACK_PROGRAMS,
                                                 P.UNPACK_BLOCK, P.UNPACK_WARPS, pairs=True) for i in range(n)], reps),
        "unpack from the pinned store (copy kernel, copy settings)": per_call_us(
            [lambda i=i: expert_pack.unpack_rows(host, one[i], slots, lay, slot[i], cs.programs, cs.block, cs.warps)
             for i in range(n)], reps),
        "unpack from the pinned store, pairs kernel": per_call_us(
            [lambda i=i: expert_pack.unpack_rows(host, one[i], slots, lay, slot[i], cs.programs, cs.block, cs.warps,
                                                 pairs=True) for i in range(n)], reps),
        "copy kernel, bf16 row from the pinned store": per_call_us(
            [lambda i=i: expert_copy.gather_rows(host_bf16, one[i], slots, slot[i], cs.programs, cs.block, cs.warps)
             for i in range(n)], reps),
        "cudaMemcpyAsync, packed row": memcpy_us(host, torch.empty((2, lay.nbytes), dtype=torch.uint8, device=dev),
                                                 n_rows, reps),
        "cudaMemcpyAsync, bf16 row": memcpy_us(host_bf16, slots, n_rows, reps),
    }
    rec["us_per_expert"] = timings
    rec["copy_settings"] = {"programs": cs.programs, "block": cs.block, "warps": cs.warps}
    rec["unpack_landed_settings"] = {"programs": P.UNPACK_PROGRAMS, "block": P.UNPACK_BLOCK,
                                     "warps": P.UNPACK_WARPS}
    return rec


def checkpoint_packing(path: str) -> dict:
    """A checkpoint's experts packed (offload.compress=exp4, bf16): bytes per expert and exceptions per expert."""
    from infer.engine import load_offloaded

    _, store = load_offloaded(path, "cpu", torch.bfloat16, None, compress="exp4")
    _, plain = load_offloaded(path, "cpu", torch.bfloat16, None)
    same = all(torch.equal(store.unpacked_block(m).view(torch.int16), plain.data[m].view(torch.int16))
               for m in range(store.M))
    lay = store.layout
    cnt = store.data[..., lay.off_cnt : lay.off_cnt + 4].contiguous().view(torch.int32).flatten()
    return {"checkpoint": path, "experts": store.M * store.E, "d_model": store.D, "d_ff": store.F,
            "bf16_bytes": store.slot_bytes, "packed_bytes": store.expert_bytes,
            "ratio": store.expert_bytes / store.slot_bytes, "exception_capacity": lay.cap,
            "exceptions_per_expert": {"max": int(cnt.max()), "mean": float(cnt.float().mean())},
            "bitwise_equal_unpacked": same}


def markdown(doc: dict) -> str:
    lines = [f"# Lossless expert packing (exp4): {doc['device']}", "",
             f"{doc['date']}; `{doc['command']}`; torch {doc['torch']}.", "",
             "| shape | bf16 MB | packed MB | ratio | exceptions per row (max / mean) | pack ms per row | "
             "bitwise equal (every path) |", "|---|---|---|---|---|---|---|"]
    for r in doc["shapes"]:
        ok = all(r["bitwise_equal"].values())
        pack = f"{r['pack_ms_per_row']:.2f}" if "pack_ms_per_row" in r else "-"
        lines.append(f"| {r['shape']} | {r['bf16_bytes'] / 1e6:.2f} | {r['packed_bytes'] / 1e6:.2f} | "
                     f"{r['ratio']:.3f} | {r['exceptions_per_row']['max']} / {r['exceptions_per_row']['mean']:.1f} | "
                     f"{pack} | {'yes' if ok else 'NO: ' + str(r['bitwise_equal'])} |")
    for c in doc.get("checkpoints", []):
        lines += ["", f"Checkpoint `{c['checkpoint']}` ({c['experts']} experts, d_model {c['d_model']}, d_ff {c['d_ff']}): "
                  f"{c['packed_bytes']} packed bytes per expert for {c['bf16_bytes']} of bf16 (ratio {c['ratio']:.3f}), "
                  f"exceptions per expert max {c['exceptions_per_expert']['max']}, mean "
                  f"{c['exceptions_per_expert']['mean']:.1f} (capacity {c['exception_capacity']}); unpacked bitwise "
                  f"equal to the bf16 experts: {'yes' if c['bitwise_equal_unpacked'] else 'NO'}."]
    timed = [r for r in doc["shapes"] if "us_per_expert" in r]
    if timed:
        names = list(timed[0]["us_per_expert"])
        lines += ["", "Microseconds per expert (16 back to back in one CUDA graph; the memcpy rows: CUDA events around "
                  "back-to-back copies); GB/s = bytes read from the source per expert / time.", "",
                  "| shape | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in timed:
            cells = []
            for k in names:
                us = r["us_per_expert"][k]
                src = r["bf16_bytes"] if "bf16" in k else r["packed_bytes"]
                cells.append(f"{us:.1f} ({src / us / 1e3:.1f} GB/s)")
            lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/probe-expert-pack.json")
    ap.add_argument("--rows", type=int, default=32, help="experts packed per shape")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="also pack this checkpoint's experts and report their size and exceptions (repeatable)")
    ap.add_argument("--checkpoints-only", action="store_true", help="only the --checkpoint reports (no shapes)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    shapes = ["switch-base", "switch-large"] if cuda else ["tiny"]
    doc = {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python3"] + sys.argv), "torch": torch.__version__,
           "shapes": [] if args.checkpoints_only else
           [probe(s, *SHAPES[s], dev, args.rows if cuda else 3, args.reps) for s in shapes],
           "checkpoints": [checkpoint_packing(c) for c in args.checkpoint]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    out.with_suffix(".md").write_text(md)
    print(md)
    if not all(all(r["bitwise_equal"].values()) for r in doc["shapes"]) or not all(
            c["bitwise_equal_unpacked"] for c in doc["checkpoints"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
