"""GPU probe: the decode path's fusions against the operations they replace, on the GPU's own kernels.

- kernels/rmsnorm.py add_rmsnorm (a residual add inside the norm's kernel) against torch's add then rmsnorm():
  bitwise, bf16, widths 768 and 1024, 1 / 4 / 256 rows;
- models.switch.DenseFF over a decode step's rows by the expert FFN's decode kernels against its cuBLAS matrix
  products: each one's error against the fp64 products (random weights of the switch-base-128 and switch-large-128
  shapes, bf16, 1 and 4 rows); the kernels' error must stay within twice cuBLAS's (or 1%).

    python3 scripts/probe_decode_fusions.py --out bench/results/probe-decode-fusions-h200.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.rmsnorm import add_rmsnorm, rmsnorm  # noqa: E402
from models.config import preset  # noqa: E402
from models.switch import DenseFF  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("probe_decode_fusions.py needs a CUDA GPU (the fused kernels' GPU numerics are its subject)")
    g = torch.Generator(device="cuda").manual_seed(0)
    checks: dict[str, object] = {}
    for D in (768, 1024):
        for rows in (1, 4, 256):
            h = torch.randn(rows, D, device="cuda", generator=g).bfloat16()
            y = torch.randn(rows, D, device="cuda", generator=g).bfloat16()
            w = (1 + 0.1 * torch.randn(D, device="cuda", generator=g)).bfloat16()
            s, o = add_rmsnorm(h, y, w, 1e-6)
            checks[f"add_rmsnorm D{D} rows{rows} bitwise"] = bool(
                torch.equal(s, h + y) and torch.equal(o, rmsnorm(h + y, w, 1e-6)))
    for name in ("switch-base-128", "switch-large-128"):
        cfg = preset(name)
        ff = DenseFF(cfg).cuda().bfloat16().eval()
        torch.nn.init.normal_(ff.wi.weight, std=cfg.d_model ** -0.5)
        torch.nn.init.normal_(ff.wo.weight, std=cfg.d_ff ** -0.5)
        for rows in (1, 4):
            x = torch.randn(rows, 1, cfg.d_model, device="cuda", generator=g).bfloat16()
            with torch.no_grad():
                if not ff.decode_kernels(x):
                    raise SystemExit("DenseFF.decode_kernels is off (PGMOE_DENSE_KERNEL=0?): nothing to probe")
                got = ff(x)
                ref = torch.relu(x.double() @ ff.wi.weight.double().t()) @ ff.wo.weight.double().t()
                mm = ff.wo(torch.relu(ff.wi(x)))

            def err(a):
                return ((a.double() - ref).norm() / ref.norm()).item()

            checks[f"dense {name} rows{rows} rel err: decode kernels, cuBLAS"] = [err(got), err(mm)]
    bad = [k for k, v in checks.items()
           if v is False or (isinstance(v, list) and v[0] > max(0.01, 2 * v[1]))]
    out = {"command": "python3 " + " ".join(sys.argv), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
           "torch": torch.__version__, "device": torch.cuda.get_device_name(), "checks": checks,
           "failed": bad}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
