"""Training throughput: this project's Switch (pre-gated, grouped-GEMM experts) vs transformers'
SwitchTransformersForConditionalGeneration, same shapes, batch and sequence lengths, random weights.

    python3 scripts/bench_train.py --out bench/results            # H200: switch-base-8 and -128
    python3 scripts/bench_train.py --tiny --out /tmp/x            # CPU smoke test of the logic

One training step = forward with labels (LM loss + router z-loss and load-balancing loss) and
backward, parameters and compute in bf16 (the optimiser step is the same for both models and is
left out, so that switch-base-128's two models and their gradients fit on one GPU in turn).
Timed with CUDA events: warm-up steps, then the median of the measured steps. Needs no Hydra.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.config import preset  # noqa: E402
from models.pregate import convert_to_pregated  # noqa: E402
from models.switch import Switch  # noqa: E402
from train import experts as fast_experts  # noqa: E402


def hf_model(cfg, device):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    d = cfg.to_hf_dict()
    d.pop("pregated", None)
    d.pop("lookahead", None)
    hcfg = SwitchTransformersConfig(
        **{k: v for k, v in d.items() if k not in ("architectures", "model_type")}
    )
    with torch.device(device):
        return SwitchTransformersForConditionalGeneration(hcfg)


def own_model(cfg, device):
    with torch.device(device):
        m = Switch(cfg)
    convert_to_pregated(m, 1)
    return m


def time_steps(step, device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1000)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return times


def bench_one(name: str, kind: str, args, device) -> dict:
    cfg = preset(name)
    if args.tiny:
        cfg = cfg.replace(expert_capacity=args.capacity if args.capacity is not None else cfg.expert_capacity)
    torch.manual_seed(0)
    model = own_model(cfg, device) if kind == "ours" else hf_model(cfg, device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model.to(dtype).train()
    backend = "n/a"
    if kind == "ours":
        backend = fast_experts.install(model, args.expert_backend, device)
    B, S, T = args.batch, args.src_len, args.tgt_len
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(2, cfg.vocab_size, (B, S), generator=g).to(device)
    labels = torch.randint(2, cfg.vocab_size, (B, T), generator=g).to(device)
    mask = torch.ones_like(ids)
    hf_kw = {"output_router_logits": True} if kind == "hf" else {}
    router_losses = True

    def step():
        out = model(input_ids=ids, attention_mask=mask, labels=labels, **hf_kw)
        out.loss.backward()
        for p in model.parameters():
            p.grad = None

    if kind == "hf":
        try:
            step()
        except ValueError as e:
            # transformers 5.0-5.17 cannot return router logits for Switch (its broken router):
            # time it without the router losses, which only makes the anchor's step lighter.
            print(f"transformers: output_router_logits failed ({e}); timing without router losses", flush=True)
            hf_kw = {}
            router_losses = False

    times = time_steps(step, device, args.warmup, args.iters)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    res = {
        "model": name,
        "impl": kind,
        "expert_backend": backend,
        "step_s_median": med,
        "step_s_all": times,
        "tokens_per_s": B * (S + T) / med,
        "peak_gib": peak,
        "router_losses": router_losses,
    }
    print(
        f"{name:>16} {kind:>5} ({backend}): {med * 1000:8.1f} ms/step  {res['tokens_per_s']:10.0f} tokens/s"
        + (f"  peak {peak:.1f} GiB" if peak else ""),
        flush=True,
    )
    model = ids = labels = mask = None  # free before the next model is built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src-len", type=int, default=256)
    ap.add_argument("--tgt-len", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--expert-backend", default="auto", choices=["auto", "grouped", "reference"])
    ap.add_argument("--capacity", type=int, default=None, help="--tiny only: expert capacity")
    ap.add_argument("--tiny", action="store_true", help="tiny model, few short steps (CPU smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.models = args.models or ["tiny"]
        args.batch, args.src_len, args.tgt_len, args.warmup, args.iters = 2, 16, 8, 1, 2
    models = args.models or ["switch-base-8", "switch-base-128"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.tiny:
        print("warning: no GPU; timings on the CPU are not the benchmark", file=sys.stderr)

    results = []
    for name in models:
        pair = {}
        for kind in ("ours", "hf"):
            pair[kind] = bench_one(name, kind, args, device)
        speedup = pair["ours"]["tokens_per_s"] / pair["hf"]["tokens_per_s"]
        print(f"{name:>16} speed-up: {speedup:.2f}x", flush=True)
        results.append({"model": name, "ours": pair["ours"], "transformers": pair["hf"], "speedup": speedup})

    import transformers

    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    hf_v = transformers.__version__
    doc = {
        "benchmark": "train_step_throughput",
        "what": "forward with labels (LM + router z/aux losses) + backward; params and compute in "
        f"{args.dtype}; random weights; optimiser step excluded; tokens = batch x (src + tgt)",
        "batch": args.batch,
        "src_len": args.src_len,
        "tgt_len": args.tgt_len,
        "warmup": args.warmup,
        "iters": args.iters,
        "ours": "models.Switch converted to pre-gated (lookahead 1), train.experts grouped-GEMM expert FFN",
        "baseline": f"transformers {hf_v} SwitchTransformersForConditionalGeneration "
        "(output_router_logits=True where the version supports it: see router_losses per result)",
        "results": results,
        "machine": {
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(),
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_v,
            "transformers": hf_v,
            "cuda": torch.version.cuda,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    major_minor = tuple(int(x) for x in hf_v.split(".")[:2])
    if (5, 0) <= major_minor < (5, 18):
        doc["note"] = (
            f"transformers {hf_v}: its Switch router is broken for quality (5.0-5.17), which does "
            "not change the cost of a step; the timing comparison stands"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if args.tiny else "h200" if "H200" in (doc["machine"]["gpu"] or "") else device.type
    path = out / f"train-throughput-{tag}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
