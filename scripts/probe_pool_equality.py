"""GPU probe: does the expert FFN give bitwise the same rows when the experts are read from a slot pool (the
offload runner's layout: [P, X] rows, strided views, a slot table) as from resident [E, F, D] / [E, D, F]
tensors (gpu_only's), and the same rows when called twice? Per token count T (switch-base-128's shapes, bf16,
top-1, random data). Writes JSON with the command.

    python3 scripts/probe_pool_equality.py --out bench/results/probe-pool-equality-h200.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.expert_ffn import expert_ffn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,4,16,32,64,256")
    ap.add_argument("--E", type=int, default=128)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--F", type=int, default=3072)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "probe-pool-equality.json"))
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    E, d, F = args.E, args.d, args.F
    w_in = (torch.randn(E, F, d, generator=g) * d**-0.5).to(dtype).to(dev)
    w_out = (torch.randn(E, d, F, generator=g) * F**-0.5).to(dtype).to(dev)
    rows = []
    for T in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(T, d, generator=g).to(dtype).to(dev)
        ids = torch.randint(0, E, (T, 1), generator=g, dtype=torch.int32).to(dev)
        wts = torch.rand(T, 1, generator=g).to(dev)
        used = ids.unique()
        P = used.numel() + 3
        pool = torch.zeros(P, 2 * F * d, dtype=dtype, device=dev)  # [P, X]: w_in rows, then w_out rows
        slot = torch.zeros(E, dtype=torch.int32, device=dev)
        perm = torch.randperm(P, generator=g)[: used.numel()].to(dev)  # experts in scattered slots
        for j, e in enumerate(used.tolist()):
            p = int(perm[j])
            pool[p, : F * d] = w_in[e].reshape(-1)
            pool[p, F * d :] = w_out[e].reshape(-1)
            slot[e] = p
        pin, pout = pool[:, : F * d].view(P, F, d), pool[:, F * d :].view(P, d, F)
        y_res = expert_ffn(x, w_in, w_out, ids, wts)
        y_res2 = expert_ffn(x, w_in, w_out, ids, wts)
        y_pool = expert_ffn(x, pin, pout, ids, wts, slot_of_expert=slot)
        ref = torch.stack([wts[t, 0] * (w_out[ids[t, 0]].float() @ torch.relu(w_in[ids[t, 0]].float() @ x[t].float()))
                           for t in range(T)])
        row = {"T": T, "pool_equal_bitwise": bool(torch.equal(y_res, y_pool)),
               "repeat_equal_bitwise": bool(torch.equal(y_res, y_res2)),
               "rows_differing": int((y_res != y_pool).any(-1).sum()),
               "max_abs_diff": float((y_res.float() - y_pool.float()).abs().max()),
               "rel_err_vs_fp32": float((y_res.float() - ref).norm() / ref.norm())}
        print(row, flush=True)
        rows.append(row)
    res = {"command": "python3 " + " ".join(sys.argv), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
           "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
           "shape": {"E": E, "d": d, "F": F}, "dtype": str(dtype), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
