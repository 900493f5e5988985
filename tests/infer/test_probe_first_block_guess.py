"""scripts/probe_first_block_guess.py on tiny checkpoints the tests create (the embedded docsum task)."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.infer.test_policies import _token_routed_checkpoint
from tests.infer.util import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("probe_fbg", ROOT / "scripts" / "probe_first_block_guess.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def _run(ckpt, out, *extra):
    args = ["--checkpoint", str(ckpt), "--examples", "3", "--profile-examples", "3", "--max-new-tokens", "10",
            "--max-input-tokens", "48", "--out", str(out), "--threads", "1", *extra]
    assert probe.main(args) == 0
    return json.loads(out.with_suffix(".json").read_text())


def test_probe_on_a_token_routed_block(tmp_path):
    """A first decoder MoE block that routes by the token alone: every rule that reads the token is exact where
    it guesses (the embedding's router too), and the bound is 100%; the markdown table is written."""
    res = _run(_token_routed_checkpoint(tmp_path / "tok"), tmp_path / "p", "--inputs", "gold")
    h = res["hit_rate"]
    assert res["outputs"] == 3 and h["positions"] > 3
    for rule in ("embedding", "last_seen_per_output", "last_seen_across", "token_bound"):
        assert h[rule]["precision"] == pytest.approx(1.0), rule
    assert h["embedding"]["coverage"] == h["token_bound"]["coverage"] == 1.0
    assert h["last_seen_per_output"]["coverage"] <= h["last_seen_across"]["coverage"] < 1.0
    md = (tmp_path / "p.md").read_text()
    assert "| last_seen_across |" in md and "coverage" in md


def test_probe_greedy_on_a_random_model(tmp_path):
    """Greedy outputs of a random tiny model: fractions in [0, 1], hits = coverage x precision, the bound at
    least every token-only rule's precision."""
    res = _run(tiny_checkpoint(tmp_path / "ck", pregated=True), tmp_path / "q")
    h = res["hit_rate"]
    for rule in probe.RULES:
        r = h[rule]
        assert 0.0 <= r["coverage"] <= 1.0 and 0.0 <= r["hits"] <= r["coverage"]
        if r["precision"] is not None:
            assert r["hits"] == pytest.approx(r["coverage"] * r["precision"])
    assert h["token_bound"]["precision"] >= h["embedding"]["precision"] - 1e-12
    with pytest.raises(SystemExit, match="no conf/data"):
        probe.main(["--checkpoint", str(tmp_path / "ck"), "--data", "nope", "--out", str(tmp_path / "r")])
