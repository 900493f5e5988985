"""The runner's report: aggregate per-batch measurements, the environment, a table, JSON and a plot."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from infer.engine import RunResult


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "compute_device": "cpu" if device.type == "cpu" else torch.cuda.get_device_name(device),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cpu":
        env["note"] = (
            "CPU-only run: the CPU is the compute device; the expert store is ordinary memory and "
            "'copies' are memcpy within RAM; no GPU memory or PCIe figures are reported"
        )
    else:
        env["cuda"] = torch.version.cuda
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def pinned_peak_GBps(device: torch.device, nbytes: int = 256 << 20, trials: int = 5) -> float | None:
    """Host -> GPU bandwidth of large copies from pinned memory (the ceiling for the runner's copies): the best of
    `trials` timings of 3 back-to-back copies of nbytes, after a warm-up copy. The best, not the mean: a single
    timing has read as low as 50.8 GB/s on the H200 in a run whose expert copies then moved at 53.7 GB/s."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    best = 0.0
    for _ in range(trials):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        b.record()
        torch.cuda.synchronize(device)
        best = max(best, 3 * nbytes / (a.elapsed_time(b) / 1e3) / 1e9)
    return best


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def aggregate(runs: list[RunResult], pinned_peak: float | None = None) -> dict[str, Any]:
    """One policy's batches -> one set of metrics."""
    ms = [r.metrics for r in runs]
    per_token = [x for m in ms for x in m["decode_ms"]]
    total_s = sum(m["total_ms"] for m in ms) / 1e3
    tokens = sum(m["batch_size"] * m["new_tokens"] for m in ms)
    lookups = sum(m.get("expert_lookups") or 0 for m in ms)
    hits = sum(m.get("cache_hits") or 0 for m in ms)
    copied = sum(m.get("bytes_copied") or 0 for m in ms)
    stalls = [m.get("stall_ms") for m in ms]
    guesses = [m.get("first_block_guess") or {} for m in ms]
    g_hits, g_looks = (sum(g.get(k) or 0 for g in guesses) for k in ("hits", "lookups"))
    per_tok = [m["stall_ms_per_token"] for m in ms if m.get("stall_ms_per_token") is not None]
    cuda = ms[0]["peak_allocated_bytes"] is not None
    out: dict[str, Any] = {
        "batches": len(ms),
        "sequences": sum(m["batch_size"] for m in ms),
        "generated_tokens": tokens,
        "ttft_ms": statistics.mean(m["ttft_ms"] for m in ms),
        "ms_per_token_median": statistics.median(per_token) if per_token else None,
        "ms_per_token_p90": _pct(per_token, 0.9),
        "tokens_per_s": tokens / total_s if total_s else None,
        "peak_allocated_bytes": max(m["peak_allocated_bytes"] for m in ms) if cuda else None,
        "peak_reserved_bytes": max(m["peak_reserved_bytes"] for m in ms) if cuda else None,
        "bytes_copied": copied,
        "experts_copied": sum(m.get("experts_copied") or 0 for m in ms),
        "copy_GBps_avg": (copied / total_s / 1e9) if cuda and total_s else None,
        "pinned_peak_GBps": pinned_peak,
        "stall_ms": sum(stalls) if all(s is not None for s in stalls) else None,
        # eager steps: events around the waits; graph steps: derived by difference (stall_method)
        "stall_ms_per_token": statistics.median(per_tok) if per_tok else None,
        "stall_method": next((m["stall_method"] for m in ms if m.get("stall_method")), None),
        "hit_rate": (hits / lookups) if lookups else None,
        # the first decoder MoE block's experts guessed from the tokens (pregated / lookahead)
        "first_block_guess_hit_rate": (g_hits / g_looks) if g_looks else None,
        "cuda_graph": all(m["cuda_graph"] for m in ms),
        "copy_mode": ms[0].get("copy_mode"),
        "pool_bytes": ms[0].get("pool_bytes"),
        "experts_cpu_computed": sum(m.get("experts_cpu_computed") or 0 for m in ms),
        "tokens_cpu_computed": sum(m.get("tokens_cpu_computed") or 0 for m in ms),
        "cpu_compute": ms[0].get("cpu_compute"),
    }
    if ms[0].get("cpu_compute_calibration") is not None:
        out["cpu_compute_calibration"] = ms[0]["cpu_compute_calibration"]
    if cuda and pinned_peak and out["copy_GBps_avg"] is not None:
        out["copy_fraction_of_peak"] = out["copy_GBps_avg"] / pinned_peak
    return out


def _fmt(v, spec: str, scale: float = 1.0, none: str = "-") -> str:
    return none if v is None else format(v * scale, spec)


COLUMNS = [
    "policy",
    "quality",
    "same_as_gpu_only",
    "ttft_ms",
    "ms/tok med",
    "ms/tok p90",
    "tok/s",
    "peak alloc GB",
    "peak rsrv GB",
    "copied MB",
    "copy GB/s",
    "stall ms",
    "stall ms/tok",
    "hit rate",
    "guess hits",
    "cpu experts",
    "graph",
]


def rows(entries: list[dict[str, Any]], quality_key: str | None) -> list[list[str]]:
    out = []
    for e in entries:
        m, q = e["metrics"], e.get("quality") or {}
        out.append(
            [
                e["policy"],
                _fmt(q.get(quality_key) if quality_key else None, ".2f"),
                {True: "yes", False: "NO", None: "-"}[e.get("same_as_gpu_only")],
                _fmt(m["ttft_ms"], ".1f"),
                _fmt(m["ms_per_token_median"], ".2f"),
                _fmt(m["ms_per_token_p90"], ".2f"),
                _fmt(m["tokens_per_s"], ".1f"),
                _fmt(m["peak_allocated_bytes"], ".3f", 1e-9),
                _fmt(m["peak_reserved_bytes"], ".3f", 1e-9),
                _fmt(m["bytes_copied"], ".1f", 1e-6),
                _fmt(m["copy_GBps_avg"], ".1f"),
                _fmt(m["stall_ms"], ".1f"),
                _fmt(m.get("stall_ms_per_token"), ".3f"),
                _fmt(m["hit_rate"], ".2f"),
                _fmt(m.get("first_block_guess_hit_rate"), ".2f"),
                _fmt(m.get("experts_cpu_computed") if m.get("cpu_compute") not in (None, "off") else None, ".0f"),
                "yes" if m["cuda_graph"] else "no",
            ]
        )
    return out


def table(entries: list[dict[str, Any]], quality_key: str | None) -> str:
    cols = list(COLUMNS)
    if quality_key:
        cols[1] = quality_key
    body = rows(entries, quality_key)
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(cols)]
    line = lambda r: "  ".join(x.rjust(w) if i else x.ljust(w) for i, (x, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in body])


def write_json(path: Path, report: dict[str, Any]) -> Path:
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def plot(path: Path, entries: list[dict[str, Any]], title: str) -> Path:
    """Two panels: ms per output token (median, p90 whisker) and peak GPU memory, per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["policy"] for e in entries]
    med = [e["metrics"]["ms_per_token_median"] or 0.0 for e in entries]
    p90 = [e["metrics"]["ms_per_token_p90"] or 0.0 for e in entries]
    mem = [e["metrics"]["peak_allocated_bytes"] for e in entries]
    fig, (a, b) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(names) + 4), 4.2))
    x = range(len(names))
    a.bar(
        x,
        med,
        color="tab:blue",
        yerr=[[0] * len(med), [max(0.0, p - m) for p, m in zip(p90, med)]],
        capsize=3,
    )
    a.set_title("ms per output token (median; whisker to p90)")
    a.set_xticks(list(x), names, rotation=35, ha="right")
    if all(v is not None for v in mem):
        b.bar(x, [v / 1e9 for v in mem], color="tab:orange")
        b.set_title("peak GPU memory allocated (GB)")
    else:
        b.text(
            0.5, 0.5, "CPU-only run:\nno GPU memory figures", ha="center", va="center", transform=b.transAxes
        )
        b.set_title("peak GPU memory")
    b.set_xticks(list(x), names, rotation=35, ha="right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
