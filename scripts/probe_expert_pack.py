"""GPU probe of the lossless expert packing (offload.compress=exp4, kernels/expert_pack.py).

For one Switch expert shape at a time (w_in then w_out rows drawn as scripts/bench_e2e.py draws them: N(0, d^-1/2)
and N(0, d_ff^-1/2), bf16): the packed size against bf16's, the exceptions per row, the time to pack a block on the
GPU, a bitwise check of every unpack path (from GPU memory, from pinned host memory through its mapped address,
and replayed from a CUDA graph), and per-expert times, 16 experts back to back in one CUDA graph:
  - unpack of a landed packed row (GPU memory to a GPU slot; copy_mode dma's step after each wait);
  - unpack straight from the pinned store (the copy kernel's, e.g. on_demand's copies; the pool's settings);
  - the plain copy kernel moving the bf16 row from the pinned store (what the unpack replaces);
  - a cudaMemcpyAsync of the packed row and of the bf16 row from pinned memory (the copy engines: dma's copies).
--compare LABEL=FILE checks and times another implementation beside this one (e.g. an earlier revision's
kernels/expert_pack.py, with its own layout), --sweep the unpack kernel's launch settings. Writes JSON (with the
command) and markdown. On a machine without a GPU it runs a small shape under the Triton interpreter (a smoke test,
no timings).

    python3 scripts/probe_expert_pack.py --out bench/results/probe-expert-pack-h200.json
    git show 6f28947:kernels/expert_pack.py > /tmp/ep_prev.py
    python3 scripts/probe_expert_pack.py --compare prev=/tmp/ep_prev.py --sweep --out ...
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
    """Median microseconds per call of the fns run back to back in one CUDA graph (scripts/bench_kernels.graph_of;
    replays timed by scripts/probe_decode.cuda_times, no L2 flush between them)."""
    from scripts.bench_kernels import graph_of
    from scripts.probe_decode import cuda_times

    return statistics.median(cuda_times(graph_of(*fns), 1, reps)) * 1e3 / len(fns)


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


def load_module(path: str):
    """A Python file with expert_pack's API (layout, pack_rows, unpack_rows), e.g. an earlier revision's
    kernels/expert_pack.py (`git show REV:kernels/expert_pack.py > FILE`), to time beside the current one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"expert_pack_compare_{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (its dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


# the unpack kernel's settings swept: (programs, layout chunk, warps, next chunk's loads ahead)
SWEEP_LANDED = [(p, c, 4, a) for p in (256, 512, 1024) for c in (2048, 4096, 8192) for a in (False, True)]
SWEEP_PINNED = [(p, c, w, a) for p in (16, 32, 64) for c in (4096, 8192, 16384) for w in (4, 8) for a in (False, True)]


def probe(name: str, d: int, f: int, dev, n_rows: int, reps: int, compare: dict | None = None,
          sweep: bool = False, timers=None) -> dict:
    """compare: {label: module} of other expert_pack implementations (their own layouts), checked and timed beside
    this one (their `pairs=True` kernel too where they have one; those with a `block` launch argument at 4096 for a
    landed row and the copy settings' block from the pinned store). sweep: time the settings above. timers: (per
    call, memcpy) timing functions standing in for per_call_us and memcpy_us, to run the timing code off the GPU."""
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

    def pinned(t):
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
        h.copy_(t)
        return h

    host, host_bf16 = pinned(packed), pinned(w)
    ids = torch.arange(n_rows, dtype=torch.int32, device=dev)
    # the kernels timed: label -> (module, layout, packed rows in GPU memory, in pinned memory, extra kwargs)
    kernels = {"": (expert_pack, lay, packed, host, {})}
    for label, mod in (compare or {}).items():
        lay_c = mod.layout(X)
        packed_c = mod.pack_rows(w, lay_c)
        kernels[label] = (mod, lay_c, packed_c, pinned(packed_c), {})
        if "pairs" in mod.unpack_rows.__code__.co_varnames:
            kernels[label + ", pairs kernel"] = (mod, lay_c, packed_c, kernels[label][3], {"pairs": True})
    checks = {}
    for label, (mod, lay_k, src_dev, src_host, kw) in kernels.items():
        for where, src in (("from GPU memory", src_dev), ("from pinned host memory", src_host)):
            out = torch.full_like(w, float("nan"))
            mod.unpack_rows(src, ids, out, lay_k, **kw)
            checks[where + (f" ({label})" if label else "")] = bool(
                torch.equal(out.view(torch.int16), w.view(torch.int16)))
    ref = expert_pack.unpack_rows_reference(host[:2], lay)
    checks["reference"] = bool(torch.equal(ref.view(torch.int16), w[:2].cpu().view(torch.int16)))
    cs, P = CopySettings(), SlotPool
    if cuda:  # replayed from a CUDA graph (ids on the GPU, no host sync), a reversed slot table
        out = torch.full_like(w, float("nan"))
        dst_row = ids.flip(0).contiguous()
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            expert_pack.unpack_rows(host, ids, out, lay, dst_row, num_programs=P.PINNED_PROGRAMS,
                                    num_warps=P.PINNED_WARPS)
        g.replay()
        torch.cuda.synchronize()
        checks["from pinned host memory, replayed from a CUDA graph"] = bool(
            torch.equal(out.flip(0).view(torch.int16), w.view(torch.int16)))
    rec["bitwise_equal"] = checks
    if not cuda and timers is None:
        return rec
    per_call_us, memcpy_us = timers or (globals()["per_call_us"], globals()["memcpy_us"])
    n = 16
    slots = torch.empty((2, X), dtype=torch.bfloat16, device=dev)
    one = [torch.tensor([i % n_rows], dtype=torch.int32, device=dev) for i in range(n)]
    slot = [torch.tensor([i % 2], dtype=torch.int32, device=dev) for i in range(n)]

    def unpack_us(mod, lay_k, src, progs, warps, **kw):  # kw: the module's other arguments
        return per_call_us([lambda i=i: mod.unpack_rows(src, one[i], slots, lay_k, slot[i], num_programs=progs,
                                                        num_warps=warps, **kw) for i in range(n)], reps)

    timings = {}
    for label, (mod, lay_k, src_dev, src_host, kw) in kernels.items():
        tag = f" ({label})" if label else ""
        if "block" in mod.unpack_rows.__code__.co_varnames:  # an earlier revision's: its block argument
            landed, pinned_kw = dict(kw, block=4096), dict(kw, block=cs.block)
            pinned_pw = (cs.programs, cs.warps)
        else:  # this one: the pool's settings for each path
            landed, pinned_kw = dict(kw, ahead=False), dict(kw, ahead=True)
            pinned_pw = (P.PINNED_PROGRAMS, P.PINNED_WARPS)
        timings[f"unpack landed row (GPU memory -> slot), dma's step{tag}"] = unpack_us(
            mod, lay_k, src_dev, P.UNPACK_PROGRAMS, P.UNPACK_WARPS, **landed)
        timings[f"unpack from the pinned store (copy kernel){tag}"] = unpack_us(
            mod, lay_k, src_host, *pinned_pw, **pinned_kw)
    timings["copy kernel, bf16 row from the pinned store"] = per_call_us(
        [lambda i=i: expert_copy.gather_rows(host_bf16, one[i], slots, slot[i], cs.programs, cs.block, cs.warps)
         for i in range(n)], reps)
    flat = torch.empty(n_rows * X + 8, dtype=torch.bfloat16, pin_memory=cuda)  # rows 16 bytes past the boundary
    host_off = flat[8:].view(n_rows, X)
    host_off.copy_(w)
    timings["copy kernel, bf16 row from the pinned store, rows 16 bytes off 128-byte alignment"] = per_call_us(
        [lambda i=i: expert_copy.gather_rows(host_off, one[i], slots, slot[i], cs.programs, cs.block, cs.warps)
         for i in range(n)], reps)
    host16, land16 = host.view(torch.int16), torch.empty((2, lay.nbytes // 2), dtype=torch.int16, device=dev)
    timings["copy kernel, packed row from the pinned store (no unpack)"] = per_call_us(
        [lambda i=i: expert_copy.gather_rows(host16, one[i], land16, slot[i], cs.programs, cs.block, cs.warps)
         for i in range(n)], reps)
    # the same bytes with rows 16 bytes longer (a row starts 16 r bytes past a page boundary, as a row of a packed
    # layout whose size was a multiple of 16 only; GB/s counts the packed row's bytes)
    stride = lay.nbytes + 16
    skew = torch.zeros(n_rows * stride, dtype=torch.uint8, pin_memory=cuda).view(n_rows, stride // 2 * 2)
    skew16, land_s = skew.view(torch.int16), torch.empty((2, stride // 2), dtype=torch.int16, device=dev)
    timings["copy kernel, packed row from the pinned store, rows at a 16-byte skew (no unpack)"] = per_call_us(
        [lambda i=i: expert_copy.gather_rows(skew16, one[i], land_s, slot[i], cs.programs, cs.block, cs.warps)
         for i in range(n)], reps)
    timings["cudaMemcpyAsync, packed row"] = memcpy_us(host, torch.empty((2, lay.nbytes), dtype=torch.uint8,
                                                                         device=dev), n_rows, reps)
    timings["cudaMemcpyAsync, bf16 row"] = memcpy_us(host_bf16, slots, n_rows, reps)
    rec["us_per_expert"] = timings
    rec["copy_settings"] = {"programs": cs.programs, "block": cs.block, "warps": cs.warps}
    rec["unpack_landed_settings"] = {"programs": P.UNPACK_PROGRAMS, "warps": P.UNPACK_WARPS, "ahead": False}
    rec["unpack_pinned_settings"] = {"programs": P.PINNED_PROGRAMS, "warps": P.PINNED_WARPS, "ahead": True}
    rec["chunk"] = lay.T
    if sweep:  # this module's kernel under other settings: [programs, chunk, warps, ahead, us per expert, packed bytes]
        for key, sweep_set, where in (("sweep_landed", SWEEP_LANDED, "gpu"), ("sweep_pinned", SWEEP_PINNED, "host")):
            rec[key] = []
            for c in sorted({e[1] for e in sweep_set}):
                lay_c = expert_pack.layout(X, chunk=c)
                src = expert_pack.pack_rows(w, lay_c)
                src = pinned(src) if where == "host" else src
                rec[key] += [[p, c, wp, a, unpack_us(expert_pack, lay_c, src, p, wp, ahead=a), lay_c.nbytes]
                             for p, c_, wp, a in sweep_set if c_ == c]
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
                src = r["bf16_bytes"] if "bf16" in k else r["packed_bytes"]  # (a compared layout's: within 0.1%)
                cells.append(f"{us:.1f} ({src / us / 1e3:.1f} GB/s)")
            lines.append(f"| {r['shape']} | " + " | ".join(cells) + " |")
    for key, what in (("sweep_landed", "a landed row (GPU memory)"), ("sweep_pinned", "from the pinned store")):
        for r in [r for r in timed if key in r]:
            best = min(r[key], key=lambda e: e[4])
            lines += ["", f"{r['shape']}: the unpack kernel's settings, {what}: microseconds per expert "
                      f"(GB/s of packed bytes read); best programs={best[0]} chunk={best[1]} warps={best[2]} "
                      f"ahead={best[3]}, {best[4]:.1f} us.", "", "| programs | chunk | warps | ahead | us | GB/s |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {p} | {c} | {wp} | {a} | {us:.1f} | {nb / us / 1e3:.1f} |" for p, c, wp, a, us, nb in r[key]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/probe-expert-pack.json")
    ap.add_argument("--rows", type=int, default=32, help="experts packed per shape")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="also pack this checkpoint's experts and report their size and exceptions (repeatable)")
    ap.add_argument("--checkpoints-only", action="store_true", help="only the --checkpoint reports (no shapes)")
    ap.add_argument("--compare", action="append", default=[], metavar="LABEL=FILE",
                    help="also check and time another expert_pack implementation (a Python file with its API, e.g. "
                         "an earlier revision's kernels/expert_pack.py), under LABEL (repeatable)")
    ap.add_argument("--sweep", action="store_true", help="also time the unpack kernel under other launch settings")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    compare = {}
    for item in args.compare:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_file():
            raise SystemExit(f"--compare {item!r}: expected LABEL=FILE with FILE an existing Python file")
        compare[label] = load_module(path)
    shapes = ["switch-base", "switch-large"] if cuda else ["tiny"]
    doc = {"device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python3"] + sys.argv), "torch": torch.__version__,
           "shapes": [] if args.checkpoints_only else
           [probe(s, *SHAPES[s], dev, args.rows if cuda else 3, args.reps, compare, args.sweep) for s in shapes],
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
