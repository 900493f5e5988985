"""The shipped default model (checkpoints/default/) loads and reproduces the validation metrics
recorded next to it (checkpoints/default/metrics.json, written by scripts/eval_checkpoint.py --write)
through train's own evaluation code, ships in <= 20 MB, and its int8 storage costs little against the
source weights it was made from (scripts/ship_default.py records both). ~40 s on 2 CPU cores."""

import json
import platform
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "checkpoints" / "default"
sys.path.insert(0, str(ROOT / "scripts"))

import eval_checkpoint  # noqa: E402


def test_default_checkpoint_reproduces_recorded_metrics():
    rec = json.loads((CKPT / "metrics.json").read_text())
    # The embedded corpus is the running Python's own standard library: another minor version
    # documents other things, so the validation split differs.
    if rec["python"].rsplit(".", 1)[0] != platform.python_version().rsplit(".", 1)[0]:
        pytest.skip(f"metrics recorded on Python {rec['python']}; the embedded corpus differs on "
                    f"{platform.python_version()}")
    from models.checkpoint import load_switch

    model = load_switch(CKPT)
    assert model.cfg.pregated and any(m.pregate is not None for m in model.moes)
    rec, now, bad = eval_checkpoint.check(CKPT)
    assert not bad, bad
    assert rec["examples"] == now["examples"] > 0
    # the recorded figures are the ones the README quotes: a trained model, not a random one
    assert rec["metrics"]["loss"] < 3.0 and rec["metrics"]["rougeL"] > 1.0
    assert set(rec["metrics"]) == set(now["metrics"])
    # <= 20 MB on disk (the limit for a model that ships with the repository)
    size = sum(p.stat().st_size for p in CKPT.iterdir() if p.is_file())
    assert size <= 20_000_000, size
    # int8 storage: the recorded cost against the source (fp32/bf16) weights is small
    src = rec["source_metrics"]
    assert abs(rec["metrics"]["loss"] - src["loss"]) <= 0.01
    assert abs(rec["metrics"]["rougeL"] - src["rougeL"]) <= 1.0
