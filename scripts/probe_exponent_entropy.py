#!/usr/bin/env python3
"""How many bytes a lossless expert format could still save over exp4, and what that would buy end to end.

bf16 is sign(1) | exponent(8) | mantissa(7). exp4 (kernels/expert_pack.py) keeps sign and mantissa as one byte and
the exponent as a 4-bit code against a base per group of 128 weights. The sign and mantissa bits of these weights
are close to uniform, so only the exponent can shrink; with a base per group, the least any code can spend per
weight is the entropy of (group's largest exponent - the weight's exponent), measured here over the weights. The
bound per expert = (8 bits + that entropy) per weight + one base byte per group. Measured for experts drawn as
scripts/bench_e2e.py draws them (normal, std d_model^-0.5 for w_in and d_ff^-0.5 for w_out, bf16) and, with
--checkpoint, for a checkpoint's experts.

With --results (a scripts/bench_e2e.py JSON), a model of what the bound would do to each shape's greedy row: the
copy floor scales with the bytes copied, and `on_demand` and `pregated` keep their time above the floor (on_demand:
its compute after each copy; pregated: its tail and the copies' fixed costs). A prediction, not a measurement.

    python3 scripts/probe_exponent_entropy.py --checkpoint checkpoints/default \
        --results bench/results/e2e-h200-bf9dd10.json --out bench/results/probe-exponent-entropy.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels import expert_pack  # noqa: E402
from models.config import preset  # noqa: E402

G = expert_pack.G


def exponent_stats(rows: torch.Tensor) -> dict:
    """rows: bf16 [N, X] -> entropy (bits per weight) of the exponent below its group's largest, of the raw
    exponent, of sign + mantissa; exp4's and the bound's bytes per row as fractions of bf16's."""
    N, X = rows.shape
    bits = rows.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    e = (bits >> 7) & 0xFF
    Xg = (X + G - 1) // G * G
    eg = torch.nn.functional.pad(e, (0, Xg - X)).view(N, -1, G)
    below = (eg.amax(dim=-1, keepdim=True) - eg).reshape(N, -1)[:, :X]
    below = torch.where(e == 0, torch.full_like(below, 1000), below)  # zeros / subnormals: one symbol of their own

    def entropy(v: torch.Tensor) -> float:
        _, counts = torch.unique(v, return_counts=True)
        p = counts.double() / counts.sum()
        return float(-(p * p.log2()).sum())

    h_below, h_raw = entropy(below), entropy(e)
    h_signmant = entropy(((bits >> 8) & 0x80) | (bits & 0x7F))
    bf16 = 2 * X
    exp4 = expert_pack.layout(X).nbytes
    bound = X * (8 + h_below) / 8 + Xg // G
    return {"rows": N, "weights_per_row": X, "entropy_below_group_max_bits": h_below, "entropy_exponent_bits": h_raw,
            "entropy_sign_mantissa_bits": h_signmant, "exp4_fraction": exp4 / bf16, "bound_fraction": bound / bf16,
            "bound_over_exp4": bound / exp4}


def bench_rows(shape: str, n: int, seed: int = 1) -> torch.Tensor:
    """n experts drawn as scripts/bench_e2e.py's build_store draws them (w_in then w_out, bf16)."""
    cfg = preset(shape)
    FD = cfg.d_ff * cfg.d_model
    g = torch.Generator().manual_seed(seed)
    t = torch.empty((n, 2 * FD), dtype=torch.float32)
    t[:, :FD].normal_(0.0, cfg.d_model ** -0.5, generator=g)
    t[:, FD:].normal_(0.0, cfg.d_ff ** -0.5, generator=g)
    return t.to(torch.bfloat16)


def checkpoint_rows(path: str, n: int) -> torch.Tensor:
    from infer.engine import load_offloaded

    _, store = load_offloaded(path, "cpu", torch.bfloat16, None)
    rows = store.data.reshape(-1, store.X)
    step = max(1, rows.shape[0] // n)
    return rows[::step][:n].contiguous()


def predict(results: dict, fractions: dict[str, float]) -> dict:
    """Per shape of a bench_e2e JSON whose experts were exp4 (greedy): the floor scaled by bound / exp4, the policies'
    time above it kept."""
    out = {}
    for shape, s in results.get("shapes", {}).items():
        if not isinstance(s, dict) or "runs" not in s or shape not in fractions or s.get("compress") != "exp4":
            continue
        runs = {r["label"].split("/")[-1]: r for r in s["runs"] if r["decoding"] == "greedy"
                and r["label"].startswith("pregated/")}
        if not {"on_demand", "pregated"} <= set(runs):
            continue
        floor = s["floors"]["greedy"]["copy_floor_ms"]
        od, pg = (runs[p]["metrics"]["ms_per_token_median"] for p in ("on_demand", "pregated"))
        new_floor = floor * fractions[shape]
        od2, pg2 = od - floor + new_floor, pg - floor + new_floor
        out[shape] = {"measured": {"copy_floor_ms": floor, "on_demand_ms": od, "pregated_ms": pg,
                                   "on_demand_over_pregated": od / pg},
                      "predicted": {"copy_floor_ms": new_floor, "on_demand_ms": od2, "pregated_ms": pg2,
                                    "on_demand_over_pregated": od2 / pg2}}
    return out


def markdown(res: dict) -> str:
    lines = ["# Exponent entropy of the experts: what a lossless format could still save over exp4", "",
             f"{res['date']}; `{res['command']}`. Fractions of bf16's bytes per expert; entropies in bits per "
             "weight. Bound = 8 bits (sign and mantissa) + the entropy of the exponent below its group's largest, "
             "per weight, + a base byte per group of 128.", "",
             "| experts | rows | exponent below group max | raw exponent | sign + mantissa (of 8) | exp4 | bound | "
             "bound / exp4 |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res["experts"].items():
        lines.append(f"| {name} | {r['rows']} | {r['entropy_below_group_max_bits']:.3f} | "
                     f"{r['entropy_exponent_bits']:.3f} | {r['entropy_sign_mantissa_bits']:.3f} | "
                     f"{r['exp4_fraction']:.3f} | {r['bound_fraction']:.3f} | {r['bound_over_exp4']:.3f} |")
    if res.get("prediction"):
        lines += ["", f"A model, not a measurement (`{res['results']}`, greedy): the copy floor scaled by bound / exp4, "
                  "`on_demand` and `pregated` keeping their time above the floor.", "",
                  "| shape | floor ms | on_demand | pregated | on_demand / pregated | predicted floor | on_demand | "
                  "pregated | on_demand / pregated |", "|---|---|---|---|---|---|---|---|---|"]
        for shape, p in res["prediction"].items():
            m, q = p["measured"], p["predicted"]
            lines.append(f"| {shape} | {m['copy_floor_ms']:.3f} | {m['on_demand_ms']:.3f} | {m['pregated_ms']:.3f} | "
                         f"{m['on_demand_over_pregated']:.3f} | {q['copy_floor_ms']:.3f} | {q['on_demand_ms']:.3f} | "
                         f"{q['pregated_ms']:.3f} | {q['on_demand_over_pregated']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["switch-base-128", "switch-large-128"])
    ap.add_argument("--rows", type=int, default=4, help="experts measured per shape")
    ap.add_argument("--checkpoint", default=None, help="also measure this checkpoint's experts")
    ap.add_argument("--results", default=None, help="a scripts/bench_e2e.py JSON for the prediction")
    ap.add_argument("--out", required=True, help="JSON path (markdown beside it)")
    args = ap.parse_args(argv)
    res = {"command": "python3 scripts/probe_exponent_entropy.py " + " ".join(argv if argv is not None
                                                                                else sys.argv[1:]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
           "experts": {}}
    for shape in args.shapes:
        res["experts"][shape] = exponent_stats(bench_rows(shape, args.rows))
        print(f"[entropy] {shape}: {res['experts'][shape]}", flush=True)
    if args.checkpoint:
        res["experts"][f"checkpoint {args.checkpoint}"] = exponent_stats(checkpoint_rows(args.checkpoint, args.rows))
    if args.results:
        res["results"] = args.results
        fractions = {s: r["bound_over_exp4"] for s, r in res["experts"].items() if s in args.shapes}
        res["prediction"] = predict(json.loads(Path(args.results).read_text()), fractions)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(markdown(res))
    assert all(math.isfinite(r["bound_fraction"]) for r in res["experts"].values())
    return res


if __name__ == "__main__":
    main()
