"""scripts/probe_exponent_entropy.py on small experts: the bound below exp4's bytes, the prediction's arithmetic."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import probe_exponent_entropy as pee  # noqa: E402


def test_exponent_stats_of_normal_weights():
    """Normal weights: sign and mantissa near 8 bits of entropy, the exponent below its group's largest ~2.5-2.7
    bits, so the bound sits below exp4 (which spends 4 bits plus exceptions on it)."""
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(2, 64 * 1024, generator=g) * 0.03).to(torch.bfloat16)
    r = pee.exponent_stats(rows)
    assert 7.9 < r["entropy_sign_mantissa_bits"] <= 8.0
    assert 2.3 < r["entropy_below_group_max_bits"] < 2.9
    assert r["bound_fraction"] == pytest.approx((8 + r["entropy_below_group_max_bits"]) / 16 + 1 / 256, rel=1e-9)
    assert r["bound_fraction"] < r["exp4_fraction"] < 0.8
    # one exponent everywhere (weights +-1.5): no entropy left, the bound is sign + mantissa + the bases
    flat = torch.where(torch.rand(1, 4096, generator=g) < 0.5, 1.5, -1.5).to(torch.bfloat16)
    assert pee.exponent_stats(flat)["entropy_below_group_max_bits"] == 0.0


def test_probe_runs_and_predicts(tmp_path):
    results = {"shapes": {"tiny": {"compress": "exp4", "floors": {"greedy": {"copy_floor_ms": 2.0}}, "runs": [
        {"label": "pregated/greedy/on_demand", "decoding": "greedy", "metrics": {"ms_per_token_median": 4.0}},
        {"label": "pregated/greedy/pregated", "decoding": "greedy", "metrics": {"ms_per_token_median": 2.2}}]}}}
    (tmp_path / "r.json").write_text(json.dumps(results))
    out = tmp_path / "p.json"
    res = pee.main(["--shapes", "tiny", "--rows", "2", "--results", str(tmp_path / "r.json"), "--out", str(out)])
    f = res["experts"]["tiny"]["bound_over_exp4"]
    assert 0.5 < f < 1.0
    p = res["prediction"]["tiny"]["predicted"]
    assert p["copy_floor_ms"] == pytest.approx(2.0 * f)
    assert p["on_demand_ms"] - p["copy_floor_ms"] == pytest.approx(2.0)  # the time above the floor kept
    assert p["pregated_ms"] - p["copy_floor_ms"] == pytest.approx(0.2)
    assert json.loads(out.read_text())["command"].startswith("python3 scripts/probe_exponent_entropy.py")
    assert "| tiny | 2 |" in out.with_suffix(".md").read_text()
