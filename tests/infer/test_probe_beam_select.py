"""scripts/probe_beam_select.py on the CPU (its smoke-test mode): every piece runs and is reported."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import probe_beam_select as pbs  # noqa: E402


def test_probe_beam_select_runs_on_the_cpu(tmp_path):
    out = tmp_path / "p.json"
    res = pbs.main(["--out", str(out), "--shapes", "tiny", "--positions", "8", "--reps", "2", "--beams", "3",
                    "--batch", "2"])
    (row,) = res["rows"]
    assert row["batch"] == 2 and row["num_beams"] == 3
    for key in ("select_us", "select_reorder_us", "reorder_self_us", "reorder_self_gather_us",
                "reorder_self_per_block_us", "reorder_all_us", "greedy_select_us", "candidates_ops_us"):
        assert row[key] > 0
    # both caches hold (layers x 2) tensors of [rows, heads, positions, d_kv] in fp32 on the CPU
    assert row["self_cache_bytes"] == row["cross_cache_bytes"] > 0
    assert json.loads(out.read_text())["meta"]["command"].startswith("python3 scripts/probe_beam_select.py")
    md = out.with_suffix(".md").read_text()
    assert "| tiny | 2 x 3 |" in md and "CPU smoke test" in md


def test_probe_state_is_laid_out_as_prefill_makes_it():
    """The probe's state keeps the self caches in one buffer (what Switch.prefill does), and the per-block one
    reorders to the same values."""
    import torch

    from models.config import preset

    cfg = preset("tiny")
    one = pbs.make_state(cfg, 4, 6, 5, torch.device("cpu"), torch.float32)
    per = pbs.make_state(cfg, 4, 6, 5, torch.device("cpu"), torch.float32, one_buffer=False)
    assert one.self_kv is not None and per.self_kv is None
    assert one.self_k[1].data_ptr() == one.self_kv[0, 1].data_ptr()
    for a, b in zip((*per.self_k, *per.self_v), (*one.self_k, *one.self_v)):
        a.copy_(b)
    index = torch.tensor([3, 0, 0, 1])
    one.reorder(index, cross=False)
    per.reorder(index, cross=False)
    assert all(torch.equal(a, b) for a, b in zip((*per.self_k, *per.self_v), (*one.self_k, *one.self_v)))
