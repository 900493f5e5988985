"""Markdown summary of an end-to-end benchmark JSON (scripts/bench_e2e.py): per model shape and
decoding mode, ms per output token and peak GPU memory of each policy and anchor, the floors (copy
floor, gpu_only), the ratios the performance targets are stated in, copy efficiency, the pre-gated
memory bound, the lookahead lever (bench_e2e --lookaheads 1,2: per lookahead, gpu_only, on_demand and the
pre-gated policy's ms/token, its stall and copy efficiency), and the batch sweep (ms per step per policy,
on_demand / pregated, the crossover, distinct experts copied per decoder MoE block per step against the
uniform-routing expectation).

Usage: python scripts/summarize_e2e.py bench/results/e2e-h200.json [--out bench/results/e2e-h200.md] [--plots]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

POLICIES = ("gpu_only", "on_demand", "prefetch_all", "pregated")
COPY_POLICIES = ("on_demand", "prefetch_all", "pregated")


def _ms(entry):
    return None if entry is None else (entry.get("metrics") or {}).get("ms_per_token_median")


def _gb(entry):
    if entry is None:
        return None
    b = (entry.get("metrics") or {}).get("peak_allocated_bytes")
    return None if b is None else b / 1e9


def _f(x, fmt="{:.2f}"):
    return "-" if x is None else fmt.format(x)


def _yn(x):
    return {True: "yes", False: "no", None: "-"}[x]


def _runs(s: dict, mode: str) -> dict:
    return {r["policy"]: r for r in s.get("runs", [])
            if r.get("family") == "pregated" and r.get("decoding") == mode and "metrics" in r}


def _floor(s: dict, mode: str, link) -> float | None:
    """The copy floor in ms per step: the run's own (bench_e2e floors), else computed for greedy."""
    fl = (s.get("floors") or {}).get(mode) or {}
    if "copy_floor_ms" in fl:
        return fl["copy_floor_ms"]
    if mode != "greedy" or not link:  # older JSONs: beams' distinct experts were not measured
        return None
    cfg = s["config"]
    n_dec_moe = cfg.get("decoder_moe_blocks") or cfg["moe_blocks"] // 2
    return n_dec_moe * s["expert_bytes"] / (link * 1e9) * 1e3


def summarize(doc: dict, source: str) -> str:
    env = doc.get("environment", {})
    link = env.get("pinned_peak_GBps")
    settings = doc["settings"]
    shapes = {k: v for k, v in doc["shapes"].items() if isinstance(v, dict) and "config" in v}
    has_table = any(s.get("runs") for s in shapes.values())
    lines = [
        f"# End-to-end decoding: {env.get('compute_device', '?')}",
        "",
        f"From `{source}` ({env.get('date', '?')}; `{env.get('command', '?')}`; torch {env.get('torch')}, "
        f"triton {env.get('triton')}, transformers {env.get('transformers')}). "
        + (f"Batch 1, {settings['input_tokens']} input and {settings['new_tokens']} output tokens, bf16, "
           if has_table else "The batch sweep alone (no table runs), bf16, ")
        + "random weights (near-uniform routing), pre-gated with lookahead 1"
        + (" (other lookaheads: the lookahead table)" if max(settings.get("lookaheads") or [1]) > 1 else "")
        + ("; every run's experts stored and copied packed losslessly (offload.compress="
           + ", ".join(f"{k} {v.get('compress') or settings.get('compress')}: {v['expert_bytes'] / 1e6:.2f} MB per "
                       f"expert for {v['slot_bytes'] / 1e6:.2f} MB of bf16"
                       for k, v in shapes.items() if v.get("slot_bytes"))
           + "), unpacked on the GPU" if settings.get("compress") or any(v.get("compress") for v in shapes.values())
           else "")
        + (". ms/token is the median decode "
           "step; peak is GPU memory allocated. Copy floor = the bytes pregated copies per decode step (greedy: "
           "one expert per decoder MoE block; beam 4: measured, where the run did) / the pinned host->GPU peak "
           f"measured in the same run ({_f(link, '{:.1f}')} GB/s)." if has_table
           else f". Pinned host->GPU peak measured at the start of the run: {_f(link, '{:.1f}')} GB/s."),
    ]
    not_run = [f"{k}: {v.get('skipped') or v.get('error')}" for k, v in doc["shapes"].items() if k not in shapes]
    if has_table:
        lines += [
            "",
            "| shape | decoding | gpu_only | on_demand | prefetch_all | pregated | transformers (GPU) | "
            "transformers + accelerate offload | copy floor | pregated / max(gpu_only, floor) | "
            "on_demand / pregated | accelerate / pregated | peak GB gpu_only / pregated | pregated peak % of "
            "gpu_only |",
            "|" + "---|" * 14,
        ]
        for shape, s in shapes.items():
            if not s.get("runs"):
                continue
            for mode in ("greedy", "beam4"):
                runs = _runs(s, mode)
                anchors = {a["label"].split("/")[1]: a for a in s.get("anchors", [])
                           if a["label"].endswith("/" + mode) and "metrics" in a}
                if not runs and not anchors:  # a decoding the run left out (--table-runs)
                    continue
                ms = {p: _ms(runs.get(p)) for p in POLICIES}
                hf_gpu, hf_off = _ms(anchors.get("gpu_only")), _ms(anchors.get("accelerate_cpu_offload"))
                pg = ms["pregated"]
                fl = _floor(s, mode, link)
                known = [x for x in (ms["gpu_only"], fl) if x is not None]
                ref = max(known) if known else None
                g_gpu, g_pg = _gb(runs.get("gpu_only")), _gb(runs.get("pregated"))
                lines.append(
                    f"| {shape} | {mode} | " + " | ".join(_f(ms[p]) for p in POLICIES)
                    + f" | {_f(hf_gpu)} | {_f(hf_off)} | {_f(fl)} | "
                    + f"{_f(pg / ref if pg and ref else None)} | "
                    + f"{_f(ms['on_demand'] / pg if pg and ms['on_demand'] else None)} | "
                    + f"{_f(hf_off / pg if pg and hf_off else None, '{:.1f}')} | "
                    + f"{_f(g_gpu)} / {_f(g_pg)} | "
                    + f"{_f(100 * g_pg / g_gpu if g_pg and g_gpu else None, '{:.1f}')} |"
                )
        lines += (copy_table(shapes) + variant_table(shapes) + dma_timeline_table(shapes, link)
                  + copier_table(shapes) + memory_table(shapes) + lookahead_table(shapes) + codec_table(shapes, settings)
                  + int8_table(shapes))
    for shape, s in shapes.items():
        if (s.get("batch_sweep") or {}).get("points"):
            lines += sweep_table(shape, s["batch_sweep"], s.get("config"), s.get("expert_bytes"))
    skipped = [f"{shape}: {a['label']}" for shape, s in shapes.items()
               for a in s.get("runs", []) + s.get("anchors", []) if "skipped" in a]
    skipped += [f"{shape}: batch {p['batch']} {pol}" for shape, s in shapes.items()
                for p in (s.get("batch_sweep") or {}).get("points", [])
                for pol, r in p["runs"].items() if "skipped" in r]
    if not_run:
        lines += ["", "Shapes not measured: " + "; ".join(not_run) + "."]
    if skipped:
        lines += ["", "Skipped by the run's time budget: " + "; ".join(skipped) + "."]
    if doc.get("failures"):
        lines += ["", "Failed checks: " + "; ".join(doc["failures"]) + "."]
    else:
        checked = any(s.get("memory_bound_check") for s in shapes.values()) or any(
            p.get("memory") for s in shapes.values() for p in (s.get("batch_sweep") or {}).get("points", [])
        )
        forced = any((s.get("batch_sweep") or {}).get("inputs") == "forced" for s in shapes.values())
        lines += ["", "Checks: every policy gave gpu_only's tokens" + (
            f" (sweep: forced inputs; {prediction_summary(shapes)})" if forced else "") + "; " + (
            "the pre-gated peak-memory bound held." if checked else
            "the pre-gated peak-memory bound was not checked (no GPU memory figures).")]
    return "\n".join(lines) + "\n"


def prediction_summary(shapes: dict) -> str:
    """The sweep's forced-input prediction checks in words: near-ties (gpu_only's top-2 margin within the
    tolerance) and gpu_only's disagreements with itself, where recorded."""
    ties, beyond, n_self, self_dis, tol = 0, 0, 0, 0, None
    for s in shapes.values():
        for p in (s.get("batch_sweep") or {}).get("points", []):
            for r in p["runs"].values():
                c = r.get("prediction_check")
                if c:
                    ties += c["near_ties"]
                    beyond += c["beyond_tolerance"]
                    tol = c["tolerance"]
            c = p.get("gpu_only_self_check")
            if c:
                n_self += c["compared"]
                self_dis += c["disagreements"]
    if tol is None:  # an older JSON: the strict check only
        return "every policy's predictions matched gpu_only's"
    text = ("every policy's predictions matched gpu_only's" if ties + beyond == 0 else
            f"every policy's predictions matched gpu_only's but at {ties} near-tie(s), where gpu_only's top-2 "
            f"logit margin is at most {tol}" + (f", and {beyond} beyond it" if beyond else ""))
    if n_self:
        text += f"; gpu_only run twice disagreed with itself at {self_dis} of {n_self} (row, step)s"
    return text


def copy_table(shapes: dict) -> list[str]:
    rows = []
    for shape, s in shapes.items():
        for mode in ("greedy", "beam4"):
            runs = _runs(s, mode)
            for pol in COPY_POLICIES:
                c = (runs.get(pol) or {}).get("copy")
                if not c or "error" in c:
                    continue
                eff = c.get("copy_efficiency")
                wc = c.get("while_copying") or {}
                weff = wc.get("efficiency")
                after = runs[pol].get("pinned_peak_after_GBps")
                lower = c.get("achieved_GBps_lower_bound")
                eff_after = lower / after if after and lower else None
                rows.append(
                    f"| {shape} | {mode} | {pol} | {c['decode_bytes_per_step'] / 1e6:.1f} | "
                    f"{_f(lower, '{:.1f}')} | {_f(eff and 100 * eff, '{:.1f}')} | "
                    f"{_f(after, '{:.1f}')} | {_f(eff_after and 100 * eff_after, '{:.1f}')} | "
                    f"{_f(wc.get('GBps'), '{:.1f}')} | {_f(weff and 100 * weff, '{:.0f}')} | "
                    f"{_f(c.get('stall_ms_per_token'), '{:.3f}')} | {_yn(c.get('copy_on_critical_path'))} |"
                )
    if not rows:
        return []
    return [
        "",
        "Copy efficiency during decoding: bytes copied in the timed decode steps (the run's bytes minus those "
        "of a 1-token run of the same prompt) / their wall time, a lower bound on the copy stream's bandwidth "
        "(equal to it when the copy stream is busy for the whole step), as % of the pinned peak. Copying is "
        "on the critical path when the stall is >= 5% of the step (target there: >= 90% of the peak). "
        "'While copying': the per-block copies' bytes / their time on the copy stream (CUDA events, an eager "
        "8-token run of the same policy; '-' where the run did not measure it): how fast the link runs when "
        "it runs; the lower bound also counts the time it waits for routing. 'Peak after': the pinned peak "
        "measured again right after the run's timed pass (3 trials; '-' in results from before it was), and "
        "the lower bound as % of it: a link that is slower for a while shows here, not as the runner's loss.",
        "",
        "| shape | decoding | policy | MB copied per step | GB/s (lower bound) | % of pinned peak | "
        "peak after, GB/s | % of peak after | GB/s while copying | % of pinned peak | stall ms/token | "
        "copy on critical path |",
        "|" + "---|" * 12,
    ] + rows


def copier_table(shapes: dict) -> list[str]:
    """The dma copier per offloaded run: the copy mode used, the host loop's slowest driver call (where a driver
    call was held back), and a failed first try's error (the run then reran with another copy mode)."""
    rows = []
    for shape, s in shapes.items():
        for r in s.get("runs", []):
            m = r.get("metrics") or {}
            failed = [n for n in r.get("notes", []) if "copy_mode=" in n and " failed: " in n]
            slow = m.get("dma_slowest_call")
            if m.get("copy_mode") is None or (slow is None and not failed):
                continue
            what = f"{slow['call']}, plan {slow['plan']}, {slow['ms']:.3f} ms" if slow else "-"
            why = failed[0].split(" failed: ", 1)[1][:300].replace("|", "/") if failed else "-"
            rows.append(f"| {shape} | {r.get('decoding', '-')} | {r['label'].split('/')[-1]} | {m['copy_mode']} | "
                        f"{what} | {why} |")
    if not rows:  # (runs before the loop timed its calls, and no failed try)
        return []
    return [
        "",
        "The dma copier per run: the copy mode the run used, the native host loop's slowest driver call (a call held "
        "back by the driver shows here: infer.offload.DMA_HOST_COPY_NOTE), and where a first try with dma failed, "
        "its error (the run was redone with another copy mode; its tokens and times are that mode's).",
        "",
        "| shape | decoding | run | copy mode used | slowest driver call of the copier | first try's error |",
        "|---|---|---|---|---|---|",
    ] + rows


def dma_timeline_table(shapes: dict, link) -> list[str]:
    """copy_mode dma runs' traced pass (engine.dma_timeline): where the copier's copies ran in the step. GB/s
    while copying: the median over the plans that copied of their experts' bytes / their copy time, where the
    timeline counts each plan's experts (experts_per_plan); in older results, where a plan is one expert (greedy,
    batch 1, no cache, not prefetch_all)."""
    rows = []
    for shape, s in shapes.items():
        for mode in ("greedy", "beam4"):
            for name, r in _runs(s, mode).items():
                tl = (r.get("metrics") or {}).get("dma_timeline") or {}
                if not tl.get("copy_start_ms"):
                    continue
                dur = statistics.median(b - a for a, b in zip(tl["copy_start_ms"], tl["copy_end_ms"]))
                gaps = tl["idle_before_ms"][1:]
                n_ex = tl.get("experts_per_plan")
                if n_ex is not None:
                    rates = [n * s["expert_bytes"] / ((b - a) * 1e6)
                             for n, a, b in zip(n_ex, tl["copy_start_ms"], tl["copy_end_ms"]) if n > 0 and b > a]
                    gbps = statistics.median(rates) if rates else None
                else:
                    one = (mode == "greedy" and "@" not in name and not name.startswith("prefetch_all")
                           and (r.get("metrics") or {}).get("batch_size") == 1)
                    gbps = s["expert_bytes"] / (dur * 1e6) if one and dur > 0 else None
                early = (f"{tl['early_copy_start_ms']:.3f} - {tl['early_copy_end_ms']:.3f}"
                         if tl.get("early_copy_start_ms") is not None else "-")
                rows.append(
                    f"| {shape} | {mode} | {name} | {early} | {len(tl['copy_start_ms'])} | {tl['copy_start_ms'][0]:.3f} | "
                    f"{dur:.3f} | {_f(statistics.median(gaps) if gaps else None, '{:.3f}')} | "
                    f"{tl['copy_end_ms'][-1]:.3f} | {tl['step_ms']:.3f} | {_f(gbps, '{:.1f}')} | "
                    f"{_f(gbps and link and 100 * gbps / link, '{:.0f}')} |")
    if not rows:
        return []
    return [
        "",
        "DMA timeline (copy_mode dma; a traced replay pass after the timed one, of the run's first 20 steps at "
        "most, so for beam search, whose first steps copy more, its step can be longer than the run's median; "
        "CUDA events around each plan's copies on the copier's stream, medians over the steps, ms from the step's "
        "start): the prefetched "
        "plans the copier handled per step, when the first began (before it: the compute up to the first "
        "decoder MoE block's routing and that block's own copy, by the copy kernel), each plan's copy time, the "
        "link's idle time between two plans, when the last ended, the traced step, and the bandwidth while "
        "copying (one expert per plan / its copy time) as % of the pinned peak. Early guess copy: where the copier "
        "copied the first-block guess as the step before chose its token (one-row greedy, offload's early guess), "
        "ms from the start of the step it serves ('-': none); the guess's plan then copies nothing.",
        "",
        "| shape | decoding | run | early guess copy | dma plans per step | first starts | ms per plan | idle between | "
        "last ends | step ms | GB/s while copying | % of pinned peak |",
        "|" + "---|" * 12,
    ] + rows


def variant_table(shapes: dict) -> list[str]:
    """Table runs named <policy>#<variant> (bench_e2e's levers: #torchplan, #dma, #device, #hi, #p<N>, #b<B>, #w<W>,
    #s<S>, the first-block guess's, #native / #driver / #torchcopy) beside their base policy of the same run: ms/token, the copy
    stall, the copy bandwidth's lower bound, the GPU's step time in the decode loop and replayed."""
    rows, seen = [], set()
    for shape, s in shapes.items():
        for mode in ("greedy", "beam4"):
            runs = _runs(s, mode)
            for name, r in runs.items():
                base, sep, _variant = name.partition("#")
                if not sep:
                    continue
                for label, e in ((base, runs.get(base)), (name, r)):
                    if e is None or (shape, mode, label) in seen:
                        continue
                    seen.add((shape, mode, label))
                    m, c = e.get("metrics") or {}, e.get("copy") or {}
                    cs = m.get("copy_settings") or {}
                    setting = (f"{cs.get('priority', '-')}, {cs.get('programs', '-')} x {cs.get('block', '-')}, "
                               f"{cs.get('warps', 4)} warps" if cs else "-")
                    if cs.get("dma_streams", 1) > 1:
                        setting += f"; {cs['dma_streams']} dma streams"
                    if m.get("copy_mode") == "dma" and (m.get("dma_api_used") or cs.get("dma_api")):
                        setting += f"; dma by {m.get('dma_api_used') or cs['dma_api']}"
                    g = m.get("first_block_guess") or {}
                    guess = "-" if not g.get("blocks") else (
                        f"{g.get('mode')}{', ahead' if g.get('ahead') else ''}: {g.get('hits')}/{g.get('lookups')}")
                    rows.append(
                        f"| {shape} | {mode} | {label} | {e.get('slot_plan') or '-'} | {m.get('copy_mode') or '-'} | "
                        f"{setting} | {guess} | {_f(_ms(e))} | "
                        f"{_f(m.get('stall_ms_per_token'), '{:.3f}')} | "
                        f"{_f(c.get('achieved_GBps_lower_bound'), '{:.1f}')} | "
                        f"{_f(m.get('gpu_step_ms_median'), '{:.3f}')} / "
                        f"{_f(m.get('step_ms_median_with_copies'), '{:.3f}')} |"
                    )
    if not rows:
        return []
    return [
        "",
        "Lever variants, each beside its base policy of the same run (`<policy>#<variant>`: #torchplan = the "
        "PyTorch slot plan; #dma / #device = offload.copy_mode dma (prefetched experts by the copy engines, "
        "started by a host thread) / device (the copy kernel); #hi = the copy stream at the highest priority; "
        "#p<N>/#b<B>/#w<W> = the device copy kernel's programs per expert, elements per iteration and warps "
        "per program; the kernel's settings apply where it copies; #noguess / #guessrun / #guesskeep = "
        "offload.first_block_guess off / run / keep; in older results #s<S> = the dma copier on S streams and "
        "#guessahead / #guessstart = the guess at the previous step's end or the step's start, #gil<U> = Python's "
        "thread switch interval U us while the dma copier runs, #nopace = the next step launched as the step "
        "starts, levers tried and removed; #native / #driver / #torchcopy = offload.dma_api native / driver / torch; "
        "#sdpa = torch's attention; #beamops / #nodefer = beam search's update as tensor ops / its cache reorder at "
        "the step's end; #headops = greedy's LM head as the matrix product, then the choice; #flagcopy = the ended "
        "flag copied after each step; #normops = greedy's fused head without the final add and norm; #kvgather = "
        "beam search's cache reorder as the gather of every position; #guessindex = the first-block guess looked up "
        "ahead of the slot plan, not in its kernel; #signaldone = the last MoE block's done count written behind an "
        "event on the signal stream, not right behind its copies; #noearly = the first-block guess copied from its "
        "plan at the step's start, not by the dma copier as the step before chose its token; #addops = each residual add "
        "as its own kernel before the norm, not inside the norm's kernel; #kvwrites = the self caches' keys and values "
        "written by two launches per block, not one; #densemm = the dense layers' feed-forward as two matrix products "
        "and the activation, not the expert FFN's decode kernels; #topkops = beam search's candidates (log-softmax, the "
        "add, the top-2k) as tensor ops, not kernels/beam_topk.py's kernels; in older results #noprefetch / #prefetch<P> = "
        "greedy's fused head without / with P% of its weights read into L2 before the last MoE block's wait, #pace = "
        "each step launched once the dma copier has handled the running step's first plan, #nohead / #head<KB> = the "
        "first-block guess's experts copied by the dma copier alone / with their first KB kilobytes by the copy "
        "kernel, levers tried and removed; #r<N> = a repeat row). "
        "First-block "
        "guess: mode, hits / guesses. Stall: the captured step with its copies minus without; GB/s: the copy "
        "bandwidth's lower bound (decode bytes / step time); GPU step: CUDA events around each step of the decode "
        "loop / around the same captured step replayed with every launch queued ahead (medians; '-' where the run "
        "did not record it).",
        "",
        "| shape | decoding | run | slot plan | copy mode | copy settings | "
        "first-block guess | ms/token | stall ms/token | GB/s (lower bound) | GPU step ms: loop / replayed |",
        "|" + "---|" * 11,
    ] + rows


def run_lookahead(r: dict) -> int | None:
    """A table run's pre-gate lookahead: recorded, or from its family (JSONs from before the field)."""
    if r.get("lookahead") is not None:
        return r["lookahead"]
    fam = r.get("family") or ""
    if fam == "pregated":
        return 1
    if fam.startswith("pregated-L") and fam[len("pregated-L"):].isdigit():
        return int(fam[len("pregated-L"):])
    return 0 if fam == "unconverted" else None


def lookahead_table(shapes: dict) -> list[str]:
    """The lookahead lever, where the run measured a lookahead > 1: per shape, decoding and lookahead, gpu_only,
    on_demand and the pre-gated policy (pregated at 1, lookahead above) of the model converted with it."""
    by: dict = {}
    for shape, s in shapes.items():
        for r in s.get("runs", []):
            L = run_lookahead(r)
            if L and "metrics" in r and r.get("decoding") and r.get("family") != INT8_FAMILY:
                pol = r["policy"]
                if pol == ("pregated" if L == 1 else "lookahead"):
                    pol = "pre-gated"
                by.setdefault((shape, r["decoding"], L), {})[pol] = r
    if not any(L > 1 for _, _, L in by):
        return []
    rows = []
    for (shape, mode, L), runs in sorted(by.items(), key=lambda kv: (list(shapes).index(kv[0][0]),
                                                                      kv[0][1] != "greedy", kv[0][2])):
        pg = runs.get("pre-gated")
        c = (pg or {}).get("copy") or {}
        stall = ((pg or {}).get("metrics") or {}).get("stall_ms_per_token")
        if stall is None:
            stall = c.get("stall_ms_per_token")
        eff = c.get("copy_efficiency")
        gpu, od, p = _ms(runs.get("gpu_only")), _ms(runs.get("on_demand")), _ms(pg)
        same = [r.get("same_tokens_as_gpu_only") for pol, r in runs.items() if pol != "gpu_only"]
        rows.append(
            f"| {shape} | {mode} | {L} | {_f(gpu)} | {_f(od)} | {_f(p)} | {_f(stall, '{:.3f}')} | "
            f"{_f(eff and 100 * eff, '{:.0f}')} | {_f(p / gpu if p and gpu else None)} | "
            f"{_f(od / p if p and od else None)} | {_yn(all(same) if same and None not in same else None)} |"
        )
    return [
        "",
        "Lookahead lever: the same random weights converted with lookahead L (block m's pre-gate routes block "
        "m + L, so each expert's copy has L blocks of compute to hide behind; the first L MoE blocks of each "
        "stack are fetched on demand). Pre-gated = policy `pregated` at L = 1, `lookahead` above; stall = step "
        "with copies - step without (graph replays), per token; copy % = decode bytes / step time / pinned peak "
        "(a lower bound on the copy stream's busy share). Tokens are checked against the same model's gpu_only.",
        "",
        "| shape | decoding | lookahead | gpu_only | on_demand | pre-gated | stall ms/token | copy % of pinned "
        "peak | pre-gated / gpu_only | on_demand / pre-gated | tokens = gpu_only |",
        "|" + "---|" * 11,
    ] + rows


INT8_FAMILY = "pregated-int8"


def codec_table(shapes: dict, settings: dict) -> list[str]:
    """The expert formats side by side (bench_e2e.py --compress-family): the lookahead-1 model with the table's
    format and with the family's, per shape and decoding; the last column: the family's on_demand over the table's
    pregated."""
    rows = []
    for shape, s in shapes.items():
        fam = s.get("codec_family")
        if not fam or fam.get("skipped") or fam.get("error"):
            continue
        other = f"pregated-{fam.get('compress') or 'none'}"
        for mode in ("greedy", "beam4"):
            got = {(r["family"], r["policy"]): r for r in s.get("runs", [])
                   if r.get("decoding") == mode and "metrics" in r and r.get("family") in ("pregated", other)}
            if not any(f == other for f, _ in got):
                continue
            pg_table = _ms(got.get(("pregated", "pregated")))
            own = s.get("compress") or settings.get("compress") or "none"
            for f, label in (("pregated", own), (other, fam.get("compress") or "none")):
                gpu, od, pg = (_ms(got.get((f, p))) for p in ("gpu_only", "on_demand", "pregated"))
                c = (got.get((f, "pregated")) or {}).get("copy") or {}
                floor = c.get("copy_floor_ms_per_step")
                same = [r.get("same_tokens_as_gpu_only") for (ff, p), r in got.items() if ff == f and p != "gpu_only"]
                rows.append(
                    f"| {shape} | {mode} | {label} | {_f(gpu)} | {_f(od)} | {_f(pg)} | "
                    f"{_f(c.get('decode_bytes_per_step') and c['decode_bytes_per_step'] / 1e6, '{:.1f}')} | "
                    f"{_f(floor)} | {_f(pg / max(gpu, floor) if pg and gpu and floor else None)} | "
                    f"{_f(od / pg if od and pg else None)} | "
                    f"{_f(od / pg_table if od and pg_table else None)} | "
                    f"{_yn(all(same) if same and None not in same else None)} |"
                )
    if not rows:
        return []
    return [
        "",
        "Expert formats side by side (`--compress-family`): the same experts stored and copied in the table's "
        "format and in another, in one run, each format's policies checked against its own gpu_only; the last "
        "column but one divides each format's on_demand by the table's pregated.",
        "",
        "| shape | decoding | experts | gpu_only | on_demand | pregated | MB copied per step | copy floor | "
        "pregated / max(gpu_only, floor) | on_demand / pregated | on_demand / table's pregated | "
        "tokens = own gpu_only |",
        "|" + "---|" * 12,
    ] + rows


def int8_table(shapes: dict) -> list[str]:
    """The int8-transfer lever (bench_e2e.py --int8): the lookahead-1 model with its experts as per-row int8
    beside the same model in the run's dtype, per shape and decoding."""
    rows = []
    for shape, s in shapes.items():
        fam = s.get("int8_family")
        if not fam or fam.get("skipped") or fam.get("error"):
            continue
        for mode in ("greedy", "beam4"):
            got = {}
            for r in s.get("runs", []):
                if r.get("decoding") == mode and "metrics" in r and r.get("family") in ("pregated", INT8_FAMILY):
                    got[(r["family"], r["policy"])] = r
            if not any(f == INT8_FAMILY for f, _ in got):
                continue
            match = (fam.get("gpu_only_tokens_matching_bf16") or {}).get(mode) or {}
            for f, label in (("pregated", "float"), (INT8_FAMILY, "int8")):
                gpu, od, pg = (_ms(got.get((f, p))) for p in ("gpu_only", "on_demand", "pregated"))
                c = (got.get((f, "pregated")) or {}).get("copy") or {}
                floor = c.get("copy_floor_ms_per_step")
                same = [r.get("same_tokens_as_gpu_only") for (ff, p), r in got.items() if ff == f and p != "gpu_only"]
                peaks = [((got.get((f, p)) or {}).get("metrics") or {}).get("peak_allocated_bytes")
                         for p in ("gpu_only", "pregated")]
                peak = " / ".join(_f(b and b / 1e9) for b in peaks)
                rows.append(
                    f"| {shape} | {mode} | {label} | {_f(gpu)} | {_f(od)} | {_f(pg)} | "
                    f"{_f(c.get('decode_bytes_per_step') and c['decode_bytes_per_step'] / 1e6, '{:.1f}')} | "
                    f"{_f(floor)} | {_f(pg / max(gpu, floor) if pg and gpu and floor else None)} | "
                    f"{_f(od / pg if od and pg else None)} | {peak} | "
                    f"{_yn(all(same) if same and None not in same else None)} | "
                    + (f"{match.get('matching_prefix')} of {match.get('of')} |" if label == "int8" and match else "- |")
                )
    if not rows:
        return []
    return [
        "",
        "Int8 expert transfer (`--int8`, offload.quantize=int8): the same model with its experts stored, copied "
        "and computed as per-row int8 (about half of bf16's bytes), its policies checked against its own "
        "(int8) gpu_only; the last column: how many leading tokens of the int8 gpu_only equal the bf16 "
        "gpu_only's (random weights: a rough sign; the quantization's quality cost is measured on a trained "
        "model).",
        "",
        "| shape | decoding | experts | gpu_only | on_demand | pregated | MB copied per step | copy floor | "
        "pregated / max(gpu_only, floor) | on_demand / pregated | peak GB gpu_only / pregated | "
        "tokens = own gpu_only | int8 tokens = bf16 |",
        "|" + "---|" * 13,
    ] + rows


def memory_table(shapes: dict) -> list[str]:
    rows = []
    for shape, s in shapes.items():
        for c in s.get("memory_bound_check", []):
            two, stream = c.get("two_blocks_experts"), c.get("streaming_region_experts")
            eb = s.get("expert_bytes")
            shared = two is not None and eb and c.get("pool_bytes_expected") == max(two, stream) * eb
            # staging and the streaming region share their slots from 2026-11-30 on (earlier runs: the sum)
            experts = "-" if two is None else (f"max({two}, {stream})" if shared else f"{two} + {stream}")
            rows.append(
                f"| {shape} | {c['decoding']} | {c['peak'] / 1e9:.3f} | {c['bound'] / 1e9:.3f} | "
                f"{_yn(c['ok'])} | {experts} | "
                f"{_f(c.get('peak_vs_gpu_only_pct'), '{:.1f}')} |"
            )
    if not rows:
        return []
    return [
        "",
        "Pre-gated peak memory: bound = non-expert weights (the run's baseline allocation) + two blocks' "
        "experts (decode: the current and the next block's, min(E, rows) each) and the encoder's streaming "
        "region (in the same slots: the larger of the two; earlier runs held both) + gpu_only's activations "
        "+ 64 MiB.",
        "",
        "| shape | decoding | pregated peak GB | bound GB | within | expert slots in bound (two blocks, streaming) "
        "| peak % of gpu_only |",
        "|" + "---|" * 7,
    ] + rows


def expected_distinct_experts(E: int, rows: int) -> float:
    """Distinct experts per MoE block per step of `rows` independent rows routed uniformly (top-1)."""
    return E * (1.0 - (1.0 - 1.0 / E) ** rows)


INPUTS_TEXT = {
    "forced": "decoder inputs forced: every row's next token comes from a fixed random token table, the same "
    "for every policy (same tokens by construction; each policy's predictions under those inputs are checked "
    "against gpu_only's)",
    "greedy": "decoder inputs greedy: each row feeds back its own argmax; with random weights the rows decode "
    "alike and route alike, so copies at B > 1 understate what independent rows need",
}


def _experts(p: dict, pol: str, sw: dict, cfg: dict | None, eb: int | None) -> float | None:
    """Distinct experts copied per decoder MoE block per step: recorded, or from the decode bytes (older JSONs)."""
    v = (p.get("experts_per_decoder_block_per_step") or {}).get(pol)
    if v is not None:
        return v
    by = (((p["runs"].get(pol) or {}).get("copy")) or {}).get("decode_bytes_per_step")
    n_dec = sw.get("decoder_moe_blocks") or (cfg or {}).get("decoder_moe_blocks")
    eb = sw.get("expert_bytes") or eb
    return by / eb / n_dec if by is not None and n_dec and eb else None


def sweep_table(shape: str, sw: dict, cfg: dict | None = None, expert_bytes: int | None = None) -> list[str]:
    cross = sw.get("crossover_batch")
    ratios = sw.get("on_demand_over_pregated") or {}
    E = sw.get("num_experts") or (cfg or {}).get("num_experts")
    inputs = sw.get("inputs", "greedy")
    lines = [
        "",
        f"Batch sweep, {shape}: greedy, {sw['input_tokens']} input and {sw['new_tokens']} output tokens per "
        f"prompt (prefetch_all: {sw['prefetch_all_tokens']}); {INPUTS_TEXT.get(inputs, inputs)}. ms per decode "
        "step (median; one step makes B tokens). Copy floor = pregated's measured bytes per step / pinned peak. "
        "Experts/block/step = distinct experts copied per decoder MoE block per decode step (decode copy bytes "
        "per step / expert bytes / decoder MoE blocks); uniform = E(1 - (1 - 1/E)^B), what B independent rows "
        "routed uniformly would touch; distinct tokens = rows with different decoder inputs per step (gpu_only). "
        f"Crossover (smallest B where pregated is no faster than on_demand): "
        f"**{cross if cross is not None else 'none in the sweep'}**.",
        "",
        "| B | gpu_only | on_demand | prefetch_all | pregated | copy floor | on_demand / pregated | "
        "pregated tokens/s | pregated copy % of peak | pregated peak % of gpu_only | experts/block/step "
        "on_demand / pregated | uniform | distinct tokens |",
        "|" + "---|" * 13,
    ]
    for p in sorted(sw["points"], key=lambda p: p["batch"]):
        runs = p["runs"]
        pg = (runs.get("pregated") or {}).get("metrics") or {}
        eff = ((runs.get("pregated") or {}).get("copy") or {}).get("copy_efficiency")
        mem = (p.get("memory") or {}).get("peak_vs_gpu_only_pct")
        uni = p.get("uniform_routing_expectation")
        if uni is None and E:
            uni = expected_distinct_experts(E, p["batch"])
        ex = [_experts(p, pol, sw, cfg, expert_bytes) for pol in ("on_demand", "pregated")]
        lines.append(
            f"| {p['batch']} | " + " | ".join(_f(_ms(runs.get(pol))) for pol in POLICIES)
            + f" | {_f(p.get('copy_floor_ms_per_step'))} | {_f(ratios.get(str(p['batch'])))} | "
            + f"{_f(pg.get('decode_tokens_per_s'), '{:.0f}')} | {_f(eff and 100 * eff, '{:.0f}')} | "
            + f"{_f(mem, '{:.1f}')} | {_f(ex[0])} / {_f(ex[1])} | {_f(uni)} | "
            + f"{_f(p.get('distinct_tokens_per_step'))} |"
        )
    extra = []
    for p in sorted(sw["points"], key=lambda p: p["batch"]):
        for name, r in p["runs"].items():
            g = ((r or {}).get("metrics") or {}).get("first_block_guess") or {}
            if "#" in name or g.get("blocks"):
                guess = (f"{g.get('mode')}{', ahead' if g.get('ahead') else ''}: {g.get('hits')}/{g.get('lookups')}"
                         if g.get("blocks") else "off")
                extra.append(f"| {p['batch']} | {name} | {guess} | {_f(_ms(r))} |")
    if extra:
        lines += ["", "First-block guess in the sweep (hits / guesses; each step guesses one expert per row):", "",
                  "| B | run | first-block guess | ms per step |", "|---|---|---|---|", *extra]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--out")
    ap.add_argument("--plots", action="store_true",
                    help="also draw the run's plots again beside the JSON (<stem>.png, <stem>-batch.png), as "
                    "scripts/bench_e2e.py draws them")
    args = ap.parse_args()
    doc = json.loads(Path(args.json).read_text())
    text = summarize(doc, args.json)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.plots:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_e2e import plot, plot_batch

        src = Path(args.json)
        plot(src.with_suffix(".png"), doc)
        if any((v or {}).get("batch_sweep") for v in doc["shapes"].values() if isinstance(v, dict)):
            plot_batch(src.with_name(src.stem + "-batch.png"), doc)


if __name__ == "__main__":
    main()
