"""scripts/probe_policy_equality.py on the tiny model (CPU): every comparison it makes, its JSON and markdown, and
its pieces: bitwise comparison that tells -0.0 from 0.0, the logits' argmax flips with gpu_only's margin."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("probe_policy_equality_for_test",
                                                  ROOT / "scripts" / "probe_policy_equality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_logits_and_calls():
    p = _script()
    a = [torch.tensor([[1.0, 2.0, 1.5], [0.0, 3.0, 2.999]])]
    b = [torch.tensor([[1.0, 2.0, 1.5], [0.0, 2.998, 2.999]])]
    c = p.compare_logits(a, b)
    assert c["bitwise_equal_steps"] == 0 and abs(c["max_abs_logit_diff"] - 0.002) < 1e-6
    (flip,) = c["argmax_flips"]
    assert (flip["step"], flip["row"], flip["gpu_only_argmax"], flip["policy_argmax"]) == (0, 1, 1, 2)
    assert abs(flip["gpu_only_top2_margin"] - 0.001) < 1e-5
    assert p.compare_logits(a, a)["bitwise_equal_steps"] == 1
    zeros = [("x", torch.zeros(3))]
    signed = [("x", torch.tensor([0.0, -0.0, 0.0]))]
    d = p.compare_calls(zeros, signed)  # equal values, different bits: a difference with 0 elements differing
    assert d["calls_differing"] == 1 and d["first_difference"]["elements_differing"] == 0
    assert p.compare_calls(zeros, zeros)["first_difference"] is None
    assert "error" in p.compare_calls(zeros, [("y", torch.zeros(3))])


def test_tiny_run_and_markdown(tmp_path):
    out = tmp_path / "probe.json"
    run = subprocess.run(
        [sys.executable, "scripts/probe_policy_equality.py", "--shape", "tiny", "--batch", "2", "--input-tokens", "8",
         "--new-tokens", "3", "--policies", "on_demand,pregated", "--op-determinism", "--blocking-copy-check",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(out.read_text())
    for mode in ("graph", "eager"):  # on the CPU there is no graph; both modes run the same eager step
        for name in ("on_demand", "pregated"):
            e = r["modes"][mode][name]
            assert e["logits"]["bitwise_equal_steps"] == e["logits"]["steps"] == 3
            assert e["predictions_differing"] == 0
    hooks = r["modes"]["eager"]["gpu_only_repeat"]["hooks"]
    assert hooks["calls"] > hooks["encoder_calls"] > 0 and hooks["calls_differing"] == 0
    assert r["blocking_copy_check"]["failed"] is False  # no dma copier on the CPU
    assert r["op_determinism"]["linear_o"] == 1
    md = out.with_suffix(".md").read_text()
    assert "| graph | on_demand | 3 / 3 |" in md and "gpu_only (second run)" in md
    again = tmp_path / "both.md"
    subprocess.run([sys.executable, "scripts/probe_policy_equality.py", "--md-from", str(out), str(out), "--out",
                    str(again)], cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert again.read_text().count("## `probe.json`") == 2
