"""scripts/bench_train_dp.py: its CPU smoke mode runs the 1-process and 2-process (gloo DDP) fine-tunes
and writes the scaling and loss-curve agreement; the agreement check fails on curves that differ."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_train_dp", ROOT / "scripts" / "bench_train_dp.py")
dp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dp)


def test_agreement_accepts_equal_and_rejects_differing_curves():
    c = [(10, 6.0), (20, 5.0), (30, 4.5), (40, 4.2), (50, 4.0), (60, 3.9)]
    assert dp.agreement(c, c)["agree"]
    near = [(s, v * 1.005) for s, v in c]
    assert dp.agreement(c, near)["agree"]
    spike = [(s, v * (1.05 if s == 20 else 1.0)) for s, v in c]  # one point 5% off
    r = dp.agreement(c, spike)
    assert not r["agree"] and r["max_rel_diff_at"] == 20
    drift = [(s, v * (1.015 if s >= 20 else 1.0)) for s, v in c]  # the tail 1.5% off
    assert not dp.agreement(c, drift)["agree"]
    assert not dp.agreement(c, [(5, 1.0)])["agree"]  # no common step


def test_windows_skip_the_warmup():
    m = {"history": [{"split": "train", "step": s, "tokens_per_s": float(s)} for s in (10, 20, 30)]
         + [{"split": "validation", "step": 30, "loss": 1.0}]}
    assert dp.windows(m, 10) == [20.0, 30.0]


def test_cpu_smoke_one_vs_two_processes(tmp_path):
    out = tmp_path / "dp.json"
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_train_dp.py"), "--tiny", "--runs", "one", "two",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert set(rep["runs"]) == {"one", "two"}
    for r in rep["runs"].values():
        assert r["rc"] == 0 and r["steps"] == 6 and r["tokens_per_s_median"] > 0
        # where the step time went (train/loop.py's history): both phases measured
        assert r["fwd_bwd_s_median"] > 0 and r["optim_s_median"] > 0
    assert rep["runs"]["two"]["nproc"] == 2 and "--nproc_per_node=2" in rep["runs"]["two"]["command"]
    # same micro-batches, deterministic model: gloo's sums agree to rounding
    a = rep["agreement_one_vs_two"]
    assert a["agree"] and a["max_rel_diff"] < 1e-4 and a["steps"] == [2, 4, 6]
    assert rep["scaling_two"]["ratio"] > 0 and rep["scaling_two"]["target"] == 1.8
    est = rep["memory_estimates"]["tiny"]
    assert est["full_adamw_ddp_gb"] == 2 * est["full_adamw_fsdp_gb"] > 0
