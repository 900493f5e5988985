"""GPU probe: where a captured decode step's time goes, kernel by kernel (switch-base-128 shape by default).

Runs greedy decoding, or beam search with --beams N (batch 1, random weights, the bench's prompt length) per
policy under torch.profiler
(CUPTI: the kernels inside each replayed CUDA graph, and the copier's host->GPU copies) and reports, for the
median-length step: its kernels in order (offset from the step's first kernel, duration, gap before), the
copies inside its window, and the tail (the kernels after the step's last host->GPU copy ends), with sums by
kernel name. Steps are told apart by the graph launch each kernel belongs to (the trace's correlation id).
Profiling adds a little time per kernel; compare steps inside one trace, not with bench_e2e's ms/token.

    python3 scripts/profile_decode_step.py --out bench/results/profile-decode-h200.json
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infer.engine import Engine  # noqa: E402
from infer.offload import default_budget_bytes, request_eager_module_loading  # noqa: E402
from infer.policies import PolicySpec  # noqa: E402
from models.config import preset  # noqa: E402
from models.pregate import convert_to_pregated  # noqa: E402


def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_e2e_for_profile", Path(__file__).with_name("bench_e2e.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def steps_of(trace: dict) -> tuple[list[list[dict]], list[dict]]:
    """Kernels grouped by the launch they belong to (a replayed graph: one group per step, in time order;
    groups of fewer than 20 kernels, eager launches, are left out), and every host->GPU copy."""
    groups: dict[int, list[dict]] = collections.defaultdict(list)
    copies = []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") != "X":
            continue
        cat = ev.get("cat", "")
        if cat == "kernel":
            groups[ev.get("args", {}).get("correlation", -1)].append(ev)
        elif cat == "gpu_memcpy" and "HtoD" in ev.get("name", ""):
            copies.append(ev)
    steps = [sorted(g, key=lambda e: e["ts"]) for g in groups.values() if len(g) >= 20]
    steps.sort(key=lambda g: g[0]["ts"])
    return steps, sorted(copies, key=lambda e: e["ts"])


def describe(step: list[dict], copies: list[dict], next_start: float | None) -> dict:
    t0 = step[0]["ts"]
    end = max(e["ts"] + e["dur"] for e in step)
    kernels, prev_end = [], t0
    for e in step:
        kernels.append({"name": e["name"][:90], "start_us": round(e["ts"] - t0, 2), "dur_us": round(e["dur"], 2),
                        "gap_us": round(e["ts"] - prev_end, 2), "stream": e.get("args", {}).get("stream")})
        prev_end = max(prev_end, e["ts"] + e["dur"])
    window_end = next_start if next_start is not None else end
    mine = [c for c in copies if t0 - 50 <= c["ts"] < window_end]
    cps = [{"start_us": round(c["ts"] - t0, 2), "dur_us": round(c["dur"], 2),
            "GBps": round(c.get("args", {}).get("bytes", 0) / max(c["dur"], 1e-9) / 1e3, 1)} for c in mine]
    out = {"span_us": round(end - t0, 2), "kernels_n": len(step), "kernel_busy_us": round(sum(e["dur"] for e in step), 2),
           "kernels": kernels, "copies": cps}
    if mine:
        last = max(c["ts"] + c["dur"] for c in mine if c["ts"] < end)
        tail = [e for e in step if e["ts"] + e["dur"] > last]
        by = collections.Counter()
        for e in tail:
            by[e["name"][:60]] += e["dur"]
        out["tail"] = {"after_last_copy_us": round(end - last, 2), "kernels_n": len(tail),
                       "kernel_busy_us": round(sum(e["dur"] for e in tail), 2),
                       "by_name_us": {k: round(v, 2) for k, v in by.most_common()}}
        out["head"] = {"first_copy_start_us": round(min(c["ts"] for c in mine) - t0, 2)}
    by_all = collections.Counter()
    for e in step:
        by_all[e["name"][:60]] += e["dur"]
    out["by_name_us"] = {k: round(v, 2) for k, v in by_all.most_common(25)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="switch-base-128")
    ap.add_argument("--policies", default="gpu_only,pregated")
    ap.add_argument("--copy-mode", default="dma")
    ap.add_argument("--input-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    ap.add_argument("--compress", default=None, choices=["exp4"], help="experts stored and copied packed (bench_e2e's)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile-decode.json"))
    args = ap.parse_args()
    from torch.profiler import ProfilerActivity, profile

    if args.copy_mode == "dma":
        request_eager_module_loading()  # before the first CUDA call (as bench_e2e does)
    bench = _bench()
    dev, dtype = torch.device("cuda"), torch.bfloat16
    cfg = preset(args.shape)
    model = bench.build_own(cfg, dev, dtype)
    store = bench.build_store(cfg, model, dev, dtype, default_budget_bytes(), args.compress)
    model.set_backend("triton")
    convert_to_pregated(model, 1)  # every policy runs on the converted model (gpu_only computes its pre-gates too)
    eng = Engine(model, store, dev, cuda_graph=True, copy_mode=args.copy_mode, measure_stall=False)
    ids = torch.randint(3, cfg.vocab_size, (1, args.input_tokens), generator=torch.Generator().manual_seed(3))
    res = {"command": "python3 scripts/profile_decode_step.py " + " ".join(sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "device": torch.cuda.get_device_name(dev), "shape": args.shape,
           "copy_mode": args.copy_mode, "compress": args.compress, "beams": args.beams, "policies": {}}
    for name in args.policies.split(","):
        spec = PolicySpec.parse(name)
        eng.run(spec, ids, None, max_new_tokens=8, num_beams=args.beams, warmup=True)  # compile, capture
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            r = eng.run(spec, ids, None, max_new_tokens=args.new_tokens, num_beams=args.beams, warmup=False)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "t.json")
            prof.export_chrome_trace(path)
            trace = json.load(open(path))
        steps, copies = steps_of(trace)
        if not steps:
            res["policies"][name] = {"error": "no replayed step found in the trace"}
            continue
        spans = [max(e["ts"] + e["dur"] for e in s) - s[0]["ts"] for s in steps]
        med = statistics.median(spans)
        i = min(range(len(steps)), key=lambda j: abs(spans[j] - med))
        nxt = steps[i + 1][0]["ts"] if i + 1 < len(steps) else None
        d = describe(steps[i], copies, nxt)
        d["steps"] = len(steps)
        d["span_us_median"] = round(med, 2)
        d["step_to_step_us_median"] = round(statistics.median(
            [b[0]["ts"] - a[0]["ts"] for a, b in zip(steps, steps[1:])]), 2) if len(steps) > 1 else None
        d["bench_ms_per_token"] = statistics.median(r.metrics["decode_ms"]) if r.metrics.get("decode_ms") else None
        res["policies"][name] = d
        print(name, {k: v for k, v in d.items() if k not in ("kernels", "copies", "by_name_us")}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
