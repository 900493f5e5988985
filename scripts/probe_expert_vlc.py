"""GPU probe of the variable-length exponent code (offload.compress=expv, kernels/expert_vlc.py) beside exp4.

For Switch expert shapes (w_in then w_out rows drawn as scripts/bench_e2e.py draws them, bf16): the bytes a copy
moves per expert (exp4's row; expv's used prefix) against bf16's, the time to pack on the GPU, a bitwise check of
expv's unpack (from GPU memory, replayed from a CUDA graph, and the plain-torch reference), and per-expert times,
16 experts back to back in one CUDA graph:
  - unpack of a landed packed row (GPU memory to a GPU slot: copy_mode dma's step after each wait), exp4 with the
    pool's settings and expv under each launch setting of --sweep (programs per row, warps, elements per tile);
  - a cudaMemcpyAsync of exp4's row and of expv's used prefix from pinned memory (the copy engines: dma's copies).
Writes JSON (with the command) and markdown. Without a GPU it runs a small shape under the Triton interpreter (a
smoke test, no timings).

    python3 scripts/probe_expert_vlc.py --out bench/results/probe-expert-vlc-h200.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():  # Triton reads it on import: the interpreter runs the kernels on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from infer.offload import SlotPool  # noqa: E402
from kernels import expert_pack, expert_vlc  # noqa: E402
from scripts.probe_expert_pack import SHAPES, memcpy_us, per_call_us, rows  # noqa: E402

# expv's launch settings timed: (programs per row, warps, elements per tile)
DEFAULT = (1024, 4, expert_vlc.TILE)
SWEEP = [(1024, w, t) for t in (2048, 4096, 8192) for w in (2, 4, 8)] + [(512, 4, 4096), (2048, 4, 4096)]


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(a.view(torch.int16), b.view(torch.int16)))


def probe(name: str, d: int, f: int, dev, n_rows: int, reps: int, sweep: bool) -> dict:
    X = 2 * d * f
    cuda = dev.type == "cuda"
    w = rows(n_rows, d, f, dev, seed=d)
    lay4 = expert_pack.layout(X)
    lay = expert_vlc.layout(X)
    packed4 = expert_pack.pack_rows(w, lay4)
    expert_vlc.pack_rows(w[:1], lay)  # warm-up
    if cuda:
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
    packed, used = expert_vlc.pack_rows(w, lay)
    rec: dict = {"shape": name, "d_model": d, "d_ff": f, "X": X, "rows": n_rows, "bf16_bytes": 2 * X,
                 "exp4_bytes": lay4.nbytes, "expv_row_bytes": lay.nbytes, "expv_used_bytes_max": int(used.max()),
                 "expv_used_bytes_min": int(used.min()), "expv_over_exp4": int(used.max()) / lay4.nbytes,
                 "expv_over_bf16": int(used.max()) / (2 * X), "exp4_over_bf16": lay4.nbytes / (2 * X)}
    if cuda:
        b.record()
        b.synchronize()
        rec["expv_pack_ms_per_row"] = a.elapsed_time(b) / n_rows
    ids = torch.arange(n_rows, dtype=torch.int32, device=dev)
    checks = {}
    out = torch.full_like(w, float("nan"))
    expert_vlc.unpack_rows(packed, ids, out, lay)
    checks["expv kernel, from GPU memory"] = _equal(out, w)
    ref = expert_vlc.unpack_rows_reference(packed[:1].cpu(), lay)
    checks["expv plain-torch reference"] = _equal(ref, w[:1].cpu())
    if cuda:  # replayed from a CUDA graph, a reversed slot table
        out = torch.full_like(w, float("nan"))
        dst_row = ids.flip(0).contiguous()
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            expert_vlc.unpack_rows(packed, ids, out, lay, dst_row)
        g.replay()
        torch.cuda.synchronize()
        checks["expv kernel, replayed from a CUDA graph"] = _equal(out.flip(0), w)
    rec["bitwise_equal"] = checks
    if not cuda:
        return rec
    n = 16
    slots = torch.empty((2, X), dtype=torch.bfloat16, device=dev)
    one = [torch.tensor([i % n_rows], dtype=torch.int32, device=dev) for i in range(n)]
    slot = [torch.tensor([i % 2], dtype=torch.int32, device=dev) for i in range(n)]
    P = SlotPool
    timings = {"exp4 unpack landed row (pool settings)": per_call_us(
        [lambda i=i: expert_pack.unpack_rows(packed4, one[i], slots, lay4, slot[i], num_programs=P.UNPACK_PROGRAMS,
                                             num_warps=P.UNPACK_WARPS, ahead=False) for i in range(n)], reps)}
    settings = [DEFAULT] + [c for c in SWEEP if c != DEFAULT] if sweep else [DEFAULT]
    by_tile = {lay.T: (lay, packed)}
    rec["expv_sweep"] = []
    for progs, warps, tile in settings:
        if tile not in by_tile:
            lay_t = expert_vlc.layout(X, tile=tile)
            p_t, u_t = expert_vlc.pack_rows(w, lay_t)
            by_tile[tile] = (lay_t, p_t)
            rec[f"expv_used_bytes_max_tile{tile}"] = int(u_t.max())
        lay_t, p_t = by_tile[tile]
        us = per_call_us([lambda i=i: expert_vlc.unpack_rows(p_t, one[i], slots, lay_t, slot[i], num_programs=progs,
                                                             num_warps=warps) for i in range(n)], reps)
        rec["expv_sweep"].append({"programs": progs, "warps": warps, "tile": tile, "us": us})
        print(f"[vlc] {name} unpack {rec['expv_sweep'][-1]}", flush=True)
    d_us = next(r["us"] for r in rec["expv_sweep"] if (r["programs"], r["warps"], r["tile"]) == DEFAULT)
    timings["expv unpack landed row (default settings)"] = d_us
    host4 = torch.empty(packed4.shape, dtype=torch.uint8, pin_memory=True).copy_(packed4)
    hostv = torch.empty(packed.shape, dtype=torch.uint8, pin_memory=True).copy_(packed)
    u = int(used.max())
    timings["cudaMemcpyAsync, exp4 row"] = memcpy_us(host4, torch.empty((2, lay4.nbytes), dtype=torch.uint8,
                                                                        device=dev), n_rows, reps)
    timings["cudaMemcpyAsync, expv used prefix"] = memcpy_us(hostv[:, :u], torch.empty((2, u), dtype=torch.uint8,
                                                                                      device=dev), n_rows, reps)
    rec["us_per_expert"] = timings
    rec["default_settings"] = dict(zip(("programs", "warps", "tile"), DEFAULT))
    return rec


def markdown(doc: dict) -> str:
    lines = ["# expv (variable-length exponent code) beside exp4", "", f"{doc['date']}; `{doc['command']}`; "
             f"{doc['device']}, torch {doc['torch']}.", "",
             "| shape | exp4 / bf16 | expv / bf16 | expv / exp4 | lossless | exp4 unpack us | expv unpack us | "
             "memcpy exp4 us | memcpy expv us |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["shapes"]:
        t = r.get("us_per_expert", {})

        def f(k):
            return f"{t[k]:.1f}" if k in t else "-"
        lines.append(f"| {r['shape']} | {r['exp4_over_bf16']:.3f} | {r['expv_over_bf16']:.3f} | "
                     f"{r['expv_over_exp4']:.3f} | {all(r['bitwise_equal'].values())} | "
                     f"{f('exp4 unpack landed row (pool settings)')} | {f('expv unpack landed row (default settings)')} | "
                     f"{f('cudaMemcpyAsync, exp4 row')} | {f('cudaMemcpyAsync, expv used prefix')} |")
    for r in doc["shapes"]:
        if len(r.get("expv_sweep", [])) > 1:
            lines += ["", f"expv unpack of a landed row, {r['shape']}, us per expert:", "",
                      "| programs per row | warps | elements per tile | us |", "|---|---|---|---|"]
            lines += [f"| {s['programs']} | {s['warps']} | {s['tile']} | {s['us']:.1f} |" for s in r["expv_sweep"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/probe-expert-vlc.json")
    ap.add_argument("--shapes", nargs="+", default=None, help=f"of {sorted(SHAPES)} (default: the two Switch shapes; "
                    "tiny without a GPU)")
    ap.add_argument("--rows", type=int, default=8, help="experts packed per shape")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sweep", action="store_true", help="time expv's unpack under every launch setting of SWEEP")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    shapes = args.shapes or (["switch-base", "switch-large"] if cuda else ["tiny"])
    for s in shapes:
        if s not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; expected some of {sorted(SHAPES)}")
    doc = {"command": "python3 scripts/probe_expert_vlc.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter, no timings)", "shapes": []}
    for s in shapes:
        d, f = SHAPES[s]
        rec = probe(s, d, f, dev, args.rows if cuda else 2, args.reps, args.sweep and cuda)
        print(f"[vlc] {s}: {json.dumps(rec)}", flush=True)
        doc["shapes"].append(rec)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    bad = [(r["shape"], k) for r in doc["shapes"] for k, v in r["bitwise_equal"].items() if not v]
    if bad:
        raise SystemExit(f"probe_expert_vlc: not lossless: {bad}")
    return doc


if __name__ == "__main__":
    main()
