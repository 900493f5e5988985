"""GPU probe: what beam search's per-step choice costs inside the decode step's CUDA graph.

For each shape (a preset's decoder: layers, heads, vocabulary), batch B prompts x num_beams rows, 256 encoder and
256 decoder positions: a DecodeState of random caches and random logits; each piece replayed from a CUDA graph of
16 calls back to back (median per call, L2 flushed before each replay; scripts/bench_kernels.py's method):
- `select`: models.generate.BeamSelect without a state (log-softmax, top-2k, finished hypotheses, running beams);
- `select + reorder`: with the state (the self-attention caches reordered, what each step does);
- `reorder, self caches` and `reorder, all caches`: DecodeState.reorder(cross=False / True) alone, the self caches
  in one buffer as Switch.prefill makes them, half the decoder positions written (a 256-token run's mean; on a GPU
  kernels/kv_reorder.py moves those only, in place); `gather`: the self caches' gather of every position
  (PGMOE_KV_REORDER=0, the form before); `per block`: the gather a tensor per block (before that);
- `greedy select`: models.generate.GreedySelect on one row per prompt, for scale;
- `select, kernel` (GPU only): BeamSelect with the update as one kernel (kernels/beam_select.py) and the candidates
  by the tensor ops (PGMOE_BEAM_TOPK=0), and whether its buffers equal the tensor ops' after 24 steps of random
  logits (eos made likely on every third);
- `select, kernels` (GPU only): with the candidates by kernels/beam_topk.py too (the default on CUDA);
- `candidates`: the log-softmax, the add and the top-2k alone, as tensor ops and by kernels/beam_topk.py (GPU only),
  on float32 logits as the decode step hands them over, and whether the kernels' picks equal float64's (value
  descending, flat index ascending) over 24 draws, with the largest difference of a value.
Writes JSON (with the command) and a markdown table beside it. On a machine without a GPU it runs the same calls
eagerly, a few times, and reports wall-clock times (a smoke test, not a measurement).

    python3 scripts/probe_beam_select.py --out bench/results/probe-beam-select-h200.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernels.beam_topk import beam_topk, beam_topk_reference  # noqa: E402
from kernels.kv_reorder import reorder_reference  # noqa: E402
from models.config import preset  # noqa: E402
from models.generate import BeamSelect, GreedySelect  # noqa: E402
from models.switch import DecodeState  # noqa: E402

CALLS = 16


def make_state(cfg, rows: int, enc: int, dec: int, dev, dtype, one_buffer: bool = True) -> DecodeState:
    """Random caches of a preset's decoder. one_buffer: the self-attention caches as views of one buffer, as
    Switch.prefill makes them (self_kv); else a tensor per block."""
    H, Dh, L = cfg.num_heads, cfg.d_kv, cfg.num_decoder_layers

    def caches(n):
        return [torch.randn(rows, H, n, Dh, device=dev).to(dtype) for _ in range(L)]

    self_kv = torch.randn(2, L, rows, H, dec, Dh, device=dev).to(dtype) if one_buffer else None
    self_k, self_v = (list(self_kv[0].unbind(0)), list(self_kv[1].unbind(0))) if one_buffer else (caches(dec),
                                                                                                  caches(dec))
    return DecodeState(enc_bias=torch.zeros(rows, 1, 1, enc, device=dev, dtype=dtype), cross_k=caches(enc),
                       cross_v=caches(enc), self_k=self_k, self_v=self_v,
                       pos=torch.full((1,), dec // 2, dtype=torch.long, device=dev), max_len=dec, self_kv=self_kv)


def per_call_us(fn, dev, reps: int) -> float:
    """Median microseconds per call of CALLS calls back to back: one CUDA graph replay after an L2 flush on a GPU,
    wall clock of eager calls on the CPU."""
    if dev.type != "cuda":
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(CALLS):
                fn()
            times.append((time.perf_counter() - t0) / CALLS * 1e6)
        return statistics.median(times)
    from bench_kernels import bench_us, graph_of

    return bench_us([graph_of(*[fn] * CALLS)], reps) / CALLS


def probe(shape: str, batch: int, beams: int, dev, reps: int, enc: int, dec: int, dtype) -> dict:
    cfg = preset(shape)
    rows = batch * beams
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(rows, cfg.vocab_size, device=dev, generator=g).to(dtype)
    state = make_state(cfg, rows, enc, dec, dev, dtype)
    per_block = make_state(cfg, rows, enc, dec, dev, dtype, one_buffer=False)
    kw = dict(device=dev, start_token=0, pad_token=0, eos_token=1)
    bare = BeamSelect(batch, beams, dec, kernel=False, **kw)
    fused = BeamSelect(batch, beams, dec, kernel=True, topk=False, **kw) if dev.type == "cuda" else None
    fused_topk = BeamSelect(batch, beams, dec, kernel=True, topk=True, **kw) if dev.type == "cuda" else None
    logits32 = logits.float()
    scores = torch.randn(rows, device=dev, generator=g)
    full = BeamSelect(batch, beams, dec, state=state, kernel=False, **kw)
    greedy = GreedySelect(batch, dec, **kw)
    one_row = logits[::beams].contiguous()
    index = torch.arange(rows, device=dev).flip(0)
    out = {"shape": shape, "batch": batch, "num_beams": beams, "vocab": cfg.vocab_size,
           "decoder_layers": cfg.num_decoder_layers, "encoder_positions": enc, "decoder_positions": dec,
           "self_cache_bytes": sum(b.numel() * b.element_size() for b in (*state.self_k, *state.self_v)),
           "cross_cache_bytes": sum(b.numel() * b.element_size() for b in (*state.cross_k, *state.cross_v))}
    for name, fn in (("select_us", lambda: bare(logits)), ("select_reorder_us", lambda: (full(logits), state.apply_deferred())),
                     ("reorder_self_us", lambda: state.reorder(index, cross=False)),
                     ("reorder_self_gather_us", lambda: reorder_reference(state.self_kv.flatten(0, 1).flatten(3), index)),
                     ("reorder_self_per_block_us", lambda: per_block.reorder(index, cross=False)),
                     ("reorder_all_us", lambda: state.reorder(index)),
                     ("greedy_select_us", lambda: greedy(one_row)),
                     ("select_kernel_us", (lambda: fused(logits)) if fused is not None else None),
                     ("select_kernels_us", (lambda: fused_topk(logits32)) if fused_topk is not None else None),
                     ("candidates_ops_us", lambda: beam_topk_reference(logits32, scores, beams, 2 * beams)),
                     ("candidates_kernels_us", (lambda: beam_topk(logits32, scores, beams, 2 * beams))
                      if dev.type == "cuda" else None)):
        if fn is None:  # (the kernel: GPU only)
            out[name] = None
            continue
        out[name] = per_call_us(fn, dev, reps)
        print(f"[probe] {shape} B={batch} x {beams} {name}: {out[name]:.1f}", flush=True)
    # the reorder's written positions equal the gather's, the rest untouched (a check of the kernel on the GPU)
    kv = state.self_kv.flatten(0, 1).flatten(3)
    before, src = kv.clone(), torch.tensor([2, 0, 0, 1] * rows, device=dev)[:rows] % rows
    want = before.clone()
    reorder_reference(want, src)
    state.reorder(src, cross=False)
    n = int(state.pos) * cfg.d_kv
    out["reorder_equals_gather"] = bool(torch.equal(kv[..., :n], want[..., :n]) and torch.equal(kv[..., n:],
                                                                                            before[..., n:]))
    print(f"[probe] {shape} reorder's written positions equal the gather's: {out['reorder_equals_gather']}", flush=True)
    if fused is not None:  # the kernel's buffers after the same calls: the tensor ops' (a correctness check)
        a = BeamSelect(batch, beams, dec, kernel=False, **kw)
        k = BeamSelect(batch, beams, dec, kernel=True, topk=False, **kw)
        same = True
        for s in range(24):
            x = torch.randn(rows, cfg.vocab_size, device=dev, generator=g).to(dtype)
            x[:, 1] += 4.0 * (s % 3 == 0)  # eos likely on some steps: hypotheses finish
            a(x)
            k(x)
            same &= all(torch.equal(getattr(a, b).cpu(), getattr(k, b).cpu()) for b in  # (ended: pinned host memory)
                        ("tok", "scores", "seqs", "fin_scores", "fin_seqs", "fin_len", "done", "ended", "t", "src"))
        out["select_kernel_equals_tensor_ops"] = bool(same)
        print(f"[probe] {shape} kernel's buffers equal the tensor ops': {same}", flush=True)
        # the candidates' kernels against float64 (value descending, flat index ascending)
        K, same, diff = 2 * beams, True, 0.0
        for _ in range(24):
            x = torch.randn(rows, cfg.vocab_size, device=dev, generator=g) * 3
            sc = torch.randn(rows, device=dev, generator=g) * 2
            got_s, got_i = beam_topk(x, sc, beams, K)
            cand = (torch.log_softmax(x.double(), -1) + sc.double()[:, None]).view(batch, beams * cfg.vocab_size)
            want_s, want_i = torch.sort(cand, dim=1, descending=True, stable=True)
            same &= bool(torch.equal(got_i, want_i[:, :K]))
            diff = max(diff, (got_s.double() - want_s[:, :K]).abs().max().item())
        out["candidates_kernels_equal_float64"] = same
        out["candidates_kernels_max_abs_diff"] = diff
        print(f"[probe] {shape} candidates' kernels pick float64's: {same} (values within {diff:.2e})", flush=True)
    return out



def _f(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _kernel(r: dict) -> str:
    if r.get("select_kernel_us") is None:
        return "-"
    return f"{r['select_kernel_us']:.1f} ({'yes' if r.get('select_kernel_equals_tensor_ops') else 'NO'})"


def _topk(r: dict) -> str:
    if r.get("candidates_kernels_us") is None:
        return "-"
    same = "yes" if r.get("candidates_kernels_equal_float64") else "NO"
    return f"{r['candidates_kernels_us']:.1f} ({same}, {r.get('candidates_kernels_max_abs_diff', 0):.1e})"


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# Beam search's choice in the decode step: {m['device']}", "",
             f"{m['date']}; torch {m['torch']}; `{m['command']}`. {m['how']}", "",
             "| shape | prompts x beams | vocab | select | select + reorder (self caches) | reorder, self caches | "
             "reorder, self caches: gather | reorder, self caches per block | reorder, all caches | greedy select | "
             "select, kernel (= tensor ops) | select, kernels | candidates: tensor ops / kernels (= float64) | "
             "self / cross caches MB |", "|" + "---|" * 14]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['batch']} x {r['num_beams']} | {r['vocab']} | {r['select_us']:.1f} | "
                     f"{r['select_reorder_us']:.1f} | {r['reorder_self_us']:.1f} | "
                     f"{_f(r.get('reorder_self_gather_us'))} | {_f(r.get('reorder_self_per_block_us'))} | {r['reorder_all_us']:.1f} | "
                     f"{r['greedy_select_us']:.1f} | {_kernel(r)} | {_f(r.get('select_kernels_us'))} | "
                     f"{_f(r.get('candidates_ops_us'))} / {_topk(r)} | {r['self_cache_bytes'] / 1e6:.1f} / "
                     f"{r['cross_cache_bytes'] / 1e6:.1f} |")
    lines += ["", "Reorder of the written positions equal to the gather's there, the rest untouched: "
              + ", ".join(f"{r['shape']} {'yes' if r.get('reorder_equals_gather') else 'NO'}" for r in res["rows"])
              + " (off the GPU the gather runs: equal by construction)."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON path (markdown beside it)")
    ap.add_argument("--shapes", nargs="+", default=["switch-base-128", "switch-large-128"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--positions", type=int, default=256, help="encoder and decoder positions")
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    how = (f"Per call, {CALLS} calls back to back in one CUDA graph, median of {args.reps} replays (L2 flushed before "
           "each); us." if dev.type == "cuda" else f"CPU smoke test: eager wall clock per call ({CALLS} calls, median "
           f"of {args.reps}); us.")
    meta = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "how": how,
            "command": " ".join(["python3", "scripts/probe_beam_select.py"] + (argv or sys.argv[1:]))}
    res = {"meta": meta, "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes:
        res["rows"].append(probe(shape, args.batch, args.beams, dev, args.reps, args.positions, args.positions,
                                 dtype))
        out.write_text(json.dumps(res, indent=1))
        out.with_suffix(".md").write_text(markdown(res))
    return res


if __name__ == "__main__":
    main()
