#!/usr/bin/env python3
"""End-to-end benchmark of the offloading runner on the GPU, with transformers anchors.

For each shape (switch-base-8/64/128, switch-large-128; random bf16 weights, experts generated
straight into the pinned store): batch 1, 256 input and 256 output tokens, greedy and beam 4,
every policy and cache setting; `speculative` runs on the same weights before the pre-gate
conversion (an unconverted model), every other policy after it. Runs named `<policy>+cpu_<mode>`
(on_demand+cpu_always, on_demand+cpu_auto, ...) compute missed experts on the CPU
(offload.cpu_compute, infer/cpu_compute.py); its cost model's calibration is in each shape's
`cpu_compute_calibration`. Their tokens are checked against gpu_only on the CPU (fp32); on the GPU
the CPU's bf16 sums differ from the GPU's, so a divergence is recorded (matching prefix), not failed. Checks that every policy gives
gpu_only's tokens, asserts the pre-gated peak-memory bound (non-expert weights + two blocks' experts
+ the activations measured under gpu_only), and runs the anchors: transformers' Switch model fully
on the GPU, and with its experts offloaded to the CPU by accelerate (dispatch_model, expert modules
mapped to "cpu"). Random weights route near uniformly (every expert equally likely), so caches hit
about C/E of the time: a floor for caching, not what a trained model sees.

    python3 scripts/bench_e2e.py --out bench/results [--quick] [--shapes switch-base-8 ...]
    python3 scripts/bench_e2e.py --tiny --out /tmp/x     # CPU smoke test with the tiny model

No Hydra needed. Results are written after every run (JSON + PNG), so a run cut short keeps what
it measured; a time budget (--budget-s) skips what would not fit and says so.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from infer import report as rep  # noqa: E402
from infer.engine import Engine  # noqa: E402
from infer.offload import ExpertStore, OffloadError, default_budget_bytes, is_expert_param  # noqa: E402
from infer.policies import PolicySpec  # noqa: E402
from models.config import preset  # noqa: E402
from models.pregate import convert_to_pregated  # noqa: E402
from models.switch import Switch  # noqa: E402

SHAPES = ["switch-base-8", "switch-base-64", "switch-base-128", "switch-large-128"]
ROUTING_NOTE = (
    "random weights: routing is near uniform over the experts, so a cache of C slots hits about "
    "C/E of lookups and the pre-gate (initialised from the next router) is the next router"
)
HF_NOTE = (
    "transformers < 5.18 has a broken Switch router: its outputs are wrong, its timing (the "
    "anchor's purpose) is representative"
)


# ----------------------------------------------------------------------------------------------- models
def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    *parents, leaf = name.split(".")
    mod = model
    for p in parents:
        mod = getattr(mod, p)
    setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=False))


def build_own(cfg, device, dtype) -> Switch:
    """Non-expert weights random on the device; experts stay on meta (they live in the store)."""
    with torch.device("meta"):
        model = Switch(cfg)
    for name, p in list(model.named_parameters()):
        if not is_expert_param(name):
            _set_param(model, name, torch.empty(p.shape, dtype=dtype, device=device))
    torch.manual_seed(0)
    model.init_weights()  # normal_ on the meta experts is a no-op
    return model.eval()


def build_store(cfg, model, device, dtype, budget) -> ExpertStore:
    """Random experts generated on the device block by block and copied into the pinned store."""
    store = ExpertStore(cfg, len(model.moes), dtype, budget, pin=device.type == "cuda")
    FD = store.F * store.D
    g = torch.Generator(device=device).manual_seed(1)
    for m in range(store.M):
        t = torch.empty((store.E, store.X), dtype=dtype, device=device)
        t[:, :FD].normal_(0.0, cfg.d_model**-0.5, generator=g)
        t[:, FD:].normal_(0.0, cfg.d_ff**-0.5, generator=g)
        store.data[m].copy_(t)
        del t
    return store


def nonexpert_bytes(model: Switch) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not is_expert_param(n))


# ----------------------------------------------------------------------------------------------- anchors
def hf_model(cfg, store: ExpertStore, device, dtype, experts_on: str):
    """transformers' Switch model with our random weights' shapes; experts on the device (copied from
    the store) or left in the pinned store (CPU views, no extra RAM) for accelerate to offload."""
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    d = cfg.replace(eos_token_id=1).to_hf_dict()  # min_new_tokens forces the length instead
    hcfg = SwitchTransformersConfig(
        **{k: v for k, v in d.items() if k not in ("extra", "pregated", "lookahead")}
    )
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            hf = SwitchTransformersForConditionalGeneration(hcfg)
    finally:
        torch.set_default_dtype(old)
    block_of = {}
    m = 0
    for stack, layer, decoder in (("encoder", 1, False), ("decoder", 2, True)):
        for i in cfg.sparse_layers(decoder):
            block_of[f"{stack}.block.{i}.layer.{layer}.mlp.experts"] = m
            m += 1
    g = torch.Generator(device=device).manual_seed(2)
    for name, p in list(hf.named_parameters()):
        prefix, _, rest = name.partition(".expert_")
        if prefix in block_of:
            e, kind = int(rest.split(".")[0]), rest.split(".")[1]
            src = store.w_in(block_of[prefix], e) if kind == "wi" else store.w_out(block_of[prefix], e)
            _set_param(hf, name, src.to(device) if experts_on == "gpu" else src)
            continue
        t = torch.empty(p.shape, dtype=dtype, device=device)
        if "layer_norm" in name:
            t.fill_(1.0)
        else:
            t.normal_(0.0, (p.shape[-1] if p.dim() > 1 else 1) ** -0.5, generator=g)
        _set_param(hf, name, t)
    if hasattr(hf, "tie_weights"):
        hf.tie_weights()
    for name, p in list(hf.named_parameters()):
        if p.is_meta:
            _set_param(hf, name, torch.randn(p.shape, dtype=dtype, device=device))
    hf.eval()
    if experts_on == "cpu":
        from accelerate import dispatch_model

        dmap = {}
        for name in hf.state_dict():  # state_dict also names tied copies (lm_head.weight)
            prefix = name.split(".expert_")[0]
            main = 0 if device.type == "cuda" else "cpu"  # CPU: only exercises the code path (tests)
            dmap[prefix if prefix in block_of else name.rsplit(".", 1)[0]] = (
                "cpu" if prefix in block_of else main
            )
        hf = dispatch_model(hf, device_map=dmap, main_device=0 if device.type == "cuda" else "cpu")
    return hf


def run_hf(hf, input_ids, new_tokens: int, num_beams: int, device) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, ids, scores):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())
            return scores

    def gen(n):
        stamps.clear()
        with torch.no_grad():
            return hf.generate(
                input_ids=input_ids,
                max_new_tokens=n,
                min_new_tokens=n,
                num_beams=num_beams,
                do_sample=False,
                logits_processor=LogitsProcessorList([Stamp()]),
            )

    gen(2)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = gen(new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t1 = time.perf_counter()
    per = [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]
    per.sort()
    return {
        "new_tokens": int(out.shape[1]) - 1,
        "ttft_ms": 1e3 * (stamps[0] - t0) if stamps else None,
        "ms_per_token_median": per[len(per) // 2] if per else None,
        "ms_per_token_p90": per[min(len(per) - 1, int(0.9 * (len(per) - 1)))] if per else None,
        "tokens_per_s": (int(out.shape[1]) - 1) / (t1 - t0),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
    }


# ----------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="64 output tokens, greedy + beam on fewer settings")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: the tiny model, a few tokens")
    ap.add_argument("--shapes", nargs="*", default=None)
    ap.add_argument("--input-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument(
        "--prefetch-all-tokens",
        type=int,
        default=24,
        help="prefetch_all copies every expert per block per token: fewer tokens, same per-token figures",
    )
    ap.add_argument("--copy-mode", default="auto", choices=["auto", "device", "host"])
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument(
        "--budget-s", type=float, default=470.0, help="skip runs that start after this many seconds"
    )
    ap.add_argument("--pinned-budget-gb", type=float, default=None)
    args = ap.parse_args()

    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = args.shapes or ["tiny"]
        args.input_tokens, args.new_tokens, args.prefetch_all_tokens = 16, 6, 4
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --tiny for the CPU smoke test", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = args.shapes or SHAPES
        if args.quick:
            args.new_tokens = min(args.new_tokens, 64)
    tag = (
        "cpu-tiny" if args.tiny else re_tag(torch.cuda.get_device_name(0)) + ("-quick" if args.quick else "")
    )
    json_path, png_path = out_dir / f"e2e-{tag}.json", out_dir / f"e2e-{tag}.png"
    budget = args.pinned_budget_gb * 1e9 if args.pinned_budget_gb else default_budget_bytes()
    env = rep.environment(device)
    env["command"] = " ".join(["python3"] + sys.argv)
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = None
    try:
        import accelerate

        env["accelerate"] = accelerate.__version__
    except ImportError:
        env["accelerate"] = None
    env["pinned_peak_GBps"] = rep.pinned_peak_GBps(device)
    result = {
        "environment": env,
        "notes": [ROUTING_NOTE, HF_NOTE],
        "settings": vars(args),
        "shapes": {},
        "failures": [],
    }

    def save(final: bool = True):
        result["wall_s"] = time.perf_counter() - t_start
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        if not final:
            return
        try:
            plot(png_path, result)
        except Exception as e:  # the JSON is what counts
            print(f"[bench] plot failed: {e}", file=sys.stderr)

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    for shape in shapes:
        if over_budget():
            result["shapes"][shape] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            save()
            continue
        print(f"[bench] {shape}: building random weights ...", flush=True)
        cfg = preset(shape).replace(eos_token_id=-1)  # never stop early: exactly new_tokens tokens
        res = bench_shape(shape, cfg, device, dtype, budget, args, over_budget, result, save)
        result["shapes"][shape] = res
        save()
    fails = result["failures"]
    print(f"[bench] wrote {json_path} and {png_path} in {time.perf_counter() - t_start:.0f} s")
    if fails:
        print("[bench] FAILED checks:\n  " + "\n  ".join(fails), file=sys.stderr)
        return 1
    return 0


def re_tag(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def bench_shape(shape, cfg, device, dtype, budget, args, over_budget, result, save) -> dict:
    t0 = time.perf_counter()
    model = build_own(cfg, device, dtype)
    try:
        store = build_store(cfg, model, device, dtype, budget)
    except OffloadError as e:
        result["failures"].append(f"{shape}: {e}")
        return {"error": str(e)}
    if device.type == "cuda":
        model.set_backend("triton")
    E, eb = cfg.num_experts, store.expert_bytes
    C = max(1, E // 4)
    out: dict = {
        "config": {"num_experts": E, "d_model": cfg.d_model, "d_ff": cfg.d_ff, "moe_blocks": store.M},
        "expert_bytes": eb,
        "store_bytes": store.total_bytes,
        "nonexpert_bytes": nonexpert_bytes(model),
        "cache_slots": C,
        "build_s": None,
        "runs": [],
        "anchors": [],
    }
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, cfg.vocab_size, (1, args.input_tokens), generator=g)
    eng = Engine(
        model, store, device, cuda_graph=not args.no_graph, copy_mode=args.copy_mode, measure_stall=True
    )
    out["build_s"] = time.perf_counter() - t0
    lru, lfu = f"@lru{C}", f"@lfu{C}"
    modes = [("greedy", 1), ("beam4", 4)]
    plain = ["gpu_only", "speculative", "speculative" + lru]
    conv = [
        "gpu_only",
        "on_demand",
        "on_demand" + lru,
        "on_demand" + lfu,
        "on_demand+cpu_always",
        "on_demand+cpu_auto",
        "on_demand" + lru + "+cpu_auto",
        "prefetch_all",
        "pregated",
        "pregated" + lru,
        "pregated" + lfu,
        "pregated+cpu_auto",
    ]
    if args.quick:
        plain = ["gpu_only", "speculative"]
        conv = ["gpu_only", "on_demand", "on_demand" + lru, "on_demand+cpu_always", "on_demand+cpu_auto",
                "prefetch_all", "pregated", "pregated" + lru]
    refs: dict = {}
    for family, names in (("unconverted", plain), ("pregated", conv)):
        if family == "pregated":
            convert_to_pregated(model, 1)
        for mode, nb in modes:
            for name in names:
                label = f"{family}/{mode}/{name}"
                if over_budget():
                    out["runs"].append({"label": label, "skipped": "time budget"})
                    continue
                pname, _, cpu_mode = name.partition("+cpu_")
                spec = PolicySpec.parse(pname)
                n_new = args.prefetch_all_tokens if spec.name == "prefetch_all" else args.new_tokens
                entry = run_one(eng, spec, ids, n_new, nb, args, cpu_compute=cpu_mode or "off")
                entry.update(label=label, family=family, decoding=mode)
                if cpu_mode:
                    entry["policy"] = name
                    if eng._calibration is not None:
                        out["cpu_compute_calibration"] = eng._calibration.as_dict()
                # the CPU's bf16 sums are not the GPU's: a divergence there is recorded, not failed
                strict = not cpu_mode or device.type == "cpu"
                key = (family, mode)
                if spec.name == "gpu_only" and "tokens" in entry:
                    refs[key] = entry["tokens"]
                if nb > 1 and n_new != args.new_tokens and "tokens" in entry:
                    # beam search's result depends on the length limit: compare with gpu_only at the same one
                    short = run_one(eng, PolicySpec.parse("gpu_only"), ids, n_new, nb, args)
                    if "tokens" in short:
                        entry["same_tokens_as_gpu_only"] = entry["tokens"] == short["tokens"]
                        if not entry["same_tokens_as_gpu_only"] and strict:
                            result["failures"].append(f"{shape} {label}: tokens differ from gpu_only")
                elif "tokens" in entry and key in refs:
                    ref = refs[key][0][: len(entry["tokens"][0])]
                    entry["same_tokens_as_gpu_only"] = entry["tokens"][0] == ref
                    entry["matching_prefix_tokens"] = _prefix(entry["tokens"][0], ref)
                    if not entry["same_tokens_as_gpu_only"] and strict:
                        result["failures"].append(f"{shape} {label}: tokens differ from gpu_only")
                out["runs"].append(entry)
                print(f"[bench] {shape} {label}: " + summary(entry), flush=True)
                save_partial(result, shape, out, save)
    check_memory_bound(shape, out, result)
    # anchors
    if not args.no_anchors:
        del eng
        for what in ("gpu", "cpu"):
            for mode, nb in modes:
                label = f"transformers/{'gpu_only' if what == 'gpu' else 'accelerate_cpu_offload'}/{mode}"
                if over_budget():
                    out["anchors"].append({"label": label, "skipped": "time budget"})
                    continue
                if what == "cpu" and device.type != "cuda":
                    out["anchors"].append({"label": label, "skipped": "no GPU: CPU offload has no meaning"})
                    continue
                try:
                    hf = hf_model(cfg, store, device, dtype, what)
                    n_new = args.new_tokens if what == "gpu" else min(args.new_tokens, 64)
                    m = run_hf(hf, ids.to(device), n_new, nb, device)
                    out["anchors"].append({"label": label, "metrics": m})
                except Exception as e:  # an anchor that breaks must not take the measurements with it
                    out["anchors"].append({"label": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                finally:
                    hf = None
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                print(f"[bench] {shape} {label}: " + summary(out["anchors"][-1]), flush=True)
                save_partial(result, shape, out, save)
    store.close()
    del model, store
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_one(eng: Engine, spec: PolicySpec, ids, n_new: int, nb: int, args, cpu_compute: str = "off") -> dict:
    modes = (
        [eng.copy_mode]
        if spec.name == "gpu_only"
        else ([args.copy_mode] if args.copy_mode != "auto" else ["auto", "host"])
    )
    errors = []
    for mode in modes:
        eng.copy_mode = mode
        try:
            r = eng.run(
                spec, ids, None, max_new_tokens=n_new, num_beams=nb, warmup=True, cpu_compute=cpu_compute
            )
            m = {k: v for k, v in r.metrics.items() if k != "decode_ms"}
            return {"policy": spec.label, "metrics": m, "tokens": r.tokens, "notes": r.notes + errors}
        except Exception as e:
            errors.append(f"copy_mode={mode} failed: {type(e).__name__}: {str(e)[:300]}")
            if eng.device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            eng.copy_mode = args.copy_mode
    return {"policy": spec.label, "error": "; ".join(errors)}


def summary(entry: dict) -> str:
    if "error" in entry or "skipped" in entry:
        return entry.get("error") or entry.get("skipped")
    m = entry["metrics"]
    mem = m.get("peak_allocated_bytes")
    return (
        f"{m['ms_per_token_median']:.2f} ms/token, ttft {m['ttft_ms']:.1f} ms, peak {mem / 1e9:.2f} GB"
        if mem
        else f"{m['ms_per_token_median']:.2f} ms/token (no GPU)"
    ) + (
        f", graph={m.get('cuda_graph')}, copy={m.get('copy_mode')}, hit={m.get('hit_rate')}"
        if "cuda_graph" in m
        else ""
    ) + (
        f", cpu={m.get('cpu_compute')}: {m.get('experts_cpu_computed')} experts"
        if m.get("cpu_compute") not in (None, "off")
        else ""
    ) + _stall(m)


def _stall(m: dict) -> str:
    """Stall per token: CUDA events around the waits (eager), or derived by difference of graph replays."""
    s = m.get("stall_ms_per_token")
    if s is None:
        return ""
    if m.get("step_ms_median_without_copies") is None:
        return f", stall {s:.3f} ms/token (events)"
    return (
        f", stall {s:.3f} ms/token (by difference: step {m['step_ms_median_with_copies']:.3f} ms with copies"
        f" - {m['step_ms_median_without_copies']:.3f} ms without)"
    )


def save_partial(result, shape, out, save) -> None:
    result["shapes"][shape] = out
    save(final=False)


def check_memory_bound(shape: str, out: dict, result: dict) -> None:
    """Peak under pregated (no cache) <= non-expert weights + two blocks' experts + gpu_only's activations."""
    E, eb, nonexp = out["config"]["num_experts"], out["expert_bytes"], out["nonexpert_bytes"]
    all_experts = out["store_bytes"]
    checks = []
    for mode in ("greedy", "beam4"):
        runs = {
            r["policy"]: r
            for r in out["runs"]
            if r.get("family") == "pregated" and r.get("decoding") == mode and "metrics" in r
        }
        ref, pg = runs.get("gpu_only"), runs.get("pregated")
        if not ref or not pg or ref["metrics"].get("peak_allocated_bytes") is None:
            continue
        # Each run's own need: its peak minus what was allocated when it started (the resident
        # non-expert weights, and anything earlier runs in this process still hold).
        base_ref = ref["metrics"].get("baseline_allocated_bytes") or 0
        base_pg = pg["metrics"].get("baseline_allocated_bytes") or 0
        act = max(0, ref["metrics"]["peak_allocated_bytes"] - base_ref - all_experts)
        bound = base_pg + 2 * E * eb + act + (64 << 20)  # + 64 MiB for the plan's small tensors
        peak = pg["metrics"]["peak_allocated_bytes"]
        ok = peak <= bound
        checks.append(
            {"decoding": mode, "peak": peak, "bound": bound, "activations_from_gpu_only": act,
             "baseline_pregated": base_pg, "nonexpert_bytes": nonexp, "ok": ok}
        )
        if not ok:
            result["failures"].append(
                f"{shape} {mode}: pregated peak {peak / 1e9:.3f} GB > bound {bound / 1e9:.3f} GB"
            )
    out["memory_bound_check"] = checks


# ----------------------------------------------------------------------------------------------- plot
def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s, v in result["shapes"].items() if isinstance(v, dict) and v.get("runs")]
    if not shapes:
        return
    fig, axes = plt.subplots(2, 2, figsize=(16, 9))
    for row, mode in enumerate(("greedy", "beam4")):
        labels: list[str] = []
        for s in shapes:
            for r in result["shapes"][s]["runs"] + result["shapes"][s].get("anchors", []):
                lab = _short(r)
                if (r.get("decoding") == mode or r["label"].endswith(mode)) and lab not in labels:
                    labels.append(lab)
        w = 0.8 / len(shapes)
        for j, s in enumerate(shapes):
            vals, mems = [], []
            items = {
                _short(r): r
                for r in result["shapes"][s]["runs"] + result["shapes"][s].get("anchors", [])
                if r.get("decoding") == mode or r["label"].endswith(mode)
            }
            for lab in labels:
                m = items.get(lab, {}).get("metrics") or {}
                vals.append(m.get("ms_per_token_median") or 0)
                mems.append((m.get("peak_allocated_bytes") or 0) / 1e9)
            x = [i + j * w for i in range(len(labels))]
            axes[row][0].bar(x, vals, w, label=s)
            axes[row][1].bar(x, mems, w, label=s)
        for col, title in ((0, "ms per output token (median)"), (1, "peak GPU memory allocated (GB)")):
            ax = axes[row][col]
            ax.set_title(f"{mode}: {title}")
            ax.set_xticks(
                [i + 0.4 - w / 2 for i in range(len(labels))], labels, rotation=45, ha="right", fontsize=7
            )
            if any(p.get_height() > 0 for p in ax.patches):
                ax.set_yscale("log")
            ax.legend(fontsize=7)
    env = result["environment"]
    fig.suptitle(
        f"e2e, batch 1, {result['settings']['input_tokens']} in / {result['settings']['new_tokens']} out, "
        f"{env['compute_device']}, torch {env['torch']} (random weights: near-uniform routing)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _short(r: dict) -> str:
    lab = r["label"]
    for mode in ("/greedy", "/beam4"):
        lab = lab.replace(mode, "")
    return lab.replace("pregated/", "").replace("unconverted/", "unconv:").replace("transformers/", "hf:")


if __name__ == "__main__":
    env_threads = os.environ.get("BENCH_THREADS")
    if env_threads:
        torch.set_num_threads(int(env_threads))
    sys.exit(main())
