"""Checkpoint loading memory: peak anonymous RAM while loading a checkpoint, against its size.

Streaming loading (meta-device model, each parameter allocated once, filled one tensor at a time
from memory-mapped files) should need about 1x the model in private memory, never 2x. File pages
that the memory map brings in are page cache (reclaimable, shared), so the figure that matters is
the process's anonymous memory: RssAnon, sampled while it loads.

Usage: python scripts/bench_load.py [--model switch-base-8] [--dtype bf16] [--shard-mb 500] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_anon_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def child(path: str) -> None:
    """Load the checkpoint, report baseline and peak RssAnon as JSON on stdout."""
    import torch

    from models.checkpoint import load_switch

    base = rss_anon_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_bytes())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    model = load_switch(path)
    secs = time.perf_counter() - t0
    done.set()
    t.join()
    peak[0] = max(peak[0], rss_anon_bytes())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(baseline_anon=base, peak_anon=peak[0], model_bytes=n_bytes, load_s=secs,
                          dtype=str(model.dtype), torch=torch.__version__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="switch-base-8")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return

    import torch

    from models.checkpoint import save_switch
    from models.config import preset
    from models.switch import Switch

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        with torch.device("meta"):
            model = Switch(preset(args.model))
        model = model.to_empty(device="cpu").to(dtype)
        model.init_weights()
        path = save_switch(model, Path(tmp) / args.model, max_shard_bytes=args.shard_mb * 2**20)
        del model
        files = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                             check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    extra = res["peak_anon"] - res["baseline_anon"]
    res.update(
        model=args.model, checkpoint_bytes=files, shard_mb=args.shard_mb,
        peak_extra_anon_over_model=extra / res["model_bytes"],
        command="python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]]),
        machine=platform.platform(), cpu_count=os.cpu_count(), python=platform.python_version(),
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    print(f"{args.model} ({args.dtype}): checkpoint {files / 1e9:.2f} GB, model {res['model_bytes'] / 1e9:.2f} GB, "
          f"peak extra anonymous RAM {extra / 1e9:.2f} GB = {res['peak_extra_anon_over_model']:.2f}x the model, "
          f"loaded in {res['load_s']:.1f} s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"load-{args.model}-cpu.json").write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
