"""GPU probe: greedy decoding's LM head and choice, as the matrix product path and as kernels/lm_head.py's fused
head, checked and timed side by side (issue 6's tail of the decode step).

For each model width (switch-base 768, switch-large 1024; T5's vocabulary 32128, bf16, tied embeddings' scale)
and batch B:
  check:  the fused head's logits against F.linear's (max difference in bf16 steps), its tokens against the
          argmax of F.linear's logits over --check-rows random rows (a disagreement is counted with the top-2
          margin of the reference: a tie within a last bit is allowed, anything else fails the probe);
  time:   one captured call of each path, after an L2 flush (scripts/bench_kernels.bench_us, median of --reps):
          "matmul" = h * scale, F.linear, .float(), greedy_select over the logits (the captured step's head
          before); "fused" = lm_head_partials + greedy_select over the partials; with --sweep every
          (block_v, block_d, warps, stages) of the grid below at B = 1 and B = 4, the pinned one
          (kernels/lm_head.CONFIG) marked;
  norm:   the step's tail from the last block's residual and output: "separate" = the residual add, the final
          RMS norm kernel, the fused head and the choice; "in head" = the head with the add and the norm in its
          kernel (add / norm_weight), then the choice; and its check as above (logits in bf16 steps, tokens).

    python3 scripts/probe_lm_head.py --out $OUT/probe-lm-head.json [--sweep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import lm_head  # noqa: E402
from kernels.greedy import greedy_select  # noqa: E402
from kernels.rmsnorm import rmsnorm  # noqa: E402

V = 32128
WIDTHS = {"switch-base": 768, "switch-large": 1024}
GRID = {"block_v": (64, 128, 256), "block_d": (32, 64, 128), "warps": (4, 8), "stages": (3, 4)}


def _state(B, dev):
    return [torch.zeros(B, dtype=torch.long, device=dev), torch.zeros(B, 8, dtype=torch.long, device=dev),
            torch.zeros(B, dtype=torch.bool, device=dev), torch.zeros(8, dtype=torch.bool, device=dev),
            torch.zeros((), dtype=torch.long, device=dev)]


def check(D: int, rows: int, dev, norm: bool = False) -> dict:
    g = torch.Generator(device=dev).manual_seed(D)
    w = (torch.randn(V, D, device=dev, generator=g) * D ** -0.5 * 4).bfloat16()
    nw = (torch.rand(D, device=dev, generator=g) * 2 + 0.1).bfloat16()
    scale = D ** -0.5
    out = {"rows": rows, "max_diff_bf16_steps": 0.0, "token_disagreements": 0, "disagreement_margins": []}
    B = 32
    for _ in range(0, rows, B):
        h = (torch.randn(B, D, device=dev, generator=g) * 8).bfloat16()
        y = (torch.randn(B, D, device=dev, generator=g) * 8).bfloat16() if norm else None
        x = rmsnorm(h + y, nw, 1e-6) if norm else h
        ref = F.linear(x * scale, w).float()
        P = lm_head.tiles(V, lm_head.CONFIG["block_v"])
        logits = torch.empty(B, V, device=dev)
        pv, pi = torch.empty(B, P, device=dev), torch.empty(B, P, dtype=torch.int32, device=dev)
        lm_head.lm_head_partials(h, w, scale, logits, pv, pi, add=y, norm_weight=nw if norm else None, eps=1e-6)
        step = ref.abs().clamp_min(1e-3) * 2 ** -7
        out["max_diff_bf16_steps"] = max(out["max_diff_bf16_steps"], float(((logits - ref).abs() / step).max()))
        row_step = ref.abs().amax(-1, keepdim=True) * 2 ** -7  # one bf16 step at the row's largest logit
        out["max_diff_row_steps"] = max(out.get("max_diff_row_steps", 0.0),
                                        float(((logits - ref).abs() / row_step).max()))
        st = _state(B, dev)
        greedy_select(pv, *st, 0, 1, index=pi)
        want = ref.argmax(-1)
        bad = (st[0] != want).nonzero().flatten().tolist()
        for b in bad:
            top2 = ref[b].topk(2).values
            out["disagreement_margins"].append(float(top2[0] - top2[1]))
            out.setdefault("disagreement_margins_row_steps", []).append(float((top2[0] - top2[1]) / row_step[b]))
            out["token_disagreements"] += 1
    torch.cuda.synchronize()
    # a disagreement is allowed only where the reference's top two are within one bf16 step of each other. With the
    # add and norm in the kernel the norm's scale multiplies the sums, not each element before its rounding: every
    # logit differs by other roundings of the row's terms, so the difference is measured in steps of the row's
    # largest logit (within 2), and a disagreement allowed where the top two are within one such step
    if norm:
        out["ok"] = out.get("max_diff_row_steps", 0.0) <= 2.01 and all(
            m <= 1.0 for m in out.get("disagreement_margins_row_steps", []))
    else:
        out["ok"] = out["max_diff_bf16_steps"] <= 1.01 and all(m <= 2 ** -7 * 64 for m in out["disagreement_margins"])
    return out


def time_paths(D: int, B: int, reps: int, cfgs: list[dict], dev) -> dict:
    from scripts.bench_kernels import bench_us, graph_of

    g = torch.Generator(device=dev).manual_seed(1)
    w = (torch.randn(V, D, device=dev, generator=g) * D ** -0.5).bfloat16()
    h = torch.randn(B, D, device=dev, generator=g).bfloat16()
    scale = D ** -0.5
    st = _state(B, dev)
    holder = {}

    def matmul():
        holder["l"] = F.linear(h * scale, w)[:, :].float()
        greedy_select(holder["l"], *st, 0, 1)

    res = {"B": B, "D": D, "matmul_us": bench_us([graph_of(matmul)], reps), "fused": []}
    P_max = lm_head.tiles(V, min(c["block_v"] for c in cfgs))
    pinned_cfg = lm_head.CONFIG
    logits = torch.empty(B, V, device=dev)
    pv_all = torch.empty(B, P_max, device=dev)
    pi_all = torch.empty(B, P_max, dtype=torch.int32, device=dev)
    for c in cfgs:
        P = lm_head.tiles(V, c["block_v"])
        pv, pi = pv_all[:, :P].contiguous(), pi_all[:, :P].contiguous()

        def fused(c=c, pv=pv, pi=pi):
            lm_head.lm_head_partials(h, w, scale, logits, pv, pi, **c)
            greedy_select(pv, *st, 0, 1, index=pi)

        try:
            us = bench_us([graph_of(fused)], reps)
        except Exception as e:  # a config that does not compile (shared memory): recorded
            res["fused"].append({**c, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        res["fused"].append({**c, "us": us, "pinned": c == pinned_cfg})
    ok = [r for r in res["fused"] if "us" in r]
    pinned = [r for r in ok if r["pinned"]]
    res["fused_pinned_us"] = pinned[0]["us"] if pinned else None
    res["fused_best"] = min(ok, key=lambda r: r["us"]) if ok else None
    # the tail from the last block's residual h and output y: the add and the norm as kernels of their own, or in
    # the head's kernel
    y = torch.randn(B, D, device=dev, generator=g).bfloat16()
    nw = (torch.rand(D, device=dev, generator=g) + 0.5).bfloat16()
    P = lm_head.tiles(V, pinned_cfg["block_v"])
    pv, pi = pv_all[:, :P].contiguous(), pi_all[:, :P].contiguous()

    def separate():
        lm_head.lm_head_partials(rmsnorm(h + y, nw, 1e-6), w, scale, logits, pv, pi)
        greedy_select(pv, *st, 0, 1, index=pi)

    def in_head():
        lm_head.lm_head_partials(h, w, scale, logits, pv, pi, add=y, norm_weight=nw, eps=1e-6)
        greedy_select(pv, *st, 0, 1, index=pi)

    a, b = graph_of(separate), graph_of(in_head)
    res["norm_separate_us"], res["norm_in_head_us"] = bench_us([a], reps), bench_us([b], reps)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--check-rows", type=int, default=512)
    ap.add_argument("--batches", default="1,4,32")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-widths", default="switch-base", help="the widths --sweep covers (comma-separated)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    grid = [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]
    res = {"probe": "lm_head", "command": "python3 scripts/probe_lm_head.py " + " ".join(sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(dev), "vocab": V, "pinned": lm_head.CONFIG, "widths": {}}
    ok = True
    for name, D in WIDTHS.items():
        c = check(D, args.check_rows, dev)
        ok &= c["ok"]
        rows = []
        for B in [int(b) for b in args.batches.split(",")]:
            pinned = dict(lm_head.CONFIG)
            cfgs = grid if (args.sweep and B in (1, 4) and name in args.sweep_widths.split(",")) else [pinned]
            r = time_paths(D, B, args.reps, cfgs, dev)
            rows.append(r)
            best = r["fused_best"]
            print(f"{name} B={B}: matmul {r['matmul_us']:.1f} us, fused (pinned) {r['fused_pinned_us']:.1f} us, "
                  f"best {best['us']:.1f} us {best}; add + norm separate {r['norm_separate_us']:.1f} us, "
                  f"in the head {r['norm_in_head_us']:.1f} us", flush=True)
        cn = check(D, args.check_rows, dev, norm=True)
        ok &= cn["ok"]
        res["widths"][name] = {"D": D, "check": c, "check_norm": cn, "times": rows}
        print(name, "check with the add and norm", {k: v for k, v in cn.items() if k != "disagreement_margins"},
              flush=True)
        print(name, "check", {k: v for k, v in c.items() if k != "disagreement_margins"}, flush=True)
    res["ok"] = ok
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("wrote", args.out, "ok" if ok else "CHECK FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
