#!/usr/bin/env python3
"""End-to-end benchmark of the offloading runner on the GPU, with transformers anchors.

For each shape (switch-base-8/64/128, switch-large-128; random bf16 weights, experts generated
straight into the pinned store, packed losslessly as python -m infer's default offload.compress=auto does on a
GPU: expv for experts of at least 16 MiB in bf16, exp4 below; --compress none keeps bf16 rows): batch 1, 256 input and 256 output tokens, greedy and beam 4,
every policy and cache setting; `speculative` runs on the same weights before the pre-gate
conversion (an unconverted model), every other policy after it. Runs named `<policy>+cpu_<mode>`
(on_demand+cpu_always, on_demand+cpu_auto, ...) compute missed experts on the CPU
(offload.cpu_compute, infer/cpu_compute.py); its cost model's calibration is in each shape's
`cpu_compute_calibration`. Their tokens are checked against gpu_only on the CPU (fp32); on the GPU
the CPU's bf16 sums differ from the GPU's, so a divergence is recorded (matching prefix), not failed.
Checks that every policy gives gpu_only's tokens, asserts the pre-gated peak-memory bound
(non-expert weights + two blocks' experts + the activations measured under gpu_only), and runs the
anchors: transformers' Switch model fully on the GPU, and with its experts offloaded to the CPU by
accelerate (dispatch_model, expert modules mapped to "cpu"). --table-runs MODES:POLICIES keeps only
the named runs of this table (with --sweep-only: those runs, then the sweep). Random weights route near uniformly (every expert equally likely), so caches hit
about C/E of the time: a floor for caching, not what a trained model sees.

Batch sweep (--batch-sweep 1,2,4,8,16,32, off by default): decoding of B random prompts of the
same length (eos disabled: every row makes exactly --sweep-new-tokens tokens) under gpu_only,
on_demand, prefetch_all (fewer tokens) and pregated; ms per decode step (one step makes B tokens),
tokens/s, peak memory, bytes copied, and the crossover: the smallest B where pregated's step is no
faster than on_demand's. Decoder inputs (--sweep-inputs): `forced` (default) takes every row's next
token from a fixed random [B, new_tokens] table, the same for every policy (teacher forcing, applied
to the logits outside the decode step / CUDA graph): the rows' inputs differ, so they route as
independently as the router allows, and every policy decodes the same tokens by construction; each
policy's own predictions (argmax of the unforced logits) are checked against gpu_only's. `greedy`
feeds back each row's argmax: with random weights the rows then decode alike and route alike, which
understates the copies at B > 1. Per point: distinct experts copied per decoder MoE block per step
(decode copy bytes / expert bytes / decoder MoE blocks) next to the uniform-routing expectation
E * (1 - (1 - 1/E) ** B). Plot e2e-<tag>-batch.png.

Lookahead lever (--lookaheads 1,2[,3]): after the lookahead-1 table, for each L > 1 the same random weights
(non-expert weights rebuilt from the same seed and compared with lookahead 1's; the same expert store) are
converted with lookahead L and run as family `pregated-L<L>`: gpu_only, on_demand and the `lookahead` policy
(infer/policies.py: block m's pre-gate routes block m + L, so each expert's copy has L blocks of compute to hide
behind; the model refuses `pregated`), greedy and beam 4 or the modes of --table-runs, tokens checked against
that family's own gpu_only (another model: other tokens than lookahead 1's). Every table run carries
`lookahead` (0: unconverted). `--tiny` with a lookahead > 1 gives tiny 4 + 4 MoE blocks (it has 2 + 2).

Copy efficiency (greedy and beam 4, on_demand / prefetch_all / pregated, and pregated in the sweep):
bytes copied during the timed decode steps (the run's bytes minus those of a 1-token run of the same
prompt: prefill + first step) / the timed steps' wall time, over the pinned host->GPU peak measured
at the start of the run. A lower bound on the copy stream's bandwidth: equal to it when the copy
stream is busy for the whole step.

    python3 scripts/bench_e2e.py --out bench/results [--quick] [--shapes switch-base-8 ...]
    python3 scripts/bench_e2e.py --out bench/results --shapes switch-base-128 --batch-sweep 1,2,4,8,16,32
    # the sweep alone, with beam-4 runs of three policies first (--table-runs MODES:POLICIES)
    python3 scripts/bench_e2e.py --out bench/results --shapes switch-base-128 --sweep-only \
        --batch-sweep 1,2,4,8,16,32 --table-runs beam4:gpu_only,on_demand,pregated --new-tokens 64 \
        --budget-s 135
    # the lookahead lever: greedy, lookahead 1 and 2 side by side
    python3 scripts/bench_e2e.py --out bench/results --shapes switch-base-128 --no-anchors \
        --table-runs greedy:gpu_only,on_demand,pregated --lookaheads 1,2
    python3 scripts/bench_e2e.py --tiny --out /tmp/x     # CPU smoke test with the tiny model (sweep 1,2)

No Hydra needed. Results are written after every run (JSON + PNG), so a run cut short keeps what
it measured; a time budget (--budget-s) skips what would not fit and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import infer.engine as engine_mod  # noqa: E402
from infer import report as rep  # noqa: E402
from infer.engine import Engine  # noqa: E402
from infer.offload import (  # noqa: E402
    CopySettings,
    ExpertStore,
    OffloadError,
    default_budget_bytes,
    is_expert_param,
    request_eager_module_loading,
)
from infer.policies import PolicySpec  # noqa: E402
from kernels import slot_plan  # noqa: E402
from models.config import ConfigError, preset  # noqa: E402
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


def build_store(cfg, model, device, dtype, budget, compress: str | None = None) -> ExpertStore:
    """Random experts generated on the device block by block and copied into the pinned store (compress="exp4":
    the same weights, packed on the device, then copied in)."""
    store = ExpertStore(cfg, len(model.moes), dtype, budget, pin=device.type == "cuda", compress=compress)
    FD = store.F * store.D
    g = torch.Generator(device=device).manual_seed(1)
    for m in range(store.M):
        t = torch.empty((store.E, store.slot_X), dtype=dtype, device=device)
        t[:, :FD].normal_(0.0, cfg.d_model**-0.5, generator=g)
        t[:, FD:].normal_(0.0, cfg.d_ff**-0.5, generator=g)
        store.put_block(m, t)
        del t
    return store


INT8_FAMILY_POLICIES = ("gpu_only", "on_demand", "pregated")


def quantized_store(store: ExpertStore, cfg, device, budget) -> ExpertStore:
    """The same experts as per-row int8 (offload.quantize=int8), quantized block by block on the device."""
    q = ExpertStore(cfg, store.M, store.dtype, budget, pin=device.type == "cuda", quantize="int8")
    for m in range(store.M):
        for dst, w in zip(q.weights(q.data[m]), store.weights(store.data[m].to(device))):
            q.put(dst, w)
    return q


def shape_compress(args, cfg, device, dtype) -> str | None:
    """The shape's expert format: --compress as python -m infer resolves offload.compress for its experts (auto: expv
    for experts of at least EXPV_MIN_BYTES in bf16, exp4 below, on a GPU; none on the CPU)."""
    setting = getattr(args, "compress_setting", None) or getattr(args, "compress", None)
    return ExpertStore.resolve_compress(setting, device, dtype, expert_bytes=cfg.expert_bytes(2))[0]


def recompressed_store(store: ExpertStore, cfg, device, budget, codec: str | None) -> ExpertStore:
    """The same experts in another format (offload.compress=codec, None: bf16 rows), block by block on the device."""
    q = ExpertStore(cfg, store.M, torch.bfloat16, budget, pin=device.type == "cuda", compress=codec)
    for m in range(store.M):
        q.put_block(m, store.unpacked_block(m, device))
    return q


def bench_codec_family(shape, cfg, model, store, device, budget, args, over_budget, result, out, save, modes_run,
                       run_named, link) -> None:
    """Family pregated-<codec>: the lookahead-1 model with the same experts in another format (see
    --compress-family): gpu_only, on_demand, pregated, their tokens checked against that family's gpu_only."""
    codec = args.compress_family
    if codec == "other":  # the other of exp4 and expv
        codec = "exp4" if store.compress == "expv" else "expv"
    family = f"pregated-{codec}"
    fam: dict = {"compress": None if codec == "none" else codec, "policies": list(CODEC_FAMILY_POLICIES)}
    out["codec_family"] = fam
    eng_c = family_engine(shape, family, fam, lambda: recompressed_store(store, cfg, device, budget, fam["compress"]),
                          f"the same experts as {codec}", model, device, args, over_budget, result, out, save, link)
    if eng_c is None:
        return
    for mode, nb in modes_run:
        for name in CODEC_FAMILY_POLICIES:
            run_named(eng_c, family, mode, nb, name)
    del eng_c
    family_done(device, result, shape, out, save)


def family_engine(shape, family, fam, build, what, model, device, args, over_budget, result, out, save, link):
    """A family's engine over the store build() makes (None, with the reason in fam, where the time budget is spent
    or the store cannot be built); fam gets its bytes, copy floor and build time."""
    if over_budget():
        fam["skipped"] = "time budget"
        save_partial(result, shape, out, save)
        return None
    print(f"[bench] {shape}: {what} ...", flush=True)
    t_build = time.perf_counter()
    try:
        store_f = build()
    except OffloadError as e:
        fam["error"] = str(e)
        result["failures"].append(f"{shape} {family}: {e}")
        save_partial(result, shape, out, save)
        return None
    n_dec = out["config"]["decoder_moe_blocks"]
    fam.update(expert_bytes=store_f.expert_bytes, store_bytes=store_f.total_bytes,
               copy_floor_ms_greedy=n_dec * store_f.expert_bytes / (link * 1e9) * 1e3 if link else None,
               build_s=time.perf_counter() - t_build)
    return Engine(model, store_f, device, cuda_graph=not args.no_graph, copy_mode=args.copy_mode,
                  measure_stall=True, first_block_guess=args.first_block_guess)


def family_done(device, result, shape, out, save) -> None:
    """After a family's runs (its engine and store dropped): free the GPU memory, save."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    save_partial(result, shape, out, save)


CODEC_FAMILY_POLICIES = ("gpu_only", "on_demand", "pregated")


def bench_int8_family(shape, cfg, model, store, device, dtype, budget, args, over_budget, result, out, save,
                      modes_run, table, run_named, refs, link) -> None:
    """Family pregated-int8: the lookahead-1 model with an int8 store (see --int8)."""
    family = "pregated-int8"
    names = [n for n in (table["policies"] if table else INT8_FAMILY_POLICIES)
             if n.partition("#")[0].partition("@")[0].partition("+")[0] in INT8_FAMILY_POLICIES
             and "+cpu_" not in n]
    fam: dict = {"quantize": "int8", "policies": names}
    out["int8_family"] = fam
    eng_q = family_engine(shape, family, fam, lambda: quantized_store(store, cfg, device, budget),
                          "the same experts as per-row int8", model, device, args, over_budget, result, out, save, link)
    if eng_q is None:
        return
    for mode, nb in modes_run:
        for name in names:
            run_named(eng_q, family, mode, nb, name)
        a, b = refs.get(("pregated", mode)), refs.get((family, mode))
        if a and b:  # the quantization's effect on the tokens (random weights: a rough sign only)
            n = min(len(a[0]), len(b[0]))
            same = next((i for i in range(n) if a[0][i] != b[0][i]), n)
            fam.setdefault("gpu_only_tokens_matching_bf16", {})[mode] = {"matching_prefix": same, "of": n}
    del eng_q
    family_done(device, result, shape, out, save)


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
    # A compressed store's blocks, unpacked once (on the device). For accelerate's CPU experts they go to pinned host
    # memory, as the uncompressed store's views are, so that its copies to the GPU run as fast as they would there.
    unpacked: dict[int, torch.Tensor] = {}

    def expert(m: int, e: int, which: int) -> torch.Tensor:
        if not store.compress:
            return store.w_in(m, e) if which == 0 else store.w_out(m, e)
        if m not in unpacked:
            rows = store.unpacked_block(m, device)
            if experts_on == "cpu":
                host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=device.type == "cuda")
                rows = host.copy_(rows)
            unpacked[m] = rows
        return store.weights(unpacked[m])[which][e]

    for name, p in list(hf.named_parameters()):
        prefix, _, rest = name.partition(".expert_")
        if prefix in block_of:
            e, kind = int(rest.split(".")[0]), rest.split(".")[1]
            src = expert(block_of[prefix], e, 0 if kind == "wi" else 1)
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
    ap.add_argument("--copy-mode", default="auto", choices=["auto", "device", "dma", "host"])
    ap.add_argument(
        "--first-block-guess", default="run", choices=["run", "keep", "off"],
        help="offload.first_block_guess of the pregated/lookahead runs (run, the default here: each run starts with "
        "an empty guess table, so no run learns from an earlier run of the same prompt; "
        "keep: python -m infer's default; per run: #noguess, #guessrun, #guesskeep)",
    )
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument("--no-anchors", action="store_true")
    ap.add_argument(
        "--budget-s", type=float, default=470.0, help="skip runs that start after this many seconds"
    )
    ap.add_argument("--pinned-budget-gb", type=float, default=None)
    ap.add_argument(
        "--batch-sweep",
        default=None,
        help="comma-separated batch sizes (e.g. 1,2,4,8,16,32): greedy sweep of gpu_only, on_demand, "
        "prefetch_all, pregated after each shape's table (default: none; --tiny: 1,2)",
    )
    ap.add_argument("--sweep-shapes", nargs="*", default=None, help="shapes to sweep (default: every shape run)")
    ap.add_argument(
        "--sweep-policies", default=None,
        help="comma-separated policies of the sweep (default: gpu_only,on_demand,prefetch_all,pregated; the first "
        "must be gpu_only, the tokens' reference); the first-block guess variants are allowed: pregated#noguess",
    )
    ap.add_argument("--sweep-new-tokens", type=int, default=64)
    ap.add_argument("--sweep-prefetch-all-tokens", type=int, default=8)
    ap.add_argument(
        "--sweep-inputs",
        default="forced",
        choices=list(SWEEP_INPUTS),
        help="the sweep rows' decoder inputs: forced (default): a fixed random token table per batch size, the "
        "same for every policy (diverse rows, routing as independent as the router allows); greedy: each row's "
        "own argmax (with random weights the rows decode alike and route alike)",
    )
    ap.add_argument(
        "--sweep-only",
        action="store_true",
        help="only the batch sweep: no anchors, and no table runs but those named by --table-runs",
    )
    ap.add_argument(
        "--table-runs",
        default=None,
        metavar="MODES:POLICIES",
        help="only these runs of the per-shape table (pre-gated model; speculative* run on the unconverted one), "
        "e.g. beam4:gpu_only,on_demand,pregated or greedy,beam4:pregated,pregated@lru32; with --sweep-only: "
        "these runs, then the sweep",
    )
    ap.add_argument(
        "--lookaheads",
        default="1",
        metavar="L,L,...",
        help="pre-gate lookaheads to measure (default 1). Lookahead 1 is the table above; for each L > 1, after "
        "it, the same random weights converted with lookahead L run as family pregated-L<L>: gpu_only, on_demand "
        "and the `lookahead` policy (--table-runs: its modes, and its gpu_only/on_demand/pregated/lookahead "
        "names, pregated read as lookahead), tokens checked against that family's gpu_only",
    )
    ap.add_argument(
        "--compress",
        default="auto",
        choices=["auto", "none", "exp4", "expv"],
        help="exp4: every run's experts stored and copied packed losslessly (offload.compress=exp4, "
        "kernels/expert_pack: about 76%% of bf16's bytes), unpacked on the GPU: the same random weights and tokens "
        "as without it; expv: the same with a variable-length exponent code (kernels/expert_vlc: about 67%%); none: "
        "bf16 rows; auto (default, as python -m infer): per shape, expv for experts of at least 16 MiB in bf16 and "
        "exp4 below on a GPU, none with --tiny (each shape's compress is its choice; the settings' compress is auto's "
        "choice before the experts' size, compress_setting the flag)",
    )
    ap.add_argument(
        "--compress-family",
        default=None,
        choices=["none", "exp4", "expv", "other"],
        help="after the lookahead-1 table, the same experts in this format (other: exp4 where the table's is expv, "
        "else expv) run as family pregated-<format>: gpu_only, on_demand, pregated (the modes of the table), side "
        "by side with the table's format",
    )
    ap.add_argument(
        "--int8",
        action="store_true",
        help="after the lookahead-1 table, the same model with its experts stored, copied and computed as "
        "per-row int8 (offload.quantize=int8: about half the bytes to copy) runs as family pregated-int8: "
        "gpu_only, on_demand, pregated (--table-runs: its modes and those names), tokens checked against that "
        "family's gpu_only (int8 too), and the agreement of its gpu_only tokens with the bf16 gpu_only's",
    )
    args = ap.parse_args()
    args.lookaheads = parse_lookaheads(args.lookaheads)
    args.batch_sweep = parse_batches(args.batch_sweep)
    args.table_runs = parse_table_runs(args.table_runs)
    args.sweep_policies = parse_sweep_policies(args.sweep_policies)
    if args.copy_mode == "dma" or any("#dma" in p for p in (args.table_runs or {}).get("policies", ())):
        request_eager_module_loading()  # before the first CUDA call (infer.offload.eager_module_loading)

    t_start = time.perf_counter()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    args.compress_setting = args.compress  # (args.compress: the choice, as python -m infer makes it)
    if args.tiny:
        device = torch.device("cpu")
        args.compress = ExpertStore.resolve_compress(args.compress, device, torch.bfloat16)[0]
        dtype = torch.bfloat16 if args.compress else torch.float32  # exp4: bf16
        shapes = args.shapes or ["tiny"]
        args.input_tokens, args.new_tokens, args.prefetch_all_tokens = 16, 6, 4
        args.batch_sweep = args.batch_sweep or [1, 2]
        args.sweep_new_tokens, args.sweep_prefetch_all_tokens = min(args.sweep_new_tokens, 4), 3
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --tiny for the CPU smoke test", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        args.compress = ExpertStore.resolve_compress(args.compress, device, dtype)[0]
        shapes = args.shapes or SHAPES
        if args.quick:
            args.new_tokens = min(args.new_tokens, 64)
    tag = (
        "cpu-tiny" if args.tiny else re_tag(torch.cuda.get_device_name(0)) + ("-quick" if args.quick else "")
    )
    json_path, png_path = out_dir / f"e2e-{tag}.json", out_dir / f"e2e-{tag}.png"
    batch_png = out_dir / f"e2e-{tag}-batch.png"
    if args.sweep_only and not args.batch_sweep:
        print("--sweep-only needs --batch-sweep", file=sys.stderr)
        return 2
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
    # The slot-plan kernel is checked against its reference on this device first (compiled, as the runs
    # use it); a failure is reported and the runs plan with the reference instead of failing.
    plan_msg = slot_plan.self_check(device) if device.type == "cuda" else None
    env["slot_plan_check"] = plan_msg or ("ok" if device.type == "cuda" else "not run (CPU: the reference plans)")
    if plan_msg:
        print(f"[bench] {plan_msg}: every run plans with the PyTorch reference", file=sys.stderr, flush=True)
        slot_plan.DEFAULT_IMPL = "reference"
    elif device.type == "cuda" and "PGMOE_PLAN_IMPL" not in os.environ:
        slot_plan.DEFAULT_IMPL = "auto"  # the checked kernel; <policy>#torchplan runs keep the reference
    result = {
        "environment": env,
        "notes": [ROUTING_NOTE, HF_NOTE],
        "settings": vars(args),
        # EAGER where a dma run needs it: every kernel loaded at start-up (device memory outside the allocator)
        "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING"),
        "shapes": {},
        "failures": [plan_msg] if plan_msg else [],
    }

    def save(final: bool = True):
        result["wall_s"] = time.perf_counter() - t_start
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        if not final:
            return
        for fn, path in ((plot, png_path), (plot_batch, batch_png)):
            try:
                fn(path, result)
            except Exception as e:  # the JSON is what counts
                print(f"[bench] plot {path.name} failed: {type(e).__name__}: {e}", file=sys.stderr)

    def over_budget() -> bool:
        return time.perf_counter() - t_start > args.budget_s

    for shape in shapes:
        if over_budget():
            result["shapes"][shape] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
            save()
            continue
        print(f"[bench] {shape}: building random weights ...", flush=True)
        cfg = shape_config(shape, args.lookaheads).replace(eos_token_id=-1)  # never stop early: new_tokens tokens
        res = bench_shape(shape, cfg, device, dtype, budget, args, over_budget, result, save)
        result["shapes"][shape] = res
        save()
    fails = result["failures"]
    written = ", ".join(str(p) for p in (json_path, png_path, batch_png) if p.exists())
    print(f"[bench] wrote {written} in {time.perf_counter() - t_start:.0f} s")
    if fails:
        print("[bench] FAILED checks:\n  " + "\n  ".join(fails), file=sys.stderr)
        return 1
    return 0


# Variants of a table run, "<policy>#<variant>[#<variant>...]" (the levers' A/B in one run):
#   torchplan: slots planned by the PyTorch reference of the slot-plan kernel (kernels/slot_plan.py: ~35
#              small ops per MoE block instead of one kernel; on CUDA the other runs use the kernel once
#              its self-check passed)
#   hi:        the copy stream at the highest priority (offload.copy_priority=high)
#   p<N>, b<B>, w<W>: the device copy kernel with N programs per expert, B elements per iteration, W
#              warps per program (offload.copy_programs / copy_block / copy_warps), e.g. pregated#p64#b4096
#   dma:       offload.copy_mode=dma (prefetched plans by the copy engines, started by a host thread;
#              infer.offload.DmaCopier); device: offload.copy_mode=device (e.g. beside --copy-mode dma)
#   noguess, guessrun, guesskeep: offload.first_block_guess off / run / keep (the first decoder MoE block's
#              experts guessed from the step's tokens; the bench's default: --first-block-guess)
#   native, driver, torchcopy: copy_mode dma's host loop: a C thread calling the CUDA driver (offload.dma_api=native,
#              the default) / a Python thread calling it by ctypes (dma_api=driver) / a Python thread with torch's
#              copy_ and a fill kernel (dma_api=torch), e.g. pregated#driver beside pregated under --copy-mode dma
#   sdpa:      the decode step's attention by torch's scaled_dot_product_attention (cuDNN's kernel on the H200)
#              instead of kernels/decode_attention.py; its last bits differ, so its tokens are recorded, not failed
#   beamkernel / beamops: beam search's update after the top-2k as one kernel (kernels/beam_select.py, the default
#              on CUDA; PGMOE_BEAM_KERNEL=1) / as BeamSelect's tensor ops (PGMOE_BEAM_KERNEL=0); the same choices,
#              so their tokens are checked as any policy's
#   nodefer:   beam search's cache reorder at the end of the step that chose the beams (PGMOE_BEAM_DEFER=0) instead
#              of the next step's start, behind that step's first copies (models.switch.DecodeState.defer_reorder)
#   headops:   greedy's LM head as the matrix product, the cast of the logits and the choice over them
#              (PGMOE_GREEDY_HEAD=0) instead of kernels/lm_head.py's head with each tile's argmax and the choice over
#              the tiles (the default on CUDA); its sums run in another order, so its tokens are recorded, not failed
#   flagcopy:  the decode loop's "every row ended" flag copied to pinned memory after each step (PGMOE_ENDED_COPY=1)
#              instead of written there by the choice's kernel inside the step (the default on CUDA)
#   normops:   greedy's fused LM head without the final residual add and norm in its kernel (PGMOE_HEAD_NORM=0): the
#              add and the norm kernel before it, as before
#   kvgather:  beam search's reorder of the self-attention caches as the gather of every position (PGMOE_KV_REORDER=0)
#              instead of kernels/kv_reorder.py's in-place move of the written positions (the default on CUDA); the
#              same tokens
#   guessindex: the first-block guess looked up by an index_select ahead of the slot plan (PGMOE_GUESS_LOOKUP=0)
#              instead of inside the plan's kernel
#   signaldone: copy_mode dma: the decoder's last MoE block's done count written behind an event on the signal stream
#              (PGMOE_DMA_DIRECT_LAST=0), as every other block's, instead of on the copies' stream right behind them
#   noearly:   copy_mode dma, one-row greedy: the first-block guess copied from its plan at the step's start
#              (PGMOE_EARLY_GUESS=0) instead of by the copier as the step before chose its token
#   addops:    each residual add of the model as its own kernel before the norm (PGMOE_ADD_NORM=0) instead of inside
#              the norm's kernel (kernels/rmsnorm.py add_rmsnorm, the default on CUDA); the same numbers
#   kvwrites:  the decode step's self-attention keys and values written into their caches by two launches per block
#              (PGMOE_KV_ONE_WRITE=0) instead of one; the same numbers
#   densemm:   the dense layers' feed-forward over a decode step's rows as two matrix products and the activation
#              (PGMOE_DENSE_KERNEL=0) instead of one expert of the expert FFN's decode kernels (the default on CUDA)
#   topkops:   beam search's candidates (log-softmax, the add of the beams' scores, the top-2k) as tensor ops
#              (PGMOE_BEAM_TOPK=0) instead of kernels/beam_topk.py's three kernels (the default on CUDA); its
#              log-sum-exp sums in another order, so its tokens are recorded, not failed
#   r<N>:      no setting: a repeat of the row's settings under another label (rows interleaved against drift)
PLAN_VARIANTS = {"": None, "torchplan": "reference"}
ENV_VARIANTS = {"nodefer": ("PGMOE_BEAM_DEFER", "0"), "headops": ("PGMOE_GREEDY_HEAD", "0"),
                "flagcopy": ("PGMOE_ENDED_COPY", "1"), "kvgather": ("PGMOE_KV_REORDER", "0"),
                "normops": ("PGMOE_HEAD_NORM", "0"),
                "guessindex": ("PGMOE_GUESS_LOOKUP", "0"), "signaldone": ("PGMOE_DMA_DIRECT_LAST", "0"),
                "noearly": ("PGMOE_EARLY_GUESS", "0"), "addops": ("PGMOE_ADD_NORM", "0"),
                "kvwrites": ("PGMOE_KV_ONE_WRITE", "0"), "densemm": ("PGMOE_DENSE_KERNEL", "0"),
                "topkops": ("PGMOE_BEAM_TOPK", "0")}


def variant_env(variant: str) -> dict[str, str]:
    """The environment settings of a variant's ENV_VARIANTS tokens."""
    return {ENV_VARIANTS[tok][0]: ENV_VARIANTS[tok][1] for tok in variant.split("#") if tok in ENV_VARIANTS}
GUESS_VARIANTS = {"noguess": "off", "guessrun": "run", "guesskeep": "keep"}


@contextlib.contextmanager
def sdpa_attention(model: Switch, on: bool):
    """While on: the model's decode-step attention by torch's SDPA instead of the decode-attention kernel."""
    atts = [m for m in model.modules() if hasattr(m, "decode_kernel")]
    before = [a.decode_kernel for a in atts]
    if on:
        for a in atts:
            a.decode_kernel = False
    try:
        yield
    finally:
        for a, b in zip(atts, before):
            a.decode_kernel = b


@contextlib.contextmanager
def env_setting(name: str, value: str | None):
    """While inside: environment variable `name` set to value (None: left as it is)."""
    before = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def beam_variant(variant: str) -> str | None:
    """PGMOE_BEAM_KERNEL for a run variant (models.generate.BeamSelect reads it when the engine makes one):
    #beamkernel -> "1" (kernels/beam_select.py), #beamops -> "0" (BeamSelect's tensor ops), neither -> None (left
    as it is: the default); both is an error."""
    toks = variant.split("#")
    if "beamkernel" in toks and "beamops" in toks:
        raise SystemExit(f"run variant #{variant}: #beamkernel and #beamops together")
    return "1" if "beamkernel" in toks else "0" if "beamops" in toks else None


def variant_guess(variant: str) -> str | None:
    """The first-block guess mode a variant asks for ("noguess" -> "off"), or None."""
    found = [GUESS_VARIANTS[t] for t in variant.split("#") if t in GUESS_VARIANTS]
    return found[-1] if found else None


def parse_variant(variant: str) -> tuple[str | None, dict, str | None]:
    """"torchplan#hi#p64" -> ("reference", {"priority": "high", "programs": 64}, None); "dma" -> (None, {},
    "dma") (the copy mode); SystemExit when unknown."""
    plan, copy, mode = None, {}, None
    for tok in [t for t in variant.split("#") if t]:
        if tok in PLAN_VARIANTS:
            plan = PLAN_VARIANTS[tok]
        elif tok in ("dma", "device"):
            mode = tok
        elif tok in GUESS_VARIANTS or tok in ENV_VARIANTS or tok in ("sdpa", "beamkernel", "beamops"):
            pass  # variant_guess; variant_env; sdpa_attention; beam_variant
        elif tok in ("native", "driver", "torchcopy"):
            copy["dma_api"] = "torch" if tok == "torchcopy" else tok
        elif tok == "hi":
            copy["priority"] = "high"
        elif tok[:1] == "r" and tok[1:].isdigit():
            pass  # a repeat's mark: another row of the same settings, e.g. pregated#r2 interleaved with pregated
        elif tok[:1] in ("p", "b", "w") and tok[1:].isdigit():
            copy[{"p": "programs", "b": "block", "w": "warps"}[tok[0]]] = int(tok[1:])
        else:
            raise SystemExit(f"unknown run variant #{tok}; known: #torchplan, #dma, #device, #hi, "
                             "#p<programs>, #b<block>, #w<warps>, #noguess, #guessrun, #guesskeep, #native, #driver, #torchcopy, "
                             "#sdpa, #beamkernel, #beamops, #nodefer, #headops, #flagcopy, #kvgather, #normops, "
                             "#guessindex, #signaldone, #noearly, #addops, #kvwrites, #densemm, #topkops, #r<repeat>")
    if copy:
        try:
            CopySettings(**copy)
        except OffloadError as e:
            raise SystemExit(f"run variant #{variant}: {e}") from None
    return plan, copy, mode


def parse_table_runs(text: str | None) -> dict | None:
    """"beam4:gpu_only,on_demand,pregated" -> {"modes": ["beam4"], "policies": [...]}; None: no filter."""
    if not text:
        return None
    modes_s, sep, pols_s = text.partition(":")
    modes = [m for m in modes_s.replace(" ", "").split(",") if m]
    pols = [p for p in pols_s.replace(" ", "").split(",") if p]
    bad = [m for m in modes if m not in ("greedy", "beam4")]
    if not sep or not modes or not pols or bad:
        raise SystemExit(f"--table-runs {text!r}: expected MODES:POLICIES, modes from greedy,beam4, e.g. "
                         "beam4:gpu_only,on_demand,pregated")
    for p in pols:
        core, _, variant = p.partition("#")
        parse_variant(variant)
        PolicySpec.parse(core.partition("+cpu_")[0])  # an unknown policy fails here, before any run
    # gpu_only first: the reference of the pre-gated memory check, whose activations then take in the
    # process's one-time allocations (cuBLAS workspaces, ...) as in a default run, whatever order was given
    pols = [p for p in pols if p == "gpu_only"] + [p for p in pols if p != "gpu_only"]
    return {"modes": modes, "policies": pols}


def parse_lookaheads(text: str | None) -> list[int]:
    """"1,2" -> [1, 2]; lookahead 1 (the main table) is always measured."""
    try:
        out = sorted({int(x) for x in str(text or "1").replace(" ", "").split(",") if x} | {1})
    except ValueError:
        out = [0]
    if out[0] < 1:
        raise SystemExit(f"--lookaheads {text!r}: expected positive lookaheads, e.g. 1,2")
    return out


# The runs of a family converted with lookahead L > 1 (no --table-runs): its gpu_only (the tokens' reference),
# on_demand (which does not use the pre-gates: the same work as at lookahead 1) and the pre-gated policy.
LOOKAHEAD_FAMILY_POLICIES = ("gpu_only", "on_demand", "lookahead")


def pregate_policy(lookahead: int) -> str:
    """The offload policy of a model converted with this lookahead (infer/policies.py refuses the other)."""
    return "pregated" if lookahead == 1 else "lookahead"


def family_policies(names, lookahead: int) -> list[str]:
    """The run names of a pre-gated family of this lookahead: `pregated` and `lookahead` both name its pre-gated
    policy (suffixes kept; duplicates dropped). At lookahead 1 every other name is kept; at L > 1 only
    gpu_only, on_demand and the pre-gated policy (the lever's comparison), with their suffixes."""
    out: list[str] = []
    for name in names:
        rest_i = min((i for i in (name.find(c) for c in "@+#") if i >= 0), default=len(name))
        pol, rest = name[:rest_i], name[rest_i:]
        if pol in ("pregated", "lookahead"):
            pol = pregate_policy(lookahead)
        elif lookahead > 1 and pol not in ("gpu_only", "on_demand"):
            continue
        if pol + rest not in out:
            out.append(pol + rest)
    return out


TINY_MOE_BLOCKS = 4  # per stack, when a lookahead > 1 is asked for (tiny has 2: lookahead 2 leaves no pre-gate)


def shape_config(shape: str, lookaheads=(1,)):
    """The shape's preset. `tiny` with a lookahead > 1: 8 + 8 layers with 4 + 4 MoE blocks (or more, so that
    the largest lookahead leaves a pre-gate in each stack), for every family of the run."""
    L = max(lookaheads)
    if shape != "tiny" or L == 1:
        return preset(shape)
    n = max(TINY_MOE_BLOCKS, L + 1)
    return preset(shape, num_layers=2 * n, num_decoder_layers=2 * n, num_sparse_encoder_layers=n,
                  num_sparse_decoder_layers=n)


def same_nonexpert_weights(a: Switch, b: Switch) -> bool:
    """Do two models hold the same non-expert weights (pre-gates aside: they differ with the lookahead)?"""
    sa, sb = a.state_dict(), b.state_dict()

    def keys(sd):
        return {k for k in sd if not is_expert_param(k) and ".pregate." not in k}

    if keys(sa) != keys(sb):
        return False
    return all(torch.equal(sa[k], sb[k]) for k in keys(sa))


def parse_sweep_policies(text: str | None) -> list[str] | None:
    """"gpu_only,on_demand,pregated,pregated#noguess" -> the list (None: the default); SystemExit when the first is
    not gpu_only, a policy is unknown or a variant is not a first-block guess's."""
    if not text:
        return None
    names = [p for p in text.replace(" ", "").split(",") if p]
    if not names or names[0] != "gpu_only":
        raise SystemExit(f"--sweep-policies {text!r}: the first must be gpu_only (the tokens' reference)")
    for name in names:
        core, _, variant = name.partition("#")
        try:
            PolicySpec.parse(core)
        except OffloadError as e:
            raise SystemExit(f"--sweep-policies: {e}") from None
        bad = [t for t in variant.split("#") if t and t not in GUESS_VARIANTS]
        if bad or "@" in core or "+" in core:
            raise SystemExit(f"--sweep-policies: {name!r}: the sweep takes plain policies and the first-block "
                             f"guess's variants ({', '.join('#' + v for v in GUESS_VARIANTS)})")
    return names


def parse_batches(text: str | None) -> list[int]:
    if not text:
        return []
    out = sorted({int(x) for x in text.replace(" ", "").split(",") if x})
    if not out or out[0] < 1:
        raise SystemExit(f"--batch-sweep {text!r}: expected positive batch sizes, e.g. 1,2,4,8,16,32")
    return out


def re_tag(name: str) -> str:
    import re

    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def bench_shape(shape, cfg, device, dtype, budget, args, over_budget, result, save) -> dict:
    t0 = time.perf_counter()
    model = build_own(cfg, device, dtype)
    try:
        store = build_store(cfg, model, device, dtype, budget, shape_compress(args, cfg, device, dtype))
    except OffloadError as e:
        result["failures"].append(f"{shape}: {e}")
        return {"error": str(e)}
    if device.type == "cuda":
        model.set_backend("triton")
    E, eb = cfg.num_experts, store.expert_bytes
    C = max(1, E // 4)
    out: dict = {
        "config": {
            "num_experts": E,
            "d_model": cfg.d_model,
            "d_ff": cfg.d_ff,
            "moe_blocks": store.M,
            "decoder_moe_blocks": len(model.decoder.moes),
        },
        "expert_bytes": eb,
        "slot_bytes": store.slot_bytes,  # a GPU slot's row (compressed: the unpacked bf16 row)
        "compress": store.compress,
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
        model, store, device, cuda_graph=not args.no_graph, copy_mode=args.copy_mode, measure_stall=True,
        first_block_guess=args.first_block_guess,
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
    link = result["environment"].get("pinned_peak_GBps")
    refs: dict = {}
    table = getattr(args, "table_runs", None)
    if table:  # only the named runs (gpu_only is in the list where the tokens are to be checked)
        plain = [n for n in table["policies"] if n.startswith("speculative")]
        conv = [n for n in table["policies"] if not n.startswith("speculative")]
        modes_run = [(m, nb) for m, nb in modes if m in table["modes"]]
    elif args.sweep_only:
        plain, conv, modes_run = [], [], []
    else:
        modes_run = modes
    def run_named(eng: Engine, family: str, mode: str, nb: int, name: str) -> None:
        """One table run of `name` (policy[@cache][+cpu_mode][#variant]) under `eng`'s model: measured,
        its tokens checked against gpu_only's of the same family and decoding, copies accounted. The entry's
        `lookahead` is the model's (0: unconverted)."""
        label = f"{family}/{mode}/{name}"
        lookahead = eng.model.cfg.lookahead if eng.model.cfg.pregated else 0
        if over_budget():
            out["runs"].append({"label": label, "skipped": "time budget", "family": family, "lookahead": lookahead})
            return
        core, _, variant = name.partition("#")
        pname, _, cpu_mode = core.partition("+cpu_")
        spec = PolicySpec.parse(pname)
        n_new = args.prefetch_all_tokens if spec.name == "prefetch_all" else args.new_tokens
        t_run = time.perf_counter()
        impl_before = slot_plan.DEFAULT_IMPL
        plan, copy, copy_mode = parse_variant(variant)
        sdpa = "sdpa" in variant.split("#")
        if plan:
            slot_plan.DEFAULT_IMPL = plan
        try:
            with engine_settings(eng, copy=dataclasses.replace(eng.copy, **copy),
                                 copy_mode=copy_mode or eng.copy_mode,
                                 first_block_guess=variant_guess(variant) or eng.first_block_guess), \
                    sdpa_attention(eng.model, sdpa), env_setting("PGMOE_BEAM_KERNEL", beam_variant(variant)), \
                    contextlib.ExitStack() as more:
                for k, v in variant_env(variant).items():
                    more.enter_context(env_setting(k, v))
                entry = run_one(eng, spec, ids, n_new, nb, args, cpu_compute=cpu_mode or "off")
        finally:
            slot_plan.DEFAULT_IMPL = impl_before
        if device.type == "cuda" and spec.name != "gpu_only" and "metrics" in entry:
            # the link as it is right after the run: on one lent H200 it ran at 90% of the peak measured at the
            # start for the first half of a run, then at 98% (e2e-h200-64ffcd2-large-run1.md)
            entry["pinned_peak_after_GBps"] = rep.pinned_peak_GBps(device, trials=3)
        entry["slot_plan"] = plan or slot_plan.DEFAULT_IMPL
        entry.update(label=label, family=family, decoding=mode, lookahead=lookahead)
        if cpu_mode or variant:
            entry["policy"] = name
            if eng._calibration is not None:
                out["cpu_compute_calibration"] = eng._calibration.as_dict()
        # the CPU's bf16 sums are not the GPU's, nor SDPA's last bits the attention kernel's, nor the matrix product's
        # the LM head kernel's or the dense layers' decode kernels', nor the tensor ops' log-sum-exp beam_topk's: a
        # divergence there is recorded, not failed
        strict = (not cpu_mode or device.type == "cpu") and not sdpa and not (
            {"headops", "normops", "densemm", "topkops"} & set(variant.split("#")) and device.type == "cuda")
        key = (family, mode)
        if spec.name == "gpu_only" and not variant and "tokens" in entry:
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
        if (
            family.startswith("pregated")
            and not cpu_mode
            and not plan  # copy variants are accounted (their bandwidth is the point); plan variants not
            and spec.name in COPY_ACCOUNTED
            and spec.cache_size == 0
            and "metrics" in entry
            and not over_budget()
        ):
            entry["copy"] = copy_accounting(eng, spec, ids, nb, entry["metrics"], link)
        entry["wall_s"] = time.perf_counter() - t_run
        out["runs"].append(entry)
        print(f"[bench] {shape} {label}: " + summary(entry), flush=True)
        save_partial(result, shape, out, save)

    converted = False
    for family, names in (("unconverted", plain), ("pregated", conv)) if modes_run else ():
        if family == "pregated":
            convert_to_pregated(model, 1)
            converted = True
            names = family_policies(names, 1)
        for mode, nb in modes_run:
            for name in names:
                run_named(eng, family, mode, nb, name)
    # the lookahead lever: the same random weights (non-expert ones rebuilt from the same seed, the same
    # expert store) converted with lookahead L > 1, each family checked against its own gpu_only
    for L in [x for x in getattr(args, "lookaheads", [1]) if x > 1] if modes_run else ():
        family = f"pregated-L{L}"
        names = family_policies(table["policies"] if table else LOOKAHEAD_FAMILY_POLICIES, L)
        fam: dict = {"lookahead": L, "policies": names, "policy_of_pregates": "lookahead"}
        out.setdefault("lookahead_families", {})[family] = fam
        if over_budget():
            fam["skipped"] = "time budget"
            for mode, _ in modes_run:
                for name in names:
                    out["runs"].append({"label": f"{family}/{mode}/{name}", "skipped": "time budget",
                                        "family": family, "lookahead": L})
            save_partial(result, shape, out, save)
            continue
        print(f"[bench] {shape}: the same weights converted with lookahead {L} ...", flush=True)
        t_build = time.perf_counter()
        model_L = build_own(cfg, device, dtype)
        if device.type == "cuda":
            model_L.set_backend("triton")
        try:
            convert_to_pregated(model_L, L)
        except ConfigError as e:
            fam["error"] = str(e)
            result["failures"].append(f"{shape} {family}: {e}")
            del model_L
            save_partial(result, shape, out, save)
            continue
        eng_L = Engine(
            model_L, store, device, cuda_graph=not args.no_graph, copy_mode=args.copy_mode, measure_stall=True,
            first_block_guess=args.first_block_guess,
        )
        fam["model_lookahead"] = model_L.cfg.lookahead
        fam["same_nonexpert_weights_as_lookahead_1"] = same_nonexpert_weights(model, model_L)
        if not fam["same_nonexpert_weights_as_lookahead_1"]:
            result["failures"].append(f"{shape} {family}: the rebuilt non-expert weights differ from lookahead 1's")
        fam["build_s"] = time.perf_counter() - t_build
        for mode, nb in modes_run:
            for name in names:
                run_named(eng_L, family, mode, nb, name)
        del eng_L, model_L
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if getattr(args, "compress_family", None) and modes_run and converted:
        bench_codec_family(shape, cfg, model, store, device, budget, args, over_budget, result, out, save, modes_run,
                           run_named, link)
    if getattr(args, "int8", False) and modes_run and converted:
        bench_int8_family(shape, cfg, model, store, device, dtype, budget, args, over_budget, result, out, save,
                          modes_run, table, run_named, refs, link)
    if out["runs"]:
        check_memory_bound(shape, out, result, args.input_tokens, eng.prefill_slots)
        out["floors"] = floors(out, link)
    if args.batch_sweep and (args.sweep_shapes is None or shape in args.sweep_shapes):
        if not converted:
            convert_to_pregated(model, 1)
        out["batch_sweep"] = bench_sweep(shape, cfg, eng, args, over_budget, result, out, save)
    # anchors
    if not args.no_anchors and not args.sweep_only:
        del eng
        for what in ("gpu", "cpu"):
            for mode, nb in modes_run if table else modes:
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
    asked = eng.copy_mode  # --copy-mode, or a run variant's (#dma)
    modes = [asked] if spec.name == "gpu_only" or asked != "auto" else ["auto", "host"]
    errors = []
    for mode in modes:
        eng.copy_mode = mode
        try:
            r = eng.run(
                spec, ids, None, max_new_tokens=n_new, num_beams=nb, warmup=True, cpu_compute=cpu_compute
            )
            m = {k: v for k, v in r.metrics.items() if k != "decode_ms"}
            # the timed decode steps (every step but the first, which is in ttft): copy accounting
            m["decode_steps_timed"] = len(r.metrics["decode_ms"])
            m["decode_ms_total"] = sum(r.metrics["decode_ms"])
            return {"policy": spec.label, "metrics": m, "tokens": r.tokens, "notes": r.notes + errors}
        except Exception as e:
            errors.append(f"copy_mode={mode} failed: {type(e).__name__}: {str(e)[:300]}")
            if eng.device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            eng.copy_mode = asked
    return {"policy": spec.label, "error": "; ".join(errors)}


T_START = time.perf_counter()


def summary(entry: dict) -> str:
    """One log line per run; ends with the run's wall time (measurements and checks) and the time since
    the script started."""
    clock = (f" [{entry['wall_s']:.1f} s, at {time.perf_counter() - T_START:.0f} s]"
             if entry.get("wall_s") is not None else "")
    if "error" in entry or "skipped" in entry:
        return (entry.get("error") or entry.get("skipped")) + clock
    return _summary(entry) + clock


def _summary(entry: dict) -> str:
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
    ) + (
        f", first-block guess {g['hits']}/{g['lookups']} ({g['mode']})"
        if (g := m.get("first_block_guess")) and g.get("lookups")
        else ""
    ) + _stall(m) + _copy(entry.get("copy"), entry.get("pinned_peak_after_GBps"))


def _copy(c: dict | None, after: float | None = None) -> str:
    if not c:
        return ""
    if "error" in c:
        return f", copy accounting: {c['error']}"
    eff = c.get("copy_efficiency")
    return f", decode copies {c['decode_bytes_per_step'] / 1e6:.1f} MB/step" + (
        f" at >= {c['achieved_GBps_lower_bound']:.1f} GB/s ({100 * eff:.0f}% of pinned peak)" if eff else ""
    ) + (f"; pinned peak right after the run {after:.1f} GB/s" if after else "")


def _stall(m: dict) -> str:
    """Stall per token: CUDA events around the waits (eager), or derived by difference of graph replays."""
    s = m.get("stall_ms_per_token")
    if s is None:
        return ""
    if m.get("step_ms_median_without_copies") is None:
        return f", stall {s:.3f} ms/token (events)"
    tl = m.get("dma_timeline") or {}
    dma = ""
    if tl.get("copy_start_ms"):
        dma = ("; dma copies (ms from step start) " + ", ".join(
            f"{a:.3f}-{b:.3f}" for a, b in zip(tl["copy_start_ms"], tl["copy_end_ms"]))
            + ", link idle before each " + ", ".join(f"{x:.3f}" for x in tl["idle_before_ms"]))
    return (
        f", stall {s:.3f} ms/token (by difference: step {m['step_ms_median_with_copies']:.3f} ms with copies"
        f" - {m['step_ms_median_without_copies']:.3f} ms without{dma})"
    )


def save_partial(result, shape, out, save) -> None:
    result["shapes"][shape] = out
    save(final=False)


# ----------------------------------------------------------------------------------------------- copies
COPY_ACCOUNTED = ("on_demand", "prefetch_all", "pregated", "lookahead")
COPY_METHOD = (
    "lower bound: bytes copied during the timed decode steps (the run's bytes_copied minus those of a "
    "1-token run of the same prompt, i.e. prefill + first step) / the timed steps' wall time; equals the "
    "copy stream's bandwidth when the copy stream is busy for the whole step. copy_efficiency = this / "
    "pinned_peak_GBps (the best of 5 timings of three 256 MiB pinned copies, measured at the start of the run); "
    "pinned_peak_after_GBps: the same (3 timings) measured again right after the policy's timed run"
)
CRITICAL_METHOD = (
    "copying is on the critical path when the stall (step with copies - step without, or events around "
    "the waits) is >= 5% of the step (and >= 0.01 ms)"
)


@contextlib.contextmanager
def engine_settings(eng: Engine, **settings):
    """The engine's attributes set to `settings` inside, restored on exit."""
    saved = {k: getattr(eng, k) for k in settings}
    for k, v in settings.items():
        setattr(eng, k, v)
    try:
        yield eng
    finally:
        for k, v in saved.items():
            setattr(eng, k, v)


def copy_accounting(eng: Engine, spec: PolicySpec, ids, nb: int, m: dict, link: float | None) -> dict:
    """Bytes and bandwidth of the copies of the timed decode steps of a run with metrics m (see COPY_METHOD)."""
    steps, total_ms = m.get("decode_steps_timed") or 0, m.get("decode_ms_total") or 0.0
    if m.get("new_tokens", 0) < 2 or not steps or total_ms <= 0:
        return {"error": "fewer than 2 tokens: no timed decode step"}
    # the copy mode the measured run used (run_one may have fallen back)
    mode = m["copy_mode"] if m.get("copy_mode") in ("device", "dma", "host", "cpu") else eng.copy_mode
    try:
        with engine_settings(eng, measure_stall=False, copy_mode=mode):
            one = eng.run(spec, ids, None, max_new_tokens=1, num_beams=nb, warmup=False)
    except Exception as e:
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
        return {"error": f"1-token run failed: {type(e).__name__}: {str(e)[:300]}"}
    bytes_timed = timed_bytes(m["bytes_copied"], one.metrics["bytes_copied"], steps, m.get("decode_steps_executed"))
    out = copy_figures(bytes_timed, one.metrics["bytes_copied"], steps, total_ms, m, link)
    if eng.device.type == "cuda":
        out["while_copying"] = copy_kernel_eager(eng, spec, ids, nb, m, link)
    return out


def copy_kernel_eager(eng: Engine, spec: PolicySpec, ids, nb: int, m: dict, link: float | None) -> dict:
    """Bandwidth while the copy stream copies: CUDA events around each block's copies in an eager
    8-token run of the same policy (timing events cannot sit in a captured graph; each copy is one
    kernel of whole experts, timed alike either way). Beside the lower bound above, which also counts
    the time the link waits for routing."""
    mode = m["copy_mode"] if m.get("copy_mode") in ("device", "dma", "host") else eng.copy_mode
    if mode == "dma":
        return {"skipped": "copy_mode dma: the copies run on the host copier's stream, outside the timing "
                           "events (the lower bound above stands)"}
    try:
        with engine_settings(eng, cuda_graph=False, measure_copy=True, measure_stall=False, copy_mode=mode):
            ck = eng.run(spec, ids, None, max_new_tokens=8, num_beams=nb, warmup=False).metrics.get("copy_kernel")
    except Exception as e:  # noqa: BLE001 - recorded; the run's other figures stand
        torch.cuda.synchronize()
        return {"error": f"eager run failed: {type(e).__name__}: {str(e)[:300]}"}
    if not ck or not ck.get("GBps"):
        return {"error": "no copies timed", "copy_kernel": ck}
    return {**ck, "efficiency": ck["GBps"] / link if link else None,
            "method": "CUDA events around each block's copies on the copy stream, eager 8-token run"}


def timed_bytes(bytes_run: int, bytes_first: int, timed_steps: int, executed: int | None) -> int:
    """A run's bytes as if it had run only its timed steps after the first: the steps run after the first
    are one more than the timed ones where greedy ran a step past the output (every row had ended), so
    the bytes after the first step are scaled by timed / run (executed None: an older engine, no extra)."""
    after_first = max(1, (executed if executed is not None else timed_steps + 1) - 1)
    return bytes_first + round((bytes_run - bytes_first) * timed_steps / after_first)


def copy_figures(bytes_run: int, bytes_first: int, steps: int, total_ms: float, m: dict, link) -> dict:
    dec = max(0, bytes_run - bytes_first)
    gbps = dec / (total_ms / 1e3) / 1e9
    per_step = dec / steps
    stall, step = m.get("stall_ms_per_token"), m.get("ms_per_token_median")
    critical = None if stall is None or not step else bool(stall >= max(0.01, 0.05 * step))
    cuda = m.get("peak_allocated_bytes") is not None
    return {
        "prefill_and_first_step_bytes": bytes_first,
        "decode_bytes": dec,
        "decode_steps": steps,
        "decode_bytes_per_step": per_step,
        "achieved_GBps_lower_bound": gbps if cuda else None,
        "copy_efficiency": gbps / link if cuda and link else None,
        "copy_floor_ms_per_step": per_step / (link * 1e9) * 1e3 if link else None,
        "copy_on_critical_path": critical,
        "stall_ms_per_token": stall,
        "method": COPY_METHOD,
        "critical_path_method": CRITICAL_METHOD,
    }


def floors(out: dict, link: float | None) -> dict:
    """Per decoding mode: the copy floor (bytes pregated must copy per step / the pinned peak) and gpu_only's
    step. Greedy batch 1 needs one expert per decoder MoE block per step (computed); where the run measured
    pregated's decode bytes (copy accounting) that is used (beam 4: the beams' distinct experts)."""
    n_dec = out["config"].get("decoder_moe_blocks") or out["config"]["moe_blocks"] // 2
    computed = n_dec * out["expert_bytes"]
    res: dict = {"link_GBps": link, "definition": "copy floor = bytes pregated copies per decode step / "
                 "pinned host->GPU peak of the same run; gpu_only = its median decode step"}
    for mode in ("greedy", "beam4"):
        runs = _runs(out, mode)
        pg = runs.get("pregated", {})
        measured = (pg.get("copy") or {}).get("decode_bytes_per_step")
        by = measured if measured is not None else (computed if mode == "greedy" else None)
        res[mode] = {
            "copy_bytes_per_step": by,
            "copy_bytes_source": "measured (pregated decode)" if measured is not None else (
                "computed: one expert per decoder MoE block" if by is not None else None),
            "copy_bytes_per_step_computed_batch1": computed if mode == "greedy" else None,
            "copy_floor_ms": by / (link * 1e9) * 1e3 if link and by is not None else None,
            "gpu_only_ms": ((runs.get("gpu_only") or {}).get("metrics") or {}).get("ms_per_token_median"),
        }
    return res


def _runs(out: dict, mode: str) -> dict:
    return {
        r["policy"]: r
        for r in out.get("runs", [])
        if r.get("family") == "pregated" and r.get("decoding") == mode and "metrics" in r
    }


# ----------------------------------------------------------------------------------------------- memory
def pregated_pool_experts(E: int, rows: int, S: int, prefill_slots: int) -> tuple[int, int]:
    """Expert slots the pregated policy (lookahead 1, no cache) uses: (two blocks' decode experts, the
    encoder's streaming region), as infer.policies.OffloadRunner sizes them. The two share their slots: the
    pool holds the larger (infer.offload.SlotPool)."""
    n_enc, n_dec = min(E, rows * S), min(E, rows)  # Switch routes each token to k = 1 expert
    if n_enc <= n_dec:  # nothing to stream: the staging buffers serve the encoder too
        return 2 * n_enc, 0
    nbuf = 2 if prefill_slots >= 2 else 1
    chunk = prefill_slots // nbuf
    if chunk * nbuf >= n_enc:
        nbuf, chunk = 1, n_enc
    return 2 * n_dec, nbuf * chunk


def memory_bound(ref: dict, pg: dict, E: int, eb: int, store_bytes: int, rows: int, S: int, prefill_slots: int):
    """Peak under pregated (no cache) <= non-expert weights + two blocks' experts + gpu_only's activations.
    ref, pg: gpu_only's and pregated's metrics of the same decoding and batch. "Two blocks' experts": the
    experts two MoE blocks use (the current one and the next, pre-gated: min(E, rows) each), plus the
    encoder pass's streaming region, in the same slots (the larger of the two); the resident non-expert
    weights are in the pregated run's baseline (what was allocated when it started, with anything earlier runs in
    this process still hold)."""
    if ref.get("peak_allocated_bytes") is None or pg.get("peak_allocated_bytes") is None:
        return None
    base_ref = ref.get("baseline_allocated_bytes") or 0
    base_pg = pg.get("baseline_allocated_bytes") or 0
    act = max(0, ref["peak_allocated_bytes"] - base_ref - store_bytes)
    two, stream = pregated_pool_experts(E, rows, S, prefill_slots)
    slack = 64 << 20  # the plan's small tensors
    # a compressed store's landing, where it has its own memory (expv: a packed row per slot)
    landing = 0 if pg.get("landing_in_pool", True) else (pg.get("landing_bytes") or 0)
    pool = max(two, stream) * eb + landing
    bound = base_pg + pool + act + slack
    peak = pg["peak_allocated_bytes"]
    return {
        "rows": rows,
        "peak": peak,
        "bound": bound,
        "ok": peak <= bound,
        "two_blocks_experts": two,
        "streaming_region_experts": stream,
        "pool_bytes_reported": pg.get("pool_bytes"),
        "pool_bytes_expected": pool,
        "landing_bytes_own": landing,
        "activations_from_gpu_only": act,
        "baseline_pregated": base_pg,
        "slack_bytes": slack,
        "bound_all_experts_of_two_blocks": base_pg + 2 * E * eb + act + slack,
        "gpu_only_peak": ref["peak_allocated_bytes"],
        "peak_vs_gpu_only_pct": 100.0 * peak / ref["peak_allocated_bytes"],
        "own_need_vs_gpu_only_pct": 100.0 * (peak - base_pg) / max(1, ref["peak_allocated_bytes"] - base_ref),
    }


def check_memory_bound(shape: str, out: dict, result: dict, S: int, prefill_slots: int) -> None:
    """memory_bound for greedy and beam 4 at batch 1; a peak over the bound is a failed check."""
    E, eb = out["config"]["num_experts"], out.get("slot_bytes", out["expert_bytes"])  # the pool's rows
    checks = []
    for mode, nb in (("greedy", 1), ("beam4", 4)):
        runs = _runs(out, mode)
        ref, pg = runs.get("gpu_only"), runs.get("pregated")
        if not ref or not pg:
            continue
        # gpu_only holds every expert as a slot row (compressed: unpacked), not as the store's chunks
        resident = out["config"]["moe_blocks"] * E * eb
        c = memory_bound(ref["metrics"], pg["metrics"], E, eb, resident, nb, S, prefill_slots)
        if c is None:
            continue
        c = {"decoding": mode, "nonexpert_bytes": out["nonexpert_bytes"], **c}
        checks.append(c)
        if not c["ok"]:
            result["failures"].append(
                f"{shape} {mode}: pregated peak {c['peak'] / 1e9:.3f} GB > bound {c['bound'] / 1e9:.3f} GB"
            )
    out["memory_bound_check"] = checks


# ----------------------------------------------------------------------------------------------- sweep
SWEEP_POLICIES = ("gpu_only", "on_demand", "prefetch_all", "pregated")
CROSSOVER_DEFINITION = (
    "smallest batch B of the sweep where pregated's median decode step is no faster than on_demand's "
    "(pregated ms/step >= on_demand ms/step); null if pregated stays ahead over the whole sweep"
)


def crossover(points: list[dict]) -> dict:
    """on_demand / pregated step-time ratio per batch, and the crossover batch (CROSSOVER_DEFINITION)."""
    ratios, cross = {}, None
    for p in sorted(points, key=lambda p: p["batch"]):
        od, pg = _step_ms(p, "on_demand"), _step_ms(p, "pregated")
        if od is None or pg is None:
            continue
        ratios[str(p["batch"])] = od / pg
        if cross is None and pg >= od:
            cross = p["batch"]
    return {"crossover_batch": cross, "on_demand_over_pregated": ratios, "definition": CROSSOVER_DEFINITION}


def _step_ms(point: dict, policy: str) -> float | None:
    return ((point.get("runs", {}).get(policy) or {}).get("metrics") or {}).get("ms_per_token_median")


def expected_distinct_experts(E: int, rows: int) -> float:
    """Distinct experts per MoE block per step that `rows` independent rows routed uniformly at random
    over E experts (top-1) touch, on average: E * (1 - (1 - 1/E) ** rows)."""
    return E * (1.0 - (1.0 - 1.0 / E) ** rows)


SWEEP_INPUTS = ("forced", "greedy")
# A forced-input prediction that differs from gpu_only's where gpu_only's own top-2 logit margin is at most this is
# a near-tie, not a failed check: gpu_only run twice at batch 32 disagreed with itself at margins 0.0 and 0.19
# (bench/results/probe-policy-equality-h200.md).
PRED_TIE_TOL = 0.25
FORCED_METHOD = (
    "teacher forcing: every row's next token is taken from a fixed random [B, new_tokens] id table "
    "(drawn once per batch size, the same for every policy), so the rows' decoder inputs are diverse and "
    "every policy decodes the same tokens by construction. The step's logits are computed as usual; "
    "outside the decode step (after the captured graph, if any) the forced token's logit is set to +inf "
    "and the greedy loop's argmax picks it. Cost per step, the same for every policy: one argmax over "
    "the logits (the model's own prediction, kept for the check against gpu_only) and one scatter. "
    "same_predictions_as_gpu_only compares those predictions (argmax of the unforced logits) with "
    "gpu_only's at every step and row. gpu_only runs twice and its self-disagreements are recorded (with "
    "torch's SDPA attention it was not bitwise repeatable on the H200, bench/results/probe-policy-equality-h200.md; "
    "the decode step's attention is now kernels/decode_attention.py, which is), and a policy's disagreement fails "
    f"the check only where gpu_only's top-2 logit margin exceeds PRED_TIE_TOL = {PRED_TIE_TOL} (a near-tie below "
    "it is counted, with its margin, not failed)"
)
GREEDY_INPUTS_NOTE = (
    "greedy inputs: each row feeds back its own argmax. With random weights the greedy output barely "
    "depends on the prompt, so the rows tend to decode the same tokens and route alike: decode copies "
    "at B > 1 are fewer than independent rows would need"
)


class ForcedTokens:
    """Teacher forcing of the engine's greedy decoding to a fixed token table, done by wrapping the
    decode step the engine hands to models.generate.greedy (infer.engine imports greedy by name; it is
    replaced for the duration of `active()` and restored after). The wrapper runs outside the step
    (so outside a captured CUDA graph): it keeps the logits' argmax (the model's prediction) and
    returns the logits with the forced token's entry set to +inf, so greedy's argmax yields the
    table's token. `predictions` holds the last generate call's predictions [B, n] as lists."""

    def __init__(self, table: torch.Tensor):
        self.table = table  # [B, n] long, CPU
        self.predictions: list[list[int]] | None = None
        self.record_margins = False  # also keep each prediction's top-2 logit margin (an extra top-k per step)
        self.margins: list[list[float]] | None = None

    @contextlib.contextmanager
    def active(self):
        orig = engine_mod.greedy
        if getattr(orig, "_forced", False):
            raise RuntimeError("ForcedTokens: nested forcing")

        def forced_greedy(model, input_ids, attention_mask=None, max_new_tokens=32, eos_token_id=None,
                          step=None, state=None, on_token=None, select=None):
            # select (a token choice captured in the step's graph) is not passed on: it would choose from the
            # step's own logits, not the forced ones; greedy then chooses from forced_step's (the captured one
            # still runs in the graph, its result unused)
            if max_new_tokens > self.table.shape[1] or input_ids.shape[0] != self.table.shape[0]:
                raise ValueError(f"forced table {tuple(self.table.shape)} does not cover "
                                 f"{input_ids.shape[0]} rows x {max_new_tokens} tokens")
            table = self.table[:, :max_new_tokens].to(input_ids.device)
            inner = step or model.decode_one_token
            preds: list[torch.Tensor] = []
            margins: list[torch.Tensor] = []

            def forced_step(st, tok):
                logits = inner(st, tok)
                t = len(preds)
                preds.append(logits.argmax(-1))
                if self.record_margins:
                    top2 = logits.topk(2, dim=-1).values
                    margins.append(top2[:, 0] - top2[:, 1])
                return logits.scatter(-1, table[:, t : t + 1], float("inf"))

            out = orig(model, input_ids, attention_mask, max_new_tokens, eos_token_id,
                       step=forced_step, state=state, on_token=on_token)
            self.predictions = torch.stack(preds, dim=1).tolist() if preds else [[] for _ in range(len(table))]
            self.margins = torch.stack(margins, dim=1).tolist() if margins else None
            return out

        forced_greedy._forced = True
        engine_mod.greedy = forced_greedy
        try:
            yield self
        finally:
            engine_mod.greedy = orig


def prediction_check(ref: list[list[int]], got: list[list[int]], ref_margins: list[list[float]] | None) -> dict:
    """A run's forced-input predictions against gpu_only's (ref): disagreements, split at PRED_TIE_TOL of gpu_only's
    top-2 logit margin there into near-ties and ones beyond tolerance (all beyond where no margins were kept)."""
    n = min(len(r) for r in got) if got else 0
    where = [(i, t) for i, (ra, rb) in enumerate(zip(ref, got)) for t in range(n) if ra[t] != rb[t]]
    margins = [ref_margins[i][t] for i, t in where] if ref_margins is not None else []
    ties = sum(m <= PRED_TIE_TOL for m in margins)
    return {"compared": n * len(got), "disagreements": len(where), "near_ties": ties,
            "beyond_tolerance": len(where) - ties, "tolerance": PRED_TIE_TOL,
            "margins": [round(m, 5) for m in margins[:20]], "at": [list(w) for w in where[:20]]}


def distinct_per_step(tokens: list[list[int]] | None) -> float | None:
    """Mean over steps of the number of distinct tokens across the rows (B when every row differs)."""
    if not tokens or not tokens[0]:
        return None
    n = min(len(r) for r in tokens)
    return sum(len({r[t] for r in tokens}) for t in range(n)) / n


def bench_sweep(shape, cfg, eng: Engine, args, over_budget, result, out, save) -> dict:
    """Decoding of B prompts per batch size of args.batch_sweep, on the pre-gated model; the rows' decoder
    inputs forced to a random token table (args.sweep_inputs == "forced", FORCED_METHOD) or greedy."""
    link = result["environment"].get("pinned_peak_GBps")
    store = eng.store
    n_dec = len(eng.model.decoder.moes)
    mode = getattr(args, "sweep_inputs", "forced")
    if mode not in SWEEP_INPUTS:
        raise ValueError(f"sweep inputs {mode!r}: expected one of {SWEEP_INPUTS}")
    policies = list(getattr(args, "sweep_policies", None) or SWEEP_POLICIES)
    sw: dict = {
        "batches": list(args.batch_sweep),
        "policies": policies,
        "decoding": "greedy",
        "lookahead": eng.model.cfg.lookahead,
        "inputs": mode,
        "inputs_method": FORCED_METHOD if mode == "forced" else GREEDY_INPUTS_NOTE,
        "input_tokens": args.input_tokens,
        "new_tokens": args.sweep_new_tokens,
        "prefetch_all_tokens": min(args.sweep_prefetch_all_tokens, args.sweep_new_tokens),
        "ms_per_step": "median decode step (one step makes B tokens); tokens_per_s = B / step",
        "num_experts": store.E,
        "decoder_moe_blocks": n_dec,
        "expert_bytes": store.expert_bytes,
        "experts_per_block_definition": (
            "distinct experts copied per decoder MoE block per decode step = decode copy bytes per step "
            "/ expert bytes / decoder MoE blocks (no cache: every expert a step uses is copied once); "
            "uniform_routing_expectation = E * (1 - (1 - 1/E) ** B), what B independent rows routed "
            "uniformly at random (top-1) would touch"
        ),
        "points": [],
    }
    out["batch_sweep"] = sw
    g = torch.Generator().manual_seed(4)
    g_forced = torch.Generator().manual_seed(5)
    for B in args.batch_sweep:
        point: dict = {"batch": B, "runs": {}, "uniform_routing_expectation": expected_distinct_experts(store.E, B)}
        sw["points"].append(point)
        ids = torch.randint(3, cfg.vocab_size, (B, args.input_tokens), generator=g)
        table = torch.randint(3, cfg.vocab_size, (B, args.sweep_new_tokens), generator=g_forced)
        forcing = ForcedTokens(table) if mode == "forced" else None
        ref_tokens = ref_preds = ref_margins = None
        for name in policies:
            if over_budget():
                point["runs"][name] = {"skipped": f"time budget ({args.budget_s:.0f} s) spent"}
                continue
            core, _, variant = name.partition("#")
            spec = PolicySpec.parse(core)
            n_new = sw["prefetch_all_tokens"] if name == "prefetch_all" else args.sweep_new_tokens
            # prefetch_all's stall would replay its (slow) steps 2 x 20 times: not worth the time here
            stall = eng.measure_stall and name != "prefetch_all"
            t_run = time.perf_counter()
            if forcing is not None:
                forcing.record_margins = name == "gpu_only"  # the reference's margins (near-ties)
            with forcing.active() if forcing else contextlib.nullcontext():
                with engine_settings(eng, measure_stall=stall,
                                     first_block_guess=variant_guess(variant) or eng.first_block_guess):
                    entry = run_one(eng, spec, ids, n_new, 1, args)
                preds = forcing.predictions if forcing else None
                margins = forcing.margins if forcing else None
                tokens = entry.pop("tokens", None)
                if "metrics" in entry:
                    m = entry["metrics"]
                    step = m.get("ms_per_token_median")
                    m["ms_per_token_of_batch"] = step / B if step else None
                    m["decode_tokens_per_s"] = B * 1e3 / step if step else None
                    if core in ("on_demand", "pregated") and not over_budget():
                        entry["copy"] = copy_accounting(eng, spec, ids, 1, m, link)
                        by = (entry["copy"] or {}).get("decode_bytes_per_step")
                        if by is not None:
                            entry["copy"]["experts_per_decoder_block_per_step"] = by / store.expert_bytes / n_dec
            entry["wall_s"] = time.perf_counter() - t_run
            if "metrics" in entry:
                if name == "gpu_only":
                    ref_tokens, ref_preds, ref_margins = tokens, preds, margins
                    point["distinct_tokens_per_step"] = distinct_per_step(tokens)
                    if forcing is not None and preds is not None and not over_budget():
                        # gpu_only again: how far its own predictions repeat (the scale of the check below)
                        forcing.record_margins = False
                        with forcing.active():
                            again = run_one(eng, spec, ids, n_new, 1, args)
                        if "metrics" in again:
                            point["gpu_only_self_check"] = prediction_check(ref_preds, forcing.predictions,
                                                                            ref_margins)
                elif tokens is not None and ref_tokens is not None:
                    n = len(tokens[0])
                    same = [row[:n] for row in ref_tokens] == tokens
                    entry["same_tokens_as_gpu_only"] = same
                    if not same:
                        result["failures"].append(f"{shape} batch {B} {name}: tokens differ from gpu_only")
                    if preds is not None and ref_preds is not None:
                        chk = prediction_check(ref_preds, preds, ref_margins)
                        entry["prediction_check"] = chk
                        entry["same_predictions_as_gpu_only"] = chk["disagreements"] == 0
                        entry["predictions_matching_gpu_only"] = (
                            1.0 - chk["disagreements"] / chk["compared"] if chk["compared"] else None)
                        if chk["beyond_tolerance"]:
                            result["failures"].append(
                                f"{shape} batch {B} {name}: forced-input predictions differ from gpu_only's at "
                                f"{chk['beyond_tolerance']} of {chk['compared']} (row, step)s where gpu_only's top-2 "
                                f"margin exceeds {PRED_TIE_TOL} (margins {chk['margins']})"
                            )
            point["runs"][name] = entry
            print(f"[bench] {shape} sweep B={B} {name}: " + summary(entry), flush=True)
            sw.update(crossover(sw["points"]))
            save_partial(result, shape, out, save)
        pg = point["runs"].get("pregated", {})
        point["copy_floor_ms_per_step"] = (pg.get("copy") or {}).get("copy_floor_ms_per_step")
        point["experts_per_decoder_block_per_step"] = {
            pol: ((point["runs"].get(pol) or {}).get("copy") or {}).get("experts_per_decoder_block_per_step")
            for pol in ("on_demand", "pregated")
        }
        ref = (point["runs"].get("gpu_only") or {}).get("metrics")
        if ref and "metrics" in pg:
            point["memory"] = memory_bound(
                ref, pg["metrics"], store.E, store.expert_bytes, store.total_bytes, B, args.input_tokens,
                eng.prefill_slots,
            )
            if point["memory"] is not None and not point["memory"]["ok"]:
                result["failures"].append(f"{shape} batch {B}: pregated peak over its memory bound")
        ex = point["experts_per_decoder_block_per_step"]
        print(f"[bench] {shape} sweep B={B}: distinct experts per decoder block per step: on_demand "
              f"{_f1(ex['on_demand'])}, pregated {_f1(ex['pregated'])}, uniform routing "
              f"{point['uniform_routing_expectation']:.2f}; distinct tokens per step "
              f"{_f1(point.get('distinct_tokens_per_step'))} of {B}", flush=True)
    sw.update(crossover(sw["points"]))
    print(f"[bench] {shape} sweep: crossover batch {sw['crossover_batch']}, on_demand/pregated "
          + ", ".join(f"B={b}: {r:.2f}" for b, r in sw["on_demand_over_pregated"].items()), flush=True)
    save_partial(result, shape, out, save)
    return sw


def experts_per_block(point: dict, policy: str, n_dec: int | None, expert_bytes: int | None) -> float | None:
    """Distinct experts copied per decoder MoE block per step of a sweep point: recorded, or derived from the
    decode copy bytes (JSONs from before the field)."""
    v = (point.get("experts_per_decoder_block_per_step") or {}).get(policy)
    if v is not None:
        return v
    by = (((point.get("runs") or {}).get(policy) or {}).get("copy") or {}).get("decode_bytes_per_step")
    return by / expert_bytes / n_dec if by is not None and n_dec and expert_bytes else None


def _f1(x) -> str:
    return "-" if x is None else f"{x:.2f}"


# ----------------------------------------------------------------------------------------------- plot
def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [s for s, v in result["shapes"].items() if isinstance(v, dict) and v.get("runs")]
    if not shapes:
        return

    def of_mode(r: dict, mode: str) -> bool:
        return r.get("decoding") == mode or r["label"].endswith(mode)

    # a row of panels per decoding the run measured (a greedy-only run draws no empty beam-search panels)
    modes = [m for m in ("greedy", "beam4")
             if any(of_mode(r, m) for s in shapes for r in result["shapes"][s]["runs"])]
    if not modes:
        return
    fig, axes = plt.subplots(len(modes), 2, figsize=(16, 4.5 * len(modes)), squeeze=False)
    for row, mode in enumerate(modes):
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
            bars = axes[row][0].bar(x, vals, w, label=s)
            axes[row][1].bar(x, mems, w, label=s)
            # the floors of this shape, across the axes in its colour
            fl = (result["shapes"][s].get("floors") or {}).get(mode) or {}
            color = bars.patches[0].get_facecolor() if bars.patches else None
            for key, style, what in (("copy_floor_ms", "--", "copy floor"), ("gpu_only_ms", ":", "gpu_only")):
                if fl.get(key):
                    axes[row][0].axhline(fl[key], ls=style, lw=1.2, color=color, label=f"{s}: {what}")
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
    link = env.get("pinned_peak_GBps")
    link_s = f"{link:.1f} GB/s" if link else "n/a"
    fig.suptitle(
        f"e2e, batch 1, {result['settings']['input_tokens']} in / {result['settings']['new_tokens']} out, "
        f"{env['compute_device']}, torch {env['torch']} (random weights: near-uniform routing); floors: "
        f"-- copy (pregated's bytes per step / pinned peak "
        f"{link_s}), : gpu_only",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_batch(path: Path, result: dict) -> None:
    """Batch sweep: ms per decode step vs batch per policy (log2 x), pregated's copy floor, the crossover;
    below, on_demand / pregated per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (the experts panel's tick labels)

    shapes = [
        s for s, v in result["shapes"].items() if isinstance(v, dict) and (v.get("batch_sweep") or {}).get("points")
    ]
    if not shapes:
        return
    fig, axes = plt.subplots(3, len(shapes), figsize=(max(9.0, 6.5 * len(shapes)), 11), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.3, 1.8]})
    for j, s in enumerate(shapes):
        sw = result["shapes"][s]["batch_sweep"]
        pts = sorted(sw["points"], key=lambda p: p["batch"])
        ax, rx, ex = axes[0][j], axes[1][j], axes[2][j]
        for pol in sw["policies"]:
            xy = [(p["batch"], _step_ms(p, pol)) for p in pts if _step_ms(p, pol)]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=pol)
        fl = [(p["batch"], p.get("copy_floor_ms_per_step")) for p in pts if p.get("copy_floor_ms_per_step")]
        if fl:
            ax.plot(*zip(*fl), ls="--", color="grey", label="copy floor (pregated bytes / pinned peak)")
        cross = sw.get("crossover_batch")
        for a in (ax, rx, ex):
            a.set_xscale("log", base=2)
            a.set_xticks([p["batch"] for p in pts], [str(p["batch"]) for p in pts])
            if cross is not None:
                a.axvline(cross, color="red", lw=1, ls="-.")
        if ax.lines:
            ax.set_yscale("log")
        if cross is not None:
            ax.text(cross, ax.get_ylim()[1], f" crossover B={cross}", color="red", va="top", fontsize=8)
        inputs = sw.get("inputs", "greedy")
        fmt = result["shapes"][s].get("compress")
        ax.set_title(f"{s}: ms per decode step (median)" + (f", experts {fmt}" if fmt else "")
                     + f"\n{sw['new_tokens']} tokens, inputs {inputs}"
                     + ("" if cross is not None else "; no crossover in the sweep"), fontsize=9)
        ax.set_xlabel("batch")
        ax.legend(fontsize=7)
        r = sorted((int(b), v) for b, v in (sw.get("on_demand_over_pregated") or {}).items())
        if r:
            rx.plot(*zip(*r), marker="o", color="tab:purple")
        rx.axhline(1.0, color="black", lw=0.8)
        rx.set_title("on_demand / pregated (ms per step; > 1: pregated ahead)", fontsize=9)
        rx.set_xlabel("batch")
        # routing diversity: distinct experts copied per decoder MoE block per step vs uniform routing
        E = sw.get("num_experts") or (result["shapes"][s].get("config") or {}).get("num_experts")
        if E:
            bs = [p["batch"] for p in pts]
            ex.plot(bs, [expected_distinct_experts(E, b) for b in bs], ls="--", color="grey",
                    label="uniform routing: E(1-(1-1/E)^B)")
        cfg_s = result["shapes"][s].get("config") or {}
        n_dec = sw.get("decoder_moe_blocks") or cfg_s.get("decoder_moe_blocks")
        eb = sw.get("expert_bytes") or result["shapes"][s].get("expert_bytes")
        for pol, mk, color in (("on_demand", "s", "C1"), ("pregated", "o", "C3")):  # the top panel's colours
            xy = [(p["batch"], experts_per_block(p, pol, n_dec, eb)) for p in pts]
            xy = [(b, v) for b, v in xy if v is not None]
            if xy:
                ex.plot(*zip(*xy), marker=mk, color=color, ls="-" if pol == "pregated" else ":",
                        label=f"{pol} (measured)")
        if ex.lines:
            ex.set_yscale("log", base=2)
            ex.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ex.legend(fontsize=7)
        ex.set_title(f"distinct experts copied per decoder MoE block per step (E={E}), inputs {inputs}",
                     fontsize=9)
        ex.set_xlabel("batch")
    env = result["environment"]
    forced = any(result["shapes"][s]["batch_sweep"].get("inputs") == "forced" for s in shapes)
    inputs_s = ("inputs forced: each row's tokens from a random table, the same for every policy" if forced
                else "inputs greedy: rows that decode alike route alike")
    fig.suptitle(f"batch sweep, {result['settings']['input_tokens']} input tokens, {env['compute_device']}, "
                 f"torch {env['torch']}\n(random weights: near-uniform routing; {inputs_s})", fontsize=10)
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
