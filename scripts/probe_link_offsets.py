"""How fast one expert-sized host -> GPU copy runs from different places in a large pinned buffer (H200).

Copies one switch-base expert (9,437,184 bytes) from 48 offsets spread over a pinned buffer (torch's
pin_memory, 2 and 14 GB: switch-base-128's store is ~14 GB) and over a 2 GB transparent-hugepage mmap
registered with cudaHostRegister; the best of 5 copies per offset (CUDA events). Question it answers:
whether some parts of the pinned store copy slower (page backing), which would make a decode step's
copy time depend on which experts it needs. Writes $OUT/link.json (or --out).

    python3 scripts/probe_link_offsets.py --out bench/results/probe-link-offsets-h200.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import time

import torch

ROW = 9437184  # one switch-base expert, bytes


def rates(buf: torch.Tensor, dev, n_off: int = 48, reps: int = 5) -> dict:
    dst = torch.empty(ROW, dtype=torch.uint8, device=dev)
    span = buf.numel() - ROW
    best = []
    for i in range(n_off):
        off = (span * i // n_off) // 4096 * 4096
        src = buf[off : off + ROW]
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        best.append(min(ts))
    g = [ROW / (t / 1e3) / 1e9 for t in best]
    return {"GBps_min": min(g), "GBps_median": statistics.median(g), "GBps_max": max(g),
            "per_offset": [round(x, 1) for x in g]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "link.json"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    out: dict = {}
    for gb in (2, 14):
        t = time.time()
        buf = torch.empty(gb << 30, dtype=torch.uint8, pin_memory=True)
        buf.fill_(1)
        out[f"torch_pinned_{gb}GB"] = rates(buf, dev)
        out[f"torch_pinned_{gb}GB"]["alloc_s"] = time.time() - t
        del buf
    try:  # hugepage-backed anonymous memory, registered (pinned) with CUDA
        n = 2 << 30
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        arr = torch.frombuffer(m, dtype=torch.uint8)
        arr.fill_(1)
        rc = torch.cuda.cudart().cudaHostRegister(arr.data_ptr(), n, 0)
        out["hostregister_thp_2GB"] = rates(arr, dev)
        out["hostregister_thp_2GB"]["register_rc"] = int(rc)
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            out["thp"] = f.read().strip()
        out["AnonHugePages"] = [line for line in open("/proc/meminfo") if "Huge" in line]
    except Exception as e:  # noqa: BLE001 - recorded
        out["hostregister_error"] = repr(e)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: ({kk: vv for kk, vv in v.items() if kk != "per_offset"} if isinstance(v, dict) else v)
                      for k, v in out.items()}, indent=1))


if __name__ == "__main__":
    main()
