"""GPU probe: how long the dma copy mode's wait kernel (kernels/mailbox.py) spins before it counts a timeout.

The wait holds the compute stream until the host loop's copies for a block are done, and gives up after a number
of polls (infer.offload.DmaCopier.MAX_ITERS, or PGMOE_DMA_WAIT_POLLS) so that a copier that cannot issue its copies
never hangs the GPU. A poll is one volatile load of done[m]; what it costs in time sets how long a wait may
legitimately last (a prefetch of every expert of a block takes tens of ms on the H200's link). For each poll count
the probe launches a wait that can never be satisfied (done 0, posted 1), times it with CUDA events, checks that it
counted one timeout, and derives ns per poll and the default budget in seconds; it also times a wait that is
already satisfied (the kernel's cost on every MoE block). Writes JSON (with the command) and markdown beside it.
On a machine without a GPU it runs the kernel under the Triton interpreter with few polls (a smoke test).

    python3 scripts/probe_dma_wait.py --out bench/results/probe-dma-wait-h200.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():  # Triton reads it on import: the interpreter runs the kernel on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from infer.offload import DmaCopier  # noqa: E402
from kernels import mailbox  # noqa: E402


def time_wait(done, posted, err, polls: int, reps: int, dev) -> tuple[list[float], int]:
    """Milliseconds of reps waits of at most `polls` polls each (CUDA events on a GPU, wall clock on the CPU), and
    the timeouts they counted (err is cleared before each: a counted timeout makes a later wait skip its polls)."""
    out, timeouts = [], 0
    for _ in range(reps):
        err.zero_()
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            mailbox.wait(done, posted, err, polls)
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            mailbox.wait(done, posted, err, polls)
            out.append(1e3 * (time.perf_counter() - t))
        timeouts += int(err.item())
    err.zero_()
    return out, timeouts


def probe(polls_list: list[int], reps: int, dev) -> dict:
    done = torch.zeros(1, dtype=torch.int64, device=dev)
    posted = torch.ones(1, dtype=torch.int64, device=dev)
    err = torch.zeros(1, dtype=torch.int32, device=dev)
    mailbox.wait(done, posted, err, 10)  # compile outside the timings
    err.zero_()
    rows = []
    for polls in polls_list:
        ms, timeouts = time_wait(done, posted, err, polls, reps, dev)
        med = statistics.median(ms)
        rows.append({"polls": polls, "ms_median": med, "ms_min": min(ms), "ms_max": max(ms), "reps": reps,
                     "timeouts_counted": timeouts, "timed_out_every_rep": timeouts == reps,
                     "ns_per_poll": 1e6 * med / polls})
    done.fill_(1)
    ms, timeouts = time_wait(done, posted, err, DmaCopier.MAX_ITERS, reps, dev)
    satisfied = {"ms_median": statistics.median(ms), "timeouts_counted": timeouts}
    per_poll = statistics.median(r["ns_per_poll"] for r in rows)
    return {"rows": rows, "satisfied_wait": satisfied, "ns_per_poll": per_poll,
            "default_polls": DmaCopier.MAX_ITERS, "default_budget_s": DmaCopier.MAX_ITERS * per_poll * 1e-9}


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# dma wait kernel: polls before a timeout, {m['device']}", "",
             f"{m['date']}; torch {m['torch']}; `{m['command']}`. {m['how']}", "",
             "| polls | median ms | min ms | max ms | timeouts counted / reps | ns per poll |", "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['polls']:,} | {r['ms_median']:.3f} | {r['ms_min']:.3f} | {r['ms_max']:.3f} | "
                     f"{r['timeouts_counted']} / {r['reps']} | {r['ns_per_poll']:.1f} |")
    s = res["satisfied_wait"]
    lines += ["", f"A satisfied wait (done = posted): {1e3 * s['ms_median']:.1f} us, timeouts counted "
              f"{s['timeouts_counted']}. Default budget: {res['default_polls']:,} polls = "
              f"{res['default_budget_s']:.2f} s at {res['ns_per_poll']:.1f} ns per poll.", ""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON path (markdown beside it)")
    ap.add_argument("--polls", default=None, help="comma-separated poll counts (default: GPU 1e5,1e6,4e6; CPU 50,200)")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    default = "100000,1000000,4000000" if dev.type == "cuda" else "50,200"
    polls_list = [int(float(p)) for p in (args.polls or default).split(",")]
    how = ("One wait kernel per rep between two CUDA events; ms." if dev.type == "cuda" else
           "CPU smoke test: the Triton interpreter, wall clock (not a measurement); ms.")
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "how": how,
            "command": " ".join(["python3", "scripts/probe_dma_wait.py"] + (argv or sys.argv[1:]))}
    res = {"meta": meta, **probe(polls_list, args.reps, dev)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
